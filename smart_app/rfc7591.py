"""RFC 7591 dynamic client registration: validation of client metadata for SMART clients.

Framework-free: ``validate_client_metadata`` returns normalized metadata or raises ``RegistrationError``.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from .scopes import parse_scopes

AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post", "private_key_jwt")
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")


class RegistrationError(Exception):
    """Refused metadata; ``error`` is the RFC 7591 §3.2.2 code."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description

    def body(self) -> dict:
        return {"error": self.error, "error_description": self.description}


def _check_uri(uri: object, what: str, error: str) -> str:
    if not isinstance(uri, str):
        raise RegistrationError(error, f"{what} must be a string URI")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RegistrationError(error, f"{what} {uri!r} must be an absolute http(s) URI")
    if parts.fragment:
        raise RegistrationError(error, f"{what} {uri!r} must not contain a fragment")
    return uri


def validate_client_metadata(metadata: object) -> dict:
    """Check and normalize RFC 7591 client metadata.

    Rules: ``redirect_uris`` (absolute http(s), no fragment) are required for ``authorization_code``;
    ``token_endpoint_auth_method`` is one of ``AUTH_METHODS``; ``private_key_jwt`` needs exactly one of
    ``jwks`` (a valid JWK Set) or ``jwks_uri``; ``client_credentials`` needs ``private_key_jwt`` and
    ``system/`` scopes; the scope string contains only SMART scopes.

    Raises
    ------
    RegistrationError
        ``invalid_redirect_uri`` or ``invalid_client_metadata``.

    Examples
    --------
    >>> validate_client_metadata({"redirect_uris": ["https://app.example/cb"], "token_endpoint_auth_method": "none",
    ...                           "scope": "launch patient/*.read"})["scope"]
    'launch patient/*.rs'
    """
    if not isinstance(metadata, dict):
        raise RegistrationError("invalid_client_metadata", "the registration request body must be a JSON object")
    md = dict(metadata)
    grant_types = md.setdefault("grant_types", ["authorization_code"])
    if not isinstance(grant_types, list) or not grant_types or any(g not in GRANT_TYPES for g in grant_types):
        raise RegistrationError("invalid_client_metadata", f"grant_types must be a non-empty list drawn from {list(GRANT_TYPES)}")
    method = md.setdefault("token_endpoint_auth_method", "client_secret_basic")
    if method not in AUTH_METHODS:
        raise RegistrationError("invalid_client_metadata", f"token_endpoint_auth_method must be one of {list(AUTH_METHODS)}")
    if "authorization_code" in grant_types:
        uris = md.get("redirect_uris")
        if not isinstance(uris, list) or not uris:
            raise RegistrationError("invalid_redirect_uri", "redirect_uris is required for the authorization_code grant")
        md["redirect_uris"] = [_check_uri(u, "redirect_uri", "invalid_redirect_uri") for u in uris]
        md["response_types"] = ["code"]
    elif md.get("redirect_uris"):
        md["redirect_uris"] = [_check_uri(u, "redirect_uri", "invalid_redirect_uri") for u in md["redirect_uris"]]
    if "refresh_token" in grant_types and "authorization_code" not in grant_types:
        raise RegistrationError("invalid_client_metadata", "refresh_token requires the authorization_code grant")
    if "launch_uri" in md:
        _check_uri(md["launch_uri"], "launch_uri", "invalid_client_metadata")
    has_jwks, has_jwks_uri = "jwks" in md, "jwks_uri" in md
    if method == "private_key_jwt":
        if has_jwks == has_jwks_uri:
            raise RegistrationError("invalid_client_metadata", "private_key_jwt needs exactly one of jwks or jwks_uri")
        if has_jwks:
            try:
                key_set = KeySet.import_key_set(md["jwks"])
            except (JoseError, ValueError, TypeError, KeyError) as exc:
                raise RegistrationError("invalid_client_metadata", f"jwks is not a valid JWK Set: {exc}") from None
            if any(k.is_private for k in key_set.keys):
                raise RegistrationError("invalid_client_metadata", "jwks must contain public keys only")
        else:
            _check_uri(md["jwks_uri"], "jwks_uri", "invalid_client_metadata")
    elif has_jwks or has_jwks_uri:
        raise RegistrationError("invalid_client_metadata", "jwks/jwks_uri are only used with private_key_jwt")
    scope = md.get("scope", "")
    if not isinstance(scope, str):
        raise RegistrationError("invalid_client_metadata", "scope must be a space-separated string")
    scopes = parse_scopes(scope)
    if scopes.unknown:
        raise RegistrationError("invalid_client_metadata", f"unknown scopes: {' '.join(scopes.unknown)}")
    if "client_credentials" in grant_types:
        if method != "private_key_jwt":
            raise RegistrationError("invalid_client_metadata", "client_credentials (SMART Backend Services) requires private_key_jwt")
        if not any(s.context == "system" for s in scopes.resources):
            raise RegistrationError("invalid_client_metadata", "client_credentials clients must register system/ scopes")
    elif any(s.context == "system" for s in scopes.resources):
        raise RegistrationError("invalid_client_metadata", "system/ scopes are only for client_credentials clients")
    md["scope"] = scopes.text
    if "client_name" in md and not isinstance(md["client_name"], str):
        raise RegistrationError("invalid_client_metadata", "client_name must be a string")
    return md
