"""The clinician SMART app (mounted at /app): EHR and standalone launch, the participant's twin, the EDC cohort view.

Tokens and launch context stay on the server, keyed by a random id in the signed session cookie; pages are
server-rendered HTML with inline SVG plots, so the app works in a plain browser and inside an EHR iframe.
"""
from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, Flask, abort, current_app, redirect, render_template, request, session, url_for

from . import client as smart
from .clinician import (FhirApi, FhirCallError, Problem, latest_risk, load_cohort, load_participant, outreach_tasks,
                        parse_forecast, problem, simulate_parameters, status_words)
from .jwks import persistent_secret
from .plots import cohort_panels, enrollment_panel, forecast_panels
from .schedule_views import load_proposed_visits, load_study_schedule
from .study_results import MAX_TARGET, load_effect_reports, load_enrollment
from .study_safety import load_safety, load_strata

CLIENT_ID = "trialtwin-clinician"
#: What the app asks for. Patient data stays in the launch patient's compartment (patient/ scopes); the
#: app may write what $simulate (persist), $calibrate and $predict-dropout store for that patient; the
#: study-level resources an EDC launch needs are not patient data and come with user/ scopes.
SCOPES = ("launch openid fhirUser patient/*.rs patient/Observation.cu patient/Basic.cu patient/Provenance.cu "
          "patient/RiskAssessment.cu patient/Task.cu user/ResearchStudy.rs user/ResearchSubject.rs user/Group.rs "
          "user/Organization.rs user/Location.rs user/RiskAssessment.rs user/DocumentReference.rs "
          "user/MeasureReport.rs user/DetectedIssue.rs")
STANDALONE_SCOPES = SCOPES.replace("launch ", "launch/patient ", 1)

#: The only texts a link may put in the page's notice: ``?notice=<key>`` (never free text from the query string,
#: which anyone could craft into a convincing message on our page).
NOTICES = {
    "risk-updated": ("info", "Dropout risk updated."),
    "risk-no-next-visit": ("warning", "No visit is scheduled for this participant, so there is no next visit to "
                                      "assess."),
    "risk-not-allowed": ("warning", "This launch's access token does not allow assessing the dropout risk."),
    "risk-unavailable": ("warning", "The FHIR server does not offer $predict-dropout."),
    "risk-failed": ("warning", "The dropout risk could not be assessed; try again, or see the server's log."),
}

bp = Blueprint("clinician", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static")


def registration(app_base: str) -> dict:
    """RFC 7591 metadata (with ``client_id``) of this app, for the authorization server's ``SEED_CLIENTS``.

    Examples
    --------
    >>> registration("http://127.0.0.1:8080/app")["redirect_uris"]
    ['http://127.0.0.1:8080/app/callback']
    """
    base = app_base.rstrip("/")
    return {"client_id": CLIENT_ID, "client_name": "TrialTwin clinician app", "redirect_uris": [f"{base}/callback"],
            "launch_uri": f"{base}/launch", "grant_types": ["authorization_code"],
            "token_endpoint_auth_method": "none", "scope": f"{SCOPES} launch/patient"}


# --- server-side state ---------------------------------------------------------------------------------

class LaunchStore:
    """Pending authorizations (by ``state``) and finished grants (by session id); in memory, one process."""

    def __init__(self, pending_ttl: float = 600) -> None:
        self._lock = threading.Lock()
        self.pending: dict[str, tuple[float, smart.PendingAuthorization]] = {}
        self.grants: dict[str, smart.Grant] = {}
        self.pending_ttl = pending_ttl

    def add_pending(self, pending: smart.PendingAuthorization) -> None:
        now = time.time()
        with self._lock:
            self.pending = {k: v for k, v in self.pending.items() if v[0] > now}
            self.pending[pending.state] = (now + self.pending_ttl, pending)

    def take_pending(self, state: str) -> smart.PendingAuthorization | None:
        with self._lock:
            entry = self.pending.pop(state, None)
        return entry[1] if entry and entry[0] > time.time() else None

    def put_grant(self, grant: smart.Grant) -> str:
        sid = secrets.token_urlsafe(24)
        now = time.time()
        with self._lock:
            # Expired grants are useless (their access tokens are refused): drop them as new ones arrive.
            self.grants = {k: g for k, g in self.grants.items() if not g.expires_at or g.expires_at > now}
            self.grants[sid] = grant
        return sid

    def grant(self, sid: str | None) -> smart.Grant | None:
        with self._lock:
            return self.grants.get(sid or "")


def launches() -> LaunchStore:
    return current_app.extensions["trialtwin.launches"]


def _grant() -> smart.Grant:
    grant = launches().grant(session.get("sid"))
    if grant is None or (grant.expires_at and grant.expires_at < time.time()):
        abort(401)
    return grant


def _api(grant: smart.Grant) -> FhirApi:
    return FhirApi(grant.iss, grant.access_token, timeout=current_app.config["FHIR_HTTP_TIMEOUT"])


def _csrf() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(16)
    return session["csrf"]


# --- launch --------------------------------------------------------------------------------------------

def _trusted() -> list[str]:
    return list(current_app.config.get("TRUSTED_ISSUERS") or [])


@bp.get("/")
def start():
    """Standalone launch: choose the FHIR server (the app then asks the user for a patient)."""
    trusted = _trusted()
    return render_template("app/start.html", iss=trusted[0] if trusted else "", trusted=trusted)


@bp.get("/launch")
def launch():
    """EHR launch (``iss`` + ``launch``) or standalone launch (``iss`` only): discover, then authorize."""
    try:
        iss = smart.check_iss(request.args.get("iss", ""), _trusted())
        endpoints = smart.discover(iss, timeout=current_app.config["FHIR_HTTP_TIMEOUT"])
    except smart.LaunchError as exc:
        return render_template("app/error.html", message=str(exc)), 400
    launch_id = request.args.get("launch") or None
    scope = current_app.config["SCOPES"] if launch_id else current_app.config["STANDALONE_SCOPES"]
    url, pending = smart.authorization_request(endpoints, current_app.config["CLIENT_ID"],
                                               url_for("clinician.callback", _external=True), scope, launch_id)
    launches().add_pending(pending)
    session["state"] = pending.state  # bind the callback to the browser that started the launch
    return redirect(url)


@bp.get("/callback")
def callback():
    if request.args.get("error"):
        return render_template("app/error.html", message=f"Authorization ended: {request.args['error']} — "
                               f"{request.args.get('error_description', '')}"), 400
    state = request.args.get("state", "")
    if not state or not secrets.compare_digest(state.encode(), session.get("state", "").encode()):
        return render_template("app/error.html", message="This sign-in was not started in this browser (state "
                               "mismatch); launch the app again."), 400
    pending = launches().take_pending(state)
    if pending is None:
        return render_template("app/error.html", message="The launch has expired; launch the app again."), 400
    try:
        grant = smart.exchange_code(pending, current_app.config["CLIENT_ID"], request.args.get("code", ""),
                                    timeout=current_app.config["FHIR_HTTP_TIMEOUT"])
    except smart.LaunchError as exc:
        return render_template("app/error.html", message=str(exc)), 400
    session.pop("state", None)
    session["sid"] = launches().put_grant(grant)
    study = grant.context_reference("ResearchStudy")
    if grant.patient:
        return redirect(url_for("clinician.patient_view", patient_id=grant.patient))
    if study:
        return redirect(url_for("clinician.study_view", study_id=study))
    return render_template("app/error.html", message="The launch carried neither a patient nor a study context."), 400


# --- views ---------------------------------------------------------------------------------------------

def _number(name: str, kind, low, high, errors: list[str]):
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        errors.append(f"{name}: {raw!r} is not a number")
        return None
    if not low <= value <= high:
        errors.append(f"{name} must be between {low} and {high}")
        return None
    return value


def _what_if(errors: list[str]) -> dict | None:
    """The what-if scenario from the form (GET query), or None when no scenario field is filled in."""
    dose = _number("dose", float, 0, 1000, errors)
    adherence = _number("adherence", float, 0, 1, errors)
    missed = []
    for part in request.args.get("missed", "").replace(";", ",").split(","):
        if part.strip():
            try:
                day = int(part)
            except ValueError:
                errors.append(f"missed-dose days: {part.strip()!r} is not a whole number")
                continue
            if not 0 <= day <= 365:
                errors.append("missed-dose days must be between 0 and 365")
            else:
                missed.append(day)
    if dose is None and adherence is None and not missed:
        return None
    return {"dose": dose, "adherence": adherence, "missed_days": sorted(set(missed))}


@bp.get("/patient/<patient_id>")
def patient_view(patient_id):
    """The participant's twin: summary, forecast with bands and observations, risk and drivers, what-if."""
    grant = _grant()
    api = _api(grant)
    problems: list[Problem] = []
    errors: list[str] = []
    horizon = _number("horizon", int, 1, 365, errors) or 28
    who = load_participant(api, patient_id, problems)
    # No dosing beyond the last dose for a participant who receives no more study intervention: the twin is
    # forecast with dose 0 from its start, and there is no dosing scenario to play with.
    scenario_args = None if who.doses_stopped else _what_if(errors)
    stopped = {"dose": 0.0} if who.doses_stopped else {}
    baseline = scenario = None
    try:
        baseline = parse_forecast(api.operation(f"Patient/{patient_id}/$simulate",
                                                simulate_parameters(horizon, **stopped)))
    except FhirCallError as err:
        problems.append(problem("Forecast", err, "$simulate"))
    if baseline is not None and scenario_args and not errors:
        try:
            scenario = parse_forecast(api.operation(f"Patient/{patient_id}/$simulate",
                                                    simulate_parameters(horizon, **scenario_args)))
        except FhirCallError as err:
            problems.append(problem("What-if scenario", err, "$simulate"))
    panels = forecast_panels(baseline, scenario, last_dose=who.last_dose) if baseline is not None else []
    if baseline is not None and not panels:
        problems.append(Problem("Forecast", "The twin returned no forecast for this participant."))
    risk = latest_risk(api, patient_id, problems)
    tasks = outreach_tasks(api, patient_id, problems)
    notice = NOTICES.get(request.args.get("notice", ""))
    proposed, proposed_message = load_proposed_visits(api, patient_id)
    return render_template("app/patient.html", who=who, panels=panels, baseline=baseline, scenario=scenario,
                           scenario_args=scenario_args, horizon=horizon, risk=risk, tasks=tasks, problems=problems,
                           errors=errors, form=request.args, grant=grant, csrf=_csrf(), notice=notice,
                           proposed=proposed, proposed_message=proposed_message)


@bp.post("/patient/<patient_id>/predict-dropout")
def predict_dropout(patient_id):
    """Run ``$predict-dropout`` for the participant, then show the page again with a fixed notice key."""
    grant = _grant()
    if not secrets.compare_digest(request.form.get("csrf_token", "").encode(),
                                  session.get("csrf", "").encode()):
        abort(400)
    try:
        _api(grant).operation(f"Patient/{patient_id}/$predict-dropout", [])
        key = "risk-updated"
    except FhirCallError as err:
        if err.error_id == "no-next-visit":
            key = "risk-no-next-visit"
        elif err.status in (401, 403):
            key = "risk-not-allowed"
        elif err.status in (404, 501) and err.error_id in (None, "unknown-operation", "operation-not-supported-here"):
            key = "risk-unavailable"
        else:
            current_app.logger.warning("$predict-dropout for Patient/%s failed: %s", patient_id, err.message)
            key = "risk-failed"
    return redirect(url_for("clinician.patient_view", patient_id=patient_id) + "?" + urlencode({"notice": key}))


@bp.get("/study/<study_id>")
def study_view(study_id):
    """EDC context: the study's arms, enrolment, status counts, per-arm simulation, flagged participants, the
    enrollment forecast (``?target=``) and the stored treatment-effect reports."""
    grant = _grant()
    api = _api(grant)
    problems: list[Problem] = []
    errors: list[str] = []
    target = _number("target", int, 1, MAX_TARGET, errors)
    cohort = load_cohort(api, study_id, problems, threshold=current_app.config["RISK_THRESHOLD"])
    enrollment = None if errors else load_enrollment(api, study_id, cohort.study, cohort.subjects, target, problems)
    reports = load_effect_reports(api, study_id, problems)
    schedule = load_study_schedule(api, study_id)
    strata, safety = load_strata(api, study_id, problems), load_safety(api, study_id, problems)
    return render_template("app/study.html", cohort=cohort, panels=cohort_panels(cohort), problems=problems,
                           grant=grant, errors=errors, form=request.args, enrollment=enrollment,
                           enrollment_svg=enrollment_panel(enrollment) if enrollment and enrollment.forecast else None,
                           reports=reports, schedule=schedule, strata=strata, safety=safety)


def calendar_date(value) -> str:
    """``20 Oct 2026`` from a date, datetime or FHIR date/dateTime string (the string itself if unreadable).

    Examples
    --------
    >>> calendar_date("2026-10-20"), calendar_date("2026-10-20T07:06:27Z"), calendar_date(None)
    ('20 Oct 2026', '20 Oct 2026', '')
    """
    import datetime as dt

    if value is None or value == "":
        return ""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00")) if "T" in value \
                else dt.date.fromisoformat(value)
        except ValueError:
            return value
    return f"{value.day} {value:%b %Y}"


# --- app factory ---------------------------------------------------------------------------------------

def create_app(test_config: dict | None = None) -> Flask:
    """Build the clinician app.

    Parameters
    ----------
    test_config : dict, optional
        ``DATA_DIR`` (session secret), ``CLIENT_ID`` (default ``trialtwin-clinician``), ``SCOPES`` /
        ``STANDALONE_SCOPES``, ``TRUSTED_ISSUERS`` (FHIR bases the app may be launched from; default
        ``[FHIR_BASE_URL]`` when that is set, else any http(s) URL), ``FRAME_ANCESTORS`` (CSP
        ``frame-ancestors``, default ``'self'``), ``PUBLIC_HTTPS`` (cookie ``SameSite=None; Secure``
        for cross-site EHR iframes; default: whether ``FHIR_BASE_URL`` is https), ``FHIR_HTTP_TIMEOUT``,
        ``RISK_THRESHOLD`` (default 0.8).

    Returns
    -------
    flask.Flask
    """
    app = Flask(__name__, instance_relative_config=True)
    config = dict(test_config or {})
    base = (config.get("FHIR_BASE_URL") or "").rstrip("/")
    app.config.from_mapping(DATA_DIR=app.instance_path, CLIENT_ID=CLIENT_ID, SCOPES=SCOPES,
                            STANDALONE_SCOPES=STANDALONE_SCOPES, TRUSTED_ISSUERS=[base] if base else [],
                            FRAME_ANCESTORS="'self'", PUBLIC_HTTPS=base.startswith("https://"),
                            FHIR_HTTP_TIMEOUT=60.0, RISK_THRESHOLD=0.8)
    # Keys meant for the other apps of the process (SESSION_*, SECRET_KEY of the auth server) stay theirs.
    app.config.update({k: v for k, v in config.items() if not k.startswith("SESSION_") and k != "SECRET_KEY"})
    data_dir = Path(app.config["DATA_DIR"])
    data_dir.mkdir(parents=True, exist_ok=True)
    app.config["SECRET_KEY"] = persistent_secret(data_dir / "clinician-app-secret")
    app.config["SESSION_COOKIE_NAME"] = "trialtwin_app"
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    # Inside an EHR iframe on another site the cookie must be SameSite=None, which browsers accept only
    # with Secure (https). On http://127.0.0.1 the simulator and the app share one site, so Lax works.
    if app.config["PUBLIC_HTTPS"]:
        app.config.update(SESSION_COOKIE_SAMESITE="None", SESSION_COOKIE_SECURE=True)
    else:
        app.config.update(SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_SECURE=False)
    app.extensions["trialtwin.launches"] = LaunchStore()
    app.register_blueprint(bp)
    app.add_template_filter(calendar_date, "calendar_date")
    app.add_template_filter(status_words, "status_words")

    @app.after_request
    def _headers(response):
        # No scripts at all. Inline styles are allowed because matplotlib's SVG styles its shapes inline.
        # form-action covers the redirect to the authorization server that follows the start form.
        origins = sorted({f"{urlsplit(u).scheme}://{urlsplit(u).netloc}" for u in app.config["TRUSTED_ISSUERS"]})
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            f"form-action 'self' {' '.join(origins)}; base-uri 'none'; "
            f"frame-ancestors {app.config['FRAME_ANCESTORS']}")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(401)
    def _unauthorized(_):
        return render_template("app/error.html", message="No active launch in this browser: launch the app from "
                               "the EHR (or the launch simulator) or start a standalone launch.",
                               start=True), 401

    @app.errorhandler(400)
    def _bad_request(_):
        return render_template("app/error.html", message="The form has expired; reload the page."), 400

    return app
