"""FHIR Bulk Data export (Bulk Data Access IG v2): what to export, NDJSON files per type, the manifest.

``$export`` and ``$deidentify`` (fhir_ops/operations) describe a request with :class:`ExportRequest`
and run it with :func:`run_export` inside their job; the files are served by ``GET
<FHIR base>/_export/<job id>/<file>`` to whoever may poll the job, and removed with the job.
"""
from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qsl

import orjson

from fhir_ops import auth
from fhir_ops.deidentify import SafeHarbor
from fhir_ops.errors import FhirError, InvalidRequest, NotFound
from fhir_ops.mapping import consent as consent_map

EXPORT_PATH = "_export"
NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
KEYS_FILE = "trialtwin-deid-keys.json"
PAGE = 1000
PROGRESS_EVERY_S = 0.25
MANIFEST_EXTENSION = "https://trialtwin.org/fhir/StructureDefinition/export-report"
_CLEANUP_KEY = "trialtwin.jobs.cleanup"
_NOBODY: frozenset = frozenset()
_FILE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}\.ndjson$|^errors\.ndjson$")
#: conformance and infrastructure types a bulk pull of participant data never carries
_NOT_EXPORTED = frozenset({"StructureDefinition", "OperationDefinition", "SearchParameter", "CodeSystem", "ValueSet",
                           "ConceptMap", "CapabilityStatement", "CompartmentDefinition", "ImplementationGuide",
                           "NamingSystem", "StructureMap", "GraphDefinition", "MessageDefinition",
                           "TerminologyCapabilities", "Bundle", "Parameters", "OperationOutcome", "Binary"})


@dataclass
class ExportRequest:
    """One export, as the kick-off asked for it.

    ``patients`` None exports every resource of the types (system level); a set limits the export to
    those Patients' compartments (``Patient``, ``Group``, ``ResearchStudy`` level). ``anchors`` are
    resources exported besides (the Group or ResearchStudy itself). ``secondary`` leaves out
    participants who withdrew secondary-use consent; a de-identified export always is secondary.
    """

    level: str
    request_url: str
    types: list[str] | None = None
    since: str | None = None
    type_filters: dict[str, list[list[tuple[str, str]]]] = field(default_factory=dict)
    patients: set[str] | None = None
    anchors: list[dict] = field(default_factory=list)
    deidentify: SafeHarbor | None = None
    key_name: str | None = None
    secondary: bool = False


# --- parameters --------------------------------------------------------------------------------------

def split_types(values) -> list[str]:
    """``_type`` values, each possibly comma-separated, as a list of known resource types (400 otherwise)."""
    from fhir_ops.validation import all_resource_types

    known = set(all_resource_types())
    out: list[str] = []
    for value in values or []:
        for t in (x.strip() for x in str(value).split(",")):
            if not t:
                continue
            if t not in known:
                raise InvalidRequest(f"_type names {t!r}, which is not an R4 resource type", error_id="unknown-type",
                                     expression=["Parameters.parameter:_type"])
            if t not in out:
                out.append(t)
    return out


def parse_type_filters(values) -> dict[str, list[list[tuple[str, str]]]]:
    """``_typeFilter`` values (``Observation?code=...``) by type; each a search the type's resources must
    match (several for one type are OR-ed, as the IG says). Unknown search parameters are a 400."""
    from fhir_ops.search.registry import search_parameter
    from fhir_ops.validation import all_resource_types

    known = set(all_resource_types())
    out: dict[str, list[list[tuple[str, str]]]] = {}
    for value in values or []:
        rtype, sep, query = str(value).partition("?")
        if not sep or rtype not in known or not query:
            raise InvalidRequest(f"_typeFilter {value!r} is not of the form Type?search-parameters",
                                 error_id="invalid-type-filter", expression=["Parameters.parameter:_typeFilter"])
        pairs = parse_qsl(query, keep_blank_values=True)
        for name, _ in pairs:
            base = name.split(":")[0]
            if base.startswith("_") and base in ("_count", "_offset", "_sort", "_include", "_revinclude",
                                                 "_summary", "_elements", "_total", "_contained"):
                raise InvalidRequest(f"_typeFilter {value!r}: {name} shapes a result page and cannot filter an "
                                     "export", error_id="invalid-type-filter")
            if search_parameter(rtype, base) is None:
                raise InvalidRequest(f"_typeFilter {value!r}: {rtype} has no search parameter {base!r}",
                                     error_id="invalid-type-filter", expression=["Parameters.parameter:_typeFilter"])
        out.setdefault(rtype, []).append(pairs)
    return out


def check_output_format(value: str | None) -> None:
    if value is not None and value not in OUTPUT_FORMATS:
        raise InvalidRequest(f"_outputFormat {value!r} is not supported; this server writes {NDJSON}",
                             error_id="unsupported-output-format", expression=["Parameters.parameter:_outputFormat"])


def deidentification_key(app, name: str | None) -> bytes:
    """The secret of the named de-identification key (``DEIDENTIFY_KEYS`` config, else the key file).

    Without configured keys the server keeps one key, ``default``, in ``trialtwin-deid-keys.json``
    beside the jobs database (created on first use, mode 0600): pseudonyms then stay the same across
    exports and restarts. The key never leaves the server.
    """
    name = name or "default"
    configured = app.config.get("DEIDENTIFY_KEYS")
    if configured:
        keys = dict(configured)
    else:
        keys = _key_file(app)
    if name not in keys:
        raise InvalidRequest(f"no de-identification key named {name!r} (known: {', '.join(sorted(keys))})",
                             error_id="unknown-deidentify-key", expression=["Parameters.parameter:_deidentifyKey"])
    value = keys[name]
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


_KEY_LOCK = threading.Lock()


def _key_file(app) -> dict:
    path = os.path.join(_state_dir(app), KEYS_FILE)
    with _KEY_LOCK:
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"default": base64.b64encode(secrets.token_bytes(32)).decode("ascii")}, f)
        with open(path, encoding="utf-8") as f:
            return json.load(f)


# --- where files live ----------------------------------------------------------------------------------

def _state_dir(app) -> str:
    from fhir_ops import jobs

    return os.path.dirname(os.path.abspath(jobs.manager(app).table.path))


def job_dir(app, job_id: str) -> str:
    """The folder of one export's files: beside the jobs database, so any server process on the same data
    directory serves them."""
    return os.path.join(_state_dir(app), "exports", job_id)


def file_url(base_url: str, job_id: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/{EXPORT_PATH}/{job_id}/{name}"


# --- the export ------------------------------------------------------------------------------------------

def _exported_types(store, request: ExportRequest, access) -> tuple[list[str], list[dict]]:
    from fhir_ops.validation import all_resource_types

    errors: list[dict] = []
    if request.types:
        candidates = list(request.types)
    else:
        candidates = [t for t in all_resource_types() if t not in _NOT_EXPORTED]
    if request.level != "system":
        # a patient-level export carries the participants' compartments (and its anchors)
        anchor_types = {a["resourceType"] for a in request.anchors}
        candidates = [t for t in candidates if t == "Patient" or auth.in_compartment_type(t) or t in anchor_types]
    allowed = []
    for t in candidates:
        if access is not None and not (access.can("read", t) and access.can("search", t)):
            if request.types:  # asked for by name: say why it is missing
                errors.append(_error_line(f"{t} is not exported: the access token's scopes do not allow reading "
                                          f"and searching it", "insufficient-scope"))
            continue
        allowed.append(t)
    return allowed, errors


def _error_line(message: str, error_id: str) -> dict:
    return FhirError(message, status=403, code="forbidden", error_id=error_id).to_outcome()


def _pages(store, rtype: str, params: list[tuple[str, str]]):
    offset = 0
    while True:
        page = store.search(rtype, params + [("_count", str(PAGE)), ("_offset", str(offset))], strict=True)
        if page.matches:
            yield page.matches
        offset += len(page.matches)
        if len(page.matches) < PAGE or (page.total is not None and offset >= page.total):
            return


def run_export(ctx, request: ExportRequest) -> dict:
    """Write the NDJSON files of ``request`` for the job of ``ctx``; return the Bulk Data manifest.

    Every resource passes the same visibility check as a search answer (fhir_ops.auth.visible) for the
    token that started the export, so site or compartment rules added there apply here too.
    """
    from flask import current_app

    app = current_app._get_current_object()
    store, access = ctx.store, ctx.access
    transaction_time = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    job_id = ctx.job.id
    folder = job_dir(app, job_id)
    os.makedirs(folder, exist_ok=True)
    excluded = consent_map.withdrawals(store, consent_map.SECONDARY_USE) if request.secondary else {}
    types, errors = _exported_types(store, request, access)
    counts: dict[str, int] = {}
    left_out = {"consentWithdrawn": 0, "notVisible": 0}
    left_out_patients: set[str] = set()
    files: dict[str, object] = {}
    since = [("_lastUpdated", f"gt{request.since}")] if request.since else []
    anchors = {t: [a for a in request.anchors if a["resourceType"] == t] for t in types}
    # whose data a resource is matters for a patient-level export, a consent check or date shifting only
    need_participants = request.level != "system" or bool(excluded) or request.deidentify is not None
    study_ref = next((f"ResearchStudy/{a['id']}" for a in request.anchors if a["resourceType"] == "ResearchStudy"),
                     None)
    reported = -PROGRESS_EVERY_S
    try:
        for i, rtype in enumerate(types):
            if ctx.cancelled():
                break
            now = time.monotonic()
            if now - reported >= PROGRESS_EVERY_S:  # each report is a write to the jobs table
                ctx.progress(i / max(len(types), 1), f"exporting {rtype} ({i + 1} of {len(types)} types)")
                reported = now
            seen: set[str] = set()
            queries = request.type_filters.get(rtype) or [[]]
            sources = [anchors.get(rtype) or []] if anchors.get(rtype) else []
            for query in queries:
                sources.append(_pages(store, rtype, list(query) + since))
            for source in sources:
                for chunk in (source if not isinstance(source, list) else [source]):
                    if ctx.cancelled():
                        break
                    for resource in chunk:
                        rid = resource.get("id")
                        if rid in seen:
                            continue
                        seen.add(rid)
                        participants = auth.compartment_patients(resource) if need_participants else _NOBODY
                        anchor = any(a is resource for a in anchors.get(rtype) or [])
                        if not anchor and request.level != "system" and (not participants or (
                                request.patients is not None and not participants & request.patients)):
                            continue
                        if study_ref and rtype == "ResearchSubject" and \
                                ((resource.get("study") or {}).get("reference") != study_ref):
                            continue  # the participant's enrolment in another study is not this study's data
                        if participants & excluded.keys() and not anchor:
                            left_out["consentWithdrawn"] += 1
                            left_out_patients |= participants & excluded.keys()
                            continue
                        if not auth.visible(access, resource):
                            left_out["notVisible"] += 1
                            continue
                        if request.deidentify is not None:
                            resource = request.deidentify.apply(resource, participants)
                        f = files.get(rtype)
                        if f is None:
                            f = files[rtype] = open(os.path.join(folder, f"{rtype}.ndjson"), "wb")
                        f.write(orjson.dumps(resource, option=orjson.OPT_APPEND_NEWLINE))
                        counts[rtype] = counts.get(rtype, 0) + 1
    finally:
        for f in files.values():
            f.close()
    if ctx.cancelled():
        shutil.rmtree(folder, ignore_errors=True)
        raise FhirError("The export was cancelled", status=409, code="conflict", error_id="cancelled")
    base = ctx.base_url
    if errors:
        with open(os.path.join(folder, "errors.ndjson"), "w", encoding="utf-8") as f:
            for e in errors:
                f.write(json.dumps(e) + "\n")
    report: dict = {"exported": dict(sorted(counts.items())), "leftOut": left_out,
                    "secondaryUse": request.secondary}
    if request.secondary:
        report["consentWithdrawnParticipants"] = len(left_out_patients)
        if request.deidentify is None:
            # identified secondary export: name the Consents that took each participant out
            report["consentWithdrawals"] = [excluded[p].reason() for p in sorted(left_out_patients)]
    if request.deidentify is not None:
        report["deidentification"] = {**request.deidentify.report(), "keyName": request.key_name}
    manifest = {
        "transactionTime": transaction_time,
        "request": request.request_url,
        "requiresAccessToken": access is not None,
        "output": [{"type": t, "url": file_url(base, job_id, f"{t}.ndjson"), "count": counts[t]}
                   for t in types if t in counts],
        "error": ([{"type": "OperationOutcome", "url": file_url(base, job_id, "errors.ndjson")}] if errors else []),
        "extension": {MANIFEST_EXTENSION: report},
    }
    ctx.progress(1.0, f"{sum(counts.values())} resources in {len(counts)} files")
    return manifest


# --- serving the files -----------------------------------------------------------------------------------

def init_app(app) -> None:
    """Register ``GET <FHIR_PREFIX>/_export/<job id>/<file>`` and the clean-up of a forgotten job's files."""
    from fhir_ops.operations.registry import fhir_prefix

    if "trialtwin_export_file" in app.view_functions:
        return
    rule = f"{fhir_prefix(app)}/{EXPORT_PATH}/<job_id>/<file_name>"
    app.add_url_rule(rule, "trialtwin_export_file", _export_file, methods=["GET"])
    app.extensions.setdefault(_CLEANUP_KEY, []).append(
        lambda job_id: shutil.rmtree(job_dir(app, job_id), ignore_errors=True))


def cleanup_hooks(app) -> list:
    """What to call with a job id when the job is cancelled or expires (fhir_ops.jobs)."""
    return list(app.extensions.get(_CLEANUP_KEY, []))


def _export_file(job_id: str, file_name: str):
    from flask import Response, current_app, send_file

    from fhir_ops import jobs

    job = jobs.manager(current_app).get(job_id)  # 404 once cancelled or expired
    path = os.path.join(job_dir(current_app, job.id), file_name)
    if not _FILE_NAME.match(file_name) or not os.path.isfile(path):
        raise NotFound(f"job {job_id} has no file {file_name!r}", error_id="unknown-export-file")
    response: Response = send_file(path, mimetype=NDJSON, conditional=False, max_age=0)
    return response
