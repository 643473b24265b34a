"""RFC 7591 dynamic client registration over HTTP, followed by a launch of the new app."""
from __future__ import annotations

import pytest
import requests
from joserfc.jwk import ECKey

pytestmark = pytest.mark.api

PUBLIC_EC = ECKey.generate_key("P-384").as_dict(private=False)


def test_registered_confidential_app_can_launch_with_client_secret_basic(stack, agent):
    app = stack.register(client_name="Site dashboard", redirect_uris=["https://site.example/cb"],
                         launch_uri="https://site.example/launch", token_endpoint_auth_method="client_secret_basic",
                         scope="launch openid fhirUser user/Observation.rs patient/*.read")
    assert app["client_secret"] and app["client_secret_expires_at"] == 0
    assert app["scope"] == "launch openid fhirUser user/Observation.rs patient/*.rs"
    launch = stack.simulate_launch(agent, app["client_id"], patient="tt-001")
    assert launch["url"].startswith("https://site.example/launch")
    redirect, verifier = stack.authorize(agent, app["client_id"], "launch openid fhirUser patient/*.read",
                                         launch=launch["launch"], redirect_uri="https://site.example/cb")
    # Without the secret the confidential client is refused ...
    anonymous = requests.post(stack.token_endpoint, data={
        "grant_type": "authorization_code", "code": redirect["code"], "redirect_uri": "https://site.example/cb",
        "client_id": app["client_id"], "code_verifier": verifier}, timeout=10)
    assert anonymous.json()["error"] == "invalid_client"
    # ... and with it, gets the token.
    response = requests.post(stack.token_endpoint, auth=(app["client_id"], app["client_secret"]), data={
        "grant_type": "authorization_code", "code": redirect["code"], "redirect_uri": "https://site.example/cb",
        "code_verifier": verifier}, timeout=10)
    assert response.status_code == 200, response.text
    # Asked in SMART v1 syntax, granted as asked (registration stored the v2 form).
    assert response.json()["patient"] == "tt-001" and response.json()["scope"] == "launch openid fhirUser patient/*.read"


def test_scopes_beyond_registration_are_not_granted(stack, agent):
    app = stack.register_public_app(scope="launch patient/Observation.rs")
    launch = stack.simulate_launch(agent, app["client_id"], patient="tt-001")
    redirect, verifier = stack.authorize(agent, app["client_id"], "launch patient/Observation.rs user/*.cruds",
                                         launch=launch["launch"])
    body = stack.exchange(app["client_id"], redirect["code"], verifier).json()
    assert body["scope"] == "launch patient/Observation.rs"


@pytest.mark.parametrize("metadata, error, fragment", [
    ({"token_endpoint_auth_method": "none", "scope": "launch"}, "invalid_redirect_uri", "redirect_uris is required"),
    ({"redirect_uris": ["app.example/cb"], "token_endpoint_auth_method": "none"}, "invalid_redirect_uri", "absolute"),
    ({"redirect_uris": ["https://app.example/cb#frag"]}, "invalid_redirect_uri", "fragment"),
    ({"redirect_uris": ["https://a.example/cb"], "token_endpoint_auth_method": "private_key_jwt"},
     "invalid_client_metadata", "exactly one of jwks or jwks_uri"),
    ({"redirect_uris": ["https://a.example/cb"], "token_endpoint_auth_method": "tls_client_auth"},
     "invalid_client_metadata", "token_endpoint_auth_method"),
    ({"grant_types": ["client_credentials"], "token_endpoint_auth_method": "private_key_jwt",
      "jwks": {"keys": [PUBLIC_EC]}, "scope": "patient/*.rs"},
     "invalid_client_metadata", "system/ scopes"),
    ({"grant_types": ["client_credentials"], "token_endpoint_auth_method": "private_key_jwt",
      "jwks": {"keys": "nope"}, "scope": "system/*.rs"}, "invalid_client_metadata", "jwks"),
    ({"redirect_uris": ["https://a.example/cb"], "scope": "patient/*.rs bogus"}, "invalid_client_metadata", "bogus"),
    ({"redirect_uris": ["https://a.example/cb"], "grant_types": ["implicit"]}, "invalid_client_metadata", "grant_types"),
])
def test_invalid_metadata_is_refused(stack, metadata, error, fragment):
    response = stack.post_registration(metadata)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == error and fragment in body["error_description"]


def test_private_keys_are_refused_in_jwks(stack, rsa_key):
    response = stack.post_registration({
        "grant_types": ["client_credentials"], "token_endpoint_auth_method": "private_key_jwt",
        "jwks": {"keys": [rsa_key.as_dict(private=True)]}, "scope": "system/*.rs"})
    assert response.status_code == 400 and "public keys only" in response.json()["error_description"]


def test_non_json_body_is_refused(stack):
    response = stack.post_registration("redirect_uris=x")
    assert response.status_code == 400 and response.json()["error"] == "invalid_client_metadata"


def test_registration_can_require_an_initial_access_token(tmp_path):
    from smart_app.authz import create_app
    from tests.live_server import serve
    app = create_app({"DATA_DIR": str(tmp_path), "REGISTRATION_ACCESS_TOKEN": "let-me-in"})
    metadata = {"redirect_uris": ["https://a.example/cb"], "token_endpoint_auth_method": "none"}
    with serve(app) as base:
        refused = requests.post(base + "/register", json=metadata, timeout=10)
        accepted = requests.post(base + "/register", json=metadata, headers={"Authorization": "Bearer let-me-in"},
                                 timeout=10)
    assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    assert accepted.status_code == 201


def test_asymmetric_confidential_app_authenticates_with_private_key_jwt(stack, rsa_key):
    from smart_app.rfc7523 import ASSERTION_TYPE

    from .helpers import UserAgent, client_assertion
    agent = UserAgent("dr.okafor")
    app = stack.register(client_name="Sponsor portal", redirect_uris=["https://sponsor.example/cb"],
                         token_endpoint_auth_method="private_key_jwt",
                         jwks={"keys": [rsa_key.as_dict(private=False)]}, scope="launch openid fhirUser user/*.rs")
    assert "client_secret" not in app
    launch = stack.simulate_launch(agent, app["client_id"], study="tt-201",
                                   launch_url="https://sponsor.example/launch")
    redirect, verifier = stack.authorize(agent, app["client_id"], "launch openid fhirUser user/*.rs",
                                         launch=launch["launch"], redirect_uri="https://sponsor.example/cb")
    response = requests.post(stack.token_endpoint, data={
        "grant_type": "authorization_code", "code": redirect["code"], "redirect_uri": "https://sponsor.example/cb",
        "code_verifier": verifier, "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(rsa_key, app["client_id"], stack.token_endpoint)}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["fhirContext"] == [{"reference": "ResearchStudy/tt-201"}]
