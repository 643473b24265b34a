"""$translate, $lookup, $validate-code and $import-map over real HTTP against the embedded server."""
from __future__ import annotations

import pytest
import requests

from terminology import workflow
from terminology.catalog import LOINC, MDC, SNOMED
from tests.terminology.r4check import output_problems

pytestmark = pytest.mark.api
FHIR_JSON = {"Content-Type": "application/fhir+json"}
EDC_LAB = "https://trialtwin.org/fhir/CodeSystem/edc-lab"
LAB_MAP = "https://trialtwin.org/fhir/ConceptMap/edc-lab-to-loinc"


def value(params, name):
    return next((next(v for k, v in p.items() if k.startswith("value")) for p in params["parameter"] if p["name"] == name), None)


def test_translate_get_and_post_agree(fhir_server):
    base, _ = fhir_server
    got = requests.get(f"{base}/ConceptMap/$translate", params={"system": MDC, "code": "147842"}, timeout=10)
    assert got.status_code == 200 and got.headers["Content-Type"].startswith("application/fhir+json")
    assert output_problems(got.json(), "OperationDefinition-translate.json") == []
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "coding", "valueCoding": {"system": MDC, "code": "147842"}}, {"name": "targetsystem", "valueUri": LOINC}]}
    posted = requests.post(f"{base}/ConceptMap/$translate", json=body, headers=FHIR_JSON, timeout=10)
    assert posted.status_code == 200 and posted.json() == got.json()
    match = next(p for p in got.json()["parameter"] if p["name"] == "match")
    assert match["part"][1]["valueCoding"]["code"] == "8867-4"


def test_translate_reverse_unmapped_and_errors(fhir_server):
    base, _ = fhir_server
    rev = requests.get(f"{base}/ConceptMap/$translate",
                       params={"system": SNOMED, "code": "302866003", "reverse": "true"}, timeout=10).json()
    assert value(rev, "result") is True
    assert [p for p in rev["parameter"] if p["name"] == "match"][0]["part"][1]["valueCoding"]["code"] == "AE-HYPOGLY"
    none = requests.get(f"{base}/ConceptMap/$translate", params={"system": EDC_LAB, "code": "LAB-NONE"}, timeout=10).json()
    assert value(none, "result") is False and "LAB-NONE" in value(none, "message")
    bad = requests.get(f"{base}/ConceptMap/$translate", params={"system": MDC, "code": "1", "reverse": "maybe"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    missing = requests.get(f"{base}/ConceptMap/$translate", params={"code": "1"}, timeout=10)
    assert missing.status_code == 400 and missing.json()["issue"][0]["details"]["coding"][0]["code"] == "missing-parameter"


def test_translate_instance_level_uses_that_version(fhir_server):
    base, store = fhir_server
    workflow.seed(store)
    active = workflow.active_version(store, LAB_MAP)
    out = requests.get(f"{base}/ConceptMap/{active['id']}/$translate",
                       params={"system": EDC_LAB, "code": "LAB-EGFR"}, timeout=10).json()
    assert value(out, "result") is True


def test_lookup_and_validate_code(fhir_server):
    base, _ = fhir_server
    out = requests.get(f"{base}/CodeSystem/$lookup", params={"system": LOINC, "code": "8480-6"}, timeout=10)
    assert out.status_code == 200 and value(out.json(), "display") == "Systolic blood pressure"
    unknown = requests.get(f"{base}/CodeSystem/$lookup", params={"system": LOINC, "code": "1-8"}, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["resourceType"] == "OperationOutcome"
    vs = requests.get(f"{base}/ValueSet/$validate-code", params={
        "url": "https://trialtwin.org/fhir/ValueSet/vital-signs", "system": LOINC, "code": "4548-4"}, timeout=10).json()
    assert value(vs, "result") is False and "not in the value set" in value(vs, "message")
    cs = requests.post(f"{base}/CodeSystem/$validate-code", headers=FHIR_JSON, timeout=10, json={
        "resourceType": "Parameters", "parameter": [
            {"name": "codeableConcept", "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "25064002"}]}}]}).json()
    assert value(cs, "result") is True and value(cs, "display") == "Headache"
    inst = requests.get(f"{base}/ValueSet/ucum-units/$validate-code",
                        params={"system": "http://unitsofmeasure.org", "code": "mmol/L"}, timeout=10).json()
    assert value(inst, "result") is True



def test_trialtwin_own_codes_answer_lookup_and_validate_code(fhir_server):
    """The codes TrialTwin emits (OperationOutcome error ids, twin outputs) are looked up like any other."""
    base, _ = fhir_server
    errors = "https://trialtwin.org/fhir/CodeSystem/error"
    got = requests.get(f"{base}/CodeSystem/$lookup", params={"system": errors, "code": "unknown-client"}, timeout=10)
    assert got.status_code == 200, got.text
    assert output_problems(got.json(), "OperationDefinition-lookup.json") == []
    assert value(got.json(), "display")
    made_up = requests.get(f"{base}/CodeSystem/$lookup", params={"system": errors, "code": "no-such-error"}, timeout=10)
    assert made_up.status_code == 404 and made_up.json()["resourceType"] == "OperationOutcome"
    outputs = "https://trialtwin.org/fhir/CodeSystem/twin-output"
    known = next(c["code"] for c in __import__("profiles").load("CodeSystem-twin-output.json")["concept"])
    inside = requests.get(f"{base}/ValueSet/$validate-code", params={
        "url": "https://trialtwin.org/fhir/ValueSet/twin-outputs", "system": outputs, "code": known}, timeout=10).json()
    assert value(inside, "result") is True
    outside = requests.get(f"{base}/ValueSet/$validate-code", params={
        "url": "https://trialtwin.org/fhir/ValueSet/twin-outputs", "system": LOINC, "code": "4548-4"}, timeout=10).json()
    assert value(outside, "result") is False


CSV = ("source_system,source_code,target_system,target_code,equivalence\n"
       f"{EDC_LAB},LAB-HBA1C,{LOINC},4548-4,equivalent\n"
       f"{EDC_LAB},LAB-FPG,{LOINC},1558-6,equivalent\n")


def _import(base, csv_text, version):
    return requests.post(f"{base}/ConceptMap/$import-map", headers=FHIR_JSON, timeout=10, json={
        "resourceType": "Parameters", "parameter": [
            {"name": "csv", "valueString": csv_text}, {"name": "url", "valueUri": LAB_MAP},
            {"name": "version", "valueString": version}]})


def test_import_map_csv_draft_and_line_errors(fhir_server):
    base, store = fhir_server
    workflow.seed(store)
    ok = _import(base, CSV, "2.0.0")
    assert ok.status_code == 201, ok.text
    draft = ok.json()
    assert draft["resourceType"] == "ConceptMap" and draft["status"] == "draft" and draft["version"] == "2.0.0"
    assert ok.headers["Location"].endswith(f"/ConceptMap/{draft['id']}/_history/1")
    assert requests.get(f"{base}/ConceptMap/{draft['id']}", timeout=10).json()["status"] == "draft"
    # the draft is not in force: translation still uses the active version
    eg = requests.get(f"{base}/ConceptMap/$translate", params={"system": EDC_LAB, "code": "LAB-EGFR"}, timeout=10).json()
    assert value(eg, "result") is True

    count = store.search("ConceptMap", [("_count", "100")]).total
    bad = _import(base, CSV + f"{EDC_LAB},LAB-EGFR,{LOINC},62238-1,\n", "3.0.0")
    assert bad.status_code == 400
    issues = bad.json()["issue"]
    assert issues[1]["expression"] == ["line[4]"] and "line 4" in issues[1]["diagnostics"]
    assert store.search("ConceptMap", [("_count", "100")]).total == count
    assert _import(base, CSV, "2.0.0").status_code == 409
    # the state-changing operation refuses GET
    assert requests.get(f"{base}/ConceptMap/$import-map", timeout=10).status_code == 405


def test_import_map_concept_map_body(fhir_server):
    base, store = fhir_server
    cm = {"resourceType": "ConceptMap", "url": "https://example.org/cm/new", "version": "1", "status": "active",
          "group": [{"source": EDC_LAB, "target": LOINC, "element": [
              {"code": "LAB-FPG", "target": [{"code": "1558-6", "equivalence": "equivalent"}]}]}]}
    out = requests.post(f"{base}/ConceptMap/$import-map", headers=FHIR_JSON, timeout=10, json={
        "resourceType": "Parameters", "parameter": [{"name": "conceptMap", "resource": cm}]})
    assert out.status_code == 201 and out.json()["status"] == "draft"
    audits = store.search("AuditEvent", [("_count", "10")]).matches
    assert [a["subtype"][0]["code"] for a in audits] == ["import"]


def test_capability_statement_lists_the_terminology_operations(fhir_server):
    base, _ = fhir_server
    cap = requests.get(f"{base}/metadata", timeout=10).json()
    ops = {r["type"]: {o["definition"] for o in r.get("operation", [])} for r in cap["rest"][0]["resource"]}
    canon = "https://trialtwin.org/fhir/OperationDefinition/"
    assert {canon + "translate", canon + "import-map"} <= ops["ConceptMap"]
    assert {canon + "lookup", canon + "validate-code"} <= ops["CodeSystem"]
    assert canon + "validate-code" in ops["ValueSet"]
    # the published definitions are served
    od = requests.get(f"{base}/OperationDefinition/translate", timeout=10).json()
    assert od["base"] == "http://hl7.org/fhir/OperationDefinition/ConceptMap-translate"


def test_translate_against_a_named_draft_version(fhir_server):
    base, store = fhir_server
    workflow.seed(store)
    csv_text = CSV + f"{EDC_LAB},LAB-FPG,{LOINC},14771-0,equivalent\n"
    assert _import(base, csv_text, "2.0.0").status_code == 201
    params = {"system": EDC_LAB, "code": "LAB-FPG", "url": LAB_MAP}
    active = requests.get(f"{base}/ConceptMap/$translate", params=params, timeout=10).json()
    draft = requests.get(f"{base}/ConceptMap/$translate", params={**params, "conceptMapVersion": "2.0.0"}, timeout=10).json()
    codes = lambda out: [p["part"][1]["valueCoding"]["code"] for p in out["parameter"] if p["name"] == "match"]  # noqa: E731
    assert codes(active) == ["1558-6"] and codes(draft) == ["1558-6", "14771-0"]
    missing = requests.get(f"{base}/ConceptMap/$translate", params={**params, "conceptMapVersion": "9"}, timeout=10)
    assert missing.status_code == 404
    no_url = requests.get(f"{base}/ConceptMap/$translate",
                          params={"system": EDC_LAB, "code": "LAB-FPG", "conceptMapVersion": "2.0.0"}, timeout=10)
    assert no_url.status_code == 400
