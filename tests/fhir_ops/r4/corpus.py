"""A corpus of valid and invalid R4 resources, generated per element rule and per required binding.

Bases are resources the project writes (the demo study's generator plus hand-written generated-resource
shapes); every case is a (rule, resource) pair derived from one base by one mutation.
"""
from __future__ import annotations

import copy
from typing import Iterator

from fhir_ops.r4.validator import compiled

STRINGS = ["", " padded ", "2024-13-01", "2024-02-30", "1970-05-01", "2024-01-11T10:00:00Z", "has space",
           "http://example.org/x", "final", "12", "x" * 300, "line\nbreak", "tab\there"]
NUMBERS = [-1, 0, 2, 1.5, 10 ** 20, -(2 ** 40)]


def hand_written_bases() -> list[dict]:
    """Shapes of what the operations write, independent of the demo generator."""
    return [
        {"resourceType": "Observation", "id": "o1", "status": "final",
         "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "HbA1c"}]},
         "subject": {"reference": "Patient/abc"}, "effectiveDateTime": "2024-01-11T10:00:00Z",
         "issued": "2024-01-11T10:05:00.123Z",
         "valueQuantity": {"value": 7.1, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
         "component": [{"code": {"text": "lower"}, "valueQuantity": {"value": 6.5, "unit": "%", "comparator": ">"}}]},
        {"resourceType": "Patient", "active": True, "gender": "female", "birthDate": "1970-05-01",
         "name": [{"use": "official", "family": "Doe", "given": ["Jane", "Q"]}], "multipleBirthInteger": 2,
         "telecom": [{"system": "email", "value": "j@example.org", "use": "home"}],
         "address": [{"use": "home", "type": "both", "city": "Lyon"}]},
        {"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/p1"},
         "occurrenceDateTime": "2024-05-01T00:00:00Z",
         "prediction": [{"outcome": {"text": "missed visit"}, "probabilityDecimal": 0.82,
                         "whenPeriod": {"start": "2024-05-01", "end": "2024-06-01"}}],
         "extension": [{"url": "https://trialtwin.org/fhir/StructureDefinition/risk-driver",
                        "extension": [{"url": "feature", "valueString": "burden"},
                                      {"url": "contribution", "valueDecimal": 0.21}]}]},
        {"resourceType": "Task", "status": "requested", "intent": "proposal", "priority": "urgent",
         "for": {"reference": "Patient/p1"}, "authoredOn": "2024-05-01T09:00:00+02:00",
         "code": {"coding": [{"system": "https://trialtwin.org/fhir/CodeSystem/trialtwin", "code": "outreach"}]},
         "restriction": {"period": {"end": "2024-05-08"}}},
        {"resourceType": "Provenance", "target": [{"reference": "RiskAssessment/r1"}],
         "recorded": "2024-05-01T09:00:00Z",
         "agent": [{"who": {"display": "TrialTwin"}}],
         "entity": [{"role": "source", "what": {"reference": "Observation/o1"}}]},
        {"resourceType": "Appointment", "status": "booked", "start": "2024-03-01T09:00:00+01:00",
         "end": "2024-03-01T09:30:00+01:00", "minutesDuration": 30,
         "participant": [{"actor": {"reference": "Patient/abc"}, "status": "accepted", "required": "required"}]},
        {"resourceType": "MedicationAdministration", "status": "completed",
         "medicationCodeableConcept": {"coding": [{"system": "urn:ip", "code": "TTX-101"}]},
         "subject": {"reference": "Patient/abc"}, "effectiveDateTime": "2024-01-11",
         "dosage": {"dose": {"value": 50, "unit": "mg"}}},
        {"resourceType": "Group", "type": "person", "actual": True, "quantity": 2,
         "member": [{"entity": {"reference": "Patient/a"}}, {"entity": {"reference": "Patient/b"}}],
         "characteristic": [{"code": {"text": "arm"}, "valueBoolean": True, "exclude": False}]},
        {"resourceType": "CarePlan", "status": "draft", "intent": "proposal", "subject": {"reference": "Patient/a"},
         "activity": [{"detail": {"kind": "Appointment", "status": "scheduled",
                                  "scheduledPeriod": {"start": "2024-06-01"}}}]},
        {"resourceType": "Bundle", "type": "collection",
         "entry": [{"fullUrl": "urn:uuid:5b3bd7a2-8a5b-4d7f-9d1d-7c3bfbd1d1a1",
                    "resource": {"resourceType": "Basic", "code": {"text": "x"}}}]},
    ]


def demo_bases() -> list[dict]:
    """Two resources of each type the demo study's generator writes."""
    from fhir_ops.demo import build_demo_resources, simulate_demo_records

    seen: dict[str, int] = {}
    out = []
    for r in build_demo_resources(simulate_demo_records(7, 12)):
        if seen.get(r["resourceType"], 0) < 2:
            seen[r["resourceType"]] = seen.get(r["resourceType"], 0) + 1
            out.append(r)
    return out


def _paths(node, path=()) -> Iterator[tuple[tuple, object]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "resourceType":
                yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def _set(base: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(base)
    cur = out
    for step in path[:-1]:
        cur = cur[step]
    cur[path[-1]] = value
    return out


def _delete(base: dict, path: tuple) -> dict:
    out = copy.deepcopy(base)
    cur = out
    for step in path[:-1]:
        cur = cur[step]
    del cur[path[-1]]
    return out


def bound_codes(resource: dict) -> Iterator[tuple[tuple, str, frozenset]]:
    """(path, value set url, codes) of every code in ``resource`` whose element has a required binding."""
    nodes = compiled()

    def walk(node, obj, path):
        for key, value in obj.items():
            field = node.fields.get(key)
            if field is None:
                continue
            items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
            for i, item in items:
                sub = path + ((key,) if i is None else (key, i))
                if field[2] == 0 and field[4] is not None:
                    yield sub, field[5], field[4]
                elif field[2] == 1 and isinstance(item, dict):
                    yield from walk(field[3], item, sub)
                elif field[2] == 2 and isinstance(item, dict) and item.get("resourceType") in nodes:
                    yield from walk(nodes[item["resourceType"]], item, sub)

    yield from walk(nodes[resource["resourceType"]], resource, ())


def cases(base: dict) -> Iterator[tuple[str, dict]]:
    """Every mutation of ``base``: (rule, resource)."""
    yield "valid", base
    for path, old in _paths(base):
        if not path:
            yield "unknown-element", _set(base, ("colour",), "blue")
            continue
        if isinstance(old, dict):
            yield "unknown-element", _set(base, path + ("nickName",), "x")
            yield "empty-object", _set(base, path, {})
        if isinstance(path[-1], str):
            yield "missing-element", _delete(base, path)
            if isinstance(old, list):
                yield "cardinality-unwrapped", _set(base, path, old[0])
                yield "empty-array", _set(base, path, [])
            else:
                yield "cardinality-wrapped", _set(base, path, [old])
        if isinstance(old, str):
            for value in STRINGS:
                yield "primitive-format", _set(base, path, value)
            yield "primitive-kind", _set(base, path, 12)
        elif isinstance(old, bool):
            yield "primitive-format", _set(base, path, not old)
            yield "primitive-kind", _set(base, path, "true")
        elif isinstance(old, (int, float)):
            for value in NUMBERS:
                yield "primitive-format", _set(base, path, value)
            yield "primitive-kind", _set(base, path, str(old))
        if isinstance(path[-1], str) and path[-1].startswith(("value", "effective", "occurrence", "medication")) \
                and path[-1] not in ("value",):
            yield "choice-twice", _set(base, path[:-1] + ("valueString" if not path[-1].startswith("valueS")
                                                           else "valueBoolean",), "x")
    for path, url, codes in bound_codes(base):
        yield "binding-invalid", _set(base, path, "not-a-" + path[-1 if isinstance(path[-1], str) else -2])
        for code in sorted(codes)[:3]:
            yield "binding-valid", _set(base, path, code)
