"""The SMART App Launch client side, framework-free: discovery, the PKCE authorization request, the code exchange.

Built on authlib's ``OAuth2Session``; the clinician app (``smart_app.app``) is a thin Flask adapter over it.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from authlib.integrations.base_client.errors import OAuthError


class LaunchError(Exception):
    """A launch that cannot go on (bad ``iss``, discovery failed, the server refused the code): shown to the user."""


@dataclass(frozen=True)
class SmartEndpoints:
    """What the app needs from ``<iss>/.well-known/smart-configuration``."""

    iss: str
    authorization_endpoint: str
    token_endpoint: str
    capabilities: tuple[str, ...] = ()


@dataclass
class PendingAuthorization:
    """Everything the callback needs to finish one authorization (kept server-side, keyed by ``state``)."""

    state: str
    code_verifier: str
    endpoints: SmartEndpoints
    redirect_uri: str
    launch: str | None = None


@dataclass
class Grant:
    """A finished launch: the token response and the context it carries."""

    iss: str
    access_token: str
    scope: str
    patient: str | None = None
    encounter: str | None = None
    fhir_context: list = field(default_factory=list)
    fhir_user: str | None = None
    need_patient_banner: bool = False
    expires_at: float | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def context_reference(self, resource_type: str) -> str | None:
        """The id of the first ``fhirContext`` entry of ``resource_type`` (e.g. the ResearchStudy of an EDC launch)."""
        for entry in self.fhir_context:
            reference = (entry or {}).get("reference", "") if isinstance(entry, dict) else ""
            kind, _, rid = reference.rpartition("/")
            if kind.rsplit("/", 1)[-1] == resource_type and rid:
                return rid
        return None


def check_iss(iss: str, allowed: list[str] | tuple[str, ...]) -> str:
    """Accept ``iss`` only if it is an http(s) URL on the allow-list (the app would otherwise fetch any URL it is given).

    Examples
    --------
    >>> check_iss("https://ehr.example/fhir/", ["https://ehr.example/fhir"])
    'https://ehr.example/fhir'
    """
    iss = (iss or "").strip().rstrip("/")
    parts = urlsplit(iss)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LaunchError(f"iss must be an absolute http(s) URL of a FHIR server, got {iss!r}")
    if allowed and iss not in {a.rstrip("/") for a in allowed}:
        raise LaunchError(f"this app is not configured to trust the FHIR server {iss}; trusted: {', '.join(allowed)}")
    return iss


def discover(iss: str, http: requests.Session | None = None, timeout: float = 10) -> SmartEndpoints:
    """Read ``<iss>/.well-known/smart-configuration`` and check it supports what the app needs (PKCE S256)."""
    http = http or requests.Session()
    try:
        response = http.get(f"{iss}/.well-known/smart-configuration", timeout=timeout,
                            headers={"Accept": "application/json"})
        response.raise_for_status()
        doc = response.json()
    except (requests.RequestException, ValueError) as exc:
        raise LaunchError(f"could not read the SMART configuration of {iss}: {exc}") from None
    missing = [k for k in ("authorization_endpoint", "token_endpoint") if not doc.get(k)]
    if missing:
        raise LaunchError(f"the SMART configuration of {iss} lacks {', '.join(missing)}")
    if "S256" not in (doc.get("code_challenge_methods_supported") or []):
        raise LaunchError(f"{iss} does not support PKCE with S256, which this app requires")
    return SmartEndpoints(iss, doc["authorization_endpoint"], doc["token_endpoint"], tuple(doc.get("capabilities") or ()))


def authorization_request(endpoints: SmartEndpoints, client_id: str, redirect_uri: str, scope: str,
                          launch: str | None = None) -> tuple[str, PendingAuthorization]:
    """Build the authorization URL (PKCE S256, ``aud`` = iss, ``launch`` when given) and what to remember for it."""
    verifier = generate_token(64)
    state = secrets.token_urlsafe(24)
    session = OAuth2Session(client_id, redirect_uri=redirect_uri, scope=scope, code_challenge_method="S256")
    extra = {"aud": endpoints.iss}
    if launch:
        extra["launch"] = launch
    url, _ = session.create_authorization_url(endpoints.authorization_endpoint, state=state, code_verifier=verifier,
                                              **extra)
    return url, PendingAuthorization(state, verifier, endpoints, redirect_uri, launch)


def exchange_code(pending: PendingAuthorization, client_id: str, code: str, timeout: float = 10) -> Grant:
    """Exchange the authorization code (with the PKCE verifier) for tokens and the launch context."""
    session = OAuth2Session(client_id, redirect_uri=pending.redirect_uri, code_challenge_method="S256",
                            token_endpoint_auth_method="none")
    try:
        token = session.fetch_token(pending.endpoints.token_endpoint, grant_type="authorization_code", code=code,
                                    code_verifier=pending.code_verifier, timeout=timeout)
    except (OAuthError, requests.RequestException, ValueError) as exc:
        raise LaunchError(f"the authorization server refused the code: {exc}") from None
    if not token.get("access_token"):
        raise LaunchError("the token response has no access_token")
    fhir_context = token.get("fhirContext") if isinstance(token.get("fhirContext"), list) else []
    return Grant(iss=pending.endpoints.iss, access_token=token["access_token"], scope=token.get("scope", ""),
                 patient=token.get("patient"), encounter=token.get("encounter"), fhir_context=fhir_context,
                 fhir_user=token.get("fhirUser"), need_patient_banner=bool(token.get("need_patient_banner")),
                 expires_at=token.get("expires_at"), raw=dict(token))
