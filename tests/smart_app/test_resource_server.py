"""The resource-server token library against the live authorization server: JWKS and introspection paths,
error challenges, and enforcement inside a real Flask FHIR front."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from fhir_ops.errors import FhirError, Forbidden, Unauthorized
from smart_app.jwks import SigningKeys
from smart_app.resource_server import TokenValidator
from smart_app.tokens import sign

from .helpers import UserAgent

pytestmark = pytest.mark.api

SCOPE = "launch openid fhirUser offline_access patient/Observation.rs patient/Patient.rs"


def _launch(stack, agent, scope=SCOPE, **context) -> dict:
    app = stack.register_public_app()
    launch = stack.simulate_launch(agent, app["client_id"], **context)
    redirect, verifier = stack.authorize(agent, app["client_id"], scope, launch=launch["launch"])
    return {"client_id": app["client_id"], **stack.exchange(app["client_id"], redirect["code"], verifier).json()}


def _validator(stack, **kw) -> TokenValidator:
    return TokenValidator(issuer=stack.auth, audience=stack.fhir, jwks_uri=stack.auth + "/.well-known/jwks.json", **kw)


def _server_keys(stack) -> SigningKeys:
    return SigningKeys.load_or_create(Path(stack.auth_app.config["KEYS_FILE"]))


def test_jwt_validated_with_cached_jwks(stack, agent):
    token = _launch(stack, agent, patient="tt-001", study="tt-201")
    validator = _validator(stack)
    access = validator.authenticate(f"Bearer {token['access_token']}")
    assert access.client_id == token["client_id"] and access.patient == "tt-001"
    assert access.user == "Practitioner/dr-chen" and access.subject == "dr.chen"
    assert access.fhir_context == ({"reference": "ResearchStudy/tt-201"},)
    assert access.can("read", "Observation") and access.can("s", "Patient") and not access.can("c", "Observation")
    validator.validate(token["access_token"])
    assert validator.jwks_cache.fetch_count == 1


def test_unknown_kid_refetches_at_most_once_per_interval(stack, agent):
    token = _launch(stack, agent, patient="tt-001")
    clock = [time.time()]
    validator = _validator(stack, clock=lambda: clock[0])
    validator.validate(token["access_token"])
    stranger = SigningKeys.load_or_create(Path(stack.auth_app.config["DATA_DIR"]) / "other-keys.json")
    forged = sign(stranger, {"iss": stack.auth, "aud": stack.fhir, "exp": int(clock[0]) + 60, "scope": "user/*.cruds"})
    for _ in range(3):
        with pytest.raises(Unauthorized):
            validator.validate(forged)
    assert validator.jwks_cache.fetch_count == 1  # within min_refresh_interval: no new fetch
    clock[0] += 11
    with pytest.raises(Unauthorized):
        validator.validate(forged)
    assert validator.jwks_cache.fetch_count == 2


@pytest.mark.parametrize("change, message", [
    ({"exp": -120}, "expired"),
    ({"aud": "https://other.example/fhir"}, "audience"),
    ({"iss": "https://other.example/auth"}, "wrong issuer"),
])
def test_bad_claims_are_invalid_token(stack, change, message):
    now = int(time.time())
    claims = {"iss": stack.auth, "aud": stack.fhir, "exp": now + 60, "iat": now, "client_id": "c",
              "scope": "user/*.rs"}
    claims.update({k: (now + v if k == "exp" else v) for k, v in change.items()})
    token = sign(_server_keys(stack), claims)
    with pytest.raises(Unauthorized) as info:
        _validator(stack).validate(token)
    assert message in info.value.message
    challenge = info.value.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge


def test_tampered_token_and_bad_headers(stack, agent):
    token = _launch(stack, agent, patient="tt-001")["access_token"]
    header, payload, signature = token.split(".")
    tampered = ".".join([header, payload[:-4] + ("AAAA" if payload[-4:] != "AAAA" else "BBBB"), signature])
    validator = _validator(stack)
    with pytest.raises(Unauthorized, match="signature|malformed"):
        validator.validate(tampered)
    with pytest.raises(Unauthorized) as missing:
        validator.authenticate(None)
    assert missing.value.status == 401 and missing.value.headers["WWW-Authenticate"] == 'Bearer realm="fhir"'
    with pytest.raises(Unauthorized):
        validator.authenticate("Basic dXNlcjpwYXNz")


def test_validation_by_introspection(stack, agent):
    rs = stack.register(client_name="FHIR resource server", redirect_uris=["https://fhir.example/unused"],
                        token_endpoint_auth_method="client_secret_basic", scope="")
    token = _launch(stack, agent, patient="tt-002")
    validator = TokenValidator(issuer=stack.auth, audience=stack.fhir, introspection_endpoint=stack.auth + "/introspect",
                               introspection_auth=(rs["client_id"], rs["client_secret"]))
    access = validator.validate(token["access_token"])
    assert access.patient == "tt-002" and access.can("r", "Observation")
    with pytest.raises(Unauthorized, match="only access tokens"):
        validator.validate(token["refresh_token"])
    with pytest.raises(Unauthorized, match="not active"):
        validator.validate("opaque-and-unknown")
    wrong_credentials = TokenValidator(issuer=stack.auth, audience=stack.fhir,
                                       introspection_endpoint=stack.auth + "/introspect",
                                       introspection_auth=(rs["client_id"], "wrong"))
    # A resource server the issuer does not accept is a server-side fault: 503, not the caller's 401.
    with pytest.raises(FhirError) as info:
        wrong_credentials.validate(token["access_token"])
    assert info.value.status == 503 and info.value.error_id == "introspection-failed"


def test_fhir_front_enforces_scope_and_compartment(stack, agent):
    patient_token = _launch(stack, agent, patient="tt-002")["access_token"]
    bundle = requests.get(stack.fhir + "/Patient", headers={"Authorization": f"Bearer {patient_token}"}, timeout=10)
    assert bundle.status_code == 200
    assert [e["resource"]["id"] for e in bundle.json()["entry"]] == ["tt-002"]

    anonymous = requests.get(stack.fhir + "/Patient", timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["resourceType"] == "OperationOutcome"
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")

    obs_only = _launch(stack, UserAgent(), scope="launch patient/Observation.rs", patient="tt-002")["access_token"]
    forbidden = requests.get(stack.fhir + "/Patient", headers={"Authorization": f"Bearer {obs_only}"}, timeout=10)
    assert forbidden.status_code == 403
    assert 'error="insufficient_scope"' in forbidden.headers["WWW-Authenticate"]


def test_require_raises_forbidden_with_scope_hint(stack, agent):
    access = _validator(stack).validate(_launch(stack, agent, patient="tt-001")["access_token"])
    with pytest.raises(Forbidden) as info:
        access.require("update", "Observation")
    assert info.value.status == 403 and "patient/Observation.u" in info.value.headers["WWW-Authenticate"]
    assert access.require("search", "Observation") == "tt-001"


def test_validator_from_config_with_the_co_located_key_file(stack, agent):
    from smart_app.resource_server import validator_from_config
    assert validator_from_config({}) is None
    validator = validator_from_config({"SMART_ISSUER": stack.auth, "FHIR_BASE_URL": stack.fhir,
                                       "SMART_KEYS_FILE": stack.auth_app.config["KEYS_FILE"]})
    assert validator.jwks_cache is None  # keys read from disk, no HTTP
    access = validator.validate(_launch(stack, agent, patient="tt-001")["access_token"])
    assert access.patient == "tt-001"
