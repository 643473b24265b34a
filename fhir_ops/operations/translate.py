"""``ConceptMap/$translate`` (R4 ConceptMap-translate): a thin wrapper over ``terminology.conceptmap.translate``.

Type level uses the active version of every map (or the one named by ``url``); instance level the stored map.
"""
from __future__ import annotations

from fhir_ops.operations.registry import OperationContext, OperationResult, operation
from terminology.conceptmap import MapSet, translate
from terminology.workflow import active_mapset, versions


@operation("OperationDefinition-translate.json")
def handle(ctx: OperationContext, params: dict) -> OperationResult:
    url, wanted = params.get("url"), params.get("conceptMapVersion")
    if ctx.level == "instance":
        maps = MapSet([ctx.store.read("ConceptMap", ctx.resource_id)])
    elif url and wanted:
        # any stored version may be named, drafts and retired ones included (to try a draft before publishing)
        stored = [v for v in versions(ctx.store, url) if v.get("version") == wanted]
        # not stored: the active set still holds shipped maps; it answers 404 for an unknown version
        maps = MapSet(stored) if stored else active_mapset(ctx.store)
    else:
        maps = active_mapset(ctx.store)
    result = translate(
        maps, code=params.get("code"), system=params.get("system"), version=params.get("version"),
        coding=params.get("coding"), codeable_concept=params.get("codeableConcept"),
        url=params.get("url"), concept_map_version=params.get("conceptMapVersion"),
        source=params.get("source"), target=params.get("target"),
        target_system=params.get("targetsystem"), reverse=bool(params.get("reverse", False)))
    # the pure function already builds the R4 Parameters (match parts in R4 order)
    return OperationResult(resource=result)
