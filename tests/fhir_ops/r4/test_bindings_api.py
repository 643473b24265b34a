"""Over HTTP: R4 type list, and one invalid code per required binding of every resource type TrialTwin writes.

Each invalid code is refused on create, update, transaction and batch with a 422 OperationOutcome whose
expression names the element, nothing is stored, and $validate reports the same element.
"""
from __future__ import annotations

import copy
import json

import pytest

from fhir_ops.r4.validator import compiled
from profiles import PROFILES_DIR
from terminology.catalog import TRIALTWIN_CS
from tests.fhir_ops.conftest import error_id
from tests.fhir_ops.r4.corpus import bound_codes, demo_bases, hand_written_bases

pytestmark = pytest.mark.api

BAD = "not-a-code"


def _operation_outputs() -> list[dict]:
    """What the operations store beyond the corpus's bases: $safety-signal's DetectedIssue and MeasureReport
    (the profiles' examples, the shapes fhir_ops.mapping.safety builds; $forecast-enrollment writes a
    MeasureReport too), the model Device every learned or twin model run names (fhir_ops.mapping.model_device)
    and $estimate-effect's DocumentReference report."""
    examples = [json.loads(path.read_text(encoding="utf-8"))
                for path in sorted((PROFILES_DIR / "examples").glob("*.json"))
                if path.name.startswith(("DetectedIssue-", "MeasureReport-"))]
    device = {"resourceType": "Device", "status": "active",
              "identifier": [{"system": "https://trialtwin.org/fhir/model", "value": "dropout|1.0.1"}],
              "deviceName": [{"name": "dropout", "type": "model-name"}],
              "type": {"coding": [{"system": TRIALTWIN_CS, "code": "twin-model"}], "text": "TrialTwin model"},
              "version": [{"value": "1.0.1"}]}
    report = {"resourceType": "DocumentReference", "status": "current",
              "type": {"coding": [{"system": TRIALTWIN_CS, "code": "effect-report"}]},
              "date": "2026-11-20T12:00:00Z", "context": {"related": [{"reference": "ResearchStudy/tt-201"}]},
              "content": [{"attachment": {"contentType": "text/html", "data": "PHA+eDwvcD4="}}]}
    return examples + [device, report]


def _written_bases() -> dict[str, dict]:
    """One valid base per resource type the demo study or an operation writes."""
    bases: dict[str, dict] = {}
    for base in hand_written_bases() + demo_bases() + _operation_outputs():
        bases.setdefault(base["resourceType"], base)
    bases.pop("Bundle")  # a collection Bundle is not something the server stores for the project
    bases["Basic"] = {"resourceType": "Basic", "code": {"text": "twin state"}}
    return bases


def _binding_cases() -> list[tuple[str, dict, str]]:
    """(label, resource with one invalid code, expected expression) for every required code binding:
    each top-level bound element of the type, plus every bound code nested in the base."""
    out = []
    nodes = compiled()
    for rtype, base in sorted(_written_bases().items()):
        for key, field in sorted(nodes[rtype].fields.items()):
            if field[2] != 0 or field[4] is None or key.startswith("_"):
                continue
            bad = copy.deepcopy(base)
            bad.pop("id", None)
            bad[key] = [BAD] if field[1] else BAD
            out.append((f"{rtype}.{key}", bad, f"{rtype}.{key}" + ("[0]" if field[1] else "")))
        for path, _url, _codes in bound_codes(base):
            if len(path) == 1:
                continue
            bad = copy.deepcopy(base)
            bad.pop("id", None)
            holder = bad
            for step in path[:-1]:
                holder = holder[step]
            holder[path[-1]] = BAD
            where = rtype + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in path)
            out.append((where, bad, where))
    return out


CASES = _binding_cases()


def test_the_cases_cover_every_written_type_with_a_binding():
    labels = {label.split(".")[0] for label, _, _ in CASES}
    assert {"Observation", "Patient", "Appointment", "Encounter", "MedicationAdministration", "ResearchSubject",
            "ResearchStudy", "RiskAssessment", "Task", "Provenance", "AdverseEvent", "DetectedIssue",
            "MeasureReport", "Device", "DocumentReference", "Consent", "CarePlan", "Group", "Library"} <= labels
    assert len(CASES) >= 40


def _expressions(outcome: dict) -> set[str]:
    return {x for issue in outcome["issue"] for x in issue.get("expression", [])}


def test_every_required_binding_is_enforced_on_create(fhir):
    for label, resource, where in CASES:
        r = fhir.post(resource["resourceType"], resource)
        assert r.status_code == 422, (label, r.status_code, r.text[:300])
        assert error_id(r) == "invalid-code" and where in _expressions(r.json()), (label, r.json())
        assert r.json()["issue"][0]["code"] == "code-invalid"
    counts = {rtype: fhir.get(f"{rtype}?_summary=count").json()["total"] for rtype in _written_bases()}
    assert not any(counts.values()), counts  # nothing half-written


def test_update_transaction_batch_and_validate_refuse_the_same_codes(fhir):
    for label, resource, where in CASES:
        rtype = resource["resourceType"]
        put = fhir.put(f"{rtype}/x1", {**resource, "id": "x1"})
        assert put.status_code == 422 and where.replace(rtype, f"{rtype}", 1) in _expressions(put.json()), label
        tx = fhir.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Basic", "code": {"text": "ok"}}, "request": {"method": "POST", "url": "Basic"}},
            {"resource": resource, "request": {"method": "POST", "url": rtype}}]})
        assert tx.status_code == 422, (label, tx.text[:300])
        inner = where.split(".", 1)[1]
        assert f"Bundle.entry[1].resource.{inner}" in _expressions(tx.json()), (label, tx.json())
        batch = fhir.post("", {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": resource, "request": {"method": "POST", "url": rtype}}]}).json()
        response = batch["entry"][0]["response"]
        assert response["status"].startswith("422"), label
        assert where in _expressions(response["outcome"]), (label, response)
        checked = fhir.post(f"{rtype}/$validate", resource)
        assert checked.status_code == 200
        errors = [i for i in checked.json()["issue"] if i["severity"] == "error"]
        assert errors and where in _expressions({"issue": errors}), (label, checked.json())
    assert fhir.get("Basic?_summary=count").json()["total"] == 0  # the transactions left nothing behind


def test_valid_codes_are_stored(fhir):
    for rtype, base in sorted(_written_bases().items()):
        body = {k: v for k, v in base.items() if k != "id"}
        r = fhir.post(rtype, body)
        assert r.status_code == 201, (rtype, r.text[:300])


def test_r4_type_list_on_the_wire(fhir):
    citation = fhir.post("Citation", {"resourceType": "Citation", "status": "active"})
    assert citation.status_code == 404 and error_id(citation) == "unknown-resource-type"
    assert fhir.get("Citation").status_code == 404
    product = fhir.post("MedicinalProduct", {"resourceType": "MedicinalProduct", "name": [{"productName": "TTX-101"}]})
    assert product.status_code == 201
    ees = fhir.post("EffectEvidenceSynthesis", {"resourceType": "EffectEvidenceSynthesis", "status": "draft",
                                                 "population": {"reference": "Group/g"},
                                                 "exposure": {"reference": "EvidenceVariable/e"},
                                                 "exposureAlternative": {"reference": "EvidenceVariable/a"},
                                                 "outcome": {"reference": "EvidenceVariable/o"}})
    assert ees.status_code == 201, ees.text[:300]
    assert fhir.get("EffectEvidenceSynthesis").json()["total"] == 1
    types = {r["type"] for r in fhir.get("metadata").json()["rest"][0]["resource"]}
    assert "MedicinalProduct" in types and "Citation" not in types and len(types) == 146
    # a transaction entry of a non-R4 type is refused as a whole
    tx = fhir.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Citation", "status": "active"}, "request": {"method": "POST", "url": "Citation"}}]})
    assert tx.status_code in (400, 404)
