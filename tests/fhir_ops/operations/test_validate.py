"""$validate end to end over real HTTP against the embedded server (R4 Resource-validate)."""
from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.api

FHIR = {"Content-Type": "application/fhir+json"}
GOOD = {"resourceType": "Patient", "gender": "female", "birthDate": "1970-01-01"}
BAD = {"resourceType": "Patient", "gender": "female", "birthDate": "1970-13-01"}


def issues(response) -> list[dict]:
    assert response.headers["Content-Type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"]


def test_valid_resource_as_parameters(base_url):
    body = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": GOOD}]}
    response = requests.post(base_url + "/fhir/Patient/$validate", json=body, headers=FHIR)
    assert response.status_code == 200
    found = issues(response)
    assert found[0]["severity"] == "information" and found[0]["diagnostics"] == "valid"


def test_invalid_bare_resource_reports_errors_with_200(base_url):
    response = requests.post(base_url + "/fhir/Patient/$validate", json=BAD, headers=FHIR)
    assert response.status_code == 200
    errors = [i for i in issues(response) if i["severity"] == "error"]
    assert errors and any("Patient.birthDate" in i.get("expression", []) for i in errors)
    assert not any(i["severity"] == "information" for i in issues(response))
    # nothing was stored
    assert requests.get(base_url + "/fhir/Patient").json().get("total", 0) == 0


def test_type_mismatch_is_an_error_issue(base_url):
    response = requests.post(base_url + "/fhir/Observation/$validate", json=GOOD, headers=FHIR)
    assert response.status_code == 200
    assert issues(response)[0]["details"]["coding"][0]["code"] == "wrong-resource-type"


def test_instance_level_validates_the_stored_resource(base_url):
    created = requests.post(base_url + "/fhir/Patient", json=GOOD, headers=FHIR)
    assert created.status_code == 201
    pid = created.json()["id"]
    response = requests.get(base_url + f"/fhir/Patient/{pid}/$validate")
    assert response.status_code == 200 and issues(response)[0]["diagnostics"] == "valid"
    update = {"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": {**GOOD, "id": "other"}}, {"name": "mode", "valueCode": "update"}]}
    response = requests.post(base_url + f"/fhir/Patient/{pid}/$validate", json=update, headers=FHIR)
    assert issues(response)[0]["details"]["coding"][0]["code"] == "id-mismatch"
    response = requests.get(base_url + f"/fhir/Patient/{pid}/$validate", params={"mode": "delete"})
    assert issues(response)[0]["diagnostics"] == "valid"
    response = requests.get(base_url + "/fhir/Patient/nobody/$validate")
    assert response.status_code == 404


def test_unknown_profile_is_reported_as_not_checked(base_url):
    response = requests.post(base_url + "/fhir/Patient/$validate?", json={
        "resourceType": "Parameters", "parameter": [
            {"name": "resource", "resource": GOOD},
            {"name": "profile", "valueUri": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"}]},
        headers=FHIR)
    severities = [i["severity"] for i in issues(response)]
    assert severities == ["information", "warning"]


@pytest.mark.parametrize("request_args, status, error_id", [
    ({"method": "GET", "path": "/fhir/Patient/$validate"}, 400, "missing-parameter"),
    ({"method": "GET", "path": "/fhir/Patient/$validate?mode=sideways"}, 400, "wrong-type"),
    ({"method": "GET", "path": "/fhir/Patient/$validate?resource=x"}, 400, "wrong-type"),
    ({"method": "GET", "path": "/fhir/Patient/$validate?strict=true"}, 400, "unknown-parameter"),
    ({"method": "POST", "path": "/fhir/$validate", "json": GOOD}, 400, "operation-not-supported-here"),
    ({"method": "POST", "path": "/fhir/Patient/$validate",
      "json": {"resourceType": "Parameters", "parameter": [{"name": "resource", "valueString": "x"}]}},
     400, "wrong-type"),
])
def test_bad_calls(base_url, request_args, status, error_id):
    args = dict(request_args)
    response = requests.request(args.pop("method"), base_url + args.pop("path"), headers=FHIR, **args)
    assert response.status_code == status
    assert issues(response)[0]["details"]["coding"][0]["code"] == error_id


def test_validate_runs_asynchronously_on_request(base_url):
    import time

    response = requests.post(base_url + "/fhir/Patient/$validate", json=BAD,
                             headers={**FHIR, "Prefer": "respond-async"})
    assert response.status_code == 202
    location = response.headers["Content-Location"]
    deadline = time.monotonic() + 300  # generous: a busy CI machine
    while (polled := requests.get(location)).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert polled.status_code == 200
    assert any(i["severity"] == "error" for i in issues(polled))


def test_capability_statement_lists_operations_from_the_registry(base_url):
    capability = requests.get(base_url + "/fhir/metadata").json()
    by_type = {r["type"]: r.get("operation", []) for r in capability["rest"][0]["resource"]}
    definition = "https://trialtwin.org/fhir/OperationDefinition/validate"
    assert {"name": "validate", "definition": definition} in by_type["Patient"]
    assert {"name": "validate", "definition": definition} in by_type["Observation"]
    served = requests.get(base_url + "/fhir/OperationDefinition/validate")
    assert served.status_code == 200 and served.json()["url"] == definition


SD = "https://trialtwin.org/fhir/StructureDefinition"
CS = "https://trialtwin.org/fhir/CodeSystem/trialtwin"
RISK = {
    "resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/p1"},
    "meta": {"profile": [f"{SD}/dropout-risk"]},
    "extension": [{"url": f"{SD}/twin-model", "valueReference": {"reference": "Device/m1"}}],
    "method": {"coding": [{"system": CS, "code": "learned-model"}]},
    "occurrenceDateTime": "2026-11-20T10:00:00Z",
    "performer": {"reference": "Device/m1"},
    "basis": [{"reference": "Observation/o1/_history/1"}],
    "prediction": [{"outcome": {"coding": [{"system": CS, "code": "missed-next-visit"}]},
                    "probabilityDecimal": 0.42, "whenPeriod": {"start": "2026-11-20", "end": "2026-12-04"}}],
}


def _validate(base_url, resource, **extra):
    parameter = [{"name": "resource", "resource": resource}]
    parameter += [{"name": k, ("valueUri" if k == "profile" else "valueCode"): v} for k, v in extra.items()]
    return requests.post(base_url + f"/fhir/{resource['resourceType']}/$validate",
                         json={"resourceType": "Parameters", "parameter": parameter}, headers=FHIR)


def test_trialtwin_profile_is_checked_structurally(base_url):
    ok = issues(_validate(base_url, RISK, mode="profile"))
    assert [i["severity"] for i in ok] == ["information", "information"]
    assert ok[1]["details"]["coding"][0]["code"] == "profile-checked"
    broken = {k: v for k, v in RISK.items() if k != "performer"}  # the model that made the prediction
    found = issues(_validate(base_url, broken, profile=f"{SD}/dropout-risk"))
    errors = [i for i in found if i["severity"] == "error"]
    assert errors and all(i["details"]["coding"][0]["code"] == "profile-violation" for i in errors)
    assert any("RiskAssessment.performer" in i["diagnostics"] for i in errors)

