"""HTTP face of the inference service: ``POST /predict/<model>``, ``GET /models``, ``GET /metrics``.

A thin Flask wrapper over ``inference.service``; errors go through ``fhir_ops.app.render_error``.
"""
from __future__ import annotations

import math
import os

from flask import Flask, current_app, jsonify, request

from fhir_ops import auth, limits
from fhir_ops.app import render_error
from fhir_ops.errors import FhirError, InvalidRequest, NotFound, UnsupportedMediaType
from inference.registry import ChecksumMismatch, ModelRegistry
from inference.service import InferenceService, UnknownModel, get_service

__all__ = ["create_app", "service_for"]

#: Bound one request's work; bigger jobs belong in the in-process API or a bulk operation.
MAX_ROWS_PER_REQUEST = 100_000


def service_for(app: Flask) -> InferenceService:
    """The service an app serves from (its own when ``test_config`` built one, else the process-wide one)."""
    own = app.extensions.get("trialtwin_inference")
    if own is not None:
        return own
    # the server's data directory holds the versions the learning loop trained and which one is active
    data_dir = app.config.get("DATA_DIR") or os.environ.get("TRIALTWIN_DATA_DIR")
    if data_dir:
        from inference.model_loop import loop_service

        return loop_service(data_dir)
    return get_service()


def _rows_from_body(body, names: tuple[str, ...]) -> list[list[float]]:
    """Turn ``{"rows": [...]}`` into a list of numeric rows in model column order.

    A row is either a list in ``names`` order or an object keyed by feature name (all required).
    """
    if not isinstance(body, dict) or "rows" not in body:
        raise InvalidRequest('body must be a JSON object {"rows": [...]} (each row a list of numbers or an '
                             'object keyed by feature name)', error_id="invalid-body", expression=["rows"])
    rows = body["rows"]
    if not isinstance(rows, list) or not rows:
        raise InvalidRequest('"rows" must be a non-empty list', error_id="invalid-body", expression=["rows"])
    if len(rows) > MAX_ROWS_PER_REQUEST:
        raise InvalidRequest(f"{len(rows)} rows exceed the per-request limit of {MAX_ROWS_PER_REQUEST}",
                             error_id="too-many-rows", expression=["rows"])
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            missing = [n for n in names if n not in row]
            if missing:
                raise InvalidRequest(f"row {i} lacks feature(s) {missing}", error_id="missing-feature",
                                     expression=[f"rows[{i}].{missing[0]}"])
            unknown = sorted(set(row) - set(names))
            if unknown:
                raise InvalidRequest(f"row {i} has unknown feature(s) {unknown}; expected {list(names)}",
                                     error_id="unknown-feature", expression=[f"rows[{i}].{unknown[0]}"])
            row = [row[n] for n in names]
        elif not isinstance(row, list):
            raise InvalidRequest(f"row {i} must be a list or an object, got {type(row).__name__}",
                                 error_id="invalid-body", expression=[f"rows[{i}]"])
        elif len(row) != len(names):
            raise InvalidRequest(f"row {i} has {len(row)} features, the model expects {len(names)}: {list(names)}",
                                 error_id="wrong-feature-count", expression=[f"rows[{i}]"])
        for j, value in enumerate(row):
            # bool is an int subclass, but true/false as a feature value is a client mistake.
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"row {i} feature '{names[j]}' must be a number, got {value!r}",
                                     error_id="invalid-feature-value", expression=[f"rows[{i}].{names[j]}"])
            if isinstance(value, int) and not -2**53 <= value <= 2**53:
                # beyond what a float feature holds exactly (a 400-digit integer would not fit at all)
                raise InvalidRequest(f"row {i} feature '{names[j]}' is an integer too large for a feature value",
                                     error_id="invalid-feature-value", expression=[f"rows[{i}].{names[j]}"])
            if not math.isfinite(value):
                raise InvalidRequest(f"row {i} feature '{names[j]}' is NaN or infinite; missing values are "
                                     "not allowed", error_id="invalid-feature-value",
                                     expression=[f"rows[{i}].{names[j]}"])
        out.append(row)
    return out


def create_app(test_config: dict | None = None) -> Flask:
    """Build the inference HTTP app.

    Parameters
    ----------
    test_config : dict, optional
        ``MODELS_DIR`` (registry directory), ``MICRO_BATCHING`` (bool), ``MAX_WAIT_MS``,
        ``MAX_BATCH_ROWS``, ``FORCE_CPU``. With any of these the app gets its own service;
        without, it shares :func:`inference.service.get_service`.
    """
    app = Flask(__name__)
    app.json.sort_keys = False
    own_keys = {"MODELS_DIR", "MICRO_BATCHING", "MAX_WAIT_MS", "MAX_BATCH_ROWS", "FORCE_CPU"}
    if test_config:
        app.config.update(test_config)
        if own_keys & set(test_config):
            app.extensions["trialtwin_inference"] = InferenceService(
                ModelRegistry(test_config["MODELS_DIR"]) if "MODELS_DIR" in test_config else None,
                micro_batching=test_config.get("MICRO_BATCHING", True),
                max_wait_ms=test_config.get("MAX_WAIT_MS", 2.0),
                max_batch_rows=test_config.get("MAX_BATCH_ROWS", 8192),
                force_cpu=test_config.get("FORCE_CPU"))

    # Exception covers HTTPException too: unknown routes and 405 become OperationOutcomes as well.
    app.register_error_handler(Exception, render_error)

    # Secure by default, like the FHIR app: predictions are risk assessments of participants, so a
    # caller needs a token that may read RiskAssessments (system/, user/ or patient/ scopes).
    if auth.configure(app) == "smart":
        # A CORS preflight carries no token by design (Fetch standard); it reaches no data either.
        app.before_request(lambda: None if request.method == "OPTIONS"
                           else auth.require_token("read", "RiskAssessment") and None)
    from fhir_ops import cors

    cors.init_app(app, [r"/.*"])

    @app.post("/predict/<model>")
    def predict(model: str):
        service = service_for(current_app)
        version = request.args.get("version")
        try:
            names = service.feature_names(model, version)
        except UnknownModel as exc:
            raise NotFound(str(exc), error_id="unknown-model") from None
        if not request.is_json:
            raise UnsupportedMediaType("send the rows as application/json", error_id="unsupported-media-type")
        body = limits.loads(request.get_data(cache=True), malformed_id="invalid-json", allow_nan=True)
        rows = _rows_from_body(body, names)
        try:
            result = service.predict(model, rows, version)
        except ChecksumMismatch as exc:  # a server-side integrity failure, not the client's fault
            raise FhirError(str(exc), status=500, code="exception", error_id="model-checksum") from None
        except ValueError as exc:
            raise InvalidRequest(str(exc), error_id="invalid-features") from None
        return jsonify({"model": result.model, "version": result.version, "provider": result.provider,
                        "features": list(names),
                        "probabilities": [float(p) for p in result.probabilities]})

    @app.get("/models")
    def models():
        return jsonify({"models": service_for(current_app).models()})

    @app.get("/metrics")
    def metrics():
        return jsonify(service_for(current_app).metrics())

    return app
