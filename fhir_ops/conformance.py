"""Structural check of a resource against a TrialTwin profile's differential (the unit tier).

It checks what our differentials state: cardinality, fixed and pattern values, choice types,
reference targets and extension slices. Full validation is HAPI's `$validate` (integration tier).
"""
from __future__ import annotations

from typing import Any, Iterator

import profiles

_PRIMITIVE_SUFFIX = {
    "dateTime": "DateTime", "decimal": "Decimal", "integer": "Integer", "string": "String",
    "code": "Code", "boolean": "Boolean", "positiveInt": "PositiveInt", "uri": "Uri",
    "Quantity": "Quantity", "Range": "Range", "Period": "Period", "Reference": "Reference",
    "CodeableConcept": "CodeableConcept", "Coding": "Coding",
}


def profile_by_url(url: str) -> dict | None:
    """Return the shipped StructureDefinition with canonical ``url`` (None if not ours)."""
    for res in _structure_definitions():
        if res["url"] == url:
            return res
    return None


def _structure_definitions() -> list[dict]:
    return [r for r in profiles.all_resources() if r["resourceType"] == "StructureDefinition"]


def check(resource: dict, profile: dict | None = None) -> list[str]:
    """Check ``resource`` against ``profile`` (default: each profile named in ``meta.profile``).

    Returns a list of human-readable problems; empty means the resource conforms structurally.
    A resource that names no TrialTwin profile is a problem in itself: every generated
    resource must say which profile it claims.
    """
    if profile is None:
        urls = resource.get("meta", {}).get("profile", [])
        ours = [profile_by_url(u) for u in urls]
        if not any(ours):
            return [f"{resource.get('resourceType')} names no TrialTwin profile in meta.profile"]
        return [p for prof in ours if prof for p in check(resource, prof)]
    if resource.get("resourceType") != profile["type"]:
        return [f"profile {profile['url']} is for {profile['type']}, not {resource.get('resourceType')}"]
    problems: list[str] = []
    slices: dict[str, dict] = {}
    for element in profile["differential"]["element"]:
        eid = element["id"]
        if ":" in eid:
            slices[eid] = element
            continue
        if "." not in eid:
            continue
        problems += _check_element(resource, element)
    problems += _check_extension_slices(resource, slices)
    return problems


def _check_element(resource: dict, element: dict) -> list[str]:
    path = element["path"]
    parents = path.split(".")[1:-1]
    leaf = path.split(".")[-1]
    problems = []
    for where, holder in _walk(resource, parents, profile_path=path.split(".")[0]):
        values = _values(holder, leaf)
        mn = element.get("min")
        mx = element.get("max")
        if mn is not None and len(values) < mn:
            problems.append(f"{where}.{leaf}: at least {mn} required, found {len(values)}")
        if mx not in (None, "*") and len(values) > int(mx):
            problems.append(f"{where}.{leaf}: at most {mx} allowed, found {len(values)}")
        for key, value in _choice_values(holder, leaf):
            if "type" in element:
                allowed = [t["code"] for t in element["type"]]
                if leaf.endswith("[x]") and not any(key == leaf[:-3] + _PRIMITIVE_SUFFIX.get(t, t) for t in allowed):
                    problems.append(f"{where}.{key}: type not allowed (allowed: {', '.join(allowed)})")
                problems += _check_targets(f"{where}.{key}", value, element["type"])
            for fixed_key in ("fixedCode", "fixedUri", "fixedString"):
                if fixed_key in element and value != element[fixed_key]:
                    problems.append(f"{where}.{key}: must be {element[fixed_key]!r}, found {value!r}")
            for pattern_key in ("patternCodeableConcept", "patternCoding"):
                if pattern_key in element and not _matches_pattern(value, element[pattern_key]):
                    problems.append(f"{where}.{key}: does not match the required pattern {element[pattern_key]}")
    return problems


def _check_targets(where: str, value: Any, types: list[dict]) -> list[str]:
    targets = [t for typ in types for t in typ.get("targetProfile", [])]
    if not targets or not isinstance(value, dict) or "reference" not in value:
        return []
    ref_type = value["reference"].split("/")[-2] if "/_history/" not in value["reference"] \
        else value["reference"].split("/")[-4]
    allowed_types = set()
    for t in targets:
        prof = profile_by_url(t)
        allowed_types.add(prof["type"] if prof else t.rsplit("/", 1)[-1])
    if ref_type not in allowed_types and "Resource" not in allowed_types:
        return [f"{where}: reference to {ref_type} not allowed (allowed: {', '.join(sorted(allowed_types))})"]
    return []


def _check_extension_slices(resource: dict, slices: dict[str, dict]) -> list[str]:
    problems = []
    for eid, element in slices.items():
        path, _, rest = eid.partition(":")
        if "." in rest or not path.endswith("extension"):
            continue
        parents = element["path"].split(".")[1:-1]
        urls = [p for t in element.get("type", []) for p in t.get("profile", [])]
        if not urls:
            continue
        for where, holder in _walk(resource, parents, profile_path=element["path"].split(".")[0]):
            found = [e for e in holder.get("extension", []) if e.get("url") in urls]
            if len(found) < element.get("min", 0):
                problems.append(f"{where}.extension:{rest}: at least {element['min']} required ({urls[0]})")
            mx = element.get("max", "*")
            if mx != "*" and len(found) > int(mx):
                problems.append(f"{where}.extension:{rest}: at most {mx} allowed ({urls[0]})")
            for ext in found:
                problems += _check_extension(f"{where}.extension:{rest}", ext, urls[0])
    return problems


def _check_extension(where: str, ext: dict, url: str) -> list[str]:
    definition = profile_by_url(url)
    if definition is None:
        return []
    problems = []
    subs = [e for e in definition["differential"]["element"]
            if e["id"].startswith("Extension.extension:") and e["id"].count(".") == 1]
    if subs:
        for sub in subs:
            name = sub["sliceName"]
            found = [e for e in ext.get("extension", []) if e.get("url") == name]
            if len(found) < sub.get("min", 0):
                problems.append(f"{where}: sub-extension {name!r} required")
            if sub.get("max", "*") != "*" and len(found) > int(sub["max"]):
                problems.append(f"{where}: sub-extension {name!r} at most {sub['max']}")
    elif not any(k.startswith("value") for k in ext):
        problems.append(f"{where}: value[x] required")
    return problems


def _walk(node: Any, parents: list[str], profile_path: str) -> Iterator[tuple[str, dict]]:
    """Yield (location, holder) for every object reached by following ``parents``."""
    if not parents:
        if isinstance(node, dict):
            yield profile_path, node
        return
    head, tail = parents[0], parents[1:]
    for i, child in enumerate(_values(node, head)):
        if isinstance(child, dict):
            yield from _walk(child, tail, f"{profile_path}.{head}[{i}]")


def _values(holder: dict, leaf: str) -> list:
    return [v for _, v in _choice_values(holder, leaf)]


def _choice_values(holder: dict, leaf: str) -> list[tuple[str, Any]]:
    if leaf.endswith("[x]"):
        stem = leaf[:-3]
        keys = [k for k in holder if k.startswith(stem) and k[len(stem):][:1].isupper()]
    else:
        keys = [leaf] if leaf in holder else []
    out = []
    for key in keys:
        value = holder[key]
        out += [(key, v) for v in value] if isinstance(value, list) else [(key, value)]
    return out


def _matches_pattern(value: Any, pattern: Any) -> bool:
    """FHIR pattern semantics: every element in the pattern appears in the value."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(
            k in value and _matches_pattern(value[k], v) for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and all(any(_matches_pattern(v, p) for v in value) for p in pattern)
    return value == pattern
