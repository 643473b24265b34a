"""SMART scope parsing and the v1 → v2 mapping (SMART App Launch 2.2, "Scopes for requesting FHIR resources")."""
from __future__ import annotations

import pytest

from smart_app.scopes import Scope, parse_scope, parse_scopes, to_v2

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, v2", [
    ("patient/Observation.read", "patient/Observation.rs"),
    ("patient/*.write", "patient/*.cud"),
    ("user/*.*", "user/*.cruds"),
    ("system/Patient.rs", "system/Patient.rs"),
    ("patient/Observation.rs?category=laboratory", "patient/Observation.rs?category=laboratory"),
])
def test_v1_and_v2_forms(text, v2):
    # Enforcement reads the v2 meaning; the text stays what was asked (a v1 request is granted as v1).
    assert parse_scope(text).v2_text == v2
    assert parse_scope(text).text == text


@pytest.mark.parametrize("text", ["patient/Observation", "patient/Observation.x", "doctor/*.rs", "patient/obs.rs",
                                  "patient/Observation.", "launch",
                                  "user/Observation.sr"])  # v2 permissions must come in c-r-u-d-s order
def test_not_resource_scopes(text):
    with pytest.raises(ValueError):
        parse_scope(text)


def test_value_object_validates_and_is_immutable():
    with pytest.raises(ValueError):
        Scope("patient", "Observation", "rx")
    scope = Scope("user", "*", "sr")
    assert scope.interactions == "rs"
    with pytest.raises(AttributeError):
        scope.context = "system"


def test_scope_set_keeps_names_and_unknowns_apart():
    scopes = parse_scopes("launch openid fhirUser patient/*.read made/up offline_access")
    assert scopes.names == ("launch", "openid", "fhirUser", "offline_access")
    assert scopes.unknown == ("made/up",)
    assert "openid" in scopes and "profile" not in scopes
    assert to_v2("user/*.* launch") == "launch user/*.cruds"


def test_within_grants_only_what_registration_covers():
    registered = parse_scopes("launch patient/*.rs user/Observation.cruds")
    asked = parse_scopes("launch openid patient/Observation.read user/Observation.write user/Patient.rs")
    assert asked.within(registered).text == "launch patient/Observation.read user/Observation.write"
    assert asked.within(registered).v2_text == "launch patient/Observation.rs user/Observation.cud"


def test_cut_to_narrows_self_asserted_scopes_to_the_administrators_ceiling():
    ceiling = parse_scopes("launch system/Observation.rs system/Patient.r")
    asked = parse_scopes("launch openid system/*.cruds user/*.rs")
    assert asked.cut_to(ceiling).text == "launch system/Observation.rs system/Patient.r"
    # A v1 scope keeps its spelling when the ceiling leaves it whole, and is narrowed to v2 otherwise.
    assert parse_scopes("patient/*.read").cut_to(parse_scopes("patient/*.cruds")).text == "patient/*.read"
    assert parse_scopes("patient/*.*").cut_to(parse_scopes("patient/*.rs")).text == "patient/*.rs"
    assert parse_scopes("system/*.cruds").cut_to(parse_scopes("user/*.cruds")).text == ""


def test_granular_query_needs_matching_registration():
    assert parse_scope("patient/Observation.rs").covers(parse_scope("patient/Observation.rs?category=vital-signs"))
    assert not parse_scope("patient/Observation.rs?category=laboratory").covers(parse_scope("patient/Observation.rs"))
