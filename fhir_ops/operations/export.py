"""``$export`` (FHIR Bulk Data Access IG v2): system, ``Patient`` and ``Group/[id]`` level, and
``ResearchStudy/[id]`` (its participants, the study's equivalent of a Group), with Safe Harbor
de-identification on request. Runs only asynchronously; the answer is the Bulk Data manifest.
"""
from __future__ import annotations

from fhir_ops import bulk_export
from fhir_ops.deidentify import DATE_MODES, SafeHarbor
from fhir_ops.errors import InvalidRequest, NotFound
from fhir_ops.operations.registry import OperationContext, OperationResult, operation

PURPOSES = ("primary", "secondary")


def _where(ctx: OperationContext) -> str:
    if ctx.level == "system":
        return "system"
    if ctx.level == "type" and ctx.resource_type == "Patient":
        return "patient"
    if ctx.level == "instance" and ctx.resource_type in ("Group", "ResearchStudy"):
        return ctx.resource_type.lower()
    target = ctx.resource_type + ("/[id]" if ctx.level == "instance" else "")
    raise InvalidRequest(f"$export runs at the system level, on Patient, Group/[id] and ResearchStudy/[id]; not on "
                         f"{target}", error_id="operation-not-supported-here", code="not-supported")


def _members(store, group: dict) -> set[str]:
    """Patient ids of a Group's members (Patient members, and the individuals of ResearchSubject members)."""
    out: set[str] = set()
    for member in group.get("member") or []:
        if not isinstance(member, dict) or member.get("inactive") is True:
            continue
        kind, _, rid = ((member.get("entity") or {}).get("reference") or "").partition("/")
        if kind == "Patient" and rid:
            out.add(rid)
        elif kind == "ResearchSubject" and rid:
            try:
                subject = store.read("ResearchSubject", rid)
            except NotFound:
                continue
            pid = ((subject.get("individual") or {}).get("reference") or "").partition("/")[2]
            if pid:
                out.add(pid)
    return out


def _study_participants(store, study_id: str) -> set[str]:
    out = set()
    for subject in store.search_all("ResearchSubject", [("study", f"ResearchStudy/{study_id}")]):
        pid = ((subject.get("individual") or {}).get("reference") or "").partition("/")[2]
        if pid:
            out.add(pid)
    return out


def build_request(ctx: OperationContext, params: dict, *, deidentify_default: str | None = None) -> \
        bulk_export.ExportRequest:
    """The ExportRequest of a call (400/404 for bad input; shared by ``$export`` and ``$deidentify``)."""
    from flask import current_app

    where = _where(ctx) if deidentify_default is None else ctx.resource_type.lower()
    bulk_export.check_output_format(params.get("_outputFormat"))
    types = bulk_export.split_types(params.get("_type"))
    filters = bulk_export.parse_type_filters(params.get("_typeFilter"))
    if types:
        stray = [t for t in filters if t not in types]
        if stray:
            raise InvalidRequest(f"_typeFilter names {', '.join(stray)}, which _type does not export",
                                 error_id="invalid-type-filter", expression=["Parameters.parameter:_typeFilter"])
    mode = params.get("_deidentify", deidentify_default)
    if mode is not None and mode not in DATE_MODES:
        raise InvalidRequest(f"_deidentify must be one of {', '.join(DATE_MODES)} (how dates are de-identified); "
                             f"got {mode!r}", error_id="invalid-deidentify",
                             expression=["Parameters.parameter:_deidentify"])
    purpose = params.get("_purpose")
    if purpose is not None and purpose not in PURPOSES:
        raise InvalidRequest(f"_purpose must be one of {', '.join(PURPOSES)}; got {purpose!r}",
                             error_id="invalid-purpose", expression=["Parameters.parameter:_purpose"])
    if mode is not None and purpose == "primary":
        raise InvalidRequest("a de-identified export is secondary use of the data; _purpose=primary contradicts "
                             "_deidentify", error_id="invalid-purpose", expression=["Parameters.parameter:_purpose"])
    if params.get("_deidentifyKey") and mode is None:
        raise InvalidRequest("_deidentifyKey without _deidentify", error_id="invalid-deidentify",
                             expression=["Parameters.parameter:_deidentifyKey"])
    store = ctx.store
    patients = None
    anchors: list[dict] = []
    if where == "group":
        group = store.read("Group", ctx.resource_id)  # 404 / 410 at kick-off
        patients = _members(store, group)
        anchors.append(group)
    elif where == "researchstudy":
        anchors.append(store.read("ResearchStudy", ctx.resource_id))
        patients = _study_participants(store, ctx.resource_id)
    asked = [(r.get("reference") or "").partition("/") for r in params.get("patient") or []]
    if asked:
        if where == "system":
            raise InvalidRequest("the patient parameter applies to Patient and Group level exports",
                                 error_id="invalid-patient", expression=["Parameters.parameter:patient"])
        bad = ["/".join(a) for a in asked if a[0] != "Patient" or not a[2]]
        if bad:
            raise InvalidRequest(f"patient must reference Patients; got {', '.join(bad)}", error_id="invalid-patient",
                                 expression=["Parameters.parameter:patient"])
        chosen = {a[2] for a in asked}
        patients = chosen if patients is None else patients & chosen
    sh = None
    key_name = None
    if mode is not None:
        key_name = params.get("_deidentifyKey") or "default"
        key = bulk_export.deidentification_key(current_app, key_name)
        from datetime import date

        sh = SafeHarbor(key, mode, date.today())
    path = "" if where == "system" else ("Patient/" if where == "patient" else f"{ctx.resource_type}/{ctx.resource_id}/")
    name = "$deidentify" if deidentify_default is not None else "$export"
    return bulk_export.ExportRequest(
        level=where, request_url=f"{ctx.base_url.rstrip('/')}/{path}{name}", types=types or None,
        since=params.get("_since"), type_filters=filters, patients=patients, anchors=anchors, deidentify=sh,
        key_name=key_name, secondary=mode is not None or purpose == "secondary")


def require_async(ctx: OperationContext) -> None:
    """400 unless the call asked for ``Prefer: respond-async`` (an export never answers synchronously)."""
    from fhir_ops.operations.registry import prefers_async

    prefer = next((v for k, v in ctx.headers.items() if k.lower() == "prefer"), "")
    if not prefers_async(prefer):
        raise InvalidRequest(f"{ctx.operation.name} runs asynchronously only: send 'Prefer: respond-async' (FHIR Bulk "
                             "Data Access)", error_id="respond-async-required")


def precheck(ctx: OperationContext, params: dict) -> None:
    require_async(ctx)
    build_request(ctx, params)


@operation("OperationDefinition-export.json", async_allowed=True, precheck=precheck, backend_only=True)
def handle(ctx: OperationContext, params: dict) -> OperationResult:
    """Export the data the call selects into NDJSON files; answer the manifest."""
    request = build_request(ctx, params)
    manifest = bulk_export.run_export(ctx, request)
    return OperationResult(resource=manifest, headers={"Content-Type": "application/json"})
