"""SMART Backend Services over real HTTP: client_credentials with private_key_jwt (RS384/ES384) and every refusal."""
from __future__ import annotations

import time

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from smart_app.rfc7523 import ASSERTION_TYPE

from .helpers import client_assertion

pytestmark = pytest.mark.api


def _token(stack, assertion: str, scope: str = "system/Observation.rs system/Patient.rs") -> requests.Response:
    return requests.post(stack.token_endpoint, data={
        "grant_type": "client_credentials", "scope": scope,
        "client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}, timeout=10)


@pytest.mark.parametrize("key_name, alg", [("rsa_key", "RS384"), ("ec_key", "ES384")])
def test_backend_token_for_rs384_and_es384(stack, backend_client, request, key_name, alg):
    key = request.getfixturevalue(key_name)
    response = _token(stack, client_assertion(key, backend_client["client_id"], stack.token_endpoint, alg=alg))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer" and 0 < body["expires_in"] <= 300
    assert body["scope"] == "system/Observation.rs system/Patient.rs"
    assert "refresh_token" not in body and "id_token" not in body
    keys = KeySet.import_key_set(requests.get(stack.auth + "/.well-known/jwks.json", timeout=10).json())
    claims = jwt.decode(body["access_token"], keys, algorithms=["RS256"]).claims
    assert claims["client_id"] == backend_client["client_id"] and claims["aud"] == stack.fhir
    assert claims["exp"] - claims["iat"] <= 300


def test_only_registered_system_scopes_are_granted(stack, backend_client, rsa_key):
    response = _token(stack, client_assertion(rsa_key, backend_client["client_id"], stack.token_endpoint),
                      scope="system/Observation.rs system/Encounter.rs user/*.cruds launch")
    assert response.status_code == 200
    assert response.json()["scope"] == "system/Observation.rs"
    refused = _token(stack, client_assertion(rsa_key, backend_client["client_id"], stack.token_endpoint),
                     scope="user/*.cruds patient/*.rs")
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"


def test_backend_token_lifetime_is_capped_at_five_minutes(tmp_path, rsa_key):
    from smart_app.authz import create_app
    from tests.live_server import serve
    from .conftest import TEST_AUTH_CONFIG, TEST_REGISTRATION_TOKEN
    app = create_app({"DATA_DIR": str(tmp_path), "BACKEND_TOKEN_LIFETIME": 3600, **TEST_AUTH_CONFIG})
    with serve(app) as base:
        client = requests.post(base + "/register", json={
            "grant_types": ["client_credentials"], "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [rsa_key.as_dict(private=False)]}, "scope": "system/*.rs"}, timeout=10,
            headers={"Authorization": f"Bearer {TEST_REGISTRATION_TOKEN}"}).json()
        body = requests.post(base + "/token", data={
            "grant_type": "client_credentials", "scope": "system/*.rs", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(rsa_key, client["client_id"], base + "/token")}, timeout=10).json()
    assert body["expires_in"] == 300


def _refused(response: requests.Response, fragment: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"] == "invalid_client"
    assert fragment in body["error_description"], body["error_description"]


def test_expired_assertion(stack, backend_client, rsa_key):
    _refused(_token(stack, client_assertion(rsa_key, backend_client["client_id"], stack.token_endpoint, exp_in=-5)),
             "expired")


def test_assertion_expiring_more_than_five_minutes_ahead(stack, backend_client, rsa_key):
    _refused(_token(stack, client_assertion(rsa_key, backend_client["client_id"], stack.token_endpoint, exp_in=400)),
             "more than 300 s")


def test_replayed_jti(stack, backend_client, rsa_key):
    assertion = client_assertion(rsa_key, backend_client["client_id"], stack.token_endpoint, jti="once-only")
    assert _token(stack, assertion).status_code == 200
    _refused(_token(stack, assertion), "already been used")
    # A fresh assertion with the same jti is a replay too, until the first one expires.
    again = client_assertion(rsa_key, backend_client["client_id"], stack.token_endpoint, jti="once-only")
    _refused(_token(stack, again), "already been used")


def test_wrong_audience(stack, backend_client, rsa_key):
    _refused(_token(stack, client_assertion(rsa_key, backend_client["client_id"], stack.fhir)), "aud must be")


def test_unregistered_key(stack, backend_client):
    stranger = RSAKey.generate_key(2048, parameters={"kid": "backend-rsa"})  # same kid, different key
    _refused(_token(stack, client_assertion(stranger, backend_client["client_id"], stack.token_endpoint)),
             "signature does not verify")
    unknown_kid = RSAKey.generate_key(2048, parameters={"kid": "other"})
    _refused(_token(stack, client_assertion(unknown_kid, backend_client["client_id"], stack.token_endpoint)),
             "no registered key")


@pytest.mark.parametrize("alg", ["RS256", "HS256"])
def test_wrong_algorithm(stack, backend_client, rsa_key, alg):
    # RS256 with the registered key's own private material: the signature is genuine, the algorithm is not allowed.
    same_rsa = RSAKey.import_key({k: v for k, v in rsa_key.as_dict(private=True).items() if k != "alg"})
    key = same_rsa if alg == "RS256" else OctKey.import_key("s" * 32)
    assertion = client_assertion(key, backend_client["client_id"], stack.token_endpoint, alg=alg, kid="backend-rsa")
    _refused(_token(stack, assertion), "is not accepted")


def test_alg_none(stack, backend_client):
    import base64
    import json

    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    unsigned = b64({"alg": "none", "typ": "JWT"}) + "." + b64({
        "iss": backend_client["client_id"], "sub": backend_client["client_id"], "aud": stack.token_endpoint,
        "exp": int(time.time()) + 60, "jti": "x"}) + "."
    _refused(_token(stack, unsigned), "is not accepted")


def test_iss_must_equal_sub(stack, backend_client, rsa_key):
    _refused(_token(stack, client_assertion(rsa_key, backend_client["client_id"], stack.token_endpoint,
                                            iss="someone-else")), "iss and sub")


def test_wrong_assertion_type_and_missing_assertion(stack, backend_client, rsa_key):
    response = requests.post(stack.token_endpoint, data={
        "grant_type": "client_credentials", "scope": "system/Patient.rs", "client_assertion_type": "urn:other",
        "client_assertion": client_assertion(rsa_key, backend_client["client_id"], stack.token_endpoint)}, timeout=10)
    _refused(response, "client_assertion_type")
    response = requests.post(stack.token_endpoint, data={"grant_type": "client_credentials",
                                                         "scope": "system/Patient.rs"}, timeout=10)
    assert response.status_code in (400, 401) and response.json()["error"] == "invalid_client"


def test_public_client_cannot_use_client_credentials(stack):
    app = stack.register_public_app()
    response = requests.post(stack.token_endpoint, data={"grant_type": "client_credentials", "client_id": app["client_id"],
                                                         "scope": "system/Patient.rs"}, timeout=10)
    assert response.json()["error"] == "invalid_client"
