"""The development SMART on FHIR authorization server: a Flask app factory wiring authlib grants to SMART rules.

Protocol logic lives in the spec-named modules (scopes, rfc7523, rfc7591, rfc7009 revocation, tokens,
discovery, outbound); this module only adapts them to Flask and authlib (authorize, token, introspect,
revoke, register, jwks, login, launch simulator). Deny by default: registration needs an initial access
token, sign-in needs a stored user's password, the launch simulator and the published development users
exist only with ``DEV_LAUNCH_SIMULATOR`` on a loopback server.
"""
from __future__ import annotations

import functools
import ipaddress
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import (
    InvalidClientError, InvalidGrantError, InvalidRequestError, InvalidScopeError,
)
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from flask import Flask, current_app, jsonify, request, session
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from limits import parse as parse_limit
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from urllib3.exceptions import HTTPError as Urllib3Error
from werkzeug.exceptions import HTTPException
from werkzeug.security import check_password_hash, generate_password_hash

from .db import AuthDB, AuthorizationCode
from .discovery import smart_configuration  # noqa: F401  (re-exported: the FHIR app serves it too)
from .jwks import JwksCache, SigningKeys, persistent_secret
from .outbound import AllowList, OutboundRefused, fetch_json
from .rfc7523 import ASSERTION_TYPE, AssertionError_, verify_client_assertion
from .rfc7591 import is_loopback_host, validate_client_metadata
from .scopes import parse_scopes
from .tokens import Issuance, TokenPolicy, issue_tokens

#: SMART Backend Services: access tokens SHOULD live no longer than five minutes.
MAX_BACKEND_TOKEN_LIFETIME = 300

#: The published development users. They exist only while ``DEV_LAUNCH_SIMULATOR`` is on (the password
#: is in the README, so it must never open a server anyone else can reach).
DEFAULT_USERS = [
    {"username": "dr.chen", "password": "trialtwin", "fhirUser": "Practitioner/dr-chen", "name": "Dr. Mei Chen"},
    {"username": "dr.okafor", "password": "trialtwin", "fhirUser": "Practitioner/dr-okafor", "name": "Dr. Ada Okafor"},
]

#: What a client registered through the configured ``REGISTRATION_ACCESS_TOKEN`` may hold at most, unless
#: ``REGISTRATION_SCOPE_CEILING`` says otherwise: user-facing read access, never system/ or write scopes.
#: Wider grants are an administrator's decision (``trialtwin clients register`` / ``clients token``).
DEFAULT_REGISTRATION_CEILING = ("launch launch/patient launch/encounter openid fhirUser profile offline_access "
                                "online_access patient/*.rs user/*.rs")


@dataclass(frozen=True)
class DevUser:
    """A user who can sign in: a username bound to a FHIR Practitioner (the ``fhirUser``)."""

    username: str
    fhir_user: str
    name: str


def is_loopback_url(url: str | None) -> bool:
    """Whether ``url`` points at this machine only (used to refuse development features elsewhere)."""
    try:
        return is_loopback_host(urlsplit(url or "").hostname)
    except ValueError:
        return False


def is_loopback_address(address: str | None) -> bool:
    try:
        return ipaddress.ip_address((address or "").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class AuthzState:
    """Everything one app instance owns: database, signing keys, users, JWKS caches, rate limiters."""

    def __init__(self, app: Flask) -> None:
        cfg = app.config
        self.db = AuthDB(cfg["DATABASE"])
        self.keys = SigningKeys.load_or_create(cfg["KEYS_FILE"])
        self.dev_mode = bool(cfg.get("DEV_LAUNCH_SIMULATOR"))
        # Published development passwords are hashed like any other, and exist only in development mode.
        self.dev_users = {u["username"]: {**u, "password_hash": u.get("password_hash")
                                          or generate_password_hash(u["password"])}
                          for u in (cfg["DEV_USERS"] if self.dev_mode else [])}
        self._dummy_hash = generate_password_hash("not-a-password")
        self.jwks_allow = AllowList.parse(cfg.get("JWKS_FETCH_ALLOW") or ())
        self.jwks_caches: dict[str, JwksCache] = {}
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.limits = {name: parse_limit(cfg[key]) for name, key in (
            ("login-user", "LOGIN_FAILURES_PER_USER"), ("login-ip", "LOGIN_FAILURES_PER_IP"),
            ("register-ip", "REGISTRATIONS_PER_IP"))}
        for seed in cfg.get("SEED_CLIENTS") or []:
            seed = dict(seed)
            client_id, secret = seed.pop("client_id"), seed.pop("client_secret", None)
            existing = self.db.get_client(client_id)
            metadata = validate_client_metadata(seed)
            # The configuration is the truth for seeded apps: a new port or host updates their redirect URIs.
            if existing is None or existing.metadata != metadata:
                self.db.add_client(metadata, client_id=client_id, registered_by="configuration",
                                   client_secret=secret or (existing.client_secret if existing else None))

    # -- users ------------------------------------------------------------------------------------
    def _user_entry(self, username: str | None) -> dict | None:
        if not username:
            return None
        stored = self.db.get_user(username)
        if stored is not None:
            return {"username": stored["username"], "fhirUser": stored["fhir_user"], "name": stored["name"],
                    "password_hash": stored["password_hash"]}
        return self.dev_users.get(username)

    def user(self, username: str | None) -> DevUser | None:
        entry = self._user_entry(username)
        return DevUser(entry["username"], entry["fhirUser"], entry.get("name") or entry["username"]) if entry else None

    def check_password(self, username: str, password: str) -> DevUser | None:
        """The user when ``password`` matches the stored hash; None otherwise (same work either way)."""
        entry = self._user_entry(username)
        ok = check_password_hash(entry["password_hash"] if entry else self._dummy_hash, password)
        return self.user(username) if entry and ok else None

    # -- throttling -------------------------------------------------------------------------------
    def over_limit(self, name: str, key: str) -> bool:
        return not self.limiter.test(self.limits[name], name, key)

    def count(self, name: str, key: str) -> None:
        self.limiter.hit(self.limits[name], name, key)

    def retry_after(self, name: str, key: str) -> int:
        reset, _ = self.limiter.get_window_stats(self.limits[name], name, key)
        return max(1, int(reset - time.time()) + 1)

    # -- client keys ------------------------------------------------------------------------------
    def client_keys(self, client_id: str) -> KeySet | None:
        """Public keys a ``private_key_jwt`` client registered (inline ``jwks`` or cached ``jwks_uri``).

        A ``jwks_uri`` is fetched only under :mod:`smart_app.outbound`'s rules (https, public addresses,
        time and size limits) unless the development allow-list ``JWKS_FETCH_ALLOW`` names its host.
        """
        client = self.db.get_client(client_id)
        if client is None or client.token_endpoint_auth_method != "private_key_jwt":
            return None
        if "jwks" in client.metadata:
            return KeySet.import_key_set(client.metadata["jwks"])
        uri = client.metadata["jwks_uri"]
        cfg = current_app.config
        fetch = functools.partial(fetch_json, allow=self.jwks_allow, timeout=float(cfg["JWKS_FETCH_TIMEOUT"]),
                                  max_bytes=int(cfg["JWKS_FETCH_MAX_BYTES"]))
        cache = self.jwks_caches.setdefault(uri, JwksCache(uri, fetch=fetch))
        try:
            return cache.get()
        except (OutboundRefused, Urllib3Error, requests.RequestException, ValueError, JoseError, OSError) as exc:
            current_app.logger.warning("jwks_uri of client %s not usable: %s", client_id, exc)
            return None


def state() -> AuthzState:
    return current_app.extensions["smart_authz"]


def issuer() -> str:
    """The issuer URL: configured, or this app's own base URL (works when mounted at /auth)."""
    return (current_app.config.get("ISSUER") or request.url_root).rstrip("/")


def fhir_base() -> str:
    """The FHIR server base URL, the audience of every access token."""
    configured = current_app.config.get("FHIR_BASE_URL")
    return (configured or request.host_url.rstrip("/") + "/fhir").rstrip("/")


def token_policy(lifetime: int | None = None) -> TokenPolicy:
    cfg = current_app.config
    return TokenPolicy(issuer=issuer(), audience=fhir_base(),
                       access_lifetime=int(lifetime or cfg["ACCESS_TOKEN_LIFETIME"]),
                       refresh_lifetime=int(cfg["REFRESH_TOKEN_LIFETIME"]))


# --- client authentication: private_key_jwt (RFC 7523 §2.2, SMART Backend Services) ----------------

def authenticate_private_key_jwt(query_client, oauth_request):
    """authlib client-auth hook; returns None when the request carries no assertion (another method may apply)."""
    form = oauth_request.form
    assertion_type, assertion = form.get("client_assertion_type"), form.get("client_assertion")
    if not assertion_type and not assertion:
        return None
    if assertion_type != ASSERTION_TYPE:
        raise InvalidClientError(status_code=401, description=f"client_assertion_type must be {ASSERTION_TYPE}")
    if not assertion:
        raise InvalidClientError(status_code=401, description="client_assertion is missing")
    # The audience is the URL of the endpoint being called (token or introspection).
    audience = issuer() + request.path
    try:
        verified = verify_client_assertion(assertion, token_endpoint=audience, client_keys=state().client_keys,
                                           jti_store=state().db)
    except AssertionError_ as exc:
        raise InvalidClientError(status_code=401, description=exc.description) from None
    claimed = form.get("client_id")
    if claimed and claimed != verified.client_id:
        raise InvalidClientError(status_code=401, description="client_id does not match the client_assertion issuer")
    return query_client(verified.client_id)


# --- grants ------------------------------------------------------------------------------------

class S256Only(CodeChallenge):
    """PKCE as SMART 2.x requires it: a challenge on every authorization request, S256 only (never plain)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant, redirect_uri):
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256 (plain is not supported)")
        return super().validate_code_challenge(grant, redirect_uri)


USER_AUTH_METHODS = ["private_key_jwt", "client_secret_basic", "client_secret_post", "none"]


class SmartAuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = USER_AUTH_METHODS

    def save_authorization_code(self, code, oauth_request):
        data = oauth_request.payload.data
        record = AuthorizationCode(
            client_id=oauth_request.client.get_client_id(),
            redirect_uri=oauth_request.payload.redirect_uri or oauth_request.client.get_default_redirect_uri(),
            scope=oauth_request.scope, username=oauth_request.user.username,
            code_challenge=data.get("code_challenge"), code_challenge_method=data.get("code_challenge_method"),
            nonce=data.get("nonce"), context=getattr(oauth_request, "smart_context", {}),
            auth_time=int(session.get("auth_time", time.time())),
        )
        state().db.save_code(code, record, current_app.config["CODE_LIFETIME"])

    def query_authorization_code(self, code, client):
        return state().db.get_code(code, client.get_client_id())

    def delete_authorization_code(self, authorization_code):
        pass  # consumed atomically in generate_token, before any token exists


    def authenticate_user(self, authorization_code):
        return state().user(authorization_code.username)

    def generate_token(self, user=None, scope=None, grant_type=None, expires_in=None, include_refresh_token=True):
        code = self.request.authorization_code
        # Consume first: of two concurrent exchanges of one code, exactly one gets a token.
        if not state().db.consume_code(code):
            raise InvalidGrantError("the authorization code has already been used")
        scopes = parse_scopes(scope)
        return issue_tokens(state().keys, state().db, token_policy(), Issuance(
            client_id=self.client.get_client_id(), scopes=scopes, username=user.username, fhir_user=user.fhir_user,
            user_name=user.name, context=code.context, nonce=code.nonce, auth_time=code.auth_time,
        ), include_refresh_token=include_refresh_token and _wants_refresh(scopes))


def _wants_refresh(scopes) -> bool:
    return "offline_access" in scopes or "online_access" in scopes


class SmartRefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = USER_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotate: a stolen refresh token is good for one use at most

    def authenticate_refresh_token(self, refresh_token):
        record = state().db.token_by_refresh(refresh_token)
        if record is None or record.is_revoked() or record.is_expired():
            return None
        return record

    def authenticate_user(self, refresh_token):
        return state().user(refresh_token.username)

    def revoke_old_credential(self, refresh_token):
        pass  # revoked atomically in generate_token, before the new pair exists

    def generate_token(self, user=None, scope=None, grant_type=None, expires_in=None, include_refresh_token=True):
        old = self.request.refresh_token
        if not state().db.revoke(old.jti):
            raise InvalidGrantError("the refresh token has already been used")
        scopes = parse_scopes(scope)
        return issue_tokens(state().keys, state().db, token_policy(), Issuance(
            client_id=self.client.get_client_id(), scopes=scopes, username=user.username, fhir_user=user.fhir_user,
            user_name=user.name, context=old.context,
        ), include_refresh_token=include_refresh_token and _wants_refresh(scopes))


class BackendServicesGrant(grants.ClientCredentialsGrant):
    """SMART Backend Services: client_credentials authenticated only by a private_key_jwt assertion."""

    TOKEN_ENDPOINT_AUTH_METHODS = ["private_key_jwt"]

    def generate_token(self, user=None, scope=None, grant_type=None, expires_in=None, include_refresh_token=True):
        requested = parse_scopes(scope).restrict(("system",))
        granted = requested.within(self.client.allowed_scopes)
        if not granted.resources:
            raise InvalidScopeError(description="request system/ scopes that the client registered, "
                                                f"registered: {self.client.allowed_scopes.text!r}")
        granted = type(granted)(granted.resources)  # no openid/launch names for a machine client
        lifetime = min(int(current_app.config["BACKEND_TOKEN_LIFETIME"]), MAX_BACKEND_TOKEN_LIFETIME)
        return issue_tokens(state().keys, state().db, token_policy(lifetime),
                            Issuance(client_id=self.client.get_client_id(), scopes=granted),
                            include_refresh_token=False)


# --- revocation (RFC 7009) ---------------------------------------------------------------------

def token_record(value: str):
    """The stored record of an access token (a JWT this server signed) or of a refresh token; None if unknown."""
    db = state().db
    if value.count(".") == 2:
        try:
            claims = jwt.decode(value, state().keys.key_set, algorithms=["RS256", "ES256"]).claims
        except (JoseError, ValueError):
            return None
        return db.token_by_jti(str(claims.get("jti", "")))
    return db.token_by_refresh(value)


class SmartRevocationEndpoint(RevocationEndpoint):
    """RFC 7009: a client revokes its own access or refresh token; the pair issued together goes with it.

    The resource server checks the same record on every request (:mod:`smart_app.revocation`), so a
    revoked access token stops working at ``/fhir`` and ``/inference`` at once.
    """

    CLIENT_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post", "private_key_jwt"]

    def query_token(self, token_string, token_type_hint):
        return token_record(token_string)

    def revoke_token(self, token, oauth_request):
        state().db.revoke(token.jti)


# --- app factory -------------------------------------------------------------------------------

def create_app(test_config: dict | None = None) -> Flask:
    """Build the authorization server app.

    Parameters
    ----------
    test_config : dict, optional
        Overrides: ``DATA_DIR`` (keys, session secret and the SQLite file live there), ``DATABASE``,
        ``KEYS_FILE``, ``ISSUER`` (default: the app's own URL), ``FHIR_BASE_URL`` (default: ``<host>/fhir``),
        ``ACCESS_TOKEN_LIFETIME``, ``BACKEND_TOKEN_LIFETIME`` (capped at 300 s), ``REFRESH_TOKEN_LIFETIME``,
        ``CODE_LIFETIME``, ``SEED_CLIENTS``, ``FHIR_HTTP_TIMEOUT``;
        ``REGISTRATION_ACCESS_TOKEN`` (None: registration only with an initial access token an
        administrator minted, ``trialtwin clients token``) and its ``REGISTRATION_SCOPE_CEILING``;
        ``DEV_LAUNCH_SIMULATOR`` (False: no launch simulator and no published ``DEV_USERS``; refused
        unless ``ISSUER`` is on loopback); ``JWKS_FETCH_ALLOW`` (hosts or networks whose ``jwks_uri`` may
        be http or non-public: development only), ``JWKS_FETCH_TIMEOUT``, ``JWKS_FETCH_MAX_BYTES``;
        ``LOGIN_FAILURES_PER_USER``, ``LOGIN_FAILURES_PER_IP``, ``REGISTRATIONS_PER_IP`` (rate limits in
        the ``limits`` notation, e.g. ``"5 per 15 minutes"``); ``MAX_CONTENT_LENGTH`` (request bodies).

    Raises
    ------
    ValueError
        ``DEV_LAUNCH_SIMULATOR`` with an ``ISSUER`` that is not on a loopback host.
    """
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(
        DATA_DIR=app.instance_path, ISSUER=None, FHIR_BASE_URL=None,
        ACCESS_TOKEN_LIFETIME=3600, BACKEND_TOKEN_LIFETIME=300, REFRESH_TOKEN_LIFETIME=30 * 24 * 3600,
        CODE_LIFETIME=60, DEV_USERS=DEFAULT_USERS, SEED_CLIENTS=[], REGISTRATION_ACCESS_TOKEN=None,
        REGISTRATION_SCOPE_CEILING=DEFAULT_REGISTRATION_CEILING, DEV_LAUNCH_SIMULATOR=False,
        JWKS_FETCH_ALLOW=[], JWKS_FETCH_TIMEOUT=3.0, JWKS_FETCH_MAX_BYTES=64 * 1024,
        LOGIN_FAILURES_PER_USER="5 per 15 minutes", LOGIN_FAILURES_PER_IP="20 per 15 minutes",
        REGISTRATIONS_PER_IP="20 per hour",
        # Forms and registrations are small; a 10 MB client_name is an attack, not a registration.
        MAX_CONTENT_LENGTH=64 * 1024,
        FHIR_HTTP_TIMEOUT=2.0,
    )
    if test_config:
        app.config.update(test_config)
    if app.config["DEV_LAUNCH_SIMULATOR"] and app.config.get("ISSUER") and not is_loopback_url(app.config["ISSUER"]):
        raise ValueError(f"DEV_LAUNCH_SIMULATOR is for a loopback development server only, but the issuer is "
                         f"{app.config['ISSUER']}; turn it off to serve other machines")
    data_dir = Path(app.config["DATA_DIR"])
    data_dir.mkdir(parents=True, exist_ok=True)
    app.config.setdefault("DATABASE", str(data_dir / "smart-auth.sqlite"))
    app.config.setdefault("KEYS_FILE", str(data_dir / "smart-signing-keys.json"))
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = persistent_secret(data_dir / "smart-session-secret")
    # Flask's own default ("session") would be shared with the clinician app on the same host, so the
    # name is set, not defaulted; the cookie is never readable by scripts, and is Secure behind https.
    app.config.update(SESSION_COOKIE_NAME=app.config.get("AUTH_SESSION_COOKIE_NAME") or "trialtwin_auth",
                      SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      SESSION_COOKIE_SECURE=str(app.config.get("ISSUER") or "").startswith("https://"))

    app.extensions["smart_authz"] = AuthzState(app)
    server = AuthorizationServer(app, query_client=lambda cid: state().db.get_client(cid),
                                 # Tokens are persisted by issue_tokens, which knows the jti and launch context.
                                 save_token=lambda token, req: None)
    server.register_client_auth_method("private_key_jwt", authenticate_private_key_jwt)
    server.register_grant(SmartAuthorizationCodeGrant, [S256Only(required=True)])
    server.register_grant(SmartRefreshTokenGrant)
    server.register_grant(BackendServicesGrant)
    server.register_endpoint(SmartRevocationEndpoint)
    app.extensions["smart_authz_server"] = server

    @app.after_request
    def _hardening(response):
        # Login and consent must never be framed (clickjacking of Approve); codes in URLs never leak by Referer.
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    from . import authz_views
    app.register_blueprint(authz_views.bp)
    from fhir_ops import cors

    # What a browser SMART app calls across origins: discovery, keys, token, introspection, revocation.
    # The front-channel pages (authorize, login) are navigations and need no CORS.
    cors.init_app(app, [r"/\.well-known/.*", "/token", "/introspect", "/revoke", "/userinfo"])

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        error = {413: "invalid_request", 429: "slow_down"}.get(exc.code) or (
            "invalid_request" if exc.code < 500 else "server_error")
        return jsonify(error=error, error_description=exc.description), exc.code, \
            getattr(exc, "trialtwin_headers", None) or {}

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return jsonify(error="server_error", error_description="internal error; see the server log"), 500

    return app


def oauth_server() -> AuthorizationServer:
    return current_app.extensions["smart_authz_server"]

