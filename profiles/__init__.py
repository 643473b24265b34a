"""TrialTwin's conformance resources (StructureDefinitions, OperationDefinitions, SearchParameters).

The JSON files are the single source of truth; code loads them from here.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent
CANONICAL_BASE = "https://trialtwin.org/fhir"


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    """Load one conformance resource by file name (``OperationDefinition-simulate.json``)."""
    return json.loads((PROFILES_DIR / name).read_text(encoding="utf-8"))


def all_resources() -> list[dict]:
    """Every conformance resource shipped in ``profiles/``."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(PROFILES_DIR.glob("*.json"))]
