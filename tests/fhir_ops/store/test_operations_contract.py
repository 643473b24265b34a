"""TrialTwin's operations served by the FHIR app over each store: the same HTTP answers, the same stored outputs.

Every test runs once on the embedded store and once on HAPI (``store`` fixture); outputs are read back
from the store itself. Ids, codes and map URLs are unique per test, so HAPI needs no reset between tests.
No assertion depends on the store: where the stores differ (server-assigned ids, meta.source, no-op
updates; see RemoteStore) the operations do not look. The one difference these tests found, HAPI
dropping ``/_history/n`` from stored references, is fixed in TrialTwin's HAPI server (hapi/README.md).
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

import pytest

from fhir_ops.conformance import check
from inference.dropout_risk import assess_dropout_risk
from inference.service import InferenceService
from terminology import workflow
from terminology.catalog import LOINC, MDC
from tests.fhir_ops.test_predict_dropout import AS_OF, AS_OF_DAY, high_risk, low_risk, parameters

pytestmark = pytest.mark.api

CANONICAL = "https://trialtwin.org/fhir/"


def _tag() -> str:
    return uuid.uuid4().hex[:10]


def value(body: dict, name: str):
    """The value (or resource, or parts) of the first output parameter called ``name``."""
    parts = body.get("parameter") or body.get("part") or []
    for p in parts:
        if p["name"] == name:
            if "resource" in p:
                return p["resource"]
            if "part" in p:
                return p
            return next(v for k, v in p.items() if k.startswith("value"))
    return None


def matches(bundle_or_result) -> list[dict]:
    return list(bundle_or_result.matches)


# ----------------------------------------------------------------------------------------- $validate

def test_validate_type_level_valid_and_invalid(client):
    good = client.post("Patient/$validate", {"resourceType": "Patient", "birthDate": "1970-01-02"})
    assert good.status_code == 200, good.text
    assert [i["severity"] for i in good.json()["issue"]] == ["information"]
    bad = client.post("Patient/$validate", {"resourceType": "Patient", "birthDate": "1970-13-02"})
    assert bad.status_code == 200 and bad.json()["resourceType"] == "OperationOutcome"
    assert any(i["severity"] == "error" and "birthDate" in json.dumps(i) for i in bad.json()["issue"])


def test_validate_instance_level_reads_the_stored_resource(client, store):
    stored = store.create({"resourceType": "Observation", "status": "final",
                           "code": {"coding": [{"system": LOINC, "code": "4548-4"}]},
                           "valueQuantity": {"value": 7.1, "unit": "%"}}).resource
    answer = client.post(f"Observation/{stored['id']}/$validate", {"resourceType": "Parameters", "parameter": []})
    assert answer.status_code == 200, answer.text
    assert answer.json()["issue"][0]["severity"] == "information"
    # mode=delete on an id the store never had is the store's NotFound, rendered the same on both
    missing = client.post(f"Observation/missing-{_tag()}/$validate", {"resourceType": "Parameters", "parameter": [
        {"name": "mode", "valueCode": "delete"}]})
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"


# ---------------------------------------------------------------------------------------- terminology

def _map_csv(source: str, rows: list[tuple[str, str]]) -> str:
    return "source_system,source_code,target_system,target_code,equivalence\n" + "".join(
        f"{source},{code},{LOINC},{target},equivalent\n" for code, target in rows)


def _import(client, url: str, version: str, csv_text: str):
    return client.post("ConceptMap/$import-map", {"resourceType": "Parameters", "parameter": [
        {"name": "csv", "valueString": csv_text}, {"name": "url", "valueUri": url},
        {"name": "version", "valueString": version}]})


def _translated(client, source: str, code: str, **extra) -> list[str]:
    out = client.get("ConceptMap/$translate", params={"system": source, "code": code, **extra})
    assert out.status_code == 200, out.text
    return [next(p for p in m["part"] if p["name"] == "concept")["valueCoding"]["code"]
            for m in out.json()["parameter"] if m["name"] == "match"]


def test_translate_uses_the_shipped_maps_on_an_empty_store(client):
    # no map stored yet on the embedded store; on HAPI other tests' maps are active, but none maps MDC
    assert _translated(client, MDC, "147842") == ["8867-4"]


def test_import_map_stores_a_draft_and_its_audit_event(client, store):
    tag = _tag()
    url, source = f"{CANONICAL}test/ConceptMap/{tag}", f"urn:trialtwin:contract:{tag}"
    answer = _import(client, url, "1.0.0", _map_csv(source, [("A1C", "4548-4")]))
    assert answer.status_code == 201, answer.text
    draft = answer.json()
    assert answer.headers["Location"].endswith(f"/ConceptMap/{draft['id']}/_history/{draft['meta']['versionId']}")
    stored = store.read("ConceptMap", draft["id"])
    assert (stored["url"], stored["version"], stored["status"]) == (url, "1.0.0", "draft")
    audits = [a for a in matches(store.search("AuditEvent", [("entity-name", f"{url}|1.0.0")]))
              if a["entity"][0]["name"] == f"{url}|1.0.0"]
    assert [a["subtype"][0]["code"] for a in audits] == ["import"]
    assert audits[0]["entity"][0]["what"] == {"reference": f"ConceptMap/{draft['id']}"}
    # a draft is not in force, but can be tried by naming its version
    assert _translated(client, source, "A1C") == []
    assert _translated(client, source, "A1C", url=url, conceptMapVersion="1.0.0") == ["4548-4"]
    # the same version again is refused and nothing more is stored
    assert _import(client, url, "1.0.0", _map_csv(source, [("A1C", "4548-4")])).status_code == 409
    assert len(workflow.versions(store, url)) == 1


def test_publish_and_rollback_through_the_store_with_audit_events(client, store):
    tag = _tag()
    url, source = f"{CANONICAL}test/ConceptMap/{tag}", f"urn:trialtwin:contract:{tag}"
    v1 = _import(client, url, "1", _map_csv(source, [("GLU", "1558-6")])).json()
    workflow.publish(store, v1["id"], agent="contract-test")
    assert _translated(client, source, "GLU") == ["1558-6"]
    v2 = _import(client, url, "2", _map_csv(source, [("GLU", "14771-0")])).json()
    workflow.publish(store, v2["id"], agent="contract-test")
    assert _translated(client, source, "GLU") == ["14771-0"]
    assert {v["version"]: v["status"] for v in workflow.versions(store, url)} == {"1": "retired", "2": "active"}

    back = workflow.rollback(store, url, agent="contract-test")
    assert (back["id"], back["status"]) == (v1["id"], "active")
    assert _translated(client, source, "GLU") == ["1558-6"]
    v2_now = store.read("ConceptMap", v2["id"])
    assert v2_now["status"] == "retired"
    assert {"system": workflow.WORKFLOW_TAGS, "code": "rolled-back"} in [
        {k: t[k] for k in ("system", "code")} for t in v2_now["meta"]["tag"]]
    # every version of every change is kept by both stores
    assert [h["status"] for h in store.history("ConceptMap", v1["id"])] == ["active", "retired", "active", "draft"]

    audits = [a for a in matches(store.search("AuditEvent", [("entity-name", url), ("_count", "50")]))
              if a["entity"][0]["name"].startswith(f"{url}|")]
    actions = sorted((a["entity"][0]["name"].split("|")[1], a["subtype"][0]["code"]) for a in audits)
    assert actions == [("1", "import"), ("1", "publish"), ("1", "rollback"), ("2", "import"), ("2", "publish")]
    assert all(a["agent"][0]["who"]["display"] == "contract-test"
               for a in audits if a["subtype"][0]["code"] != "import")


# ----------------------------------------------------------------------------------- $predict-dropout

def _renamed(resources: list[dict], tag: str) -> list[dict]:
    """The purpose-built participant of test_predict_dropout with ids (and references) unique to one test."""
    text = json.dumps(resources).replace('"pd-', f'"{tag}-').replace("/pd-", f"/{tag}-")
    return json.loads(text)


@pytest.fixture(scope="module")
def expected_probabilities():
    """In-process probabilities of the two purpose-built participants (no FHIR, no HTTP, no store)."""
    svc = InferenceService(micro_batching=False, force_cpu=True)
    hi, lo = assess_dropout_risk([high_risk()[1], low_risk()[1]], AS_OF_DAY, service=svc)
    svc.close()
    return {"high": hi.probability, "low": lo.probability, "threshold": round((hi.probability + lo.probability) / 2, 4)}


def _load_participants(client, tag: str) -> None:
    resources = _renamed([{"resourceType": "ResearchStudy", "id": "pd-study", "status": "active"},
                          *high_risk()[0], *low_risk()[0]], tag)
    answer = client.transaction([{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                                 for r in resources])
    assert answer.status_code == 200, answer.text


def _prediction(body: dict, patient_id: str) -> dict:
    return next(p for p in body["parameter"] if p["name"] == "prediction"
                and value(p, "subject")["reference"] == f"Patient/{patient_id}")


def test_predict_dropout_persists_risk_task_provenance_and_model_device(client, store, expected_probabilities):
    tag = _tag()
    _load_participants(client, tag)
    answer = client.post(f"Patient/{tag}-high/$predict-dropout",
                         parameters(threshold=expected_probabilities["threshold"], asOf=AS_OF, persist=True))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    pred = _prediction(body, f"{tag}-high")
    assert value(pred, "probability") == pytest.approx(expected_probabilities["high"], abs=1e-5)
    assert (value(body, "evaluated"), value(body, "flagged"), value(body, "tasksCreated")) == (1, 1, 1)

    # every output is readable back from the store itself, and conforms to its profile
    ra = store.read(*value(pred, "riskAssessment")["reference"].split("/"))
    assert ra["subject"] == {"reference": f"Patient/{tag}-high"} and check(ra) == []
    assert ra["prediction"][0]["probabilityDecimal"] == pytest.approx(expected_probabilities["high"], abs=1e-5)
    task = store.read(*value(pred, "task")["reference"].split("/"))
    assert task["focus"] == {"reference": f"RiskAssessment/{ra['id']}"} and check(task) == []
    prov = store.read(*value(pred, "provenance")["reference"].split("/"))
    assert [t["reference"] for t in prov["target"]] == [f"RiskAssessment/{ra['id']}/_history/1",
                                                         f"Task/{task['id']}/_history/1"]
    assert check(prov) == []
    device_type, device_id, _, device_version = value(body, "modelDevice")["reference"].split("/")
    device = store.vread(device_type, device_id, device_version)
    assert ra["performer"]["reference"] == value(body, "modelDevice")["reference"] and check(device) == []
    # and findable the way the clinician app looks for them
    assert [r["id"] for r in matches(store.search("RiskAssessment", [("subject", f"Patient/{tag}-high")]))] == [ra["id"]]
    assert [t["id"] for t in matches(store.search("Task", [("patient", f"Patient/{tag}-high")]))] == [task["id"]]

    # a re-run refreshes the open Task (a new version on either store) instead of adding one
    again = client.post(f"Patient/{tag}-high/$predict-dropout",
                        parameters(threshold=expected_probabilities["threshold"], asOf=AS_OF)).json()
    assert (value(again, "tasksCreated"), value(again, "tasksUpdated")) == (0, 1)
    [task2] = matches(store.search("Task", [("patient", f"Patient/{tag}-high")]))
    assert task2["id"] == task["id"] and task2["meta"]["versionId"] != task["meta"]["versionId"]
    assert len(store.history("Task", task["id"])) == 2
    assert len(matches(store.search("RiskAssessment", [("subject", f"Patient/{tag}-high")]))) == 2


def test_predict_dropout_study_level_and_persist_false(client, store, expected_probabilities):
    tag = _tag()
    _load_participants(client, tag)
    dry = client.post(f"ResearchStudy/{tag}-study/$predict-dropout",
                      parameters(threshold=expected_probabilities["threshold"], asOf=AS_OF, persist=False))
    assert dry.status_code == 200, dry.text
    body = dry.json()
    assert (value(body, "evaluated"), value(body, "flagged")) == (2, 1)
    assert value(_prediction(body, f"{tag}-low"), "probability") == pytest.approx(expected_probabilities["low"],
                                                                                   abs=1e-5)
    for patient in (f"{tag}-high", f"{tag}-low"):  # persist=false writes nothing on either store
        assert matches(store.search("RiskAssessment", [("subject", f"Patient/{patient}")])) == []
        assert matches(store.search("Task", [("patient", f"Patient/{patient}")])) == []
    unknown = client.post(f"ResearchStudy/missing-{tag}/$predict-dropout", parameters(persist=False))
    assert unknown.status_code == 404 and unknown.json()["resourceType"] == "OperationOutcome"


# --------------------------------------------------------------------------- $calibrate / $simulate

def _load_demo(client, tag: str, participants: int = 3) -> str:
    """A small seeded TT-201 study under ids unique to one test; returns an on-study participant's id."""
    from fhir_ops.demo import MODEL_DEFINITION, build_demo_resources, simulate_demo_records
    from fhir_ops.mapping import model_definition as fm

    built = build_demo_resources(simulate_demo_records(seed=7, n=participants))
    # the model definition Library is shared by every copy of the study: its ids and URL stay as they are
    library = [r for r in built if r["resourceType"] == "Library"]
    text = json.dumps([r for r in built if r["resourceType"] != "Library"])
    text = text.replace('"tt201-', f'"{tag}-').replace("/tt201-", f"/{tag}-")
    text = text.replace('"id": "tt-201"', f'"id": "{tag}-study"').replace('"ResearchStudy/tt-201"',
                                                                          f'"ResearchStudy/{tag}-study"')
    resources = library + json.loads(text)
    for r in resources:
        if r["resourceType"] == "ResearchStudy":
            r.update(fm.with_study_model(r, MODEL_DEFINITION.canonical))
    answer = client.transaction([{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                                 for r in resources])
    assert answer.status_code == 200, answer.text
    on_study = [r["individual"]["reference"].split("/")[1] for r in resources
                if r["resourceType"] == "ResearchSubject" and r["status"] == "on-study-intervention"]
    return on_study[0]


def _reference(body: dict, name: str) -> str:
    return value(body, name)["reference"]


def test_calibrate_versions_the_twin_state_and_simulate_persists_forecasts(client, store):
    tag = _tag()
    pid = _load_demo(client, tag)
    calibrated = client.post(f"Patient/{pid}/$calibrate", {"resourceType": "Parameters", "parameter": []})
    assert calibrated.status_code == 200, calibrated.text
    first = calibrated.json()
    assert value(first, "changed") is True and value(first, "observationsUsed") > 0
    state_type, state_id, _, state_version = _reference(first, "twinState").split("/")
    state = store.vread(state_type, state_id, state_version)
    assert state["resourceType"] == "Basic" and check(state) == []
    assert state["subject"] == {"reference": f"Patient/{pid}"}

    # nothing new: the same version; a new HbA1c result: a new version of the same twin state
    same = client.post(f"Patient/{pid}/$calibrate", {"resourceType": "Parameters", "parameter": []}).json()
    assert value(same, "changed") is False and _reference(same, "twinState") == _reference(first, "twinState")
    last_hba1c = max((o for o in matches(store.search("Observation", [
        ("subject", f"Patient/{pid}"), ("code", "http://loinc.org|4548-4"), ("_count", "100")]))),
        key=lambda o: o["effectiveDateTime"])
    newer = {k: v for k, v in last_hba1c.items() if k not in ("id", "meta")}
    taken = datetime.fromisoformat(last_hba1c["effectiveDateTime"].replace("Z", "+00:00")) + timedelta(days=1)
    newer["effectiveDateTime"] = taken.isoformat().replace("+00:00", "Z")
    newer["valueQuantity"] = dict(last_hba1c["valueQuantity"], value=last_hba1c["valueQuantity"]["value"] + 0.4)
    assert client.post("Observation", newer).status_code == 201
    updated = client.post(f"Patient/{pid}/$calibrate", {"resourceType": "Parameters", "parameter": []}).json()
    assert value(updated, "changed") is True and value(updated, "newObservations") == 1
    assert _reference(updated, "twinState").split("/")[1] == state_id
    versions = [h["meta"]["versionId"] for h in store.history("Basic", state_id)]  # newest first
    assert len(versions) == 2 and versions[-1] == state_version

    simulated = client.post(f"Patient/{pid}/$simulate", {"resourceType": "Parameters", "parameter": [
        {"name": "persist", "valueBoolean": True}, {"name": "horizonDays", "valueInteger": 7},
        {"name": "seed", "valueInteger": 2}]})
    assert simulated.status_code == 200, simulated.text
    body = simulated.json()
    assert _reference(body, "twinState") == _reference(updated, "twinState")
    forecasts = [p["valueReference"]["reference"] for p in body["parameter"] if p["name"] == "forecastObservation"]
    assert forecasts
    for ref in forecasts[:5]:
        obs = store.read(*ref.split("/")[:2])
        assert check(obs) == [] and obs["subject"] == {"reference": f"Patient/{pid}"}
        assert obs["extension"][0]["valueReference"]["reference"] == _reference(updated, "twinState")
    prov = store.read(*_reference(body, "provenance").split("/")[:2])
    assert check(prov) == []
    targets = [t["reference"] for t in prov["target"]]
    assert all("/_history/" in t for t in targets)  # exact versions survive on both stores
    assert {t.split("/_history/")[0] for t in targets} >= {r.split("/_history/")[0] for r in forecasts}
    assert len(matches(store.search("Observation", [("subject", f"Patient/{pid}"), ("status", "preliminary"),
                                                    ("_count", "500")]))) == len(forecasts)
