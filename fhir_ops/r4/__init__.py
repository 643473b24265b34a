"""The FHIR R4 (4.0.1) base definitions the server speaks, shipped as data (definitions.json).

definitions.json is generated from the official R4 definitions by scripts/build_r4_definitions.py;
this module answers which resource types exist and hands the definitions to the validator.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

DEFINITIONS_PATH = Path(__file__).with_name("definitions.json")


@lru_cache(maxsize=1)
def definitions() -> dict:
    """The parsed definitions file (types, primitive regexes, required value-set expansions)."""
    with DEFINITIONS_PATH.open(encoding="utf-8") as fh:
        return json.load(fh)


@lru_cache(maxsize=1)
def resource_types() -> tuple[str, ...]:
    """Every concrete R4 resource type, sorted (``Resource`` and ``DomainResource`` are abstract).

    Examples
    --------
    >>> types = resource_types()
    >>> len(types), "MedicinalProduct" in types, "Citation" in types
    (146, True, False)
    """
    return tuple(sorted(name for name, t in definitions()["types"].items()
                        if t["kind"] == "resource" and not t["abstract"]))


@lru_cache(maxsize=1)
def _resource_type_set() -> frozenset:
    return frozenset(resource_types())


def is_resource_type(name: object) -> bool:
    """Tell whether ``name`` is a concrete R4 resource type.

    Examples
    --------
    >>> is_resource_type("Patient"), is_resource_type("HumanName"), is_resource_type("Citation")
    (True, False, False)
    """
    return isinstance(name, str) and name in _resource_type_set()
