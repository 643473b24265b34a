"""RFC 7591 dynamic client registration: validation of client metadata for SMART clients.

Framework-free: ``validate_client_metadata`` returns normalized metadata or raises ``RegistrationError``.
"""
from __future__ import annotations

import ipaddress
from typing import Callable
from urllib.parse import urlsplit

from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from .scopes import parse_scopes

AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post", "private_key_jwt")
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")

#: Client metadata this server understands and stores (RFC 7591 §2, SMART); anything else is dropped,
#: so a registration cannot park arbitrary data on the server. ``client_id`` is never taken from the
#: client: the server generates it.
KNOWN_FIELDS = ("redirect_uris", "token_endpoint_auth_method", "grant_types", "response_types", "client_name",
                "client_uri", "logo_uri", "scope", "contacts", "tos_uri", "policy_uri", "jwks_uri", "jwks",
                "software_id", "software_version", "launch_uri")
#: Size limits: the whole request body is limited by the app (``MAX_CONTENT_LENGTH``); these bound each field.
MAX_NAME = 200
MAX_URI = 2000
MAX_URIS = 20
MAX_SCOPE = 4000
MAX_KEYS = 10
MAX_SHORT = 200
URI_FIELDS = ("client_uri", "logo_uri", "tos_uri", "policy_uri", "launch_uri")


class RegistrationError(Exception):
    """Refused metadata; ``error`` is the RFC 7591 §3.2.2 code."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description

    def body(self) -> dict:
        return {"error": self.error, "error_description": self.description}


def is_loopback_host(host: str | None) -> bool:
    """Whether a URL host names this machine only (``localhost``, 127.0.0.0/8, ``::1``).

    >>> is_loopback_host("127.0.0.1"), is_loopback_host("[::1]"), is_loopback_host("app.example")
    (True, True, False)
    """
    host = (host or "").strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _shown(uri: str) -> str:
    return repr(uri if len(uri) <= 80 else uri[:77] + "...")


def _check_uri(uri: object, what: str, error: str, *, https_only: bool = False,
               http_allowed: Callable[[str], bool] = is_loopback_host) -> str:
    """An absolute https URI (http only where ``http_allowed(host)``), no fragment, no credentials.

    ``javascript:``, ``data:`` and every other scheme are refused: these URIs are shown to users and
    followed by browsers.
    """
    if not isinstance(uri, str):
        raise RegistrationError(error, f"{what} must be a string URI")
    if len(uri) > MAX_URI:
        raise RegistrationError(error, f"{what} is longer than {MAX_URI} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in uri):
        raise RegistrationError(error, f"{what} {_shown(uri)} contains spaces or control characters")
    try:
        parts = urlsplit(uri)
        host = parts.hostname
    except ValueError:
        raise RegistrationError(error, f"{what} {_shown(uri)} is not a valid URI") from None
    if parts.scheme not in ("http", "https") or not parts.netloc or not host:
        raise RegistrationError(error, f"{what} {_shown(uri)} must be an absolute https URI")
    if parts.scheme == "http" and (https_only or not http_allowed(host)):
        rule = ("" if https_only else " (http only on a loopback host)" if http_allowed is is_loopback_host
                else " (http only for hosts on the development allow-list)")
        raise RegistrationError(error, f"{what} {_shown(uri)} must use https{rule}")
    if parts.username is not None or parts.password is not None:
        raise RegistrationError(error, f"{what} {_shown(uri)} must not carry credentials")
    if parts.fragment:
        raise RegistrationError(error, f"{what} {_shown(uri)} must not contain a fragment")
    return uri


def _check_text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise RegistrationError("invalid_client_metadata", f"{what} must be a string")
    if len(value) > limit:
        raise RegistrationError("invalid_client_metadata", f"{what} is longer than {limit} characters")
    if any(ord(c) < 0x20 and c not in "\t" for c in value):
        raise RegistrationError("invalid_client_metadata", f"{what} contains control characters")
    return value


def validate_client_metadata(metadata: object, *, jwks_http_allowed: Callable[[str], bool] = lambda host: False
                             ) -> dict:
    """Check and normalize RFC 7591 client metadata.

    Rules: unknown fields (``client_id`` included) are dropped; ``client_name`` and other text at most
    ``MAX_NAME``/``MAX_SHORT`` characters, URIs at most ``MAX_URI``; every URI is absolute https
    (``redirect_uris``/``launch_uri`` may be http on a loopback host; ``jwks_uri`` only where
    ``jwks_http_allowed(host)``, the development allow-list); ``redirect_uris`` (no fragment) are
    required for ``authorization_code``;
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
    md = {k: v for k, v in metadata.items() if k in KNOWN_FIELDS}
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
        if len(uris) > MAX_URIS:
            raise RegistrationError("invalid_redirect_uri", f"at most {MAX_URIS} redirect_uris")
        md["redirect_uris"] = [_check_uri(u, "redirect_uri", "invalid_redirect_uri") for u in uris]
        md["response_types"] = ["code"]
    elif md.get("redirect_uris"):
        if not isinstance(md["redirect_uris"], list) or len(md["redirect_uris"]) > MAX_URIS:
            raise RegistrationError("invalid_redirect_uri", f"redirect_uris must be a list of at most {MAX_URIS} URIs")
        md["redirect_uris"] = [_check_uri(u, "redirect_uri", "invalid_redirect_uri") for u in md["redirect_uris"]]
    if "refresh_token" in grant_types and "authorization_code" not in grant_types:
        raise RegistrationError("invalid_client_metadata", "refresh_token requires the authorization_code grant")
    for name in URI_FIELDS:
        if name in md:
            _check_uri(md[name], name, "invalid_client_metadata")
    has_jwks, has_jwks_uri = "jwks" in md, "jwks_uri" in md
    if method == "private_key_jwt":
        if has_jwks == has_jwks_uri:
            raise RegistrationError("invalid_client_metadata", "private_key_jwt needs exactly one of jwks or jwks_uri")
        if has_jwks:
            keys = md["jwks"].get("keys") if isinstance(md["jwks"], dict) else None
            if isinstance(keys, list) and len(keys) > MAX_KEYS:
                raise RegistrationError("invalid_client_metadata", f"jwks may hold at most {MAX_KEYS} keys")
            try:
                key_set = KeySet.import_key_set(md["jwks"])
            except (JoseError, ValueError, TypeError, KeyError) as exc:
                raise RegistrationError("invalid_client_metadata", f"jwks is not a valid JWK Set: {exc}") from None
            if any(k.is_private for k in key_set.keys):
                raise RegistrationError("invalid_client_metadata", "jwks must contain public keys only")
        else:
            # The server itself fetches this URI: https only, except hosts on the development allow-list.
            _check_uri(md["jwks_uri"], "jwks_uri", "invalid_client_metadata", http_allowed=jwks_http_allowed)
    elif has_jwks or has_jwks_uri:
        raise RegistrationError("invalid_client_metadata", "jwks/jwks_uri are only used with private_key_jwt")
    scope = md.get("scope", "")
    if not isinstance(scope, str):
        raise RegistrationError("invalid_client_metadata", "scope must be a space-separated string")
    if len(scope) > MAX_SCOPE:
        raise RegistrationError("invalid_client_metadata", f"scope is longer than {MAX_SCOPE} characters")
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
    md["scope"] = scopes.v2_text
    if "client_name" in md:
        _check_text(md["client_name"], "client_name", MAX_NAME)
    for name in ("software_id", "software_version"):
        if name in md:
            _check_text(md[name], name, MAX_SHORT)
    if "contacts" in md:
        contacts = md["contacts"]
        if not isinstance(contacts, list) or len(contacts) > MAX_URIS:
            raise RegistrationError("invalid_client_metadata", f"contacts must be a list of at most {MAX_URIS} strings")
        for contact in contacts:
            _check_text(contact, "contacts entry", MAX_SHORT)
    return md
