"""Checks that an operation's output Parameters has exactly the shape its OperationDefinition declares.

Names, cardinality and value[x] types are compared recursively (parts included), and the resource
is parsed by the R4B ``Parameters`` model.
"""
from __future__ import annotations

from fhir.resources.R4B.parameters import Parameters

import profiles


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
            elif spec.get("type") == "Element":  # any data type: exactly one value[x] of some type
                if len([k for k in e if k.startswith("value")]) != 1:
                    out.append(f"{where}: {spec['name']} carries {sorted(set(e) - {'name'})}, declared one value[x]")
            elif spec.get("type"):
                key = "value" + spec["type"][0].upper() + spec["type"][1:]
                if key not in e:
                    out.append(f"{where}: {spec['name']} carries {sorted(set(e) - {'name'})}, declared {key}")
    return out


def output_problems(parameters: dict, definition_file: str) -> list[str]:
    Parameters.model_validate(parameters)
    definition = profiles.load(definition_file)
    specs = [p for p in definition["parameter"] if p["use"] == "out"]
    return _problems(parameters["parameter"], specs, "Parameters")
