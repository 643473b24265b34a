"""SMART App Launch over real HTTP: EHR, standalone and EDC launches, PKCE, OpenID Connect, refresh."""
from __future__ import annotations

import time
from urllib.parse import urljoin

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet

from .helpers import UserAgent, parse_forms, pkce_pair, submit

pytestmark = pytest.mark.api

SCOPE = "launch openid fhirUser offline_access patient/Observation.rs patient/Patient.read"


def _server_keys(stack) -> KeySet:
    return KeySet.import_key_set(requests.get(stack.auth + "/.well-known/jwks.json", timeout=10).json())


def _claims(stack, token: str) -> dict:
    return jwt.decode(token, _server_keys(stack), algorithms=["RS256", "ES256"]).claims


def test_ehr_launch_gives_patient_encounter_id_token_and_signed_access_token(stack, agent):
    app = stack.register_public_app()
    launch = stack.simulate_launch(agent, app["client_id"], patient="tt-001", encounter="enc-7")
    assert launch["url"].startswith("https://app.example/launch?")
    assert launch["iss"] == stack.fhir

    # The practitioner signed in to the simulated EHR with a password ...
    assert any("/login" in url for url in agent.pages)
    signed_in = len(agent.pages)
    redirect, verifier = stack.authorize(agent, app["client_id"], SCOPE, launch=launch["launch"], nonce="n-42")
    assert redirect["state"] == "st-1"
    # ... so the launch is the EHR's single sign-on: no second login page.
    assert not any("/login" in url for url in agent.pages[signed_in:])

    response = stack.exchange(app["client_id"], redirect["code"], verifier)
    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["patient"] == "tt-001" and body["encounter"] == "enc-7"
    assert body["need_patient_banner"] is True
    # v2 granted as v2, v1 (patient/Patient.read) granted as v1: what was asked
    assert "patient/Observation.rs" in body["scope"].split() and "patient/Patient.read" in body["scope"].split()
    assert "refresh_token" in body

    access = _claims(stack, body["access_token"])
    assert access["iss"] == stack.auth and access["aud"] == stack.fhir
    assert access["client_id"] == app["client_id"] and access["patient"] == "tt-001"
    assert access["exp"] > time.time()
    assert jwt.decode(body["access_token"], _server_keys(stack), algorithms=["RS256"]).header["kid"]

    id_token = _claims(stack, body["id_token"])
    assert id_token["aud"] == app["client_id"] and id_token["nonce"] == "n-42"
    assert id_token["fhirUser"] == stack.fhir + "/Practitioner/dr-chen"
    assert id_token["iss"] == stack.auth

    # A code is single-use.
    again = stack.exchange(app["client_id"], redirect["code"], verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_standalone_launch_signs_in_and_picks_patient(stack):
    app = stack.register_public_app()
    agent = UserAgent("dr.okafor")
    redirect, verifier = stack.authorize(agent, app["client_id"], "launch/patient openid fhirUser patient/*.rs",
                                         patient="tt-002")
    assert any("/login" in url for url in agent.pages)
    body = stack.exchange(app["client_id"], redirect["code"], verifier).json()
    assert body["patient"] == "tt-002"
    assert "launch/patient" in body["scope"]
    assert "refresh_token" not in body  # no offline_access asked
    assert _claims(stack, body["id_token"])["fhirUser"].endswith("/Practitioner/dr-okafor")


def test_patient_picker_lists_patients_read_from_the_fhir_server(stack, agent):
    app = stack.register_public_app()
    _, challenge = pkce_pair()
    params = stack.authorize_url_params(app["client_id"], "launch/patient patient/*.rs", challenge=challenge)
    login_page = agent.session.get(stack.auth + "/authorize", params=params)  # redirected to the login page
    signed_in = submit(agent.session, login_page.url, parse_forms(login_page.text)[0],
                       {"username": "dr.chen", "password": "trialtwin"})
    assert signed_in.status_code == 302
    picker = agent.session.get(urljoin(login_page.url, signed_in.headers["Location"]))
    form = parse_forms(picker.text)[0]
    # The auth server listed patients by calling the FHIR app with its own short-lived system token.
    assert form.selects["selected_patient"] == ["tt-001", "tt-002"]
    assert "Ana Silva" in picker.text


def test_edc_launch_carries_fhir_context(stack, agent):
    app = stack.register_public_app()
    launch = stack.simulate_launch(agent, app["client_id"], study="tt-201", subject="rs-0042")
    redirect, verifier = stack.authorize(agent, app["client_id"], "launch openid fhirUser user/*.rs",
                                         launch=launch["launch"])
    body = stack.exchange(app["client_id"], redirect["code"], verifier).json()
    assert body["fhirContext"] == [{"reference": "ResearchStudy/tt-201"}, {"reference": "ResearchSubject/rs-0042"}]
    assert "patient" not in body
    assert _claims(stack, body["access_token"])["fhirContext"] == body["fhirContext"]


def test_refresh_rotates_and_keeps_context(stack, agent):
    app = stack.register_public_app()
    launch = stack.simulate_launch(agent, app["client_id"], patient="tt-001")
    redirect, verifier = stack.authorize(agent, app["client_id"], SCOPE, launch=launch["launch"])
    first = stack.exchange(app["client_id"], redirect["code"], verifier).json()
    refreshed = requests.post(stack.token_endpoint, data={
        "grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": app["client_id"]},
        timeout=10)
    assert refreshed.status_code == 200, refreshed.text
    second = refreshed.json()
    assert second["patient"] == "tt-001" and second["scope"] == first["scope"]
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert _claims(stack, second["access_token"])["patient"] == "tt-001"
    replay = requests.post(stack.token_endpoint, data={
        "grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": app["client_id"]},
        timeout=10)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"


@pytest.mark.parametrize("method, challenge, expected", [
    ("plain", "x" * 43, "S256"),
    (None, None, "PKCE is required"),
    ("S256", None, "PKCE is required"),
])
def test_pkce_is_mandatory_and_s256_only(stack, agent, method, challenge, expected):
    app = stack.register_public_app()
    params = stack.authorize_url_params(app["client_id"], "launch/patient patient/*.rs", challenge=challenge,
                                        method=method)
    response = agent.session.get(stack.auth + "/authorize", params=params, allow_redirects=False)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith("https://app.example/callback?") and "error=invalid_request" in location
    assert expected.replace(" ", "+") in location


def test_wrong_code_verifier_is_invalid_grant(stack, agent):
    app = stack.register_public_app()
    launch = stack.simulate_launch(agent, app["client_id"], patient="tt-001")
    redirect, _ = stack.authorize(agent, app["client_id"], SCOPE, launch=launch["launch"])
    wrong, _ = pkce_pair()
    response = stack.exchange(app["client_id"], redirect["code"], wrong)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


def test_wrong_audience_and_unknown_launch_are_refused(stack, agent):
    app = stack.register_public_app()
    _, challenge = pkce_pair()
    params = stack.authorize_url_params(app["client_id"], SCOPE, challenge=challenge, aud="https://evil.example/fhir",
                                        launch="whatever")
    response = agent.session.get(stack.auth + "/authorize", params=params, allow_redirects=False)
    assert "error=invalid_request" in response.headers["Location"] and "aud" in response.headers["Location"]
    params = stack.authorize_url_params(app["client_id"], SCOPE, challenge=challenge, launch="not-a-launch")
    response = agent.session.get(stack.auth + "/authorize", params=params, allow_redirects=False)
    assert "error=invalid_request" in response.headers["Location"] and "launch" in response.headers["Location"]


def test_unregistered_redirect_uri_is_not_redirected_to(stack, agent):
    app = stack.register_public_app()
    _, challenge = pkce_pair()
    params = stack.authorize_url_params(app["client_id"], SCOPE, challenge=challenge,
                                        redirect_uri="https://evil.example/cb")
    response = agent.session.get(stack.auth + "/authorize", params=params, allow_redirects=False)
    assert response.status_code == 400 and "Location" not in response.headers


def test_denial_returns_access_denied(stack, agent):
    app = stack.register_public_app()
    launch = stack.simulate_launch(agent, app["client_id"], patient="tt-001")
    redirect, _ = stack.authorize(agent, app["client_id"], SCOPE, launch=launch["launch"], decision="deny")
    assert redirect["error"] == "access_denied" and redirect["state"] == "st-1"


def test_wrong_password_shows_login_again(stack, agent):
    app = stack.register_public_app()
    _, challenge = pkce_pair()
    params = stack.authorize_url_params(app["client_id"], "launch/patient patient/*.rs", challenge=challenge)
    page = agent.session.get(stack.auth + "/authorize", params=params)
    response = submit(agent.session, page.url, parse_forms(page.text)[0], {"username": "dr.chen", "password": "nope"})
    assert response.status_code == 401 and "wrong password" in response.text


def test_launch_simulator_rejects_missing_context(stack, agent):
    app = stack.register_public_app()
    page = agent.open(stack.auth + "/launch-simulator")
    response = submit(agent.session, page.url, parse_forms(page.text)[0], {"client_id": app["client_id"]})
    assert response.status_code == 400 and "choose a patient" in response.text


def test_concurrent_exchanges_of_one_code_yield_one_token(stack, agent):
    from concurrent.futures import ThreadPoolExecutor
    app = stack.register_public_app()
    launch = stack.simulate_launch(agent, app["client_id"], patient="tt-001")
    redirect, verifier = stack.authorize(agent, app["client_id"], SCOPE, launch=launch["launch"])
    with ThreadPoolExecutor(4) as pool:
        statuses = sorted(pool.map(lambda _: stack.exchange(app["client_id"], redirect["code"], verifier).status_code,
                                   range(4)))
    assert statuses == [200, 400, 400, 400]


def test_launch_simulator_lists_studies_from_fhir_and_falls_back_to_typed_ids(stack, agent, tmp_path):
    page = agent.open(stack.auth + "/launch-simulator")
    assert page.status_code == 200
    assert '<option value="tt-201">TT-201</option>' in page.text
    assert '<option value="tt-002">Ben Okoro</option>' in page.text

    # The same app with an unreachable FHIR server still works: ids are typed.
    from smart_app.authz import create_app
    from tests.live_server import serve
    from .conftest import TEST_AUTH_CONFIG, TEST_REGISTRATION_TOKEN
    lonely = create_app({"DATA_DIR": str(tmp_path / "lonely"), "FHIR_BASE_URL": "http://127.0.0.1:9/fhir",
                         "FHIR_HTTP_TIMEOUT": 0.5, **TEST_AUTH_CONFIG})
    with serve(lonely) as base:
        app = requests.post(base + "/register", json={
            "redirect_uris": ["https://app.example/callback"], "launch_uri": "https://app.example/launch",
            "token_endpoint_auth_method": "none", "scope": "launch patient/*.rs"}, timeout=10,
            headers={"Authorization": f"Bearer {TEST_REGISTRATION_TOKEN}"}).json()
        browser = UserAgent()
        simulator = browser.open(base + "/launch-simulator")
        assert simulator.status_code == 200 and "is not reachable" in simulator.text
        launched = submit(browser.session, simulator.url, parse_forms(simulator.text)[0],
                          {"client_id": app["client_id"], "patient": "typed-123"})
    assert launched.status_code == 302
    assert "iss=http%3A%2F%2F127.0.0.1%3A9%2Ffhir" in launched.headers["Location"]
