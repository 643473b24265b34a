"""``$export`` under SMART enforcement (the combined server, real signed tokens): a system export needs a
Backend Services token with system/*.rs; files go only to the job's owner; narrower tokens export less."""
from __future__ import annotations

import time

import pytest
import requests
from joserfc.jwk import RSAKey

from .conftest import DEMO_PARTICIPANTS, combined_server

pytestmark = pytest.mark.api
FHIR_JSON = "application/fhir+json"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from combined_server(tmp_path_factory)


def _key(kid: str):
    return RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS384"})


def headers(token: str, **extra) -> dict:
    return {"Authorization": f"Bearer {token}", "Accept": FHIR_JSON, **extra}


def kick_off(served, path: str, token: str) -> requests.Response:
    return requests.get(f"{served.fhir}/{path}", headers=headers(token, Prefer="respond-async"), timeout=60)


def finish(location: str, token: str) -> requests.Response:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        poll = requests.get(location, headers=headers(token), timeout=60)
        if poll.status_code != 202:
            return poll
        assert poll.headers["X-Progress"]
        time.sleep(0.2)
    raise AssertionError("export did not finish")


def error_id(resp) -> str:
    return resp.json()["issue"][0]["details"]["coding"][0]["code"]


def test_a_backend_services_token_exports_the_system_and_only_its_client_gets_the_files(served):
    token = served.backend_token("system/*.rs", _key("bulk"))["access_token"]
    resp = kick_off(served, "$export", token)
    assert resp.status_code == 202, resp.text
    poll = finish(resp.headers["Content-Location"], token)
    assert poll.status_code == 200, poll.text
    manifest = poll.json()
    assert manifest["requiresAccessToken"] is True
    counts = {o["type"]: o["count"] for o in manifest["output"]}
    assert counts["Patient"] == DEMO_PARTICIPANTS and counts["Consent"] == 3 * DEMO_PARTICIPANTS
    url = next(o["url"] for o in manifest["output"] if o["type"] == "Patient")
    got = requests.get(url, headers=headers(token), timeout=60)
    assert got.status_code == 200 and len(got.text.splitlines()) == DEMO_PARTICIPANTS
    assert requests.get(url, timeout=60).status_code == 401
    stranger = served.backend_token("system/*.rs", _key("other"))["access_token"]
    refused = requests.get(url, headers=headers(stranger), timeout=60)
    assert refused.status_code == 403 and error_id(refused) == "not-job-owner"
    assert requests.delete(resp.headers["Content-Location"], headers=headers(stranger), timeout=60).status_code == 403


def test_a_user_token_cannot_export_the_system(served):
    token = served.user_token("user/*.rs")["access_token"]
    resp = kick_off(served, "$export", token)
    assert resp.status_code == 403 and error_id(resp) == "needs-backend-services"


def test_a_backend_token_without_every_type_cannot_export_the_system(served):
    token = served.backend_token("system/Patient.rs system/Observation.rs", _key("narrow"))["access_token"]
    resp = kick_off(served, "$export", token)
    assert resp.status_code == 403 and error_id(resp) == "needs-backend-services"


def test_a_narrow_token_exports_only_the_types_it_may_read_and_says_what_it_left_out(served):
    token = served.backend_token("system/Patient.rs system/Observation.rs", _key("narrow2"))["access_token"]
    resp = kick_off(served, "Patient/$export", token)
    assert resp.status_code == 202, resp.text
    manifest = finish(resp.headers["Content-Location"], token).json()
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Observation"}
    assert manifest["error"] == []
    resp = kick_off(served, "Patient/$export?_type=Patient,Encounter", token)
    manifest = finish(resp.headers["Content-Location"], token).json()
    assert {o["type"] for o in manifest["output"]} == {"Patient"}
    errors = requests.get(manifest["error"][0]["url"], headers=headers(token), timeout=60).text
    assert "Encounter is not exported" in errors


def test_a_patient_scoped_token_cannot_export(served):
    token = served.user_token("patient/*.rs", patient="tt201-p001")["access_token"]
    for path in ("Patient/$export", "ResearchStudy/tt-201/$export", "$export"):
        resp = kick_off(served, path, token)
        assert resp.status_code == 403, (path, resp.text)
