"""Search value semantics: date ranges, string folding, reference parsing and query compilation."""
from __future__ import annotations

import calendar

import pytest

from fhir_ops.errors import InvalidRequest
from fhir_ops.search import search_parameters_for, supported_search_types
from fhir_ops.search.extract import index_rows
from fhir_ops.search.query import MAX_COUNT, compile_search
from fhir_ops.search.values import date_range, normalize_string, split_reference

pytestmark = pytest.mark.unit


def test_partial_dates_cover_their_period():
    jan1 = calendar.timegm((2024, 1, 1, 0, 0, 0))
    assert date_range("2024") == (jan1, calendar.timegm((2025, 1, 1, 0, 0, 0)))
    assert date_range("2024-12") == (calendar.timegm((2024, 12, 1, 0, 0, 0)), calendar.timegm((2025, 1, 1, 0, 0, 0)))
    assert date_range("2024-01-01") == (jan1, jan1 + 86400)
    assert date_range("2024-01-01T00:00:00Z") == (jan1, jan1 + 1)
    assert date_range("2024-01-01T00:00Z") == (jan1, jan1 + 60)
    low, high = date_range("2024-01-01T00:00:00.250Z")
    assert low == pytest.approx(jan1 + 0.25) and high == pytest.approx(jan1 + 0.251)
    assert date_range("2024-01-01T02:00:00+02:00")[0] == jan1
    assert date_range("2023-02-29") is None and date_range("2024-02-29") is not None


def test_string_folding_and_references():
    assert normalize_string("ÉLODIE") == "elodie"
    assert split_reference("Observation/abc") == ("Observation", "abc")
    assert split_reference("#contained") == (None, "#contained")


def test_registry_covers_the_required_types():
    required = {"Patient", "Observation", "MedicationAdministration", "ResearchStudy", "ResearchSubject",
                "RiskAssessment", "Task", "CarePlan", "Appointment", "Group", "Provenance", "AuditEvent",
                "ConceptMap", "Encounter", "AdverseEvent", "Organization", "Location", "Device", "Condition",
                "CodeSystem", "ValueSet", "StructureDefinition", "OperationDefinition", "CommunicationRequest"}
    assert required <= set(supported_search_types())
    for t in required:
        names = {p.name for p in search_parameters_for(t)}
        assert {"_id", "_lastUpdated"} <= names


def test_index_rows_respect_reference_targets():
    rows = index_rows({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                       "subject": {"reference": "Group/g1"}})
    assert rows["reference"] == [("Observation.subject", "Group", "g1")]  # not indexed as patient


def test_compile_limits_and_errors():
    assert compile_search("Patient", [("_count", "99999")]).count == MAX_COUNT
    for bad in [("_count", "-1"), ("_offset", "x"), ("birthdate", "ge-soon"), ("name:missing", "maybe")]:
        with pytest.raises(InvalidRequest):
            compile_search("Patient", [bad])
    c = compile_search("Patient", [("name:phonetic", "x"), ("_elements", "id")])
    assert c.ignored == ["name:phonetic", "_elements"]
    with pytest.raises(InvalidRequest):
        compile_search("Patient", [("name:phonetic", "x")], strict=True)
