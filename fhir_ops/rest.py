"""The FHIR R4 REST interactions (/fhir): CRUD, history, search, transaction/batch, metadata and operation routing.

Handlers parse HTTP, call the store and build Bundles; errors are raised and rendered by the app.
"""
from __future__ import annotations

import dataclasses
import importlib
from datetime import datetime, timezone
from email.utils import format_datetime
from functools import lru_cache
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, g, request
from werkzeug.routing import BaseConverter

from fhir_ops import auth, limits, shipped
from fhir_ops.app import fhir_response, get_store, request_base
from fhir_ops.errors import FhirError, InvalidRequest, MethodNotAllowed, NotFound, UnsupportedMediaType
from fhir_ops.search.query import DEFAULT_COUNT, MAX_COUNT
from fhir_ops.search.registry import search_parameters_for
from fhir_ops.store.bundle import DELETED_TAG, canonical_bundle
from fhir_ops.urls import UrlError, parse_condition
from fhir_ops.validation import all_resource_types, is_resource_type
from terminology.harmonize import attach_outcomes, harmonize_bundle
from terminology.workflow import active_harmonizer

bp = Blueprint("fhir", __name__)

_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
_FORMAT_OK = {"json", "application/json", "application/fhir+json", "application/json+fhir"}
_CONTROL = ("_count", "_offset")


class OperationConverter(BaseConverter):
    """Matches a ``$operation`` path segment; a low weight makes it win over a plain id segment."""

    regex = r"\$[A-Za-z0-9_\-.]+"
    weight = 10


# -- request helpers -------------------------------------------------------------------------------
def _base() -> str:
    return request_base()


def _prefer() -> dict[str, str]:
    prefs = {}
    for part in request.headers.get("Prefer", "").split(","):
        key, _, value = part.strip().partition("=")
        if key:
            prefs[key.strip().lower()] = value.strip().strip('"')
    return prefs


def _check_format() -> None:
    fmt = request.args.get("_format")
    if fmt is not None and fmt not in _FORMAT_OK:
        raise FhirError(f"_format={fmt!r} is not supported; this server speaks JSON only", status=406,
                        code="not-supported", error_id="not-acceptable")


def _json_body() -> dict:
    """The request body as a JSON object, after content-type and size checks."""
    mimetype = request.mimetype
    if mimetype not in _JSON_TYPES:
        raise UnsupportedMediaType(f"Content-Type {request.content_type or '(none)'!r} is not supported; "
                                   f"send application/fhir+json", error_id="unsupported-media-type")
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    body = limits.loads(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object (a FHIR resource)", error_id="malformed-json")
    return body


def _check_type(resource_type: str) -> None:
    if not is_resource_type(resource_type):
        raise NotFound(f"unknown resource type {resource_type!r}", error_id="unknown-resource-type")


def _refuse_audit_write(resource_type: str) -> None:
    """AuditEvents are append-only and written by the server itself (fhir_ops.audit), never through the API."""
    if resource_type == "AuditEvent":
        raise MethodNotAllowed("AuditEvent is written by the server only: the audit trail cannot be created, "
                               "changed or deleted through the API", error_id="audit-read-only",
                               headers={"Allow": "GET"})


def _disclosed(resources) -> None:
    """Note the stored resources this answer carries: the audit record names their patients."""
    g.trialtwin_disclosed = resources


def _http_date(instant: str | None) -> str | None:
    if not instant:
        return None
    try:
        dt = datetime.fromisoformat(instant.replace("Z", "+00:00"))
    except ValueError:
        return None
    return format_datetime(dt.astimezone(timezone.utc), usegmt=True)


def _version_headers(resource: dict) -> dict:
    meta = resource.get("meta") or {}
    headers = {}
    if meta.get("versionId"):
        headers["ETag"] = f'W/"{meta["versionId"]}"'
    modified = _http_date(meta.get("lastUpdated"))
    if modified:
        headers["Last-Modified"] = modified
    return headers


def _write_response(resource: dict, status: int) -> Response:
    headers = _version_headers(resource)
    vid = (resource.get("meta") or {}).get("versionId")
    headers["Location"] = f"{_base()}/{resource['resourceType']}/{resource['id']}/_history/{vid}"
    prefer = _prefer().get("return", "representation")
    if prefer == "minimal":
        return fhir_response(None, status, headers)
    if prefer.lower() == "operationoutcome":
        outcome = {"resourceType": "OperationOutcome", "issue": [{
            "severity": "information", "code": "informational",
            "diagnostics": f"{resource['resourceType']}/{resource['id']} stored as version {vid}"}]}
        return fhir_response(outcome, status, headers)
    return fhir_response(resource, status, headers)


# -- metadata ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _resource_capabilities() -> tuple:
    rev_targets: dict[str, list[str]] = {}
    registered = {t for t in all_resource_types() if len(search_parameters_for(t)) > 5}
    for t in registered:
        for p in search_parameters_for(t):
            if p.type == "reference":
                for target in p.targets or ("*",):
                    rev_targets.setdefault(target, []).append(f"{t}:{p.name}")
    interactions = ["read", "vread", "update", "delete", "history-instance", "history-type", "create",
                    "search-type"]
    out = []
    for t in all_resource_types():
        params = search_parameters_for(t)
        out.append({
            "type": t,
            "interaction": [{"code": c} for c in interactions],
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchInclude": ["*", *(f"{t}:{p.name}" for p in params if p.type == "reference")],
            "searchRevInclude": sorted({*rev_targets.get(t, []), *rev_targets.get("*", [])}),
            "searchParam": [{"name": p.name, "type": p.type, "documentation": p.documentation} for p in params],
        })
    return tuple(out)


def _operations_module():
    """h-ops' operation registry, or None while it does not exist in this build."""
    try:
        return importlib.import_module("fhir_ops.operations.registry")
    except ModuleNotFoundError as exc:
        if exc.name in ("fhir_ops.operations.registry", "fhir_ops.operations"):
            return None
        raise


_CAPABILITY = "trialtwin.capability"


def capability_statement(app=None) -> dict:
    """The app's CapabilityStatement without its request-dependent ``implementation.url``.

    Built once per app, by ``create_app`` at start-up: generating it imports every resource model
    and operation (seconds), which must not land on the first client's ``GET /metadata``.
    Callers get the shared dict and must copy what they change.
    """
    app = app or current_app
    cached = app.extensions.get(_CAPABILITY)
    if cached is None:
        with app.app_context():
            cached = app.extensions[_CAPABILITY] = _build_capability_statement()
    return cached


@bp.get("/metadata")
def metadata():
    """The CapabilityStatement built at start-up, with this request's base URL."""
    _check_format()
    capability = dict(capability_statement())
    capability["implementation"] = {"description": "TrialTwin embedded FHIR R4 server", "url": _base()}
    return fhir_response(capability)


BULK_DATA_CAPABILITY = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"


def _build_capability_statement() -> dict:
    """CapabilityStatement generated from the R4 definitions, the search registry and the operation registry."""
    registry = _operations_module()
    resources = [dict(r) for r in _resource_capabilities()]  # copies: the cached tuple stays untouched
    operations: list[dict] = []
    if registry is not None:
        entries = registry.capability_operations([r["type"] for r in resources])
        operations = entries["system"]
        for resource in resources:
            if entries["resource"].get(resource["type"]):
                resource["operation"] = entries["resource"][resource["type"]]
    rest = {
        "mode": "server",
        "resource": resources,
        "interaction": [{"code": "transaction"}, {"code": "batch"}],
        "searchParam": [{"name": p.name, "type": p.type, "documentation": p.documentation}
                        for p in search_parameters_for("Resource")],
    }
    if operations:
        rest["operation"] = operations
    # security.cors says whether a browser app on another origin may call this server (fhir_ops.cors)
    cors = bool(current_app.config.get("CORS_ORIGINS"))
    # Only a server that enforces SMART says so: ``--auth open`` ignores tokens, so advertising
    # them would send clients through an authorization they do not need.
    if current_app.config.get("AUTH_MODE", "smart") == "smart" and current_app.config.get("SMART_ISSUER"):
        from smart_app.discovery import capability_security

        security = capability_security({"ISSUER": current_app.config["SMART_ISSUER"], "CORS_ORIGINS": cors})
        rest = {"mode": "server", "security": security, **{k: v for k, v in rest.items() if k != "mode"}}
    elif cors:
        rest = {"mode": "server", "security": {"cors": True}, **{k: v for k, v in rest.items() if k != "mode"}}
    capability = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "publisher": "TrialTwin",
        "kind": "instance",
        "software": {"name": "TrialTwin FHIR server", "version": "0.1.0"},
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "rest": [rest],
    }
    if registry is not None and registry.get("export") is not None:
        # a Bulk Data client looks for this to know $export is offered (Bulk Data Access IG v2)
        capability["instantiates"] = [BULK_DATA_CAPABILITY]
    return capability


@bp.get("/.well-known/smart-configuration")
def smart_configuration():
    """SMART discovery for this FHIR base (the issuer's document; 404 where no issuer is configured)."""
    issuer = current_app.config.get("SMART_ISSUER")
    if not issuer:
        raise NotFound("this server is not configured for SMART on FHIR (no SMART_ISSUER)",
                       error_id="smart-not-configured")
    from smart_app.discovery import smart_configuration as document

    resp = fhir_response(document({"ISSUER": issuer}))
    resp.content_type = "application/json"
    return resp


def _harmonizer(store):
    """The terminology harmonizer for the store's active maps; None when ``HARMONIZE`` is off."""
    if not current_app.config.get("HARMONIZE", True):
        return None
    return active_harmonizer(store)


def _harmonized(resource: dict) -> dict:
    """A single created/updated resource, harmonized (warnings are only reported for Bundles).

    A twin model definition (Library) is checked here too: one whose content does not validate is
    refused before anything is stored, with the path in the definition.
    """
    from fhir_ops.mapping.model_definition import check_library
    from fhir_ops.subscriptions import check_subscription, endpoint_allow

    check_library(resource)
    check_subscription(resource, endpoint_allow(current_app))
    harmonizer = _harmonizer(get_store())
    return resource if harmonizer is None else harmonizer.harmonize(resource)[0]


# -- system level -----------------------------------------------------------------------------------
@bp.post("/", strict_slashes=False)
def system_bundle():
    """transaction or batch Bundle."""
    _check_format()
    bundle = _json_body()
    if bundle.get("resourceType") != "Bundle":
        raise InvalidRequest("POST to the base expects a Bundle of type transaction or batch",
                             error_id="invalid-bundle", expression=["resourceType"])
    store = get_store()
    kind = bundle.get("type")
    if kind in ("transaction", "batch"):
        g.trialtwin_bundle_type = kind
    if kind not in ("transaction", "batch"):
        raise InvalidRequest(f"Bundle.type must be transaction or batch, got {str(kind)[:100]!r}",
                             error_id="invalid-bundle", expression=["Bundle.type"])
    # The entries exactly as the authorization check read them (one parse, fhir_ops.urls): the store
    # executes their canonical form, so the check and the write cannot disagree on a target.
    bundle = canonical_bundle(bundle, auth.bundle_entries(bundle))
    _refuse_shipped_writes(bundle)
    # A twin model definition (Library) in an entry is checked before anything is stored. The
    # entries are well-formed here: canonical_bundle refused any that were not.
    from fhir_ops.mapping.model_definition import check_library
    from fhir_ops.subscriptions import check_subscription, endpoint_allow

    allow = None  # the endpoint allow-list, parsed once per Bundle (not per entry) and only when needed
    for i, entry in enumerate(bundle.get("entry") or []):
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            try:
                check_library(entry["resource"])
                if allow is None:
                    allow = endpoint_allow(current_app)
                check_subscription(entry["resource"], allow)
            except FhirError as exc:
                exc.message = f"Bundle.entry[{i}]: {exc.message}"
                raise
    # incoming local codes get their standard coding and canonical unit before anything is stored
    warnings: dict = {}
    harmonizer = _harmonizer(store)
    if harmonizer is not None:
        bundle, warnings = harmonize_bundle(bundle, harmonizer=harmonizer)
    result = store.transaction(bundle) if kind == "transaction" else store.batch(bundle)
    disclosed = []
    for entry in result.get("entry") or []:
        res = (entry or {}).get("resource")
        if isinstance(res, dict):
            # a searchset answered inside the Bundle discloses its entries
            disclosed += [x["resource"] for x in res.get("entry") or [] if isinstance(x.get("resource"), dict)] \
                if res.get("resourceType") == "Bundle" else [res]
    _disclosed(disclosed)
    attach_outcomes(result, warnings)
    base = _base()
    for entry in result.get("entry") or []:
        if entry and "fullUrl" in entry and "://" not in entry["fullUrl"]:
            entry["fullUrl"] = f"{base}/{entry['fullUrl']}"
    return fhir_response(result)


def _refuse_shipped_writes(bundle: dict) -> None:
    """A Bundle may not replace or delete a shipped conformance resource, nor duplicate its canonical."""
    for entry in bundle.get("entry") or []:
        if not isinstance(entry, dict):
            continue
        req = entry.get("request") if isinstance(entry.get("request"), dict) else {}
        parts = str(req.get("url") or "").split("?")[0].strip("/").split("/")
        if req.get("method") in ("PUT", "DELETE", "PATCH") and len(parts) == 2:
            shipped.refuse_write(parts[0], parts[1])
        if req.get("method") in ("POST", "PUT", "DELETE", "PATCH") and parts and parts[0] == "AuditEvent":
            _refuse_audit_write("AuditEvent")
        if isinstance(entry.get("resource"), dict):
            shipped.refuse_duplicate(entry["resource"])


# -- type level -------------------------------------------------------------------------------------
@bp.post("/<resource_type>")
def create(resource_type):
    _check_format()
    _check_type(resource_type)
    _refuse_audit_write(resource_type)
    body = _json_body()
    if body.get("resourceType") != resource_type:
        raise InvalidRequest(f"body resourceType {body.get('resourceType')!r} does not match URL type "
                             f"{resource_type!r}", error_id="type-mismatch", expression=["resourceType"])
    shipped.refuse_duplicate(body)
    condition = None
    if request.headers.get("If-None-Exist"):
        try:
            pairs = parse_condition(request.headers["If-None-Exist"], resource_type, _base())
        except UrlError as exc:
            raise InvalidRequest(f"If-None-Exist: {exc}", error_id="invalid-condition") from None
        # a patient-scoped token's condition searches only its own compartment, like its searches do
        condition = urlencode(auth.restrict_condition(resource_type, pairs))
    body = _harmonized(body)
    result = get_store().create(body, if_none_exist=condition)
    return _write_response(result.resource, 201 if result.created else 200)


def _search_params() -> list[tuple[str, str]]:
    params = list(request.args.items(multi=True))
    if request.method == "POST":
        if request.mimetype != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType("POST _search expects application/x-www-form-urlencoded",
                                       error_id="unsupported-media-type")
        params += list(request.form.items(multi=True))
    return params


@bp.route("/<resource_type>", methods=["GET"])
@bp.route("/<resource_type>/_search", methods=["POST"])
def search(resource_type):
    _check_format()
    _check_type(resource_type)
    params = _search_params()
    strict = _prefer().get("handling") == "strict"
    result = _search_with_shipped(get_store(), resource_type, params, strict)
    base = _base()
    ignored = {name.split("=")[0] for name in result.ignored}
    kept = [(k, v) for k, v in params if k not in _CONTROL and k not in ignored and k != "_format"]

    def link(relation: str, offset: int) -> dict:
        query = urlencode([*kept, ("_count", result.count), ("_offset", offset)])
        return {"relation": relation, "url": f"{base}/{resource_type}?{query}"}

    bundle: dict = {"resourceType": "Bundle", "type": "searchset"}
    if result.total is not None:
        bundle["total"] = result.total
    links = [link("self", result.offset)]
    if result.count > 0 and not any(k == "_summary" and v == "count" for k, v in params):
        links.append(link("first", 0))
        if result.offset > 0:
            links.append(link("previous", max(0, result.offset - result.count)))
        has_next = (result.offset + result.count < result.total) if result.total is not None \
            else len(result.matches) == result.count
        if has_next:
            links.append(link("next", result.offset + result.count))
        if result.total is not None:
            links.append(link("last", max(0, (result.total - 1) // result.count * result.count)))
    bundle["link"] = links
    _disclosed([*result.matches, *result.included])
    entries = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
               for r in result.matches]
    entries += [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r,
                 "search": {"mode": "include"}} for r in result.included]
    if result.ignored:
        entries.append({"resource": {"resourceType": "OperationOutcome", "issue": [{
            "severity": "warning", "code": "not-supported",
            "diagnostics": f"ignored search parameter {name!r}: not supported for {resource_type}",
            "expression": [name]} for name in result.ignored]}, "search": {"mode": "outcome"}})
    if entries:
        bundle["entry"] = entries
    return fhir_response(bundle)


def _int_arg(params: list[tuple[str, str]], name: str, default: int) -> int:
    values = [v for k, v in params if k == name]
    try:
        return max(0, int(values[-1])) if values else default
    except ValueError:
        return default  # the store refuses it with its own OperationOutcome


def _search_with_shipped(store, resource_type: str, params: list[tuple[str, str]], strict: bool):
    """The store's search, with the shipped conformance resources that match put first on the first pages.

    A stored resource with the same url and version (a map workflow's copy of a shipped map) stands in
    for the file, so nothing is listed twice.
    """
    extra = shipped.search(resource_type, params)
    if extra:
        urls = ",".join(sorted({r["url"] for r in extra}))
        stored = store.search(resource_type, [("url", urls), ("_count", str(MAX_COUNT))]).matches
        have = {(r.get("url"), r.get("version")) for r in stored}
        extra = [r for r in extra if (r.get("url"), r.get("version")) not in have]
    if not extra:
        return store.search(resource_type, params, strict=strict)
    count = min(_int_arg(params, "_count", DEFAULT_COUNT), MAX_COUNT)
    offset = _int_arg(params, "_offset", 0)
    summary_count = ("_summary", "count") in params
    page = [] if summary_count else extra[offset:offset + count]
    rest = [(k, v) for k, v in params if k not in ("_count", "_offset")]
    rest += [("_count", str(count - len(page))), ("_offset", str(max(0, offset - len(extra))))]
    result = store.search(resource_type, rest, strict=strict)
    return dataclasses.replace(result, matches=page + list(result.matches), offset=offset, count=count,
                               total=None if result.total is None else result.total + len(extra))


def _history_bundle(resource_type: str | None, resource_id: str | None) -> dict:
    """One page of history (``_count``, ``_offset``) with the total and self/first/previous/next/last links."""
    base = _base()
    count, offset = _count_arg(), _offset_arg()
    # pages like a search: without _count the default page, never more than MAX_COUNT versions at once
    count = min(DEFAULT_COUNT if count is None else count, MAX_COUNT)
    store = get_store()
    versions = store.history(resource_type, resource_id, count=count, offset=offset)
    _disclosed(versions)
    total = store.history_total(resource_type, resource_id)
    entries = []
    for v in versions:
        meta = v.get("meta") or {}
        url = f"{v['resourceType']}/{v['id']}"
        deleted = DELETED_TAG in (meta.get("tag") or [])
        method = "DELETE" if deleted else ("POST" if meta.get("versionId") == "1" else "PUT")
        entry = {"fullUrl": f"{base}/{url}"}
        if not deleted:
            entry["resource"] = v
        entry["request"] = {"method": method, "url": url if method != "POST" else v["resourceType"]}
        entry["response"] = {"status": "204 No Content" if deleted else ("201 Created" if method == "POST" else "200 OK"),
                             "etag": f'W/"{meta.get("versionId")}"', "lastModified": meta.get("lastUpdated")}
        entries.append(entry)
    path = "/".join(p for p in (resource_type, resource_id) if p)
    here = f"{base}/{path}/_history" if path else f"{base}/_history"

    def link(relation: str, at: int) -> dict:
        query = [("_count", count)] if count is not None else []
        return {"relation": relation, "url": f"{here}?{urlencode([*query, ('_offset', at)])}"}

    links = [link("self", offset)]
    if count:
        links.append(link("first", 0))
        if offset > 0:
            links.append(link("previous", max(0, offset - count)))
        if offset + count < total:
            links.append(link("next", offset + count))
        links.append(link("last", max(0, (total - 1) // count * count)))
    bundle = {"resourceType": "Bundle", "type": "history", "total": total, "link": links}
    if entries:
        bundle["entry"] = entries
    return bundle


def _offset_arg() -> int:
    raw = request.args.get("_offset", "0")
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise InvalidRequest(f"_offset must be a non-negative integer, got {raw!r}", error_id="invalid-search-value")
    return n


def _count_arg() -> int | None:
    raw = request.args.get("_count")
    if raw is None:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise InvalidRequest(f"_count must be a non-negative integer, got {raw!r}", error_id="invalid-search-value")
    return n


@bp.get("/_history")
def system_history():
    _check_format()
    return fhir_response(_history_bundle(None, None))


@bp.get("/<resource_type>/_history")
def type_history(resource_type):
    _check_format()
    _check_type(resource_type)
    return fhir_response(_history_bundle(resource_type, None))


# -- instance level ---------------------------------------------------------------------------------
@bp.get("/<resource_type>/<resource_id>")
def read(resource_type, resource_id):
    _check_format()
    _check_type(resource_type)
    resource = shipped.read(resource_type, resource_id) or get_store().read(resource_type, resource_id)
    _disclosed([resource])
    return fhir_response(resource, 200, _version_headers(resource))


@bp.put("/<resource_type>/<resource_id>")
def update(resource_type, resource_id):
    _check_format()
    _check_type(resource_type)
    _refuse_audit_write(resource_type)
    body = _json_body()
    if body.get("resourceType") != resource_type:
        raise InvalidRequest(f"body resourceType {body.get('resourceType')!r} does not match URL type "
                             f"{resource_type!r}", error_id="type-mismatch", expression=["resourceType"])
    if "id" not in body:
        raise InvalidRequest(f"the body of an update needs an id equal to the URL id {resource_id!r}",
                             error_id="id-mismatch", expression=[f"{resource_type}.id"])
    if body["id"] != resource_id:
        raise InvalidRequest(f"body id {body['id']!r} does not match URL id {resource_id!r}",
                             error_id="id-mismatch", expression=[f"{resource_type}.id"])
    shipped.refuse_write(resource_type, resource_id)
    body = _harmonized(body)
    result = get_store().update(resource_type, resource_id, body, if_match=request.headers.get("If-Match"))
    return _write_response(result.resource, 201 if result.created else 200)


@bp.delete("/<resource_type>/<resource_id>")
def delete(resource_type, resource_id):
    _check_type(resource_type)
    _refuse_audit_write(resource_type)
    shipped.refuse_write(resource_type, resource_id)
    get_store().delete(resource_type, resource_id)
    return fhir_response(None, 204)


@bp.get("/<resource_type>/<resource_id>/_history")
def instance_history(resource_type, resource_id):
    _check_format()
    _check_type(resource_type)
    return fhir_response(_history_bundle(resource_type, resource_id))


@bp.get("/<resource_type>/<resource_id>/_history/<version_id>")
def vread(resource_type, resource_id, version_id):
    _check_format()
    _check_type(resource_type)
    served = shipped.read(resource_type, resource_id)
    if served is not None:
        if version_id != shipped.VERSION_ID:
            raise NotFound(f"{resource_type}/{resource_id} has only version {shipped.VERSION_ID}",
                           error_id="unknown-version")
        return fhir_response(served, 200, _version_headers(served))
    resource = get_store().vread(resource_type, resource_id, version_id)
    _disclosed([resource])
    return fhir_response(resource, 200, _version_headers(resource))


# -- operations ($name): routed to h-ops' registry --------------------------------------------------
# every method reaches the registry, which answers 405 with the Allow header the definition implies
OPERATION_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
def _dispatch(level: str, resource_type: str | None, resource_id: str | None, name: str):
    if resource_type is not None:
        _check_type(resource_type)
    registry = _operations_module()
    if registry is None:
        raise NotFound(f"unknown operation {name!r}", error_id="unknown-operation")
    return registry.dispatch(level, resource_type, resource_id, name)


@bp.route("/<op:name>", methods=OPERATION_METHODS)
def system_operation(name):
    return _dispatch("system", None, None, name)


@bp.route("/<resource_type>/<op:name>", methods=OPERATION_METHODS)
def type_operation(resource_type, name):
    return _dispatch("type", resource_type, None, name)


@bp.route("/<resource_type>/<resource_id>/<op:name>", methods=OPERATION_METHODS)
def instance_operation(resource_type, resource_id, name):
    return _dispatch("instance", resource_type, resource_id, name)
