"""The shipped terminology files (CodeSystem / ValueSet / ConceptMap subsets) and their in-memory catalog.

A ``Catalog`` holds code systems and value sets by canonical url; user-loaded releases
(full LOINC / SNOMED CT) replace the shipped subsets through the same ``add`` path.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
MDC = "urn:iso:std:iso:11073:10101"
UCUM = "http://unitsofmeasure.org"
#: the base of every TrialTwin canonical URL (profiles, extensions, code systems)
CANONICAL = "https://trialtwin.org/fhir"
#: TrialTwin's own code system (profiles/CodeSystem-trialtwin.json)
TRIALTWIN_CS = f"{CANONICAL}/CodeSystem/trialtwin"
#: the operations TrialTwin defines, coded as ``$name`` (profiles/CodeSystem-operation.json)
OPERATION_CS = f"{CANONICAL}/CodeSystem/operation"


def load_file(path: str | Path) -> dict:
    """Read one R4 JSON resource from disk."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def shipped(resource_type: str) -> list[dict]:
    """All shipped resources of one type (``CodeSystem``, ``ValueSet`` or ``ConceptMap``)."""
    return [load_file(p) for p in sorted(DATA_DIR.glob(f"{resource_type}-*.json"))]


def shipped_omop_maps() -> list[dict]:
    """The OMOP import's ConceptMaps (``data/omop``): concept ids to standard codes. They are kept out of
    ``shipped("ConceptMap")`` because ingest harmonization and ``$translate`` do not use them."""
    return [load_file(p) for p in sorted((DATA_DIR / "omop").glob("ConceptMap-*.json"))]


@dataclass
class CodeSystemIndex:
    """A CodeSystem resource with its concepts indexed by code (built once per version)."""

    resource: dict
    concepts: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def build(cls, resource: dict) -> "CodeSystemIndex":
        concepts: dict[str, dict] = {}

        def walk(items: list[dict]) -> None:
            for concept in items:
                concepts[concept["code"]] = concept
                walk(concept.get("concept", []))

        walk(resource.get("concept", []))
        return cls(resource, concepts)

    @property
    def url(self) -> str:
        return self.resource["url"]

    @property
    def version(self) -> str | None:
        return self.resource.get("version")


class Catalog:
    """Code systems and value sets known to this process, by canonical url."""

    def __init__(self, code_systems: list[dict] = (), value_sets: list[dict] = ()) -> None:
        self.code_systems: dict[str, CodeSystemIndex] = {}
        self.value_sets: dict[str, dict] = {}
        for cs in code_systems:
            self.add(cs)
        for vs in value_sets:
            self.add(vs)

    def add(self, resource: dict) -> None:
        """Add (or replace) a CodeSystem or ValueSet; a full licensed release replaces a subset."""
        if resource.get("resourceType") == "CodeSystem":
            self.code_systems[resource["url"]] = CodeSystemIndex.build(resource)
        elif resource.get("resourceType") == "ValueSet":
            self.value_sets[resource["url"]] = resource
        else:
            raise ValueError(f"a catalog holds CodeSystem and ValueSet resources, not {resource.get('resourceType')!r}")

    def code_system(self, url: str) -> CodeSystemIndex | None:
        return self.code_systems.get(url)

    def concept(self, system: str, code: str) -> dict | None:
        cs = self.code_systems.get(system)
        return cs.concepts.get(code) if cs else None

    def property_value(self, system: str, code: str, prop: str):
        """The value of one concept property (first one), or None."""
        concept = self.concept(system, code)
        for p in (concept or {}).get("property", []):
            if p["code"] == prop:
                return next(v for k, v in p.items() if k.startswith("value"))
        return None


def user_dir() -> Path:
    """Where user-loaded releases live: ``$TRIALTWIN_TERMINOLOGY_DIR``, else ``$TRIALTWIN_DATA_DIR/terminology``
    (default ``./data/terminology``)."""
    explicit = os.environ.get("TRIALTWIN_TERMINOLOGY_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("TRIALTWIN_DATA_DIR", "./data")) / "terminology"


def trialtwin_own(resource_type: str) -> list[dict]:
    """TrialTwin's own code systems or value sets (``profiles/``: error ids, operations, twin outputs ...),
    so ``$lookup`` and ``$validate-code`` answer for the codes TrialTwin itself emits."""
    from profiles import PROFILES_DIR

    return [load_file(p) for p in sorted(PROFILES_DIR.glob(f"{resource_type}-*.json"))]


@lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    """The shipped subsets and TrialTwin's own code systems, overridden by any release the user loaded
    (same canonical url wins).

    Cached for the process; :func:`reload_catalog` re-reads after ``trialtwin terminology load``.
    """
    catalog = Catalog(shipped("CodeSystem") + trialtwin_own("CodeSystem"),
                      shipped("ValueSet") + trialtwin_own("ValueSet"))
    folder = user_dir()
    if folder.is_dir():
        for pattern in ("CodeSystem-*.json", "ValueSet-*.json"):
            for path in sorted(folder.glob(pattern)):
                catalog.add(load_file(path))
    return catalog


def reload_catalog() -> Catalog:
    """Forget the cached catalog and read the files again."""
    default_catalog.cache_clear()
    return default_catalog()


__all__ = ["Catalog", "CodeSystemIndex", "DATA_DIR", "LOINC", "SNOMED", "MDC", "UCUM",
           "default_catalog", "load_file", "reload_catalog", "shipped", "trialtwin_own", "user_dir"]
