"""``$calibrate`` over real HTTP: the twin evolves as data arrive (new twin-state versions with
Provenance, narrower forecasts) and stays put when nothing new arrived."""
from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest
import requests

from fhir_ops import conformance
from tests.fhir_ops.operations.twin_client import HEADERS, entries, error_id, issue_text, params, simulate, single

pytestmark = pytest.mark.api

PARTICIPANT = "tt201-p029"  # 100 mg arm, enrolled late: few visits so far


def calibrate(base: str, pid: str, body: dict | None = None) -> requests.Response:
    return requests.post(f"{base}/Patient/{pid}/$calibrate", json=body or params(), headers=HEADERS, timeout=120)


def widths(body: dict) -> dict[str, float]:
    rows = entries(body, "forecast")
    return {o: float(np.mean([r["high"] - r["low"] for r in rows if r["output"] == o]))
            for o in ("concentration", "fpg", "hba1c")}


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _fmt(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def new_data(pid: str, forecast: dict, days: int = 14) -> dict:
    """A transaction of the next ``days`` daily doses and visit results on days 7 and 14.

    The values are what the current twin forecast (its medians), so the new data are plausible
    for this participant; they carry information all the same and narrow the posterior.
    """
    rows = entries(forecast, "forecast")
    start = _instant(min(r["time"] for r in rows))
    entry = []
    for k in range(days + 1):
        entry.append({"resource": {
            "resourceType": "MedicationAdministration", "status": "completed",
            "medicationCodeableConcept": {"coding": [{"system": "https://trialtwin.org/fhir/CodeSystem/investigational-product",
                                                      "code": "TTX-101"}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": _fmt(start + timedelta(days=k)),
            "dosage": {"dose": {"value": 100, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}},
            "request": {"method": "POST", "url": "MedicationAdministration"}})
    codes = {"concentration": ("https://trialtwin.org/fhir/CodeSystem/assay", "TTX101-PK", "ng/mL"),
             "fpg": ("http://loinc.org", "1558-6", "mg/dL"), "hba1c": ("http://loinc.org", "4548-4", "%")}
    for day in (7, days):
        for r in rows:
            if r["day"] != day:
                continue
            system, code, unit = codes[r["output"]]
            entry.append({"resource": {
                "resourceType": "Observation", "status": "final", "code": {"coding": [{"system": system, "code": code}]},
                "subject": {"reference": f"Patient/{pid}"},
                # just before that day's dose: a trough sample and fasting labs
                "effectiveDateTime": _fmt(_instant(r["time"]) - timedelta(minutes=5)),
                "valueQuantity": {"value": round(r["median"], 2), "unit": unit, "system": "http://unitsofmeasure.org",
                                  "code": unit}},
                "request": {"method": "POST", "url": "Observation"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entry}


def test_new_observations_give_a_new_twin_version_with_a_narrower_forecast(twin_server):
    base, _ = twin_server
    first = calibrate(base, PARTICIPANT)
    assert first.status_code == 200, first.text
    body = first.json()
    assert single(body, "changed") is True
    v1 = single(body, "twinState")["reference"]
    assert v1 == f"Basic/twin-{PARTICIPANT}/_history/1"
    assert single(body, "newObservations") == single(body, "observationsUsed") > 0
    assert single(body, "modelVersion") == "https://trialtwin.org/fhir/Library/tt201-twin|1.1.0"
    names = [p["name"] for p in entries(body, "parameter")]
    assert names == ["CL", "V", "KA", "EMAX", "EC50", "HBA1C0", "FPG0DEV"]  # the definition's variable parameters
    assert all(p["low"] < p["mean"] < p["high"] for p in entries(body, "parameter") if p["name"] != "FPG0DEV")

    before = simulate(base, f"Patient/{PARTICIPANT}", params(horizonDays=28, samples=2000, seed=1)).json()
    assert single(before, "twinState")["reference"] == v1  # the stored state is reused

    posted = requests.post(base, json=new_data(PARTICIPANT, before), headers=HEADERS, timeout=60)
    assert posted.status_code == 200, posted.text
    second = calibrate(base, PARTICIPANT).json()
    assert single(second, "changed") is True
    assert single(second, "newObservations") == 6
    assert single(second, "observationsUsed") == single(body, "observationsUsed") + 6
    v2 = single(second, "twinState")["reference"]
    assert v2 == f"Basic/twin-{PARTICIPANT}/_history/2"

    history = requests.get(f"{base}/Basic/twin-{PARTICIPANT}/_history", timeout=30).json()
    assert history["total"] == 2
    versions = [requests.get(f"{base}/{ref}", timeout=30).json() for ref in (v1, v2)]
    for state in versions:
        assert conformance.check(state) == []
    used = [len([e for e in s["extension"] if e["url"].endswith("/twin-calibrated-on")]) for s in versions]
    assert used[1] == used[0] + 6 + 15  # six results and fifteen doses
    provenance = requests.get(f"{base}/{single(second, 'provenance')['reference']}", timeout=30).json()
    assert [t["reference"] for t in provenance["target"]] == [v2]
    assert conformance.check(provenance) == []

    after = simulate(base, f"Patient/{PARTICIPANT}", params(horizonDays=28, samples=2000, seed=1)).json()
    assert single(after, "twinState")["reference"] == v2
    assert min(r["time"] for r in entries(after, "forecast")) > max(r["time"] for r in entries(before, "forecast")
                                                                      if r["day"] <= 14)
    w_before, w_after = widths(before), widths(after)
    assert w_after["concentration"] < w_before["concentration"]
    assert w_after["hba1c"] < w_before["hba1c"]
    assert sum(w_after[o] / w_before[o] for o in w_after) < 3.0


def test_calibrate_without_new_data_leaves_the_state_unchanged(twin_server):
    base, _ = twin_server
    pid = "tt201-p010"
    first = calibrate(base, pid).json()
    again = calibrate(base, pid)
    assert again.status_code == 200
    body = again.json()
    assert single(body, "changed") is False and single(body, "newObservations") == 0
    assert single(body, "twinState") == single(first, "twinState")
    assert single(body, "provenance") is None
    assert requests.get(f"{base}/Basic/twin-{pid}/_history", timeout=30).json()["total"] == 1
    forced = calibrate(base, pid, params(force=True)).json()
    assert single(forced, "changed") is True
    assert single(forced, "twinState")["reference"] == f"Basic/twin-{pid}/_history/2"


def test_calibrate_errors(twin_server):
    base, _ = twin_server
    resp = requests.get(f"{base}/Patient/{PARTICIPANT}/$calibrate", timeout=30)
    assert resp.status_code == 405 and resp.headers["Allow"] == "POST"
    resp = calibrate(base, PARTICIPANT, params(force="yes"))
    assert resp.status_code == 400 and error_id(resp) == "wrong-type" and "force" in issue_text(resp)
    resp = calibrate(base, PARTICIPANT, params(horizonDays=7))
    assert resp.status_code == 400 and error_id(resp) == "unknown-parameter"
    resp = requests.post(f"{base}/Group/whatever/$calibrate", json=params(), headers=HEADERS, timeout=30)
    assert 400 <= resp.status_code < 500 and "$calibrate" in issue_text(resp)
    patient = requests.post(f"{base}/Patient", json={"resourceType": "Patient"}, headers=HEADERS, timeout=30).json()
    resp = calibrate(base, patient["id"])
    assert resp.status_code == 422 and error_id(resp) == "participant-without-study"


def test_concurrent_first_calibrations_write_one_consistent_history(twin_server):
    """Two first calibrations of one participant at once: one writes version 1, the other finds it
    (changed=false), and every Provenance target names a version that exists with that content."""
    from concurrent.futures import ThreadPoolExecutor

    base, _ = twin_server
    pid = "tt201-p012"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: calibrate(base, pid).json(), range(2)))
    assert sorted(single(r, "changed") for r in results) == [False, True]
    assert {single(r, "twinState")["reference"] for r in results} == {f"Basic/twin-{pid}/_history/1"}
    assert requests.get(f"{base}/Basic/twin-{pid}/_history", timeout=30).json()["total"] == 1


def test_a_deleted_twin_state_is_recalibrated_as_its_next_version(twin_server):
    base, _ = twin_server
    pid = "tt201-p014"
    assert single(calibrate(base, pid).json(), "twinState")["reference"] == f"Basic/twin-{pid}/_history/1"
    assert requests.delete(f"{base}/Basic/twin-{pid}", timeout=30).status_code in (200, 204)
    again = calibrate(base, pid).json()
    assert single(again, "changed") is True
    ref = single(again, "twinState")["reference"]
    assert ref == f"Basic/twin-{pid}/_history/3"  # 2 is the deletion
    provenance = requests.get(f"{base}/{single(again, 'provenance')['reference']}", timeout=30).json()
    assert provenance["target"][0]["reference"] == ref
    assert requests.get(f"{base}/{ref}", timeout=30).json()["meta"]["versionId"] == "3"
