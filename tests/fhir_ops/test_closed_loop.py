"""The closed loop over real HTTP: a new HbA1c gives a new twin-state version, with no other call."""
from __future__ import annotations

import time

import pytest

from fhir_ops.app import create_app
from fhir_ops.closed_loop import CLOSED_LOOP_EXTENSION
from fhir_ops.demo import ensure_demo_study
from fhir_ops.store.sqlite import SQLiteStore
from tests.app_config import open_config
from tests.fhir_ops.conftest import FhirClient
from tests.live_server import serve

pytestmark = pytest.mark.api
BOUND_SECONDS = 60  # debounce 0.2 s + one calibration (~1 s quiet) on a busy shared machine


@pytest.fixture(scope="module")
def loop_server(tmp_path_factory):
    """A 30-participant TT-201 study loaded before the server starts, then served with the loop on."""
    data_dir = tmp_path_factory.mktemp("loop")
    store = SQLiteStore(str(data_dir / "trialtwin.sqlite"))
    ensure_demo_study(store, participants=30, seed=7)
    app = create_app(open_config(STORE=store, DATA_DIR=str(data_dir), CLOSED_LOOP=True, CLOSED_LOOP_DEBOUNCE=0.2,
                                 CLOSED_LOOP_POLL=0.1))
    with serve(app) as base:
        yield FhirClient(base + "/fhir"), app.extensions["trialtwin.closed_loop"]
    app.extensions["trialtwin.closed_loop"].stop()
    store.close()


def hba1c(pid: str, value: float, when: str) -> dict:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}


def decision_for(loop, ref: str, timeout: float = BOUND_SECONDS) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in list(loop.log):
            if ref in entry["trigger"]:
                return entry
        time.sleep(0.05)
    raise AssertionError(f"the closed loop did not act on {ref} within {timeout} s")


def twin_version(fhir: FhirClient, pid: str) -> int:
    resp = fhir.get(f"Basic/twin-{pid}")
    return int(resp.json()["meta"]["versionId"]) if resp.status_code == 200 else 0


def test_a_new_hba1c_gives_a_new_twin_version_whose_provenance_names_it(loop_server):
    fhir, loop = loop_server
    pid = "tt201-p029"
    before = twin_version(fhir, pid)
    t0 = time.monotonic()
    obs = fhir.post("Observation", hba1c(pid, 7.9, "2026-11-19T08:00:00Z")).json()
    ref = f"Observation/{obs['id']}/_history/{obs['meta']['versionId']}"
    entry = decision_for(loop, ref)
    assert entry["decision"] == "recalibrated", entry
    assert time.monotonic() - t0 < BOUND_SECONDS
    assert twin_version(fhir, pid) == before + 1
    state_ref = entry["twinState"]
    assert state_ref == f"Basic/twin-{pid}/_history/{before + 1}"
    prov = fhir.get(entry["provenance"]).json()
    assert prov["target"] == [{"reference": state_ref}]
    assert ref in [e["what"]["reference"] for e in prov["entity"]]
    # and the changed twin's forecast is stored, its Provenance naming that twin-state version
    forecast = entry["forecast"]
    assert forecast["decision"] == "stored" and forecast["observations"] > 0, forecast
    forecast_prov = fhir.get(forecast["provenance"]).json()
    assert state_ref in [e["what"]["reference"] for e in forecast_prov["entity"]]
    assert len(forecast_prov["target"]) == forecast["observations"]
    first = fhir.get(forecast_prov["target"][0]["reference"]).json()
    assert first["resourceType"] == "Observation" and first["subject"]["reference"] == f"Patient/{pid}"


def risk_assessments(fhir: FhirClient, pid: str) -> list[dict]:
    bundle = fhir.get("RiskAssessment", params={"subject": f"Patient/{pid}", "_count": "100"}).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def test_new_data_re_assess_the_dropout_risk(loop_server):
    # each arrival: a new RiskAssessment of the participant (outreach Task refresh: $predict-dropout's own tests)
    fhir, loop = loop_server
    pid = "tt201-p023"  # on study, next visit 2026-12-16 in this generated study
    before = {r["id"] for r in risk_assessments(fhir, pid)}
    refs = []
    for value, when in ((8.1, "2026-11-20T08:00:00Z"), (8.0, "2026-11-21T08:00:00Z")):
        obs = fhir.post("Observation", hba1c(pid, value, when)).json()
        refs.append(f"Observation/{obs['id']}/_history/{obs['meta']['versionId']}")
        entry = decision_for(loop, refs[-1])
        assert entry["decision"] in ("recalibrated", "unchanged"), entry
        dropout = entry["dropout"]
        assert dropout["decision"] == "assessed", dropout
        assert 0.0 <= dropout["probability"] <= 1.0
        stored = fhir.get(dropout["riskAssessment"]).json()
        assert stored["resourceType"] == "RiskAssessment" and stored["subject"]["reference"] == f"Patient/{pid}"
        assert stored["id"] not in before
        before.add(stored["id"])


def test_the_study_switch_turns_the_loop_off_and_on_again(loop_server):
    fhir, loop = loop_server
    pid = "tt201-p012"
    study = fhir.get("ResearchStudy/tt-201").json()
    off = {**study, "extension": [*study.get("extension", []), {"url": CLOSED_LOOP_EXTENSION, "valueBoolean": False}]}
    assert fhir.put("ResearchStudy/tt-201", off).status_code == 200
    try:
        before = twin_version(fhir, pid)
        obs = fhir.post("Observation", hba1c(pid, 8.1, "2026-11-19T08:00:00Z")).json()
        entry = decision_for(loop, f"Observation/{obs['id']}/_history/1")
        assert entry["decision"] == "skipped: ResearchStudy/tt-201 turns the closed loop off"
        assert twin_version(fhir, pid) == before
    finally:
        fhir.put("ResearchStudy/tt-201", study)
    obs = fhir.post("Observation", hba1c(pid, 8.0, "2026-11-19T09:00:00Z")).json()
    entry = decision_for(loop, f"Observation/{obs['id']}/_history/1")
    assert entry["decision"] == "recalibrated" and twin_version(fhir, pid) == before + 1


def test_a_burst_of_results_is_one_recalibration_and_forecasts_do_not_trigger_it(loop_server):
    fhir, loop = loop_server
    pid = "tt201-p020"
    before = twin_version(fhir, pid)
    refs = []
    resp = fhir.transaction([{"resource": hba1c(pid, 7.0 + k / 10, f"2026-11-1{k}T08:00:00Z"),
                              "request": {"method": "POST", "url": "Observation"}} for k in range(3)])
    for e in resp.json()["entry"]:
        refs.append(e["response"]["location"].split("/fhir/")[-1] if "/fhir/" in e["response"]["location"]
                    else e["response"]["location"])
    entry = decision_for(loop, refs[0])
    assert sorted(entry["trigger"]) == sorted(refs)
    assert twin_version(fhir, pid) == before + 1
    # a simulated forecast of the same participant is not data: no recalibration
    n = len(loop.log)
    forecast = {**hba1c(pid, 7.5, "2026-12-20T08:00:00Z"),
                "meta": {"tag": [{"system": "https://trialtwin.org/fhir/CodeSystem/trialtwin", "code": "simulated"}]}}
    fhir.post("Observation", forecast)
    marker = fhir.post("Observation", hba1c("tt201-p021", 7.2, "2026-11-19T08:00:00Z")).json()
    decision_for(loop, f"Observation/{marker['id']}/_history/1")
    assert [e["patient"] for e in loop.log[n:]] == ["tt201-p021"]


def test_a_result_arriving_over_hl7_v2_closes_the_loop_too(loop_server):
    import hl7

    from fhir_ops.connectors.hl7v2 import Hl7Ingest
    from fhir_ops.connectors.mllp import MllpClient, MllpServer
    from tests.fhir_ops.connectors.hl7_messages import obx, oru

    fhir, loop = loop_server
    pid = "tt201-p005"
    before = twin_version(fhir, pid)
    ingest = Hl7Ingest(loop.store)
    server = MllpServer(("127.0.0.1", 0), ingest.handle)
    server.start()
    try:
        with MllpClient("127.0.0.1", server.server_address[1]) as client:
            ack = hl7.parse(client.send(oru("LOOP1", "TT201-005", obx(1, "LAB-HBA1C", "7.7", "%^^UCUM",
                                                                        when="20261119080000"))))
    finally:
        server.shutdown()
        server.server_close()
        ingest.close()
    assert str(ack.segment("MSA")[1]) == "AA", str(ack)
    [obs] = [r for r in (e["resource"] for e in fhir.get(
        f"Observation?subject=Patient/{pid}&identifier=https://trialtwin.org/fhir/sid/hl7v2-message/CENTRAL-LAB|LOOP1-1-1"
    ).json()["entry"])]
    entry = decision_for(loop, f"Observation/{obs['id']}/_history/1")
    assert entry["decision"] == "recalibrated" and twin_version(fhir, pid) == before + 1
