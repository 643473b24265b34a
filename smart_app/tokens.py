"""Issuing SMART tokens: JWT access tokens, OpenID Connect id_tokens, refresh tokens and the token response.

Framework-free; the Flask grants call ``issue_tokens`` with everything it needs spelled out.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from joserfc import jwt

from .db import AuthDB
from .jwks import SigningKeys
from .scopes import ScopeSet

#: Launch-context fields returned beside the access token (SMART 2.2 "Launch context arrives with your access_token").
CONTEXT_FIELDS = ("patient", "encounter", "fhirContext", "need_patient_banner", "smart_style_url", "intent", "tenant")
#: Context fields also carried as access-token claims, so a resource server needs no introspection call.
CONTEXT_CLAIMS = ("patient", "encounter", "fhirContext")


@dataclass(frozen=True)
class Issuance:
    """Who and what a token is for."""

    client_id: str
    scopes: ScopeSet
    username: str | None = None
    fhir_user: str | None = None
    user_name: str | None = None
    context: dict | None = None
    nonce: str | None = None
    auth_time: int | None = None


@dataclass(frozen=True)
class TokenPolicy:
    """Where tokens are valid and for how long."""

    issuer: str
    audience: str
    access_lifetime: int = 3600
    refresh_lifetime: int = 30 * 24 * 3600
    id_token_lifetime: int = 3600
    alg: str = "RS256"


def sign(keys: SigningKeys, claims: dict, alg: str = "RS256") -> str:
    """Sign ``claims`` as a compact JWT with the key for ``alg``; the ``kid`` goes in the header."""
    key = keys.key_for(alg)
    return jwt.encode({"alg": alg, "typ": "JWT", "kid": key.kid}, claims, key, algorithms=[alg])


def fhir_user_url(audience: str, fhir_user: str) -> str:
    """The ``fhirUser`` claim as an absolute URL (SMART 2.2: a resolvable FHIR resource URL)."""
    if fhir_user.startswith(("http://", "https://")):
        return fhir_user
    return f"{audience.rstrip('/')}/{fhir_user}"


def issue_tokens(keys: SigningKeys, db: AuthDB, policy: TokenPolicy, grant: Issuance, *,
                 include_refresh_token: bool, now: float | None = None) -> dict:
    """Create, persist and return the token response for ``grant``.

    Returns
    -------
    dict
        ``access_token`` (signed JWT), ``token_type``, ``expires_in``, ``scope``, the launch context
        fields, ``refresh_token`` when asked and ``id_token`` when ``openid`` was granted to a user.
    """
    now = int(time.time() if now is None else now)
    context = dict(grant.context or {})
    scope_text = grant.scopes.text
    jti = secrets.token_urlsafe(16)
    claims = {
        "iss": policy.issuer, "aud": policy.audience, "sub": grant.username or grant.client_id,
        "client_id": grant.client_id, "scope": scope_text, "iat": now, "exp": now + policy.access_lifetime,
        "jti": jti,
    }
    if grant.fhir_user:
        claims["fhirUser"] = fhir_user_url(policy.audience, grant.fhir_user)
    claims.update({k: context[k] for k in CONTEXT_CLAIMS if context.get(k)})
    response = {
        "access_token": sign(keys, claims, policy.alg),
        "token_type": "Bearer",
        "expires_in": policy.access_lifetime,
        "scope": scope_text,
    }
    response.update({k: context[k] for k in CONTEXT_FIELDS if context.get(k) not in (None, "", [])})
    refresh_token = None
    if include_refresh_token:
        refresh_token = secrets.token_urlsafe(32)
        response["refresh_token"] = refresh_token
    if "openid" in grant.scopes and grant.username:
        id_claims = {
            "iss": policy.issuer, "sub": grant.username, "aud": grant.client_id, "iat": now,
            "exp": now + policy.id_token_lifetime, "auth_time": grant.auth_time or now,
        }
        if grant.nonce:
            id_claims["nonce"] = grant.nonce
        if grant.fhir_user and ("fhirUser" in grant.scopes or "profile" in grant.scopes):
            id_claims["fhirUser"] = fhir_user_url(policy.audience, grant.fhir_user)
        if grant.user_name and "profile" in grant.scopes:
            id_claims["name"] = grant.user_name
        response["id_token"] = sign(keys, id_claims, "RS256")
    db.save_token(
        jti=jti, client_id=grant.client_id, username=grant.username, scope=scope_text,
        context=context,
        issued_at=now, expires_at=now + policy.access_lifetime, refresh_token=refresh_token,
        refresh_expires_at=(now + policy.refresh_lifetime) if refresh_token else None,
    )
    return response
