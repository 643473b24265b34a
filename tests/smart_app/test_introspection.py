"""RFC 7662 token introspection over HTTP: authenticated callers, active and inactive tokens."""
from __future__ import annotations

import pytest
import requests

from smart_app.rfc7523 import ASSERTION_TYPE

from .helpers import client_assertion

pytestmark = pytest.mark.api


@pytest.fixture
def resource_server(stack):
    """The FHIR server registers as a confidential client to call introspection."""
    return stack.register(client_name="FHIR resource server", redirect_uris=["https://fhir.example/unused"],
                          token_endpoint_auth_method="client_secret_basic", scope="")


def _launch_token(stack, agent) -> dict:
    app = stack.register_public_app()
    launch = stack.simulate_launch(agent, app["client_id"], patient="tt-001", study="tt-201")
    redirect, verifier = stack.authorize(agent, app["client_id"],
                                         "launch openid fhirUser offline_access patient/Observation.rs",
                                         launch=launch["launch"])
    return {"client_id": app["client_id"], **stack.exchange(app["client_id"], redirect["code"], verifier).json()}


def test_active_access_token_reports_scope_and_context(stack, agent, resource_server):
    token = _launch_token(stack, agent)
    response = requests.post(stack.auth + "/introspect", data={"token": token["access_token"]},
                             auth=(resource_server["client_id"], resource_server["client_secret"]), timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["active"] is True
    assert body["client_id"] == token["client_id"] and body["scope"] == token["scope"]
    assert body["patient"] == "tt-001" and body["fhirContext"] == [{"reference": "ResearchStudy/tt-201"}]
    assert body["sub"] == "dr.chen" and body["fhirUser"].endswith("/Practitioner/dr-chen")
    assert body["exp"] > body["iat"]


def test_refresh_token_is_introspectable_and_inactive_after_rotation(stack, agent, resource_server):
    token = _launch_token(stack, agent)
    auth = (resource_server["client_id"], resource_server["client_secret"])
    before = requests.post(stack.auth + "/introspect", data={"token": token["refresh_token"]}, auth=auth, timeout=10)
    assert before.json()["active"] is True and before.json()["client_id"] == token["client_id"]
    requests.post(stack.token_endpoint, data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"],
                                              "client_id": token["client_id"]}, timeout=10).raise_for_status()
    after_refresh = requests.post(stack.auth + "/introspect", data={"token": token["refresh_token"]}, auth=auth,
                                  timeout=10)
    assert after_refresh.json() == {"active": False}
    # The access token issued with the rotated refresh token is revoked with it.
    old_access = requests.post(stack.auth + "/introspect", data={"token": token["access_token"]}, auth=auth, timeout=10)
    assert old_access.json() == {"active": False}


def test_garbage_and_foreign_tokens_are_inactive(stack, resource_server, rsa_key):
    auth = (resource_server["client_id"], resource_server["client_secret"])
    forged = client_assertion(rsa_key, "x", stack.fhir, alg="RS384")  # well-formed JWT, not ours
    for value in ("not-a-token", forged):
        response = requests.post(stack.auth + "/introspect", data={"token": value}, auth=auth, timeout=10)
        assert response.status_code == 200 and response.json() == {"active": False}


def test_introspection_requires_client_authentication(stack, agent):
    token = _launch_token(stack, agent)
    anonymous = requests.post(stack.auth + "/introspect", data={"token": token["access_token"]}, timeout=10)
    assert anonymous.status_code in (400, 401) and anonymous.json()["error"] == "invalid_client"
    public = requests.post(stack.auth + "/introspect", data={"token": token["access_token"],
                                                             "client_id": token["client_id"]}, timeout=10)
    assert public.json()["error"] == "invalid_client"


def test_introspection_with_private_key_jwt(stack, agent, backend_client, rsa_key):
    token = _launch_token(stack, agent)
    response = requests.post(stack.auth + "/introspect", data={
        "token": token["access_token"], "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(rsa_key, backend_client["client_id"], stack.auth + "/introspect")},
        timeout=10)
    assert response.status_code == 200 and response.json()["active"] is True
