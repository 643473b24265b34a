"""Access decisions of the resource-server library: the scope matrix (v2 and mapped v1) and the
FHIR R4 Patient compartment (hl7.org/fhir/R4/compartmentdefinition-patient.html)."""
from __future__ import annotations

import pytest

from fhir_ops.errors import Forbidden
from smart_app.resource_server import (
    AccessContext, access_context_from_claims, in_patient_compartment, patient_compartment_allows,
)
from smart_app.scopes import parse_scopes

pytestmark = pytest.mark.unit


def ctx(scope: str, patient: str | None = "p1") -> AccessContext:
    return AccessContext(client_id="app", scopes=parse_scopes(scope), patient=patient)


# (granted scope, interaction, resource type, allowed?)
MATRIX = [
    ("patient/Observation.rs", "r", "Observation", True),
    ("patient/Observation.rs", "s", "Observation", True),
    ("patient/Observation.rs", "c", "Observation", False),
    ("patient/Observation.rs", "r", "Condition", False),
    ("patient/Observation.read", "search", "Observation", True),     # v1 read = rs
    ("patient/Observation.read", "update", "Observation", False),
    ("patient/*.write", "create", "Task", True),                    # v1 write = cud
    ("patient/*.write", "delete", "Task", True),
    ("patient/*.write", "read", "Task", False),
    ("user/*.*", "d", "Patient", True),                             # v1 * = cruds
    ("user/*.cruds", "u", "CarePlan", True),
    ("user/Patient.r", "s", "Patient", False),
    ("system/*.rs", "operation", "Patient", True),                  # read-only operation needs r
    ("system/*.rs", "c", "RiskAssessment", False),
    ("launch openid fhirUser", "r", "Patient", False),
]


@pytest.mark.parametrize("scope, interaction, rtype, allowed", MATRIX)
def test_scope_matrix(scope, interaction, rtype, allowed):
    assert ctx(scope).can(interaction, rtype) is allowed


def test_patient_scopes_need_a_patient_in_context():
    assert not ctx("patient/*.rs", patient=None).can("r", "Observation")


def test_compartment_applies_only_when_patient_scopes_are_the_reason():
    assert ctx("patient/*.rs").compartment_patient("r", "Observation") == "p1"
    assert ctx("patient/*.rs user/Observation.rs").compartment_patient("r", "Observation") is None
    assert ctx("patient/*.rs user/Observation.rs").compartment_patient("r", "Patient") == "p1"


def test_require_raises_forbidden():
    with pytest.raises(Forbidden) as info:
        ctx("patient/Observation.rs").require("c", "Observation")
    assert info.value.error_id == "insufficient-scope"


def test_unknown_interaction_is_a_programming_error():
    with pytest.raises(ValueError):
        ctx("user/*.cruds").can("frobnicate", "Patient")


def test_claims_mapping():
    access = access_context_from_claims({
        "client_id": "a", "scope": "patient/*.read", "patient": "p9", "sub": "u1",
        "fhirUser": "https://h.example/fhir/Practitioner/x", "fhirContext": [{"reference": "ResearchStudy/s"}],
        "exp": 10}, "https://h.example/fhir/")
    assert access.scopes.v2_text == "patient/*.rs" and access.user == "Practitioner/x"
    assert access.fhir_context == ({"reference": "ResearchStudy/s"},) and access.expires_at == 10


P1 = {"reference": "Patient/p1"}
IN_COMPARTMENT = [
    {"resourceType": "Patient", "id": "p1"},
    {"resourceType": "Patient", "id": "p0", "link": [{"other": P1, "type": "seealso"}]},
    {"resourceType": "Observation", "subject": P1},
    {"resourceType": "Observation", "subject": {"reference": "Group/g"}, "performer": [P1]},
    {"resourceType": "Observation", "subject": {"reference": "https://h.example/fhir/Patient/p1/_history/3"}},
    {"resourceType": "Encounter", "subject": P1},
    {"resourceType": "MedicationAdministration", "subject": P1},
    {"resourceType": "Appointment", "participant": [{"actor": {"reference": "Practitioner/x"}}, {"actor": P1}]},
    {"resourceType": "ResearchSubject", "individual": P1, "study": {"reference": "ResearchStudy/s"}},
    {"resourceType": "RiskAssessment", "subject": P1},
    {"resourceType": "CarePlan", "subject": P1},
    {"resourceType": "AdverseEvent", "subject": P1},
    {"resourceType": "CommunicationRequest", "recipient": [P1]},
    {"resourceType": "Group", "member": [{"entity": {"reference": "Patient/p2"}}, {"entity": P1}]},
    {"resourceType": "Provenance", "target": [{"reference": "Observation/o"}, P1]},
]
NOT_IN_COMPARTMENT = [
    {"resourceType": "Patient", "id": "p2"},
    {"resourceType": "Observation", "subject": {"reference": "Patient/p2"}},
    {"resourceType": "Observation", "subject": {"reference": "Patient/p10"}},   # no prefix match
    {"resourceType": "Observation", "focus": [P1]},                            # focus is not a compartment link
    {"resourceType": "ResearchStudy", "id": "s"},
    {"resourceType": "Medication", "id": "m"},
    {"resourceType": "Task", "for": P1},                                        # Task is not in R4's compartment
    {"resourceType": "Encounter", "subject": {"display": "p1"}},
]


@pytest.mark.parametrize("resource", IN_COMPARTMENT, ids=lambda r: r["resourceType"])
def test_in_patient_compartment(resource):
    assert patient_compartment_allows(resource, "p1")


@pytest.mark.parametrize("resource", NOT_IN_COMPARTMENT, ids=lambda r: r["resourceType"])
def test_not_in_patient_compartment(resource):
    assert not patient_compartment_allows(resource, "p1")


def test_compartment_membership_by_type():
    assert in_patient_compartment("Observation") and in_patient_compartment("ResearchSubject")
    assert not in_patient_compartment("ResearchStudy") and not in_patient_compartment("Organization")
