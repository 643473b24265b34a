"""``CodeSystem/$lookup`` (R4 CodeSystem-lookup): a thin wrapper over ``terminology.codesystem.lookup``.

Looks in the shipped code-system subsets and any release the user loaded into the catalog.
"""
from __future__ import annotations

from fhir_ops.operations.registry import OperationContext, OperationResult, operation
from terminology.codesystem import lookup


@operation("OperationDefinition-lookup.json")
def handle(ctx: OperationContext, params: dict) -> OperationResult:
    props = params.get("property")
    return OperationResult(resource=lookup(
        code=params.get("code"), system=params.get("system"), version=params.get("version"),
        coding=params.get("coding"), property=list(props) if props else None,
        display_language=params.get("displayLanguage")))
