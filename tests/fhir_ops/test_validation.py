"""Validation of incoming resources against the R4B models: what is rejected and how it is reported."""
from __future__ import annotations

import pytest

from fhir_ops.errors import InvalidRequest
from fhir_ops.validation import all_resource_types, is_resource_type, validate_resource

pytestmark = pytest.mark.unit


def _fails(resource) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_resource(resource)
    return info.value


def test_valid_resource_is_returned_unchanged():
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "HbA1c"},
           "effectiveDateTime": "2024-02", "valueQuantity": {"value": 7.1, "unit": "%"}}
    assert validate_resource(obs) is obs


def test_unknown_type_and_datatype_are_unknown_resource_type():
    assert _fails({"resourceType": "Spaceship"}).error_id == "unknown-resource-type"
    assert _fails({"resourceType": "HumanName"}).error_id == "unknown-resource-type"
    assert _fails({"name": "x"}).error_id == "unknown-resource-type"


def test_unknown_elements_are_rejected_at_every_depth():
    err = _fails({"resourceType": "Patient", "colour": "blue", "name": [{"family": "x", "nick": "y"}]})
    assert err.error_id == "invalid-resource"
    paths = {err.expression[0], *(i["expression"][0] for i in err.extra_issues)}
    assert paths == {"Patient.colour", "Patient.name[0].nick"}
    assert len(err.to_outcome()["issue"]) == 2


@pytest.mark.parametrize("value", ["2024-13-01", "2024-02-30", "24-01-01", "2024-01-01T25:00:00Z", "tomorrow"])
def test_invalid_dates(value):
    assert _fails({"resourceType": "Patient", "birthDate": value}).expression == ["Patient.birthDate"]


def test_wrong_type_and_missing_required():
    assert _fails({"resourceType": "Patient", "active": "yes-please"}).expression == ["Patient.active"]
    assert _fails({"resourceType": "Observation", "code": {"text": "x"}}).expression == ["Observation.status"]


def test_invalid_id():
    assert _fails({"resourceType": "Patient", "id": "has spaces"}).expression == ["Patient.id"]


def test_resource_type_list_is_complete():
    types = all_resource_types()
    assert {"Patient", "ResearchSubject", "Bundle", "Parameters"} <= set(types)
    assert all(is_resource_type(t) for t in types) and "HumanName" not in types


# -- the shape-cached fast path must accept and reject exactly what full validation does ---------------
_BASES = [
    {"resourceType": "Observation", "id": "o1", "status": "final",
     "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "HbA1c"}]},
     "subject": {"reference": "Patient/abc"}, "effectiveDateTime": "2024-01-11T10:00:00Z",
     "issued": "2024-01-11T10:05:00.123Z",
     "valueQuantity": {"value": 7.1, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}},
    {"resourceType": "Patient", "active": True, "gender": "female", "birthDate": "1970-05-01",
     "name": [{"family": "Doe", "given": ["Jane", "Q"]}], "multipleBirthInteger": 2,
     "telecom": [{"system": "email", "value": "j@example.org"}]},
    {"resourceType": "Appointment", "status": "booked", "start": "2024-03-01T09:00:00+01:00",
     "end": "2024-03-01T09:30:00+01:00", "minutesDuration": 30,
     "participant": [{"actor": {"reference": "Patient/abc"}, "status": "accepted"}]},
    {"resourceType": "MedicationAdministration", "status": "completed",
     "medicationCodeableConcept": {"coding": [{"system": "urn:ip", "code": "TTX-101"}]},
     "subject": {"reference": "Patient/abc"}, "effectiveDateTime": "2024-01-11",
     "dosage": {"dose": {"value": 50, "unit": "mg"}}},
]
_STRINGS = ["", " padded ", "2024-13-01", "2024-02-30", "1970-05-01", "2024-01-11T10:00:00Z", "has space",
            "http://example.org/x", "final", "12", "1e400", "x" * 2000, "line\nbreak"]
_NUMBERS = [-1, 0, 2, 1.5, 10 ** 20, -(2 ** 40)]


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "resourceType":
                yield from _leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))
    else:
        yield path, node


def _replaced(node, path, value):
    import copy

    out = copy.deepcopy(node)
    cur = out
    for step in path[:-1]:
        cur = cur[step]
    cur[path[-1]] = value
    return out


def _accepts(fn, resource) -> bool:
    try:
        fn(resource)
        return True
    except InvalidRequest:
        return False


@pytest.mark.parametrize("base", _BASES, ids=lambda b: b["resourceType"])
def test_fast_path_agrees_with_full_validation(base):
    from fhir_ops.validation import validate_resource_full

    validate_resource(base)  # the base shape is now cached
    checked = 0
    for path, old in _leaves(base):
        candidates = _STRINGS if isinstance(old, str) else [not old] if isinstance(old, bool) else _NUMBERS
        for value in candidates:
            mutated = _replaced(base, path, value)
            if type(value) is not type(old):
                continue  # a different JSON kind is a different shape: full validation anyway
            assert _accepts(validate_resource, mutated) == _accepts(validate_resource_full, mutated), (path, value)
            checked += 1
    assert checked > 20
