"""The operation registry: one declaration per operation drives routing, checks and publication.

An operation module decorates its handler with ``@operation("OperationDefinition-<code>.json")``;
the definition gives levels, resource types, ``affectsState`` and parameters.
"""
from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import profiles
from fhir_ops import parameters
from fhir_ops.errors import FhirError, InvalidRequest, MethodNotAllowed, NotFound, UnsupportedMediaType

FHIR_JSON = "application/fhir+json"
LEVELS = ("system", "type", "instance")
_JSON_MEDIA_TYPES = {"application/fhir+json", "application/json", "application/json+fhir"}


@dataclass
class OperationResult:
    """What a handler may return instead of a plain dict of outputs.

    ``outputs`` are the ``out`` parameter values (built into ``Parameters`` by the definition);
    ``resource`` is returned as the body as it is, bypassing the output definition (for operations
    whose result is not a ``Parameters``); ``status`` and ``headers`` go on the HTTP response.
    """

    outputs: dict | None = None
    resource: dict | None = None
    status: int = 200
    headers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Writes:
    """What an operation stores, and when: the one declaration the GET rule and scope checks read.

    ``types`` are the resource types it creates or updates; ``flag`` names a boolean input that
    switches writing on (``persist``), ``default`` its value when absent; without a flag the
    operation always writes.
    """

    types: tuple[str, ...]
    flag: str | None = None
    default: bool = True

    def applies(self, flag_value: bool | None) -> bool:
        """Whether a call with this value of the flag (None: not given) writes."""
        if self.flag is None:
            return True
        return self.default if flag_value is None else bool(flag_value)


@dataclass(frozen=True)
class Operation:
    """A registered operation: its definition and what was derived from it."""

    code: str
    definition: dict
    handler: Callable[["OperationContext", dict], Any]
    async_allowed: bool = False
    writes: Writes | None = None
    #: why the operation reads other participants' data even on one Patient (None: it does not); the
    #: scope check then refuses patient-limited tokens (fhir_ops.auth.check_operation)
    cross_patient: str | None = None
    #: checks run before a job is queued, so that bad input is a 4xx at kick-off, not a failed job
    precheck: Callable[["OperationContext", dict], None] | None = None
    #: at system level, only system/ scopes (SMART Backend Services) authorize the call
    backend_only: bool = False
    #: the resource types a call on a cohort (Group, ResearchStudy) reads of its participants; the
    #: token needs broad search on each. None: any type, so a cohort call needs search on every type
    reads: tuple[str, ...] | None = None
    #: why a cohort call's answer is a study-management summary that shows no participant's recorded
    #: values (None: it may); such a call needs only the study-level scopes (see fhir_ops.auth)
    study_summary: str | None = None

    @property
    def name(self) -> str:
        return "$" + self.code

    @property
    def url(self) -> str:
        return self.definition["url"]

    @property
    def affects_state(self) -> bool:
        return bool(self.definition.get("affectsState", False))

    @property
    def resource_types(self) -> tuple[str, ...]:
        return tuple(self.definition.get("resource", ()))

    def levels(self) -> tuple[str, ...]:
        return tuple(level for level in LEVELS if self.definition.get(level, False))

    def applies_to(self, resource_type: str) -> bool:
        return any(t in parameters.ANY_RESOURCE or t == resource_type for t in self.resource_types)


class OperationContext:
    """What a handler knows about its call: where it was invoked and how to report progress.

    The same handler serves synchronous and asynchronous calls: ``progress`` and ``cancelled``
    do nothing useful synchronously and talk to the job when the call runs as one.
    """

    def __init__(self, operation: Operation, level: str, resource_type: str | None,
                 resource_id: str | None, base_url: str, *, headers: Mapping[str, str] | None = None,
                 job: Any = None, access: Any = None) -> None:
        self.operation = operation
        self.level = level
        self.resource_type = resource_type
        self.resource_id = resource_id
        self.base_url = base_url
        self.headers = dict(headers or {})
        self.job = job
        #: the caller's SMART AccessContext (None in open mode): operations that read data on the
        #: caller's behalf in a job, where no request is at hand, filter with it (fhir_ops.auth.visible)
        self.access = access

    @property
    def store(self):
        """The app's store (``fhir_ops.app.get_store()``), looked up when first needed."""
        from fhir_ops.app import get_store

        return get_store()

    @property
    def is_async(self) -> bool:
        return self.job is not None

    def progress(self, fraction: float | None, message: str | None = None) -> None:
        """Report progress (``fraction`` in [0, 1]); shown to pollers in ``X-Progress``."""
        if self.job is not None:
            self.job.report(fraction, message)

    def cancelled(self) -> bool:
        """True once the client has cancelled the job; handlers check it between steps and return."""
        return self.job is not None and self.job.cancel_requested.is_set()


_REGISTRY: dict[str, Operation] = {}
_LOCK = threading.Lock()
_loaded = False


def operation(definition: str | Mapping, *, async_allowed: bool = False, writes: Writes | None = None,
              cross_patient: str | None = None, precheck: Callable | None = None, backend_only: bool = False,
              reads: tuple[str, ...] | None = None, study_summary: str | None = None):
    """Declare an operation: decorate its handler with its OperationDefinition.

    Parameters
    ----------
    definition : str or Mapping
        File name in ``profiles/`` (``"OperationDefinition-validate.json"``), or the definition
        itself (tests, plug-ins).
    async_allowed : bool
        Whether ``Prefer: respond-async`` runs the call as a job; otherwise the preference is
        ignored and the call answers synchronously (RFC 7240 lets a server do so).
    writes : Writes, optional
        What the operation stores and which input switches that on. An operation whose definition
        has ``affectsState: false`` but that writes when asked (``$simulate`` with ``persist``)
        answers GET only while the call does not write; scope checks require ``c``/``u`` on
        ``writes.types`` exactly when the call writes.
    cross_patient : str, optional
        Why the operation, even on one Patient, reads other participants' data (``$optimize-schedule``
        weighs the site's capacity against their appointments); a patient-limited token is then refused.
    precheck : callable, optional
        ``precheck(ctx, params)`` raises a FhirError for input the handler would refuse; it runs
        before an asynchronous call is queued, so that the client gets the 4xx at kick-off.
    backend_only : bool
        At system level, require ``system/`` scopes (a SMART Backend Services token); ``user/*``
        scopes are not enough (Bulk Data ``$export``).
    reads : tuple of str, optional
        The resource types a call on a Group or ResearchStudy reads of the participants; such a call
        needs ``user/`` or ``system/`` search on each (as a search of those types would). Undeclared
        (None) means any type: the call then needs search on every type (``user/*.rs``). Deny by
        default: an aggregate is never a way around the scopes a search would need.
    study_summary : str, optional
        Why a cohort call's answer only summarizes the study for its management (arm-level
        predictions, recruitment per site, visit proposals) without showing any participant's
        recorded values; such a call then needs only ``read`` on the target and ``search`` on
        ResearchSubject (what the EDC study view holds), not the ``reads`` types.

    Returns
    -------
    callable
        A decorator that registers the handler and returns it unchanged.

    Examples
    --------
    >>> @operation("OperationDefinition-validate.json")   # doctest: +SKIP
    ... def handle(ctx, params):
    ...     return {"return": {...}}
    """
    resolved = profiles.load(definition) if isinstance(definition, str) else dict(definition)
    _check_definition(resolved)

    def register(handler):
        op = Operation(code=resolved["code"], definition=resolved, handler=handler, async_allowed=async_allowed,
                       writes=writes, cross_patient=cross_patient, precheck=precheck, backend_only=backend_only,
                       reads=None if reads is None else tuple(reads), study_summary=study_summary)
        with _LOCK:
            existing = _REGISTRY.get(op.code)
            if existing is not None and existing.handler is not handler:
                raise ValueError(f"operation ${op.code} is declared twice")
            _REGISTRY[op.code] = op
        return handler

    return register


def unregister(code: str) -> None:
    """Remove an operation (tests and plug-ins that registered one temporarily)."""
    with _LOCK:
        _REGISTRY.pop(code.lstrip("$"), None)


def _check_definition(definition: Mapping) -> None:
    if definition.get("resourceType") != "OperationDefinition" or not definition.get("code"):
        raise ValueError("an operation must be declared with an OperationDefinition that has a code")
    if not any(definition.get(level) for level in LEVELS):
        raise ValueError(f"OperationDefinition {definition['code']} enables no level (system/type/instance)")
    if (definition.get("type") or definition.get("instance")) and not definition.get("resource"):
        raise ValueError(f"OperationDefinition {definition['code']} has type/instance level but no resource")


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        from fhir_ops.operations import load_all

        load_all()
        _loaded = True


def operations() -> list[Operation]:
    """Every registered operation, sorted by code."""
    _ensure_loaded()
    with _LOCK:
        return sorted(_REGISTRY.values(), key=lambda op: op.code)


def get(code: str) -> Operation | None:
    """The operation registered under ``code`` (with or without the ``$``)."""
    _ensure_loaded()
    return _REGISTRY.get(code.lstrip("$"))


def definitions() -> dict[str, dict]:
    """The published OperationDefinitions of the registered operations, by resource id (copies)."""
    return {op.definition["id"]: copy.deepcopy(op.definition) for op in operations() if op.definition.get("id")}


def capability_operations(resource_types: Iterable[str] | None = None) -> dict:
    """CapabilityStatement entries generated from the registry.

    Parameters
    ----------
    resource_types : iterable of str, optional
        The resource types the server supports. Operations declared on ``Resource`` (every type)
        are listed under each of them; without this argument they are listed under ``"Resource"``.

    Returns
    -------
    dict
        ``{"system": [{"name", "definition"}, ...], "resource": {type: [{"name", "definition"}, ...]}}``
        for ``rest.operation`` and ``rest.resource[].operation`` respectively.
    """
    known = list(resource_types) if resource_types is not None else None
    system: list[dict] = []
    by_type: dict[str, list[dict]] = {}
    for op in operations():
        entry = {"name": op.code, "definition": op.url}
        if op.definition.get("system"):
            system.append(entry)
        if op.definition.get("type") or op.definition.get("instance"):
            for declared in op.resource_types:
                targets = ([declared] if declared not in parameters.ANY_RESOURCE or known is None else known)
                for resource_type in targets:
                    by_type.setdefault(resource_type, []).append(dict(entry))
    return {"system": system, "resource": by_type}


# ------------------------------------------------------------------------------------ dispatch

def resolve(level: str, resource_type: str | None, name: str) -> Operation:
    """Find the operation called at ``level`` on ``resource_type``, or raise the right FhirError."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    op = get(name)
    if op is None:
        known = ", ".join(o.name for o in operations()) or "none"
        raise NotFound(f"Unknown operation {'$' + name.lstrip('$')} (this server knows: {known})",
                       error_id="unknown-operation")
    where = "the system level" if level == "system" else (
        f"{resource_type}" if level == "type" else f"a {resource_type} instance")
    if level != "system" and not parameters.is_resource_type(resource_type or ""):
        raise NotFound(f"Unknown resource type {resource_type!r}", error_id="unknown-resource-type")
    if not op.definition.get(level, False):
        raise InvalidRequest(
            f"Operation {op.name} cannot be invoked at {where}; it is defined at: "
            f"{', '.join(op.levels())} level", error_id="operation-not-supported-here",
            code="not-supported")
    if level != "system" and not op.applies_to(resource_type):
        raise InvalidRequest(
            f"Operation {op.name} is not defined on {resource_type}; it applies to: "
            f"{', '.join(op.resource_types)}", error_id="operation-not-supported-here", code="not-supported")
    return op


def dispatch(level: str, resource_type: str | None, resource_id: str | None, name: str):
    """Run the operation ``name`` for the current Flask request and return a Flask response.

    Parameters
    ----------
    level : {"system", "type", "instance"}
    resource_type : str or None
        None at system level.
    resource_id : str or None
        The instance id at instance level.
    name : str
        The operation's path segment (``"$validate"``; the ``$`` is optional).

    Returns
    -------
    flask.Response
        ``application/fhir+json``: the operation's result, or 202 Accepted with
        ``Content-Location`` for a call run asynchronously.

    Raises
    ------
    FhirError
        404 unknown operation, 400 operation not defined at this level or on this type, 405 GET on
        an operation that changes state, 415 non-JSON body, 400 parameter errors.
    """
    from flask import current_app, request

    op = resolve(level, resource_type, name)
    if request.method not in ("GET", "POST"):
        raise MethodNotAllowed(f"Operation {op.name} accepts {'POST' if op.affects_state else 'GET and POST'}",
                               headers={"Allow": "POST" if op.affects_state else "GET, POST"})
    if request.method == "GET":
        if op.affects_state:
            raise MethodNotAllowed(f"Operation {op.name} changes state and must be invoked with POST",
                                   headers={"Allow": "POST"})
        params = parameters.parse_query(op.definition, request.args.items(multi=True))
        if op.writes is not None and op.writes.applies(params.get(op.writes.flag) if op.writes.flag else None):
            raise MethodNotAllowed(f"{op.name} with {op.writes.flag}=true stores resources and must be invoked "
                                   "with POST; GET is for calls that only compute", headers={"Allow": "POST"})
    else:
        stray = [k for k in request.args if k not in parameters.HTTP_LAYER_PARAMS]
        if stray:
            raise InvalidRequest(
                f"Parameters of a POSTed operation go in the Parameters body, not the URL: {', '.join(stray)}",
                error_id="unknown-parameter")
        params = parameters.parse_body(op.definition, _json_body(request), resource_type)

    base_url = fhir_base_url()
    headers = {k: v for k, v in request.headers.items()}
    from fhir_ops.auth import current_access, job_owner

    access = current_access()
    if op.precheck is not None:
        op.precheck(OperationContext(op, level, resource_type, resource_id, base_url, headers=headers,
                                     access=access), params)
    if op.async_allowed and prefers_async(request.headers.get("Prefer", "")):
        from fhir_ops import jobs

        app = current_app._get_current_object()
        job = jobs.manager(app).submit(op, level, resource_type, resource_id, params, base_url, headers,
                                       access=access)
        if access is not None:  # only the submitter may poll or cancel (fhir_ops.auth checks it)
            job.owner = job_owner(access)
        return fhir_response(
            {"resourceType": "OperationOutcome", "issue": [{
                "severity": "information", "code": "informational",
                "diagnostics": f"{op.name} accepted as job {job.id}; poll {jobs.job_url(base_url, job.id)}"}]},
            202, {"Content-Location": jobs.job_url(base_url, job.id)})
    ctx = OperationContext(op, level, resource_type, resource_id, base_url, headers=headers, access=access)
    status, body, extra = invoke(op, ctx, params)
    return fhir_response(body, status, extra)


def invoke(op: Operation, ctx: OperationContext, params: dict) -> tuple[int, dict, dict]:
    """Call the handler and turn what it returned into (status, body, headers)."""
    returned = op.handler(ctx, params)
    if isinstance(returned, OperationResult):
        if returned.resource is not None:
            return returned.status, returned.resource, dict(returned.headers)
        return returned.status, parameters.build_output(op.definition, returned.outputs or {}), dict(returned.headers)
    if not isinstance(returned, Mapping):
        raise FhirError(f"Operation {op.name} returned {type(returned).__name__}, not a dict of outputs",
                        status=500, code="exception", error_id="bad-operation-output")
    return 200, parameters.build_output(op.definition, returned), {}


def _json_body(request) -> Any:
    raw = request.get_data(cache=True)
    if not raw.strip():
        return None
    media_type = (request.mimetype or "").lower()
    if media_type not in _JSON_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"Operation bodies must be application/fhir+json, got {request.content_type or 'no Content-Type'}")
    from fhir_ops import limits

    return limits.loads(raw, malformed_id="invalid-json")


def prefers_async(prefer: str) -> bool:
    """True when a ``Prefer`` header asks for ``respond-async`` (RFC 7240)."""
    return any(token.strip().split("=")[0].strip().lower() == "respond-async" for token in prefer.split(","))


def fhir_base_url() -> str:
    """The FHIR base URL of the current request (the app's ``BASE_URL`` config wins)."""
    from flask import current_app, request

    configured = current_app.config.get("BASE_URL")
    if configured:
        return configured.rstrip("/")
    return request.host_url.rstrip("/") + request.script_root + fhir_prefix(current_app)


def fhir_prefix(app) -> str:
    """URL prefix of the FHIR routes in ``app`` (``FHIR_PREFIX`` config, default ``/fhir``)."""
    prefix = app.config.get("FHIR_PREFIX", "/fhir")
    return (prefix or "").rstrip("/")


def fhir_response(body: dict, status: int = 200, headers: Mapping[str, str] | None = None):
    """A Flask response carrying a FHIR JSON body."""
    from flask import Response

    response = Response(json.dumps(body), status=status, mimetype=FHIR_JSON)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def init_app(app) -> None:
    """Add the registry's routes to a FHIR app: async job status (``GET``/``DELETE /fhir/_jobs/<id>``)
    and the files of bulk exports (``GET /fhir/_export/<job id>/<file>``).

    The shipped OperationDefinitions are read and searched like every shipped conformance resource
    (fhir_ops.shipped, through the REST routes).
    """
    from fhir_ops import bulk_export, jobs

    jobs.init_app(app)
    bulk_export.init_app(app)
