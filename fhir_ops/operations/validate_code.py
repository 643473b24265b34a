"""``ValueSet/$validate-code`` and ``CodeSystem/$validate-code`` (R4): one declaration, two resource types.

The registry keys operations by code, so both core operations share one OperationDefinition.
"""
from __future__ import annotations

from fhir_ops.errors import InvalidRequest
from fhir_ops.operations.registry import OperationContext, OperationResult, operation
from terminology.catalog import default_catalog
from terminology.codesystem import validate_code


@operation("OperationDefinition-validate-code.json")
def handle(ctx: OperationContext, params: dict) -> OperationResult:
    catalog = default_catalog()
    common = dict(code=params.get("code"), system=params.get("system"), display=params.get("display"),
                  coding=params.get("coding"), codeable_concept=params.get("codeableConcept"))
    if ctx.resource_type == "ValueSet":
        url = params.get("url")
        if ctx.level == "instance":
            url = _instance_url(ctx, "ValueSet", catalog.value_sets.values())
        if not url:
            raise InvalidRequest("ValueSet/$validate-code needs 'url' (the value set's canonical url)",
                                 error_id="missing-parameter")
        if params.get("valueSetVersion"):
            url = f"{url}|{params['valueSetVersion']}"
        return OperationResult(resource=validate_code(catalog, value_set=url, version=params.get("systemVersion"), **common))
    url = params.get("url")
    if ctx.level == "instance":
        url = _instance_url(ctx, "CodeSystem", [cs.resource for cs in catalog.code_systems.values()])
    return OperationResult(resource=validate_code(catalog, url=url, version=params.get("version"), **common))


def _instance_url(ctx: OperationContext, rtype: str, shipped) -> str:
    """The canonical url of the instance: a shipped resource with this id, else the stored one."""
    for resource in shipped:
        if resource.get("id") == ctx.resource_id:
            return resource["url"]
    return ctx.store.read(rtype, ctx.resource_id)["url"]
