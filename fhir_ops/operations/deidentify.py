"""``Group/[id]/$deidentify`` and ``ResearchStudy/[id]/$deidentify``: a HIPAA Safe Harbor copy of a cohort's
data for secondary use or a non-production system, as NDJSON files with a report of what was changed.

The same pipeline as ``$export?_deidentify=...`` (fhir_ops.bulk_export, fhir_ops.deidentify); participants who
withdrew secondary-use consent are left out.
"""
from __future__ import annotations

from fhir_ops import bulk_export
from fhir_ops.operations.export import build_request, require_async
from fhir_ops.operations.registry import OperationContext, OperationResult, operation


def _as_export(params: dict) -> dict:
    out = {k: v for k, v in params.items() if k not in ("dateMode", "key")}
    out["_deidentify"] = params.get("dateMode", "year")
    if params.get("key"):
        out["_deidentifyKey"] = params["key"]
    return out


def precheck(ctx: OperationContext, params: dict) -> None:
    require_async(ctx)
    build_request(ctx, _as_export(params), deidentify_default="year")


@operation("OperationDefinition-deidentify.json", async_allowed=True, precheck=precheck)
def handle(ctx: OperationContext, params: dict) -> OperationResult:
    """De-identify the cohort's data into NDJSON files; answer the manifest with the change report."""
    request = build_request(ctx, _as_export(params), deidentify_default="year")
    manifest = bulk_export.run_export(ctx, request)
    return OperationResult(resource=manifest, headers={"Content-Type": "application/json"})
