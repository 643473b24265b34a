"""``ConceptMap/$import-map``: import a new concept-map version (CSV text or ConceptMap) as a draft.

Answers 201 with the stored draft, or 400 with one OperationOutcome issue per bad line / element.
"""
from __future__ import annotations

from fhir_ops.errors import InvalidRequest
from fhir_ops.operations.registry import OperationContext, OperationResult, operation
from terminology import workflow


@operation("OperationDefinition-import-map.json")
def handle(ctx: OperationContext, params: dict) -> OperationResult:
    csv_text, resource = params.get("csv"), params.get("conceptMap")
    if (csv_text is None) == (resource is None):
        raise InvalidRequest("$import-map takes exactly one of 'csv' (with 'url' and 'version') or 'conceptMap'",
                             error_id="missing-parameter")
    agent = ctx.headers.get("X-Trialtwin-User") or "fhir-api"
    if resource is not None:
        draft = workflow.import_concept_map(ctx.store, resource, agent=agent)
    else:
        meta = {"title": params["title"]} if params.get("title") else {}
        draft = workflow.import_csv(ctx.store, csv_text, url=params.get("url"), version=params.get("version"),
                                    agent=agent, **meta)
    location = f"{ctx.base_url}/ConceptMap/{draft['id']}/_history/{draft['meta']['versionId']}"
    return OperationResult(resource=draft, status=201, headers={"Location": location})
