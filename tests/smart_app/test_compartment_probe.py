"""The compartment matrix as an attacker runs it (issue #11, acceptance 2).

A token of Patient/tt201-p001 (``patient/*.cruds``) tries every path into another participant's data:
read, vread, search, _include/_revinclude, _history (instance/type/system), batch and transaction
(relative, absolute, malformed URLs), conditional create/update, operations, async job URLs, Groups and
counts. Every answer is scanned for the other patient's ids and details; the other patient's
compartment is snapshotted before and after and must be unchanged.
"""
from __future__ import annotations

import json

import pytest
import requests

from tests.smart_app.test_fhir_enforcement import FHIR_JSON, P1, P2, call, observation

pytestmark = pytest.mark.api

#: resource types of the demo that sit in a participant's compartment, with the parameter naming the patient
COMPARTMENT_SEARCHES = {"Observation": "subject", "ResearchSubject": "individual", "MedicationAdministration": "patient",
                        "Appointment": "patient", "Encounter": "patient", "AdverseEvent": "subject",
                        "RiskAssessment": "patient", "Task": "patient", "CarePlan": "patient", "Provenance": "patient"}


@pytest.fixture(scope="module")
def admin(combined):
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "probe-admin", "alg": "RS384"})
    return combined.backend_token("system/*.cruds", key)["access_token"]


def _compartment(combined, admin, patient: str) -> dict[tuple[str, str], str]:
    """(type, id) -> versionId of everything in ``patient``'s compartment, read with a system token."""
    out = {("Patient", patient): call("GET", f"{combined.fhir}/Patient/{patient}", admin).json()["meta"]["versionId"]}
    for rtype, param in COMPARTMENT_SEARCHES.items():
        bundle = call("GET", f"{combined.fhir}/{rtype}", admin, params={param: f"Patient/{patient}", "_count": 1000})
        assert bundle.status_code == 200, bundle.text
        for e in bundle.json().get("entry", []):
            assert e["search"]["mode"] == "match", (rtype, param, e)
            out[(rtype, e["resource"]["id"])] = e["resource"]["meta"]["versionId"]
    return out


def _secrets(combined, admin, snapshot) -> set[str]:
    """Strings that only the other patient's data contains: its resource ids and identifying details."""
    patient = call("GET", f"{combined.fhir}/Patient/{P2}", admin).json()
    found = {rid for _, rid in snapshot}
    for name in patient.get("name", []):
        found.update(x for x in [name.get("family"), *name.get("given", [])] if x and len(x) > 3)
    return found


class Probe:
    def __init__(self, combined, token, secrets):
        self.combined, self.token, self.secrets = combined, token, secrets
        self.answers: list[tuple[str, int]] = []

    def __call__(self, method: str, path: str, **kw) -> requests.Response:
        url = path if path.startswith("http") else f"{self.combined.fhir}/{path}".rstrip("/")
        response = call(method, url, self.token, **kw)
        sent = url + json.dumps(kw.get("json")) + json.dumps(kw.get("params")) + json.dumps(kw.get("headers"))
        text = response.text
        assert response.status_code < 500, (method, path, response.status_code, text[:300])
        body = response.json() if text and response.headers.get("Content-Type", "").startswith(FHIR_JSON) else None
        error = isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"
        if isinstance(body, dict) and body.get("resourceType") == "Bundle":
            # a searchset's links repeat the query the client sent; they carry no stored data
            text = json.dumps({k: v for k, v in body.items() if k != "link"})
        # An error may repeat what the request itself said (an id in a refused URL); nothing else of the
        # other patient may appear, and a successful answer may contain none of it at all.
        leaked = [s for s in self.secrets if s in text and not (error and s in sent)]
        assert not leaked, (method, path, response.status_code, leaked[:5], text[:500])
        self.answers.append((f"{method} {path[:80]}", response.status_code))
        return response


def test_a_patient_token_gets_nothing_of_another_patient(combined, admin):
    token = combined.user_token("patient/*.cruds", patient=P1)["access_token"]
    before = _compartment(combined, admin, P2)
    secrets = _secrets(combined, admin, before)
    by_type: dict[str, list[str]] = {}
    for rtype, rid in before:
        by_type.setdefault(rtype, []).append(rid)
    probe = Probe(combined, token, secrets)
    obs = by_type["Observation"][0]
    base = combined.fhir

    # read and vread of every resource in the other compartment; instance history of each type's first
    for rtype, ids in by_type.items():
        for rid in ids:
            assert probe("GET", f"{rtype}/{rid}").status_code in (403, 404)
        assert probe("GET", f"{rtype}/{ids[0]}/_history/1").status_code in (403, 404)
        assert probe("GET", f"{rtype}/{ids[0]}/_history").status_code in (403, 404)
    # type and system history
    probe("GET", "Observation/_history")
    probe("GET", "_history")
    # searches aimed at the other patient, by every route
    for rtype, param in COMPARTMENT_SEARCHES.items():
        probe("GET", rtype, params={param: f"Patient/{P2}"})
        probe("GET", rtype, params={param: P2, "_summary": "count"})
        probe("POST", f"{rtype}/_search", data={param: f"Patient/{P2}"},
              headers={"Content-Type": "application/x-www-form-urlencoded"})
    probe("GET", "Observation", params={"_id": obs})
    probe("GET", "Patient", params={"_id": P2})
    probe("GET", "Patient", params={"_revinclude": "Observation:subject", "_id": P2})
    probe("GET", "Patient", params={"_revinclude": "*"})
    probe("GET", "Observation", params={"_include": "Observation:subject", "_count": 1000})
    probe("GET", "Observation", params={"_include": "*", "_revinclude": "*", "_count": 1000})
    probe("GET", "ResearchSubject", params={"_include": "ResearchSubject:individual"})
    probe("GET", "ResearchSubject", params={"_summary": "count"})
    probe("GET", "Observation", params={"_total": "accurate", "_count": 0})
    # Groups and cohort operations
    group = call("POST", f"{base}/Group", admin, json={
        "resourceType": "Group", "type": "person", "actual": True, "quantity": 2,
        "member": [{"entity": {"reference": f"Patient/{P1}"}}, {"entity": {"reference": f"Patient/{P2}"}}]}).json()
    probe("GET", f"Group/{group['id']}")
    probe("GET", "Group", params={"member": f"Patient/{P1}"})
    probe("GET", "Group", params={"member": f"Patient/{P2}"})
    probe("GET", "Group", params={"_summary": "count"})
    probe("POST", f"Group/{group['id']}/$simulate", json={"resourceType": "Parameters", "parameter": []})
    probe("POST", f"Group/{group['id']}/$stratify", json={"resourceType": "Parameters", "parameter": []})
    for op in ("$simulate", "$predict-dropout", "$estimate-effect", "$forecast-enrollment", "$fit-population",
               "$optimize-schedule", "$stratify", "$safety-signal", "$train-model"):
        probe("POST", f"ResearchStudy/tt-201/{op}", json={"resourceType": "Parameters", "parameter": []})
    # a study-wide what-if of virtual participants reads no participant, but is still a cohort operation
    assert probe("POST", "ResearchStudy/tt-201/$simulate", json={"resourceType": "Parameters", "parameter": [
        {"name": "virtualParticipants", "valueInteger": 30}]}).status_code == 403
    # operations on the other patient
    for op in ("$simulate", "$calibrate", "$predict-dropout", "$optimize-schedule"):
        probe("POST", f"Patient/{P2}/{op}", json={"resourceType": "Parameters", "parameter": []})
        probe("GET", f"Patient/{P2}/{op}")
    probe("GET", f"Observation/{obs}/$validate")
    probe("POST", f"Observation/{obs}/$validate", json={"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": observation(P1)}]})
    # writes: update, delete, create into the other compartment, conditional create aimed at its data
    probe("PUT", f"Observation/{obs}", json={**observation(P1), "id": obs})
    probe("PUT", f"Observation/{obs}", json={**observation(P2), "id": obs})
    probe("DELETE", f"Observation/{obs}")
    probe("POST", "Observation", json=observation(P2))
    probe("POST", "Observation", json=observation(P1), headers={"If-None-Exist": f"_id={obs}"})
    probe("POST", "Observation", json=observation(P1), headers={"If-None-Exist": f"{base}/Observation?_id={obs}"})
    probe("PUT", "Observation", json=observation(P1), params={"_id": obs})  # conditional update: not supported
    probe("DELETE", "Observation", params={"_id": obs})  # conditional delete: not supported
    # batch and transaction entries: relative, absolute (ours and another host) and malformed URLs
    urls = [f"Observation/{obs}", f"{base}/Observation/{obs}", f"http://evil.example/fhir/Observation/{obs}",
            f"Observation//{obs}", f"Observation/./{obs}", f"Observation/../Observation/{obs}", f"/Observation/{obs}",
            f"Observation/{obs}/_history/1", f"Observation?_id={obs}", f"Observation/{obs}?_format=json"]
    for kind in ("batch", "transaction"):
        for url in urls:
            for method in ("GET", "PUT", "DELETE"):
                entry = {"request": {"method": method, "url": url}}
                if method == "PUT":
                    entry["resource"] = {**observation(P1), "id": obs}
                probe("POST", "", json={"resourceType": "Bundle", "type": kind, "entry": [entry]})
        for condition in (f"_id={obs}", f"subject=Patient/{P2}", f"Observation?_id={obs}", f"{base}/Observation?_id={obs}"):
            probe("POST", "", json={"resourceType": "Bundle", "type": kind, "entry": [{
                "fullUrl": "urn:uuid:5e1d0b9e-1111-4111-8111-000000000001", "resource": observation(P1),
                "request": {"method": "POST", "url": "Observation", "ifNoneExist": condition}}]})
        probe("POST", "", json={"resourceType": "Bundle", "type": kind, "entry": [{
            "resource": observation(P2), "request": {"method": "POST", "url": "Observation"}}]})

    after = _compartment(combined, admin, P2)
    assert after == before, "the other patient's compartment changed"
    assert len(probe.answers) > 150
    refused = [a for a in probe.answers if a[1] >= 400]
    assert len(refused) > 80  # most of the matrix is refused outright; the rest answers without their data


def test_an_async_job_is_polled_only_in_its_own_patient_context(combined, admin):
    """One clinician app, two launches: the token of p002's launch cannot read p001's job."""
    from tests.smart_app.helpers import UserAgent

    client = combined.stack.register_public_app(scope="launch/patient openid fhirUser patient/*.cruds")
    tokens = {}
    for patient in (P1, P2):
        query, verifier = combined.stack.authorize(UserAgent(), client["client_id"],
                                                   "launch/patient openid fhirUser patient/*.cruds", patient=patient)
        tokens[patient] = combined.stack.exchange(client["client_id"], query["code"], verifier).json()["access_token"]
    started = call("POST", f"{combined.fhir}/Patient/{P1}/$simulate", tokens[P1],
                   json={"resourceType": "Parameters", "parameter": []}, headers={"Prefer": "respond-async"})
    assert started.status_code == 202, started.text
    job = started.headers["Content-Location"]
    theirs = call("GET", job, tokens[P2])
    assert theirs.status_code == 403 and P1 not in theirs.text.replace(job, "")
    assert call("DELETE", job, tokens[P2]).status_code == 403
    assert call("GET", job, tokens[P1]).status_code in (200, 202)
