"""fhir_ops as a SMART resource server, over real HTTP with real tokens from the real authorization server.

The scope matrix: no token, patient-scoped read-only and read-write tokens, system tokens of backend services,
the Patient compartment (with outreach Tasks), operations, Bundles; and the CLI's refusal of open mode off loopback.
"""
from __future__ import annotations

import pytest
import requests

from fhir_ops.app import create_app
from fhir_ops.cli import main
from fhir_ops.commands.serve import check_auth_mode, is_loopback
from fhir_ops.errors import FhirError

pytestmark = pytest.mark.api

FHIR_JSON = "application/fhir+json"
P1, P2 = "tt201-p001", "tt201-p002"


def call(method: str, url: str, token: str | None = None, **kw) -> requests.Response:
    headers = {"Accept": FHIR_JSON, **kw.pop("headers", {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if "json" in kw:
        headers["Content-Type"] = FHIR_JSON
    return requests.request(method, url, headers=headers, timeout=60, **kw)


def outcome_id(response: requests.Response) -> str:
    assert response.headers["Content-Type"].startswith(FHIR_JSON), response.headers["Content-Type"]
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]["details"]["coding"][0]["code"]


def observation(patient: str, value: float = 7.1) -> dict:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "subject": {"reference": f"Patient/{patient}"},
            "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}


@pytest.fixture(scope="module")
def p1_read(combined):
    return combined.user_token("patient/*.rs", patient=P1)["access_token"]


@pytest.fixture(scope="module")
def p1_write(combined):
    return combined.user_token("patient/*.cruds", patient=P1)["access_token"]


@pytest.fixture(scope="module")
def system_read(combined):
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "edc-1", "alg": "RS384"})
    return combined.backend_token("system/*.rs", key)["access_token"]


@pytest.fixture(scope="module")
def system_write(combined):
    from joserfc.jwk import ECKey

    key = ECKey.generate_key("P-384", parameters={"kid": "edc-2", "alg": "ES384"})
    return combined.backend_token("system/Observation.cruds system/Task.cruds system/Patient.rs", key,
                                    alg="ES384")["access_token"]


# --- no token, bad token, public endpoints ------------------------------------------------------------

def test_no_token_is_401_with_a_bearer_challenge(combined):
    for method, path in (("GET", "Patient"), ("GET", f"Patient/{P1}"), ("POST", "Observation"),
                         ("POST", f"Patient/{P1}/$validate"), ("GET", "_jobs/unknown")):
        response = call(method, f"{combined.fhir}/{path}", json={} if method == "POST" else None)
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="fhir"')
        assert outcome_id(response) == "missing-token"


def test_forged_and_foreign_tokens_are_invalid(combined, p1_read):
    header, payload, signature = p1_read.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    for token in (forged, "not-a-jwt"):
        response = call("GET", f"{combined.fhir}/Patient/{P1}", token)
        assert response.status_code == 401
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        assert outcome_id(response) == "invalid-token"


def test_metadata_and_discovery_are_public_and_advertise_smart(combined):
    metadata = call("GET", f"{combined.fhir}/metadata")
    assert metadata.status_code == 200
    security = metadata.json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris["token"] == combined.base + "/auth/token"
    mine = requests.get(f"{combined.fhir}/.well-known/smart-configuration", timeout=10).json()
    theirs = requests.get(f"{combined.base}/auth/.well-known/smart-configuration", timeout=10).json()
    assert mine == theirs and mine["issuer"] == combined.base + "/auth"


def test_conformance_resources_are_readable_without_a_token_but_not_searchable(combined):
    for path in ("StructureDefinition/twin-state", "ValueSet/lab-tests/_history/1", "OperationDefinition/simulate"):
        assert call("GET", f"{combined.fhir}/{path}").status_code == 200, path
    assert call("GET", f"{combined.fhir}/StructureDefinition?url=x").status_code == 401
    assert call("PUT", f"{combined.fhir}/StructureDefinition/twin-state", json={}).status_code == 401
    assert call("GET", f"{combined.fhir}/Patient/p1").status_code == 401


# --- patient-scoped tokens ------------------------------------------------------------------------------

def test_patient_token_reads_its_patient_only(combined, p1_read):
    assert call("GET", f"{combined.fhir}/Patient/{P1}", p1_read).status_code == 200
    other = call("GET", f"{combined.fhir}/Patient/{P2}", p1_read)
    assert other.status_code == 403 and outcome_id(other) == "outside-compartment"
    # the same answer for an id that does not exist: existence of other patients' data is not revealed
    missing = call("GET", f"{combined.fhir}/Patient/no-such-patient", p1_read)
    assert missing.status_code == 403 and outcome_id(missing) == "outside-compartment"
    their_obs = call("GET", f"{combined.fhir}/Observation", p1_read, params={"subject": f"Patient/{P2}"})
    assert their_obs.status_code == 200 and "entry" not in their_obs.json()


def test_patient_token_cannot_read_another_patients_observation_or_history(combined, p1_read, system_read):
    theirs = call("GET", f"{combined.fhir}/Observation", system_read,
                  params={"subject": f"Patient/{P2}", "_count": 1}).json()["entry"][0]["resource"]
    for path in (f"Observation/{theirs['id']}", f"Observation/{theirs['id']}/_history",
                 f"Observation/{theirs['id']}/_history/1"):
        response = call("GET", f"{combined.fhir}/{path}", p1_read)
        assert response.status_code == 403, (path, response.text)
    assert call("GET", f"{combined.fhir}/Observation/_history", p1_read).status_code == 403


def test_patient_token_search_is_confined_to_the_compartment(combined, p1_read, system_read):
    mine = call("GET", f"{combined.fhir}/Observation", p1_read, params={"_count": 500}).json()
    everyone = call("GET", f"{combined.fhir}/Observation", system_read, params={"_count": 1, "_total": "accurate"}).json()
    subjects = {e["resource"]["subject"]["reference"] for e in mine["entry"]}
    assert subjects == {f"Patient/{P1}"}
    assert mine["total"] < everyone["total"]
    patients = call("GET", f"{combined.fhir}/Patient", p1_read).json()
    assert [e["resource"]["id"] for e in patients["entry"]] == [P1]
    # an _include of another type the token cannot see is dropped from the Bundle
    included = call("GET", f"{combined.fhir}/ResearchSubject", p1_read, params={"_include": "ResearchSubject:study"})
    assert {e["resource"]["resourceType"] for e in included.json()["entry"]} == {"ResearchSubject"}
    # ResearchStudy is not in the Patient compartment: a patient-only token gets no study data
    assert call("GET", f"{combined.fhir}/ResearchStudy", p1_read).status_code == 403


def test_chained_search_needs_a_broad_scope_on_every_type_it_searches(combined, p1_read, system_read, system_write):
    # A chain evaluates its condition on resources outside the compartment filter's reach.
    for params in ({"subject:Patient.gender": "female"}, {"performer.name": "x"}):
        refused = call("GET", f"{combined.fhir}/Observation", p1_read, params=params)
        assert refused.status_code == 403 and outcome_id(refused) == "chain-needs-broad-scope"
    posted = call("POST", f"{combined.fhir}/Observation/_search", p1_read, data={"subject:Patient.gender": "female"},
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert posted.status_code == 403 and outcome_id(posted) == "chain-needs-broad-scope"
    broad = call("GET", f"{combined.fhir}/Observation", system_read,
                 params={"subject:Patient.gender": "female", "_summary": "count"})
    assert broad.status_code == 200 and broad.json()["total"] > 0
    # system/Observation + system/Patient: a chain to Practitioner (performer) is outside the scopes
    outside = call("GET", f"{combined.fhir}/Observation", system_write, params={"performer:Practitioner.name": "x"})
    assert outside.status_code == 403 and outcome_id(outside) == "insufficient-scope"


def test_a_chain_inside_a_batch_needs_the_same_scopes_as_at_the_type_endpoint(combined, system_read, system_write):
    # system/Observation + system/Patient only: a chain to Practitioner is refused in a batch entry too,
    # as the whole request (it would reveal which practitioners' names match)
    chained = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation?performer:Practitioner.name=x"}}]}
    outside = call("POST", f"{combined.fhir}/", system_write, json=chained)
    assert outside.status_code == 403 and outcome_id(outside) == "insufficient-scope"
    allowed = call("POST", f"{combined.fhir}/", system_read, json=chained)
    assert allowed.status_code == 200
    assert allowed.json()["entry"][0]["response"]["status"].startswith("200")
    # a chain to a type the token may search is answered
    to_patient = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation?subject:Patient.gender=female&_summary=count"}}]}
    answered = call("POST", f"{combined.fhir}/", system_write, json=to_patient)
    assert answered.status_code == 200 and answered.json()["entry"][0]["resource"]["total"] > 0


def test_system_history_needs_read_on_every_type_broadly(combined, p1_read, system_read, system_write):
    for token in (p1_read, system_write):  # a patient's compartment; or system scopes on a few types only
        refused = call("GET", f"{combined.fhir}/_history", token, params={"_count": 5})
        assert refused.status_code == 403 and outcome_id(refused) == "history-needs-broad-scope"
    page = call("GET", f"{combined.fhir}/_history", system_read, params={"_count": 5})
    assert page.status_code == 200 and len(page.json()["entry"]) == 5 and page.json()["total"] > 5
    assert any(link["relation"] == "next" for link in page.json()["link"])


def test_read_only_token_cannot_write(combined, p1_read):
    response = call("POST", f"{combined.fhir}/Observation", p1_read, json=observation(P1))
    assert response.status_code == 403 and outcome_id(response) == "insufficient-scope"
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": observation(P1), "request": {"method": "POST", "url": "Observation"}}]}
    assert call("POST", f"{combined.fhir}/", p1_read, json=bundle).status_code == 403


def test_patient_write_token_writes_inside_its_compartment_only(combined, p1_write, system_read):
    created = call("POST", f"{combined.fhir}/Observation", p1_write, json=observation(P1))
    assert created.status_code == 201, created.text
    outside = call("POST", f"{combined.fhir}/Observation", p1_write, json=observation(P2))
    assert outside.status_code == 403 and outcome_id(outside) == "outside-compartment"
    theirs = call("GET", f"{combined.fhir}/Observation", system_read,
                  params={"subject": f"Patient/{P2}", "_count": 1}).json()["entry"][0]["resource"]
    assert call("PUT", f"{combined.fhir}/Observation/{theirs['id']}", p1_write, json=theirs).status_code == 403
    moved = dict(created.json(), subject={"reference": f"Patient/{P2}"})
    assert call("PUT", f"{combined.fhir}/Observation/{moved['id']}", p1_write, json=moved).status_code == 403
    assert call("DELETE", f"{combined.fhir}/Observation/{theirs['id']}", p1_write).status_code == 403
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": observation(P2), "request": {"method": "POST", "url": "Observation"}}]}
    assert call("POST", f"{combined.fhir}/", p1_write, json=bundle).status_code == 403
    assert call("DELETE", f"{combined.fhir}/Observation/{created.json()['id']}", p1_write).status_code == 204


EMPTY = {"resourceType": "Parameters"}


def test_operations_on_other_patients_are_refused(combined, p1_read):
    assert call("POST", f"{combined.fhir}/Patient/{P1}/$validate", p1_read, json=EMPTY).status_code == 200
    for op in ("$validate", "$simulate", "$predict-dropout", "$no-such-operation"):
        response = call("POST", f"{combined.fhir}/Patient/{P2}/{op}", p1_read, json=EMPTY)
        assert response.status_code == 403, (op, response.text)
    # cohort targets summarize many participants: never for a patient-only token
    study = call("POST", f"{combined.fhir}/ResearchStudy/tt-201/$predict-dropout", p1_read, json=EMPTY)
    assert study.status_code == 403
    # ... nor may a cohort operation write with permissions that come from one patient's compartment
    mixed = combined.user_token("patient/*.cruds user/ResearchStudy.rs user/ResearchSubject.rs", patient=P1)
    study = call("POST", f"{combined.fhir}/ResearchStudy/tt-201/$predict-dropout", mixed["access_token"], json=EMPTY)
    assert study.status_code == 403 and outcome_id(study) == "cohort-needs-broad-scope"
    assert "c on RiskAssessment" in study.json()["issue"][0]["diagnostics"]
    # a study-management summary (per-arm simulated bands) needs only the study-level scopes
    read_only = {"resourceType": "Parameters", "parameter": [{"name": "horizonDays", "valueInteger": 7}]}
    allowed = call("POST", f"{combined.fhir}/ResearchStudy/tt-201/$simulate", mixed["access_token"], json=read_only)
    assert allowed.status_code == 200, allowed.text
    # $predict-dropout persists by default: a read-only token may only ask with persist=false
    persisting = call("POST", f"{combined.fhir}/Patient/{P1}/$predict-dropout", p1_read, json=EMPTY)
    assert persisting.status_code == 403 and outcome_id(persisting) == "insufficient-scope"
    dry_run = {"resourceType": "Parameters", "parameter": [{"name": "persist", "valueBoolean": False}]}
    asked = call("POST", f"{combined.fhir}/Patient/{P1}/$predict-dropout", p1_read, json=dry_run)
    assert asked.status_code != 403, asked.text


def test_withdrawal_prediction_is_held_to_the_same_checks(combined, p1_read):
    # outcome=withdrawal takes the same route: another patient is refused, the own one answers read-only
    dry_run = {"resourceType": "Parameters", "parameter": [{"name": "outcome", "valueCode": "withdrawal"},
                                                           {"name": "persist", "valueBoolean": False}]}
    other = call("POST", f"{combined.fhir}/Patient/{P2}/$predict-dropout", p1_read, json=dry_run)
    assert other.status_code == 403, other.text
    study = call("POST", f"{combined.fhir}/ResearchStudy/tt-201/$predict-dropout", p1_read, json=dry_run)
    assert study.status_code == 403
    own = call("POST", f"{combined.fhir}/Patient/{P1}/$predict-dropout", p1_read, json=dry_run)
    # allowed through (the demo participant may have finished the schedule: then 422 no-next-visit)
    assert own.status_code != 403, own.text
    if own.status_code == 422:
        assert outcome_id(own) == "no-next-visit" and "withdrawal" in own.text


def test_schedule_optimisation_is_held_to_the_compartment_and_write_scopes(combined, p1_read):
    url = f"{combined.fhir}/Patient/{{}}/$optimize-schedule"
    dry_run = {"resourceType": "Parameters", "parameter": [{"name": "persist", "valueBoolean": False},
                                                           {"name": "replicates", "valueInteger": 20}]}
    other = call("POST", url.format(P2), p1_read, json=dry_run)
    assert other.status_code == 403 and outcome_id(other) == "outside-compartment"
    study = call("POST", f"{combined.fhir}/ResearchStudy/tt-201/$optimize-schedule", p1_read, json=dry_run)
    assert study.status_code == 403
    # proposals are Appointments, CarePlans and a Provenance: a read-only token may not store them
    persisting = call("POST", url.format(P1), p1_read, json=EMPTY)
    assert persisting.status_code == 403 and outcome_id(persisting) == "insufficient-scope"
    # even on its own Patient the schedule weighs other participants' appointments against the site's
    # capacity: nothing a patient-limited token may see, so it is refused with persist=false too
    own = call("POST", url.format(P1), p1_read, json=dry_run)
    assert own.status_code == 403 and outcome_id(own) == "cross-patient-operation"
    assert "capacity" in own.json()["issue"][0]["diagnostics"]
    clinician = combined.user_token("user/*.rs", patient=P1)["access_token"]
    asked = call("POST", url.format(P1), clinician, json=dry_run)
    assert asked.status_code != 403, asked.text


def test_outreach_task_is_visible_to_its_patients_token(combined, p1_read, system_write):
    task = {"resourceType": "Task", "status": "requested", "intent": "proposal", "description": "Call about visit 3",
            "for": {"reference": f"Patient/{P1}"}}
    mine = call("POST", f"{combined.fhir}/Task", system_write, json=task)
    theirs = call("POST", f"{combined.fhir}/Task", system_write, json=dict(task, **{"for": {"reference": f"Patient/{P2}"}}))
    assert mine.status_code == theirs.status_code == 201
    assert call("GET", f"{combined.fhir}/Task/{mine.json()['id']}", p1_read).status_code == 200
    assert call("GET", f"{combined.fhir}/Task/{theirs.json()['id']}", p1_read).status_code == 403
    found = call("GET", f"{combined.fhir}/Task", p1_read).json()
    assert {e["resource"]["for"]["reference"] for e in found["entry"]} == {f"Patient/{P1}"}


# --- backend services (system scopes) --------------------------------------------------------------------

def test_system_scopes_work_for_backend_clients(combined, system_read, system_write):
    everyone = call("GET", f"{combined.fhir}/Patient", system_read).json()
    from tests.smart_app.conftest import DEMO_PARTICIPANTS

    assert len(everyone["entry"]) == DEMO_PARTICIPANTS
    assert call("GET", f"{combined.fhir}/ResearchStudy/tt-201", system_read).status_code == 200
    assert call("POST", f"{combined.fhir}/Observation", system_read, json=observation(P2)).status_code == 403
    assert call("POST", f"{combined.fhir}/Observation", system_write, json=observation(P2)).status_code == 201
    assert call("POST", f"{combined.fhir}/Patient", system_write,
                json={"resourceType": "Patient"}).status_code == 403  # Patient.rs only


# --- configuration and CLI ----------------------------------------------------------------------------------

def test_smart_mode_without_an_issuer_refuses_to_start(tmp_path):
    with pytest.raises(ValueError, match="SMART_ISSUER"):
        create_app({"DATA_DIR": str(tmp_path)})
    with pytest.raises(ValueError, match="AUTH_MODE"):
        create_app({"DATA_DIR": str(tmp_path), "AUTH_MODE": "sometimes"})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_open_mode_is_accepted_on_loopback(host):
    assert is_loopback(host)
    check_auth_mode("open", host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org"])
def test_open_mode_is_refused_off_loopback(host):
    assert not is_loopback(host)
    with pytest.raises(FhirError, match="only allowed on a loopback host"):
        check_auth_mode("open", host)
    check_auth_mode("smart", host)  # smart mode may listen anywhere


def test_cli_refuses_open_mode_on_all_interfaces(tmp_path, capsys):
    assert main(["serve", "--auth", "open", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 1
    assert "--auth open serves participant data without any authorization" in capsys.readouterr().err


def test_async_jobs_are_visible_to_their_submitter_only(combined, system_read, p1_read):
    from joserfc.jwk import RSAKey

    started = call("POST", f"{combined.fhir}/ResearchStudy/tt-201/$simulate", system_read,
                   json={"resourceType": "Parameters", "parameter": [{"name": "horizonDays", "valueInteger": 7}]},
                   headers={"Prefer": "respond-async"})
    assert started.status_code == 202, started.text
    job = started.headers["Content-Location"]
    other_client = combined.backend_token("system/*.rs", RSAKey.generate_key(2048, parameters={"kid": "k3"}))
    refused = call("GET", job, other_client["access_token"])
    assert refused.status_code == 403 and outcome_id(refused) == "not-job-owner"
    assert call("GET", job, None).status_code == 401
    assert call("GET", job, system_read).status_code in (200, 202)


# --- the inference service shares the FHIR server's rules ------------------------------------------------

def test_inference_service_needs_a_token_that_may_read_risk_assessments(combined, system_read, system_write):
    """/inference computes risks of participants: no token → 401, a token without RiskAssessment read → 403."""
    import numpy as np

    from inference.registry import default_registry

    probe = np.load(default_registry().latest("dropout").onnx_path.with_suffix(".probe.npz"))
    body = {"rows": probe["x"][:2].tolist()}
    url = f"{combined.base}/inference/predict/dropout"
    anonymous = requests.post(url, json=body, timeout=30)
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    narrow = requests.post(url, json=body, headers={"Authorization": f"Bearer {system_write}"}, timeout=30)
    assert narrow.status_code == 403, narrow.text
    allowed = requests.post(url, json=body, headers={"Authorization": f"Bearer {system_read}"}, timeout=30)
    assert allowed.status_code == 200, allowed.text
    assert len(allowed.json()["probabilities"]) == 2


def test_a_cohort_aggregate_needs_the_search_scopes_a_search_of_its_data_would(combined):
    """Deny by default: per-arm adverse-event counts ($safety-signal), strata and effect estimates are not for
    a token that may not search the participants' data; only the operations declared study-management
    summaries (the EDC study view's $simulate, $forecast-enrollment, $optimize-schedule) run with the
    study-level scopes."""
    narrow = combined.user_token("user/ResearchStudy.rs user/ResearchSubject.rs")["access_token"]
    dry_run = {"resourceType": "Parameters", "parameter": [{"name": "persist", "valueBoolean": False}]}
    assert call("GET", f"{combined.fhir}/AdverseEvent", narrow).status_code == 403
    for op in ("$safety-signal", "$stratify", "$estimate-effect"):
        refused = call("POST", f"{combined.fhir}/ResearchStudy/tt-201/{op}", narrow, json=dry_run)
        assert refused.status_code == 403 and outcome_id(refused) == "cohort-needs-broad-scope", (op, refused.text)
        assert "s on every type (*)" in refused.json()["issue"][0]["diagnostics"], op
    summary = call("POST", f"{combined.fhir}/ResearchStudy/tt-201/$forecast-enrollment", narrow, json=dry_run)
    assert summary.status_code != 403, summary.text
