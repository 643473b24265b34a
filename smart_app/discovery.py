"""SMART App Launch 2.2 discovery: the ``.well-known/smart-configuration`` document.

A pure function of configuration so the authorization app and the FHIR app publish the same document.
"""
from __future__ import annotations

from typing import Mapping

#: SMART capabilities this server implements (SMART App Launch 2.2, "Capability Sets").
CAPABILITIES = [
    "launch-ehr", "launch-standalone", "authorize-post",
    "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
    "sso-openid-connect",
    "context-ehr-patient", "context-ehr-encounter", "context-standalone-patient",
    "context-banner", "context-style",
    "permission-v2", "permission-v1", "permission-patient", "permission-user", "permission-offline",
    "permission-online",
]

SCOPES_SUPPORTED = [
    "openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter",
    "offline_access", "online_access",
    "patient/*.cruds", "patient/*.rs", "user/*.cruds", "user/*.rs", "system/*.cruds", "system/*.rs",
]

#: Path of each endpoint under the issuer URL; one table so app routes and discovery cannot drift.
ENDPOINT_PATHS = {
    "authorization_endpoint": "/authorize",
    "token_endpoint": "/token",
    "introspection_endpoint": "/introspect",
    "revocation_endpoint": "/revoke",
    "registration_endpoint": "/register",
    "jwks_uri": "/.well-known/jwks.json",
}


def endpoint_url(issuer: str, name: str) -> str:
    """Absolute URL of endpoint ``name`` (a key of ``ENDPOINT_PATHS``) under ``issuer``."""
    return issuer.rstrip("/") + ENDPOINT_PATHS[name]


def smart_configuration(config: Mapping) -> dict:
    """Build the SMART configuration document.

    Parameters
    ----------
    config : mapping
        ``ISSUER``: the authorization server's base URL (e.g. ``https://host/auth``).

    Returns
    -------
    dict
        JSON-ready document with every field SMART 2.2 requires for the advertised capabilities
        (``issuer`` and ``jwks_uri`` because of ``sso-openid-connect``; ``authorization_endpoint`` because
        of the launch capabilities; ``code_challenge_methods_supported`` with ``S256`` only).

    Examples
    --------
    >>> doc = smart_configuration({"ISSUER": "https://ehr.example/auth"})
    >>> doc["token_endpoint"], doc["code_challenge_methods_supported"]
    ('https://ehr.example/auth/token', ['S256'])
    """
    issuer = config["ISSUER"].rstrip("/")
    doc = {"issuer": issuer}
    doc.update({name: endpoint_url(issuer, name) for name in ENDPOINT_PATHS})
    doc.update({
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "revocation_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post",
                                                       "private_key_jwt"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": list(SCOPES_SUPPORTED),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": list(CAPABILITIES),
    })
    return doc


OAUTH_URIS_EXTENSION = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def capability_security(config: Mapping) -> dict:
    """The ``CapabilityStatement.rest.security`` element advertising SMART (for ``/metadata``).

    SMART 2.x discovery is the ``.well-known`` document; the ``oauth-uris`` extension is kept because
    existing clients (e.g. the Python ``fhirclient``) still discover the endpoints through it. It carries
    only the sub-extensions its StructureDefinition defines (authorize, token, register; manage is not
    implemented), so a validator accepts it; introspection and revocation are in the ``.well-known`` document.

    Examples
    --------
    >>> sec = capability_security({"ISSUER": "https://ehr.example/auth"})
    >>> sec["service"][0]["coding"][0]["code"]
    'SMART-on-FHIR'
    """
    issuer = config["ISSUER"].rstrip("/")
    return {
        # True only when fhir_ops.cors answers cross-origin requests (CORS_ORIGINS configured)
        "cors": bool(config.get("CORS_ORIGINS")),
        "service": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}],
            "text": "OAuth2 using SMART-on-FHIR profile (see .well-known/smart-configuration)"}],
        "extension": [{"url": OAUTH_URIS_EXTENSION, "extension": [
            {"url": "authorize", "valueUri": endpoint_url(issuer, "authorization_endpoint")},
            {"url": "token", "valueUri": endpoint_url(issuer, "token_endpoint")},
            {"url": "register", "valueUri": endpoint_url(issuer, "registration_endpoint")},
        ]}],
    }
