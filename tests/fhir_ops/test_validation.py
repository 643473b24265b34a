"""Validation of incoming resources against FHIR R4 4.0.1: what is rejected and how it is reported."""
from __future__ import annotations

import pytest

from fhir_ops.errors import FhirError, InvalidRequest, Unprocessable
from fhir_ops.validation import all_resource_types, is_resource_type, validate_resource

pytestmark = pytest.mark.unit


def _fails(resource) -> FhirError:
    with pytest.raises(FhirError) as info:
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


def test_the_type_list_is_r4_not_r4b():
    types = set(all_resource_types())
    assert {"MedicinalProduct", "EffectEvidenceSynthesis", "RiskEvidenceSynthesis", "SubstanceSpecification"} <= types
    assert not {"Citation", "Evidence" + "Report", "NutritionProduct", "RegulatedAuthorization",
                "Resource", "DomainResource"} & types
    assert len(types) == 146
    assert _fails({"resourceType": "Citation", "status": "active"}).error_id == "unknown-resource-type"
    assert validate_resource({"resourceType": "MedicinalProduct", "name": [{"productName": "TTX-101"}]})


def test_required_binding_on_a_code_is_422_naming_the_element():
    err = _fails({"resourceType": "Observation", "status": "nope", "code": {"text": "x"}})
    assert isinstance(err, Unprocessable) and err.status == 422 and err.error_id == "invalid-code"
    assert err.expression == ["Observation.status"] and err.code == "code-invalid"
    assert "observation-status" in err.message
    nested = _fails({"resourceType": "Patient", "name": [{"use": "nickname-ish"}], "gender": "banana"})
    assert {nested.expression[0], *(i["expression"][0] for i in nested.extra_issues)} == \
        {"Patient.name[0].use", "Patient.gender"}


def test_a_structural_problem_with_a_bad_code_is_400():
    err = _fails({"resourceType": "Patient", "gender": "banana", "birthDate": "1970-02-30"})
    assert err.status == 400 and isinstance(err, InvalidRequest)
    assert {err.expression[0], *(i["expression"][0] for i in err.extra_issues)} == {"Patient.gender", "Patient.birthDate"}


@pytest.mark.parametrize("resource, where", [
    ({"resourceType": "Patient", "name": {"family": "x"}}, "Patient.name"),                    # max * needs an array
    ({"resourceType": "Patient", "gender": ["male"]}, "Patient.gender"),                       # max 1: no array
    ({"resourceType": "Patient", "name": []}, "Patient.name"),                                 # empty array
    ({"resourceType": "Patient", "maritalStatus": {}}, "Patient.maritalStatus"),                # empty object
    ({"resourceType": "Patient", "active": "true"}, "Patient.active"),                          # JSON kind
    ({"resourceType": "Patient", "multipleBirthInteger": 2 ** 31}, "Patient.multipleBirthInteger"),
    ({"resourceType": "Patient", "multipleBirthBoolean": True, "multipleBirthInteger": 2},
     "Patient.multipleBirthInteger"),                                                            # one choice type
    ({"resourceType": "Patient", "deceasedQuantity": {"value": 1}}, "Patient.deceasedQuantity"),  # type not allowed
    ({"resourceType": "Patient", "extension": [{"url": "http://x"}]}, "Patient.extension[0]"),  # ext-1
    ({"resourceType": "Patient", "extension": [{"valueString": "x"}]}, "Patient.extension[0].url"),
    ({"resourceType": "Patient", "contained": [{"resourceType": "Citation"}]}, "Patient.contained[0].resourceType"),
    ({"resourceType": "Patient", "contained": [{"resourceType": "Basic", "code": {"text": "x"},
                                                "contained": [{"resourceType": "Basic"}]}]},
     "Patient.contained[0].contained"),                                                          # dom-2
    ({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patient",
                                                                              "gender": "x"}}]},
     "Bundle.entry[0].resource.gender"),
    ({"resourceType": "Patient", "text": {"status": "generated", "div": "plain text"}}, "Patient.text.div"),
    ({"resourceType": "Parameters", "parameter": [{"name": "a", "part": [{"name": "b", "valueString": "x",
                                                                          "valueInteger": 1}]}]},
     "Parameters.parameter[0].part[0].valueString"),                                           # via contentReference
    ({"resourceType": "MedicationAdministration", "status": "completed", "medicationCodeableConcept": {"text": "x"},
      "subject": {"reference": "Patient/a"}, "effectiveDateTime": "2024",
      "dosage": {"dose": {"value": 1, "comparator": "<"}}}, "MedicationAdministration.dosage.dose.comparator"),
    ({"resourceType": "Observation", "status": "final", "code": {"coding": [{"code": "a\tb"}]}},
     "Observation.code.coding[0].code"),                                                        # single spaces only
])
def test_element_rules(resource, where):
    err = _fails(resource)
    assert where in {err.expression[0], *(i["expression"][0] for i in err.extra_issues)}, err.to_outcome()


def test_primitive_extensions_and_nulls_in_primitive_arrays():
    ok = {"resourceType": "Patient", "birthDate": "1970", "_birthDate": {"extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1970-01-01T01:00:00Z"}]},
        "name": [{"given": ["A", None], "_given": [None, {"extension": [{"url": "http://x", "valueCode": "y"}]}]}]}
    assert validate_resource(ok) is ok
    assert _fails({"resourceType": "Patient", "name": [{"given": ["A", None]}]}).expression == ["Patient.name[0].given[1]"]
