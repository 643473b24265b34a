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
