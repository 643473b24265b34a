"""HTTP routes of the development authorization server: discovery, authorize (login, patient picker,
approval), token, introspection, revocation, registration, JWKS and the (development-only) EHR launch simulator.
"""
from __future__ import annotations

import re
import secrets
import time
from urllib.parse import urlencode, urlsplit

import requests
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749.errors import InvalidRequestError
from flask import Blueprint, abort, current_app, jsonify, redirect, render_template, request, session, url_for
from joserfc import jwt
from joserfc.errors import JoseError
from werkzeug.exceptions import TooManyRequests

from .authz import fhir_base, is_loopback_address, issuer, oauth_server, state
from .discovery import smart_configuration
from .rfc7591 import RegistrationError, validate_client_metadata
from .scopes import parse_scopes
from .tokens import sign

bp = Blueprint("authz", __name__, template_folder="templates")

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
#: Form fields of our own pages, never forwarded as OAuth parameters.
_UI_FIELDS = {"csrf_token", "decision", "selected_patient", "username", "password"}
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(16)
    return session["csrf"]


def _check_csrf() -> None:
    sent = request.form.get("csrf_token", "")
    if not sent or not secrets.compare_digest(sent.encode(), session.get("csrf", "").encode()):
        abort(400, description="the form has expired or was not sent by this server; reload and try again")


def _oauth_params() -> list[tuple[str, str]]:
    return [(k, v) for k, vs in request.values.lists() for v in vs if k not in _UI_FIELDS]


# --- discovery -------------------------------------------------------------------------------

@bp.get("/.well-known/smart-configuration")
def smart_config():
    return jsonify(smart_configuration({"ISSUER": issuer()}))


@bp.get("/.well-known/openid-configuration")
def openid_config():
    doc = smart_configuration({"ISSUER": issuer()})
    keep = ("issuer", "jwks_uri", "authorization_endpoint", "token_endpoint", "registration_endpoint",
            "introspection_endpoint", "revocation_endpoint", "scopes_supported", "response_types_supported", "grant_types_supported",
            "token_endpoint_auth_methods_supported", "code_challenge_methods_supported",
            "id_token_signing_alg_values_supported")
    return jsonify({**{k: doc[k] for k in keep}, "subject_types_supported": ["public"],
                    "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser", "name"]})


@bp.get("/.well-known/jwks.json")
def jwks():
    return jsonify(state().keys.public_jwks())


@bp.get("/")
def index():
    return render_template("authz/index.html", doc=smart_configuration({"ISSUER": issuer()}),
                           simulator=state().dev_mode)


# --- login -----------------------------------------------------------------------------------

def _local_next(value: str) -> str:
    """Where to go after signing in: a path of this app only (never another site: no open redirect)."""
    root = request.script_root.rstrip("/") + "/"
    if value.startswith(root) and not value.startswith("//") and "\\" not in value and "://" not in value.split("?")[0]:
        return value
    return url_for("authz.index")


def _too_many(name: str, key: str, what: str) -> TooManyRequests:
    wait = state().retry_after(name, key)
    error = TooManyRequests(description=f"{what}; try again in {wait} s")
    error.trialtwin_headers = {"Retry-After": str(wait)}
    return error


@bp.route("/login", methods=["GET", "POST"])
def login():
    next_url = _local_next(request.values.get("next", ""))
    error, status = None, 200
    if request.method == "POST":
        _check_csrf()
        username = request.form.get("username", "")[:200]
        password = request.form.get("password", "")[:1000]
        ip = request.remote_addr or "?"
        # Throttle failures per account (guessing one user's password) and per address (spraying many users).
        blocked = next(((n, k) for n, k in (("login-user", username.lower()), ("login-ip", ip))
                        if state().over_limit(n, k)), None)
        if blocked:
            wait = state().retry_after(*blocked)
            return render_template("authz/login.html", next=next_url, csrf=_csrf_token(),
                                   users=sorted(state().dev_users), dev=state().dev_mode,
                                   error=f"Too many failed sign-ins. Try again in {wait} seconds."), \
                429, {"Retry-After": str(wait)}
        user = state().check_password(username, password)
        if user is not None:
            session.clear()  # a fresh session on sign-in (no fixation of a pre-login session)
            session["user"] = user.username
            session["auth_time"] = int(time.time())
            return redirect(next_url)
        state().count("login-user", username.lower())
        state().count("login-ip", ip)
        error, status = "Unknown user or wrong password.", 401
    return render_template("authz/login.html", next=next_url, error=error, csrf=_csrf_token(),
                           users=sorted(state().dev_users), dev=state().dev_mode), status


@bp.post("/logout")
def logout():
    _check_csrf()
    session.clear()
    return redirect(url_for("authz.index"))


# --- authorize -------------------------------------------------------------------------------

def _error_redirect(grant, description: str):
    error = InvalidRequestError(description, redirect_uri=grant.redirect_uri)
    error.state = request.values.get("state")
    return oauth_server().handle_error_response(None, error)


@bp.route("/authorize", methods=["GET", "POST"])
def authorize():
    server = oauth_server()
    user = state().user(session.get("user"))
    try:
        grant = server.get_consent_grant(end_user=user)
    except OAuth2Error as error:
        return server.handle_error_response(None, error)
    except ValueError:
        # authlib refuses to echo a parameter with characters RFC 6749 forbids in error texts
        # (a response_type full of backslashes): the request is malformed, not the server
        return server.handle_error_response(None, InvalidRequestError("malformed authorization request"))
    client = grant.client
    scopes_text = grant.request.scope
    scopes = parse_scopes(scopes_text)

    aud = (request.values.get("aud") or "").rstrip("/")
    if aud != fhir_base():
        return _error_redirect(grant, f"aud must be the FHIR server base URL {fhir_base()}")
    context: dict = {}
    launch = request.values.get("launch")
    if launch:
        stored = state().db.get_launch(launch)
        if stored is None:
            return _error_redirect(grant, "unknown or expired launch parameter")
        context = {k: v for k, v in stored.items() if k != "username"}
    elif "launch" in scopes:
        return _error_redirect(grant, "scope launch requires the launch parameter given by the EHR")

    if user is None:
        return redirect(url_for("authz.login", next=url_for("authz.authorize") + "?" + urlencode(_oauth_params())))

    # In an EHR launch the EHR decides the context: without a patient (an EDC study launch) patient/
    # scopes simply grant nothing; the picker appears only when the app asks for launch/patient.
    needs_patient = not context.get("patient") and (
        "launch/patient" in scopes or (not launch and any(s.context == "patient" for s in scopes.resources)))
    selected = request.form.get("selected_patient", "").strip() if request.method == "POST" else ""
    if needs_patient and not selected:
        patients, reachable = _fhir_choices("Patient")
        return render_template("authz/pick_patient.html", client=client, params=_oauth_params(),
                               patients=patients, reachable=reachable, csrf=_csrf_token(), user=user)
    if needs_patient:
        if not _FHIR_ID.match(selected):
            abort(400, description="patient id must be 1-64 letters, digits, '-' or '.'")
        context["patient"] = selected
        context.setdefault("need_patient_banner", True)

    decision = request.form.get("decision") if request.method == "POST" else None
    if decision is None:
        return render_template("authz/approve.html", client=client, scopes=scopes, context=context,
                               params=_oauth_params(), selected=selected, csrf=_csrf_token(), user=user)
    _check_csrf()
    if decision != "approve":
        return server.create_authorization_response(grant=grant, grant_user=None)
    grant.request.smart_context = context
    return server.create_authorization_response(grant=grant, grant_user=user)


# --- token, introspection, revocation, registration ------------------------------------------

@bp.post("/token")
def token():
    return oauth_server().create_token_response()


@bp.post("/revoke")
def revoke():
    """RFC 7009 token revocation (the client's own access or refresh token); effective at /fhir at once."""
    return oauth_server().create_endpoint_response("revocation")


@bp.post("/introspect")
def introspect():
    """RFC 7662, for resource servers that registered as confidential clients."""
    server = oauth_server()
    try:
        server.authenticate_client(server.create_oauth2_request(None),
                                   ["private_key_jwt", "client_secret_basic", "client_secret_post"],
                                   endpoint="introspection")
    except OAuth2Error as error:
        return server.handle_error_response(None, error)
    value = request.form.get("token")
    if not value:
        return jsonify(error="invalid_request", error_description="token is required"), 400
    return jsonify(_introspect(value)), 200, _NO_STORE


def _introspect(value: str) -> dict:
    db, keys = state().db, state().keys
    if value.count(".") == 2:
        try:
            decoded = jwt.decode(value, keys.key_set, algorithms=["RS256", "ES256"])
        except (JoseError, ValueError):
            return {"active": False}
        claims = decoded.claims
        record = db.token_by_jti(claims.get("jti", ""))
        if claims.get("iss") != issuer() or claims.get("exp", 0) <= time.time() or (record and record.revoked):
            return {"active": False}
        return {"active": True, "token_type": "Bearer", **claims}
    record = db.token_by_refresh(value)
    if record is None or record.is_revoked() or record.is_expired():
        return {"active": False}
    return {"active": True, "token_type": "refresh_token", "client_id": record.client_id, "scope": record.scope,
            "sub": record.username or record.client_id, "exp": int(record.refresh_expires_at), "iss": issuer()}


def _registration_grant() -> tuple[str, str] | None:
    """(scope ceiling, who registered) for the request's initial access token (RFC 7591 §3), or None."""
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    sent = sent.strip()
    if scheme.lower() != "bearer" or not sent:
        return None
    configured = current_app.config.get("REGISTRATION_ACCESS_TOKEN")
    if configured and secrets.compare_digest(sent.encode(), str(configured).encode()):
        return current_app.config["REGISTRATION_SCOPE_CEILING"], "configured initial access token"
    record = state().db.initial_access_token(sent)
    if record is not None:
        return record["scope"], f"initial access token {record['label'] or record['token_hash'][:8]}"
    return None


@bp.post("/register")
def register():
    """RFC 7591 dynamic client registration, closed by default: an initial access token is required.

    The token carries the administrator's scope ceiling; the registered scope is what was asked cut to
    that ceiling, so a self-asserted ``system/*.cruds`` never becomes more than the administrator allowed.
    """
    ip = request.remote_addr or "?"
    if state().over_limit("register-ip", ip):
        raise _too_many("register-ip", ip, "too many registration requests from this address")
    state().count("register-ip", ip)
    grant = _registration_grant()
    if grant is None:
        return (jsonify(error="invalid_token", error_description=(
                    "registration needs an initial access token (Authorization: Bearer ...); ask the server's "
                    "administrator to register the client (trialtwin clients register) or to issue a token "
                    "(trialtwin clients token)")),
                401, {"WWW-Authenticate": 'Bearer error="invalid_token"', **_NO_STORE})
    ceiling, registered_by = grant
    body = request.get_json(silent=True)
    allow = state().jwks_allow
    try:
        metadata = validate_client_metadata(body, jwks_http_allowed=allow.allows_host)
    except RegistrationError as exc:
        return jsonify(exc.body()), 400, _NO_STORE
    granted = parse_scopes(metadata["scope"]).cut_to(parse_scopes(ceiling))
    if "client_credentials" in metadata["grant_types"] and not any(s.context == "system" for s in granted.resources):
        return jsonify(error="invalid_client_metadata", error_description=(
            f"none of the requested system/ scopes is within what this initial access token allows "
            f"({ceiling or 'nothing'})")), 400, _NO_STORE
    metadata["scope"] = granted.v2_text
    method = metadata["token_endpoint_auth_method"]
    secret = secrets.token_urlsafe(32) if method in ("client_secret_basic", "client_secret_post") else None
    client = state().db.add_client(metadata, client_secret=secret, registered_by=registered_by)
    return jsonify(client.public_view()), 201, _NO_STORE


# --- EHR launch simulator --------------------------------------------------------------------

def _internal_token() -> str:
    """A one-minute system token the auth server uses to list patients and studies from the FHIR server."""
    now = int(time.time())
    return sign(state().keys, {
        "iss": issuer(), "aud": fhir_base(), "sub": "trialtwin-authz", "client_id": "trialtwin-authz",
        "scope": "system/Patient.rs system/Encounter.rs system/ResearchStudy.rs system/ResearchSubject.rs",
        "iat": now, "exp": now + 60, "jti": secrets.token_urlsafe(12)})


def _label(resource: dict) -> str:
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        names = resource.get("name") or [{}]
        name = " ".join([*names[0].get("given", []), names[0].get("family", "")]).strip()
        return name or resource.get("id", "")
    if rtype == "ResearchStudy":
        return resource.get("title") or resource.get("id", "")
    if rtype == "ResearchSubject":
        who = (resource.get("individual") or {}).get("reference", "")
        return f"{resource.get('id')} ({who}, {resource.get('status', '')})"
    return resource.get("id", "")


def _fhir_choices(resource_type: str) -> tuple[list[tuple[str, str]], bool]:
    """(id, label) pairs read from the FHIR server, and whether it answered; never raises."""
    try:
        response = requests.get(f"{fhir_base()}/{resource_type}", params={"_count": 100},
                                headers={"Accept": "application/fhir+json",
                                         "Authorization": f"Bearer {_internal_token()}"},
                                timeout=current_app.config["FHIR_HTTP_TIMEOUT"])
        response.raise_for_status()
        bundle = response.json()
        entries = [e.get("resource") or {} for e in bundle.get("entry") or []]
        return [(r["id"], _label(r)) for r in entries if r.get("resourceType") == resource_type and r.get("id")], True
    except (requests.RequestException, ValueError, AttributeError, TypeError, KeyError):
        return [], False


def _absolute_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _simulator_allowed() -> None:
    # Deny by default: without the development flag the route does not exist; with it, only this machine.
    if not state().dev_mode:
        abort(404, description="the launch simulator is a development feature; it is off "
                               "(trialtwin serve --dev-launch-simulator, on a loopback host, turns it on)")
    if not is_loopback_address(request.remote_addr):
        abort(403, description="the launch simulator answers only requests from this machine (loopback)")


@bp.route("/launch-simulator", methods=["GET", "POST"])
def launch_simulator():
    """Act like an EHR or EDC: choose app and context, mint a launch id, send the browser to the app.

    Development only (``DEV_LAUNCH_SIMULATOR``, loopback). The practitioner signs in first, with a
    password: the enrolment lists are never shown to anonymous visitors, and the launch carries the
    signed-in user as the EHR's single sign-on.
    """
    _simulator_allowed()
    user = state().user(session.get("user"))
    if user is None:
        return redirect(url_for("authz.login", next=url_for("authz.launch_simulator")))
    clients = [c for c in state().db.list_clients() if "authorization_code" in c.grant_types]
    errors: list[str] = []
    form = request.form
    if request.method == "POST":
        _check_csrf()
        client = state().db.get_client(form.get("client_id", ""))
        if client is None:
            errors.append("choose a registered app")
        launch_url = (form.get("launch_url") or "").strip() or (client.metadata.get("launch_uri", "") if client else "")
        if not _absolute_http(launch_url):
            errors.append("the app has no launch URL: give an absolute http(s) launch URL")
        context: dict = {}
        for field, key in (("patient", "patient"), ("encounter", "encounter")):
            value = (form.get(field) or "").strip()
            if value and not _FHIR_ID.match(value):
                errors.append(f"{field} id must be 1-64 letters, digits, '-' or '.'")
            elif value:
                context[key] = value
        fhir_context = []
        for field, rtype in (("study", "ResearchStudy"), ("subject", "ResearchSubject")):
            value = (form.get(field) or "").strip()
            if value and not _FHIR_ID.match(value):
                errors.append(f"{field} id must be 1-64 letters, digits, '-' or '.'")
            elif value:
                fhir_context.append({"reference": f"{rtype}/{value}"})
        if fhir_context:
            context["fhirContext"] = fhir_context
        if not context:
            errors.append("choose a patient or a study/subject context")
        if not errors:
            context["need_patient_banner"] = form.get("need_patient_banner") == "on"
            style = (form.get("smart_style_url") or "").strip()
            if style and _absolute_http(style):
                context["smart_style_url"] = style
            launch_id = state().db.create_launch(context)
            separator = "&" if urlsplit(launch_url).query else "?"
            return redirect(launch_url + separator + urlencode({"iss": fhir_base(), "launch": launch_id}))
    patients, reachable = _fhir_choices("Patient")
    studies, _ = _fhir_choices("ResearchStudy") if reachable else ([], False)
    subjects, _ = _fhir_choices("ResearchSubject") if reachable else ([], False)
    return render_template("authz/launch_simulator.html", clients=clients, patients=patients, studies=studies,
                           subjects=subjects, reachable=reachable, errors=errors, user=user,
                           form=form, csrf=_csrf_token(), fhir_base=fhir_base()), (400 if errors else 200)

