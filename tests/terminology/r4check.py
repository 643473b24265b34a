"""Checks that an operation's output Parameters has exactly the shape its OperationDefinition declares.

Names, cardinality and value[x] types are compared recursively (parts included), and the resource
is parsed by the R4B ``Parameters`` model.
"""
from __future__ import annotations

from fhir.resources.R4B.parameters import Parameters

import profiles

# R4's way to declare a parameter that may take one of several types (type = Element).
ALLOWED_TYPE = "http://hl7.org/fhir/StructureDefinition/operationdefinition-allowed-type"


def _problems(entries: list[dict], specs: list[dict], where: str) -> list[str]:
    out = []
    by_name = {s["name"]: s for s in specs}
    for e in entries:
        if e["name"] not in by_name:
            out.append(f"{where}: undeclared parameter {e['name']!r}")
    for spec in specs:
        mine = [e for e in entries if e["name"] == spec["name"]]
        top = None if spec["max"] == "*" else int(spec["max"])
        if len(mine) < spec["min"] or (top is not None and len(mine) > top):
            out.append(f"{where}: {spec['name']} occurs {len(mine)}x, declared {spec['min']}..{spec['max']}")
        for e in mine:
            if spec.get("part"):
                out += _problems(e.get("part", []), spec["part"], f"{where}.{spec['name']}")
            elif spec.get("type"):
                allowed = [x["valueUri"] for x in spec.get("extension", []) if x["url"] == ALLOWED_TYPE] or [spec["type"]]
                keys = ["value" + t[0].upper() + t[1:] for t in allowed]
                if not any(k in e for k in keys):
                    out.append(f"{where}: {spec['name']} carries {sorted(set(e) - {'name'})}, declared {' or '.join(keys)}")
    return out


def output_problems(parameters: dict, definition_file: str) -> list[str]:
    Parameters.model_validate(parameters)
    definition = profiles.load(definition_file)
    specs = [p for p in definition["parameter"] if p["use"] == "out"]
    return _problems(parameters["parameter"], specs, "Parameters")
