"""Risk drivers for people: a model feature's plain-language label and its value in words and units.

The label table is data (``inference/data/dropout-feature-labels.json``), so a retrained or another model only
needs its own table; a feature without a label keeps its name and raw value.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources

LABEL_FILE = "dropout-feature-labels.json"


@lru_cache(maxsize=None)
def label_table(filename: str = LABEL_FILE) -> dict[str, dict]:
    """Feature name → ``{"label", "kind", "unit"}`` from a label file in ``inference.data``."""
    text = resources.files("inference.data").joinpath(filename).read_text(encoding="utf-8")
    return {f["name"]: f for f in json.loads(text)["features"]}


def _number(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-6 or abs(x) >= 100 else f"{x:.3g}"


def describe(feature: str, value: float | None, table: dict[str, dict] | None = None) -> tuple[str, str]:
    """(label, value in words) of one driver.

    Examples
    --------
    >>> describe("next_visit_remote", 0.0)
    ('Next visit is remote', 'no')
    >>> describe("adherence_30d", 0.8125)
    ('Doses taken in the last 30 days', '81%')
    >>> describe("log_travel_km", math.log1p(80.0))
    ('Distance to the study site', '80 km')
    >>> describe("days_since_last_ae", 365.0)
    ('Time since the last adverse event', 'none in the last year')
    >>> describe("unknown_feature", 2.5)
    ('unknown_feature', '2.5')
    """
    spec = (label_table() if table is None else table).get(feature)
    if value is None:
        return (spec["label"] if spec else feature), "—"
    if spec is None:
        return feature, _number(value)
    kind, unit = spec.get("kind"), spec.get("unit")
    if spec.get("cap") is not None and value >= spec["cap"]:
        text = spec.get("at_cap") or f"{_number(spec['cap'])} {unit or ''} or more".strip()
    elif kind == "yes-no":
        text = "yes" if value >= 0.5 else "no"
    elif kind == "share":
        text = f"{100 * value:.0f}%"
    elif kind == "log1p":
        text = f"{_number(math.expm1(value))} {unit}" if unit else _number(math.expm1(value))
    else:
        text = f"{_number(value)} {unit}" if unit else _number(value)
    return spec["label"], text
