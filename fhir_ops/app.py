"""The FHIR server's Flask app factory: configuration, the store, and the one error renderer.

``create_app(test_config)`` builds a fresh app; every error leaves it as an application/fhir+json OperationOutcome.
"""
from __future__ import annotations

import logging
import os
import re

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from fhir_ops import limits
from fhir_ops.errors import FhirError, InvalidRequest
from fhir_ops.json_codec import dumps_bytes
from fhir_ops.store.base import Store

FHIR_JSON = "application/fhir+json"
log = logging.getLogger(__name__)

# werkzeug status -> (FHIR issue code, stable error id)
_HTTP_ISSUES = {
    400: ("invalid", "bad-request"),
    404: ("not-found", "unknown-route"),
    405: ("not-supported", "method-not-allowed"),
    406: ("not-supported", "not-acceptable"),
    413: ("too-costly", "payload-too-large"),
    415: ("not-supported", "unsupported-media-type"),
}


def fhir_response(body: dict | None, status: int = 200, headers: dict | None = None) -> Response:
    """A response carrying ``body`` as application/fhir+json (no body when ``body`` is None)."""
    data = b"" if body is None else dumps_bytes(body)
    resp = Response(data, status=status, headers=headers or {})
    if body is not None:
        resp.content_type = f"{FHIR_JSON}; charset=utf-8"
    else:
        # an empty answer (204, a minimal 201) has no media type at all; Flask's default is text/html
        resp.headers.pop("Content-Type", None)
    return resp


def _as_fhir_error(err: Exception) -> FhirError:
    if isinstance(err, FhirError):
        return err
    if isinstance(err, RecursionError):
        # input nested past what a recursive walk can follow: the client's doing, answered as such
        return InvalidRequest("the request is nested too deeply to process", error_id="too-deep")
    if isinstance(err, HTTPException):
        code, error_id = _HTTP_ISSUES.get(err.code or 500, ("processing", "http-error"))
        messages = {
            404: "no FHIR endpoint at this path",
            405: "this HTTP method is not allowed at this path",
            413: f"request body exceeds the limit of {current_app.config.get('MAX_CONTENT_LENGTH')} bytes",
        }
        headers = {}
        if getattr(err, "valid_methods", None):
            headers["Allow"] = ", ".join(err.valid_methods)
        return FhirError(messages.get(err.code, err.description or err.name), status=err.code or 500,
                         code=code, error_id=error_id, headers=headers)
    # Unexpected: log the traceback here, give the client a generic message only.
    log.exception("unhandled error while serving a FHIR request")
    return FhirError("internal server error; the server log has details", status=500, code="exception",
                     error_id="internal-error", severity="fatal")


def render_error(err: Exception) -> Response:
    """The one place where errors become OperationOutcome responses."""
    fe = _as_fhir_error(err)
    return fhir_response(fe.to_outcome(), fe.status, fe.headers)


_LANDING = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TrialTwin</title></head>
<body><h1>TrialTwin</h1>
<p>FHIR-native patient digital twins for clinical trials.</p>
<ul>
<li><a href="{fhir}/metadata">FHIR R4 server</a> (CapabilityStatement, base <code>{fhir}</code>)</li>
<li><a href="{fhir}/.well-known/smart-configuration">SMART configuration</a></li>
<li><a href="app/">Clinician SMART app</a></li>
</ul></body></html>
"""


def landing() -> Response:
    """What a browser pointed at the server's root gets: where the FHIR base and the app are."""
    prefix = (current_app.config.get("FHIR_PREFIX") or "").strip("/")
    return Response(_LANDING.format(fhir=prefix), content_type="text/html; charset=utf-8")


def strip_empty_content_type(response: Response) -> Response:
    """``after_request`` hook: an answer without a body (DELETE's 204, OPTIONS) names no content type."""
    if response.mimetype == "text/html" and not response.is_streamed and not response.get_data():
        response.headers.pop("Content-Type", None)
    return response


def start_request_budget() -> None:
    """``before_request`` hook: start the request's ``REQUEST_TIME_BUDGET`` (see fhir_ops.limits)."""
    limits.start_budget(current_app.config.get("REQUEST_TIME_BUDGET"))


def end_request_budget(_exc=None) -> None:
    limits.clear_budget()


def request_base() -> str:
    """The FHIR base URL of the current request (``BASE_URL`` wins over the request's own host)."""
    configured = current_app.config.get("BASE_URL")
    if configured:
        return configured.rstrip("/")
    return request.host_url.rstrip("/") + request.script_root + (current_app.config.get("FHIR_PREFIX") or "")


def get_store() -> Store:
    """Return the store of the current app (inside an app or request context)."""
    return current_app.extensions["trialtwin.store"]


def create_app(test_config: dict | None = None) -> Flask:
    """Build the FHIR server app.

    Parameters
    ----------
    test_config : dict, optional
        Overrides: ``DATA_DIR`` (default ``./data``; the SQLite file ``trialtwin.sqlite`` lives there),
        ``STORE`` (a ``Store`` instance; wins over ``DATA_DIR``), ``MAX_CONTENT_LENGTH`` (bytes,
        default 16 MiB; larger bodies get 413), ``REQUEST_TIME_BUDGET`` (seconds after which a request's
        still-running store read is stopped with a 503; writes are never cut; default 30, 0 for none), ``BASE_URL`` (external base for links, e.g.
        ``https://host/fhir``), ``FHIR_PREFIX`` (URL prefix of the FHIR routes, default ``/fhir``), ``AUTH_MODE`` ("smart", the
        default, or "open") with the SMART keys of :func:`fhir_ops.auth.init_app` (``SMART_ISSUER``,
        ``FHIR_BASE_URL``, ``SMART_KEYS_FILE`` | ``SMART_JWKS_URI`` | ``SMART_INTROSPECTION_ENDPOINT``),
        ``DASK_SCHEDULER`` (``tcp://HOST:PORT`` of a Dask scheduler that runs cohort simulations) or
        ``EXECUTOR`` (a ready ``dask.distributed.Client``; see :mod:`fhir_ops.executor`),
        ``AUDIT`` ("auto", the default, "on" or "off"; see :func:`fhir_ops.audit.recorder.init_app`),
        ``STUDY_WIDE_ROLES`` (PractitionerRole codes that see every site; see docs/audit.md).
        Without ``test_config``, ``TRIALTWIN_*`` environment variables are read (``TRIALTWIN_DATA_DIR``).

    Returns
    -------
    flask.Flask
    """
    app = Flask(__name__)
    app.config.from_mapping(DATA_DIR="./data", STORE=None, MAX_CONTENT_LENGTH=16 * 1024 * 1024,
                            BASE_URL=None, FHIR_PREFIX="/fhir", AUTH_MODE="smart",
                            REQUEST_TIME_BUDGET=limits.DEFAULT_REQUEST_BUDGET)
    if test_config is None:
        app.config.from_prefixed_env("TRIALTWIN")
    else:
        app.config.update(test_config)
    store = app.config["STORE"]
    if store is None:
        from fhir_ops.store.sqlite import SQLiteStore

        store = SQLiteStore(os.path.join(app.config["DATA_DIR"], "trialtwin.sqlite"))
    app.extensions["trialtwin.store"] = store
    # Exception covers HTTPException too, so unknown routes, 405 and 413 take the same path.
    app.register_error_handler(Exception, render_error)
    app.before_request(start_request_budget)
    app.teardown_request(end_request_budget)
    app.after_request(strip_empty_content_type)

    from fhir_ops import rest

    app.url_map.converters["op"] = rest.OperationConverter
    # FHIR clients post to the bare base (".../fhir") and sometimes add a trailing slash: never answer
    # either with werkzeug's HTML redirect
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False
    app.register_blueprint(rest.bp, url_prefix=app.config["FHIR_PREFIX"] or None)
    if (app.config["FHIR_PREFIX"] or "").strip("/"):
        app.add_url_rule("/", "landing", landing, methods=["GET"])
    from fhir_ops.operations import registry

    registry.init_app(app)  # async job polling/cancel and the shipped OperationDefinitions
    from fhir_ops.audit import recorder

    # before auth: its hooks run first before each request and last after it (refusals are recorded too)
    recorder.init_app(app)
    from fhir_ops import auth

    auth.init_app(app)  # SMART enforcement (AUTH_MODE smart) or none (open)
    from fhir_ops import cors

    # Browser SMART apps on other origins read discovery, /metadata and every FHIR route (CORS_ORIGINS)
    prefix = re.escape((app.config["FHIR_PREFIX"] or "").rstrip("/"))
    cors.init_app(app, [rf"{prefix}(/.*)?\Z" if prefix else r"/.*"])
    from fhir_ops import executor

    executor.init_app(app)  # cohort work in process, or on the Dask cluster of EXECUTOR / DASK_SCHEDULER
    rest.capability_statement(app)  # at start-up, once configured; not on the first GET /metadata
    return app
