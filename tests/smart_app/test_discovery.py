"""SMART discovery documents served by the auth app and the FHIR front, and the published JWKS."""
from __future__ import annotations

import pytest
import requests

from smart_app.discovery import smart_configuration

pytestmark = pytest.mark.api

# SMART App Launch 2.2, "Conformance": required fields, plus those the advertised capabilities make required
# (issuer and jwks_uri for sso-openid-connect; authorization_endpoint for launch-ehr / launch-standalone).
REQUIRED = ("issuer", "jwks_uri", "authorization_endpoint", "grant_types_supported", "token_endpoint",
            "capabilities", "code_challenge_methods_supported")
CAPABILITIES = ("launch-ehr", "launch-standalone", "client-public", "client-confidential-symmetric",
                "client-confidential-asymmetric", "sso-openid-connect", "context-ehr-patient", "context-ehr-encounter",
                "context-standalone-patient", "permission-v2", "permission-patient", "permission-user",
                "permission-offline")


def test_smart_configuration_from_auth_and_fhir_base(stack):
    from_auth = requests.get(stack.auth + "/.well-known/smart-configuration", timeout=10)
    from_fhir = requests.get(stack.fhir + "/.well-known/smart-configuration", timeout=10)
    assert from_auth.status_code == from_fhir.status_code == 200
    assert from_auth.headers["Content-Type"].startswith("application/json")
    doc = from_auth.json()
    assert doc == from_fhir.json()
    for name in REQUIRED:
        assert doc.get(name), name
    assert set(CAPABILITIES) <= set(doc["capabilities"])
    assert doc["issuer"] == stack.auth
    assert doc["code_challenge_methods_supported"] == ["S256"]  # plain is never offered
    assert set(doc["grant_types_supported"]) == {"authorization_code", "refresh_token", "client_credentials"}
    assert set(doc["token_endpoint_auth_methods_supported"]) == {
        "none", "client_secret_basic", "client_secret_post", "private_key_jwt"}
    assert set(doc["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert "code" in doc["response_types_supported"]
    assert {"launch", "launch/patient", "openid", "fhirUser", "offline_access"} <= set(doc["scopes_supported"])
    # Every advertised endpoint answers (GET on POST-only endpoints: 405, never 404).
    assert requests.get(doc["jwks_uri"], timeout=10).status_code == 200
    for name in ("token_endpoint", "introspection_endpoint", "registration_endpoint"):
        assert requests.get(doc[name], timeout=10).status_code == 405, name


def test_published_jwks_holds_public_keys_with_kids(stack):
    keys = requests.get(stack.auth + "/.well-known/jwks.json", timeout=10).json()["keys"]
    assert {k["kty"] for k in keys} == {"RSA", "EC"}
    assert all(k.get("kid") and "d" not in k for k in keys)


def test_keys_persist_across_restarts(tmp_path):
    from smart_app.authz import create_app
    first = create_app({"DATA_DIR": str(tmp_path)}).test_client().get("/.well-known/jwks.json").json
    second = create_app({"DATA_DIR": str(tmp_path)}).test_client().get("/.well-known/jwks.json").json
    assert first == second
    assert (tmp_path / "smart-signing-keys.json").stat().st_mode & 0o077 == 0


def test_openid_configuration(stack):
    doc = requests.get(stack.auth + "/.well-known/openid-configuration", timeout=10).json()
    assert doc["issuer"] == stack.auth and "fhirUser" in doc["claims_supported"]


def test_function_form_uses_the_given_issuer():
    doc = smart_configuration({"ISSUER": "https://ehr.example/auth/"})
    assert doc["authorization_endpoint"] == "https://ehr.example/auth/authorize"
    assert doc["jwks_uri"] == "https://ehr.example/auth/.well-known/jwks.json"


def test_metadata_oauth_uris_carry_only_what_its_definition_defines(stack):
    # The oauth-uris extension (fhir-registry.smarthealthit.org) defines authorize, token, register and manage;
    # an "introspect" part made HAPI's validator reject the CapabilityStatement. Its URLs are the discovery's.
    security = requests.get(stack.fhir + "/metadata", timeout=30).json()["rest"][0]["security"]
    [uris] = [e for e in security["extension"] if e["url"].endswith("/StructureDefinition/oauth-uris")]
    parts = {p["url"]: p["valueUri"] for p in uris["extension"]}
    assert set(parts) <= {"authorize", "token", "register", "manage"}, parts
    doc = requests.get(stack.fhir + "/.well-known/smart-configuration", timeout=10).json()
    assert parts["authorize"] == doc["authorization_endpoint"] and parts["token"] == doc["token_endpoint"]
    assert parts["register"] == doc["registration_endpoint"]
    assert doc["revocation_endpoint"] and doc["introspection_endpoint"]  # in discovery instead
