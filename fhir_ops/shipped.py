"""The conformance resources TrialTwin ships (profiles/, terminology/data) served as a read-only layer.

Read and search of StructureDefinition, OperationDefinition, SearchParameter, CodeSystem, ValueSet and
ConceptMap merge these files with what the store holds (map workflow versions); writes to them are refused.
"""
from __future__ import annotations

from functools import lru_cache

import profiles
from fhir_ops.errors import Conflict, MethodNotAllowed
from terminology.catalog import shipped as shipped_terminology
from terminology.catalog import shipped_omop_maps

CONFORMANCE_TYPES = ("StructureDefinition", "OperationDefinition", "SearchParameter", "CodeSystem", "ValueSet",
                     "ConceptMap")
#: search parameters the layer evaluates itself (element, kind); any other one makes shipped files not match
_PARAMS = {"_id": ("id", "token"), "url": ("url", "uri"), "version": ("version", "token"),
           "name": ("name", "string"), "title": ("title", "string"), "status": ("status", "token")}
_TYPE_PARAMS = {"StructureDefinition": {"type": ("type", "token")}, "OperationDefinition": {"code": ("code", "token")}}
CONTROL = frozenset({"_count", "_offset", "_summary", "_total", "_format", "_sort", "_elements"})
VERSION_ID = "1"


@lru_cache(maxsize=1)
def _by_key() -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = {}
    resources = [r for r in profiles.all_resources() if r["resourceType"] in CONFORMANCE_TYPES]
    for rtype in ("CodeSystem", "ValueSet", "ConceptMap"):
        resources += shipped_terminology(rtype)
    resources += shipped_omop_maps()  # the OMOP import's vocabulary map is shipped too
    for r in resources:
        # one fixed version: the file is the artifact; a changed file is a new artifact version
        served = {**r, "meta": {**r.get("meta", {}), "versionId": VERSION_ID}}
        out[(r["resourceType"], r["id"])] = served
    return out


def all_shipped() -> list[dict]:
    """Every shipped conformance resource, as served (with ``meta.versionId``)."""
    return list(_by_key().values())


def read(resource_type: str, resource_id: str) -> dict | None:
    """The shipped resource ``resource_type/resource_id`` or None."""
    found = _by_key().get((resource_type, resource_id))
    return None if found is None else dict(found)


def refuse_write(resource_type: str, resource_id: str) -> None:
    """Raise 405 when a client tries to replace or delete a shipped resource."""
    if (resource_type, resource_id) in _by_key():
        raise MethodNotAllowed(
            f"{resource_type}/{resource_id} is shipped with TrialTwin and read-only; store a new version under "
            "another id (for ConceptMaps: import a new version through ConceptMap/$import-map)",
            error_id="read-only-resource", headers={"Allow": "GET"})


def refuse_duplicate(resource: dict) -> None:
    """Raise 409 when a created resource claims the canonical url and version of a shipped one."""
    url, version = resource.get("url"), resource.get("version")
    if resource.get("resourceType") not in CONFORMANCE_TYPES or not url:
        return
    for r in _by_key().values():
        if r["resourceType"] == resource["resourceType"] and r.get("url") == url and r.get("version") == version:
            raise Conflict(f"{r['resourceType']}/{r['id']} already is {url}|{version} (shipped with TrialTwin); "
                           "give the new resource another version", error_id="duplicate-canonical",
                           expression=[f"{resource['resourceType']}.version"])


def _matches(resource: dict, name: str, values: str) -> bool:
    element, kind = _PARAMS.get(name) or _TYPE_PARAMS.get(resource["resourceType"], {})[name]
    have = resource.get(element)
    if not isinstance(have, str):
        return False
    for value in values.split(","):
        if kind == "string" and have.lower().startswith(value.lower()):
            return True
        if kind != "string" and have == value:
            return True
    return False


def search(resource_type: str, params: list[tuple[str, str]]) -> list[dict]:
    """The shipped resources of ``resource_type`` matching every (non-control) parameter in ``params``.

    Only _id, url, version, name, title and status (plus StructureDefinition ``type`` and OperationDefinition
    ``code``) are evaluated here; a search with any other parameter or a modifier matches no shipped file.

    Examples
    --------
    >>> [r["id"] for r in search("StructureDefinition", [("url", "https://trialtwin.org/fhir/StructureDefinition/twin-state")])]
    ['twin-state']
    >>> len(search("ConceptMap", [("status", "active"), ("_count", "5")]))
    3
    """
    if resource_type not in CONFORMANCE_TYPES:
        return []
    criteria = [(k, v) for k, v in params if k not in CONTROL]
    known = {**_PARAMS, **_TYPE_PARAMS.get(resource_type, {})}
    if any(k not in known for k, _ in criteria):
        return []
    found = [r for (t, _), r in _by_key().items() if t == resource_type
             and all(_matches(r, k, v) for k, v in criteria)]
    return sorted(found, key=lambda r: r["id"])
