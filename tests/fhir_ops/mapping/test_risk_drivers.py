"""The label table of the dropout model's features: complete for the committed model, values in words and units."""
from __future__ import annotations

import math

import pytest

from fhir_ops.mapping.risk_drivers import describe, label_table
from inference.registry import default_registry

pytestmark = pytest.mark.unit


def test_every_feature_of_the_committed_model_has_a_plain_label():
    table = label_table()
    entries = [e for e in default_registry().entries() if e.name == "dropout"]
    assert entries
    for entry in entries:
        names = [f["name"] for f in entry.metadata["feature_schema"]]
        assert set(names) <= set(table), set(names) - set(table)
    for spec in table.values():
        assert spec["label"] and "_" not in spec["label"]
        assert spec["kind"] in {"yes-no", "share", "count", "quantity", "log1p"}
        assert spec["kind"] not in {"quantity", "log1p"} or spec.get("unit")


@pytest.mark.parametrize("feature,value,expected", [
    ("next_visit_remote", 1.0, ("Next visit is remote", "yes")),
    ("sex_female", 0.0, ("Female", "no")),
    ("missed_visit_rate", 0.25, ("Share of past visits missed", "25%")),
    ("next_visit_travel_km", 12.5, ("Travel to the next visit", "12.5 km")),
    ("log_travel_km", math.log1p(42.0), ("Distance to the study site", "42 km")),
    ("age_years", 61.0, ("Age at enrolment", "61 years")),
    ("days_since_last_ae", 365.0, ("Time since the last adverse event", "none in the last year")),
    ("days_since_last_ae", 12.0, ("Time since the last adverse event", "12 days")),
    ("consecutive_missed", 2.0, ("Visits missed in a row", "2")),
    ("a_new_feature", 0.123, ("a_new_feature", "0.123")),
    ("age_years", None, ("Age at enrolment", "—")),
])
def test_values_in_words(feature, value, expected):
    assert describe(feature, value) == expected
