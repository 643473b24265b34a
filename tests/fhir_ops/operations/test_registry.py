"""The registry over real HTTP: routing by level and type, GET vs POST, errors as OperationOutcome."""
from __future__ import annotations

import pytest
import requests

from fhir_ops.operations import registry

pytestmark = pytest.mark.api

FHIR_JSON = "application/fhir+json"


def error_id(response) -> str:
    assert response.headers["Content-Type"].startswith(FHIR_JSON)
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    return outcome["issue"][0]["details"]["coding"][0]["code"]


def params_of(response) -> dict:
    assert response.status_code == 200, response.text
    return {p["name"]: next(v for k, v in p.items() if k != "name") for p in response.json()["parameter"]}


@pytest.mark.parametrize("path, where", [
    ("/fhir/$test-echo", "system:-:-"),
    ("/fhir/Patient/$test-echo", "type:Patient:-"),
    ("/fhir/Group/g1/$test-echo", "instance:Group:g1"),
])
def test_each_level_routes_to_the_handler(base_url, test_operations, path, where):
    out = params_of(requests.get(base_url + path, params={"count": "3"}))
    assert out == {"where": where, "count": 3}


def test_post_parameters_body_and_typed_output(base_url, test_operations):
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "count", "valueInteger": 2}, {"name": "dose", "valueQuantity": {"value": 50, "unit": "mg"}}]}
    response = requests.post(base_url + "/fhir/Patient/p1/$test-echo", json=body,
                             headers={"Content-Type": FHIR_JSON})
    assert response.json()["parameter"] == [
        {"name": "where", "valueString": "instance:Patient:p1"}, {"name": "count", "valueInteger": 2},
        {"name": "dose", "valueQuantity": {"value": 50, "unit": "mg"}}]


def test_operation_not_defined_on_type_names_the_type(base_url, test_operations):
    response = requests.get(base_url + "/fhir/Observation/$test-echo")
    assert response.status_code == 400
    assert error_id(response) == "operation-not-supported-here"
    assert "Observation" in response.json()["issue"][0]["diagnostics"]


def test_operation_not_defined_at_level(base_url, test_operations):
    response = requests.post(base_url + "/fhir/Patient/p1/$test-touch", json={})
    assert response.status_code == 400 and "instance" in response.json()["issue"][0]["diagnostics"]
    response = requests.post(base_url + "/fhir/$test-touch", json={})
    assert response.status_code == 400 and error_id(response) == "operation-not-supported-here"


def test_unknown_operation_and_unknown_type_are_404(base_url, test_operations):
    response = requests.get(base_url + "/fhir/Patient/$no-such-op")
    assert response.status_code == 404 and error_id(response) == "unknown-operation"
    assert "$no-such-op" in response.json()["issue"][0]["diagnostics"]
    response = requests.get(base_url + "/fhir/Spaceship/$test-echo")
    assert response.status_code == 404 and error_id(response) == "unknown-resource-type"


def test_get_on_state_changing_operation_is_405_with_allow(base_url, test_operations):
    response = requests.get(base_url + "/fhir/Patient/$test-touch")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert error_id(response) == "method-not-allowed"
    response = requests.post(base_url + "/fhir/Patient/$test-touch")
    assert response.status_code == 201
    assert response.headers["Location"] == base_url + "/fhir/Patient/new"
    assert response.json() == {"resourceType": "Patient", "id": "new"}  # single return resource is bare


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_with_allow(base_url, test_operations, method):
    response = requests.request(method, base_url + "/fhir/Patient/$test-echo", json={})
    assert response.status_code == 405 and response.headers["Allow"] == "GET, POST"
    response = requests.request(method, base_url + "/fhir/Patient/$test-touch", json={})
    assert response.status_code == 405 and response.headers["Allow"] == "POST"


@pytest.mark.parametrize("query, expected", [
    ({"bogus": "1"}, "unknown-parameter"),
    ({"count": "three"}, "wrong-type"),
    ({"dose": "50 mg"}, "wrong-type"),  # a complex type cannot travel in a query string
])
def test_bad_get_parameters_are_400(base_url, test_operations, query, expected):
    response = requests.get(base_url + "/fhir/$test-echo", params=query)
    assert response.status_code == 400 and error_id(response) == expected
    assert list(query)[0] in response.json()["issue"][0]["diagnostics"]


def test_bad_post_bodies(base_url, test_operations):
    url = base_url + "/fhir/$test-echo"
    response = requests.post(url, data="{not json", headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 400 and error_id(response) == "invalid-json"
    response = requests.post(url, data="count=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415
    response = requests.post(url, json={"resourceType": "Parameters", "parameter": [
        {"name": "count", "valueDecimal": 1.5}]})
    assert response.status_code == 400 and error_id(response) == "wrong-type"
    assert response.json()["issue"][0]["expression"] == ["Parameters.parameter[0].valueDecimal"]
    response = requests.post(url + "?count=1", json={"resourceType": "Parameters"})
    assert response.status_code == 400 and error_id(response) == "unknown-parameter"


def test_capability_entries_come_from_the_registry(test_operations):
    entries = registry.capability_operations(["Patient", "Observation"])
    assert {"name": "test-echo", "definition": registry.get("test-echo").url} in entries["system"]
    patient_ops = {e["name"] for e in entries["resource"]["Patient"]}
    assert {"test-echo", "test-touch", "validate"} <= patient_ops
    observation_ops = {e["name"] for e in entries["resource"]["Observation"]}
    assert "validate" in observation_ops  # declared on Resource: listed under every type
    assert not observation_ops & {"test-echo", "test-touch"}  # declared on Patient (and Group) only
    assert "test-slow" not in patient_ops  # system level only
    assert "test-slow" in {e["name"] for e in entries["system"]}
    unexpanded = registry.capability_operations()
    assert "validate" in {e["name"] for e in unexpanded["resource"]["Resource"]}
    assert {e["name"] for e in unexpanded["resource"]["Group"]} >= {"test-echo"}


def test_shipped_definitions_are_served(base_url, test_operations):
    response = requests.get(base_url + "/fhir/OperationDefinition/validate")
    assert response.status_code == 200
    assert response.json()["url"] == "https://trialtwin.org/fhir/OperationDefinition/validate"
    response = requests.get(base_url + "/fhir/OperationDefinition/nope")
    assert response.status_code == 404 and error_id(response) == "unknown-id"


def test_declaring_a_code_twice_is_refused(test_operations):
    from tests.fhir_ops.operations.conftest import ECHO

    with pytest.raises(ValueError, match="twice"):
        registry.operation(ECHO)(lambda ctx, params: {})


def test_shipped_definitions_are_valid_r4():
    from fhir_ops.validation import validate_resource

    for op in registry.operations():
        if op.code.startswith("test-"):
            continue
        validate_resource(op.definition)
        assert op.url == f"https://trialtwin.org/fhir/OperationDefinition/{op.code}"
