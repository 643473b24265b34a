"""Dropout features: value-object validation, no look-ahead, hand-computed values, serve-time checks."""
import math

import numpy as np
import pytest

from inference.features import (FEATURE_NAMES, FEATURE_SCHEMA, N_FEATURES, AdverseEventRecord, Dose,
                                ParticipantHistory, Visit, check_feature_matrix, dropout_feature_matrix,
                                dropout_features)

pytestmark = pytest.mark.unit


def history(**changes) -> ParticipantHistory:
    base = dict(
        visits=(Visit(28, True), Visit(56, False, "remote"), Visit(84, None, "in-person"), Visit(112, None, "remote")),
        doses=tuple(Dose(d, d % 3 != 0) for d in range(70)),
        adverse_events=(AdverseEventRecord(10, 1), AdverseEventRecord(60, 3)),
        age_years=61.0, sex="male", weight_kg=90.0, egfr=75.0, travel_distance_km=40.0,
        site_id="site-2", arm="100 mg")
    base.update(changes)
    return ParticipantHistory(**base)


def feature(x, name):
    return float(x[FEATURE_NAMES.index(name)])


def test_schema_is_documented_and_unique():
    assert N_FEATURES == len(set(FEATURE_NAMES)) == len(FEATURE_SCHEMA)
    assert all(spec.unit and len(spec.meaning) > 10 for spec in FEATURE_SCHEMA)


def test_values_computed_by_hand():
    x = dropout_features(history(), 69)
    assert x.dtype == np.float32 and x.shape == (N_FEATURES,)
    # doses 0..69 due; taken unless day % 3 == 0 -> 24 missed of 70; last 30 days: days 40..69, 10 missed
    expected = {
        "days_on_study": 69, "n_past_visits": 2, "missed_visit_rate": (1 + 1) / (2 + 2),
        "last_visit_missed": 1, "consecutive_missed": 1,
        "adherence_30d": (20 + 1) / (30 + 2), "adherence_overall": (46 + 1) / (70 + 2),
        "n_adverse_events": 2, "ae_severity_30d": 3, "days_since_last_ae": 9, "ae_last_14d": 1,
        "days_to_next_visit": 15, "next_visit_remote": 0, "next_visit_travel_km": 40.0,
        "visits_30d_to_next": 2,  # days 56 and 84 lie in (54, 84]
        "age_years": 61, "sex_female": 0, "weight_kg": 90, "egfr": 75,
        "log_travel_km": math.log1p(40.0), "arm_placebo": 0,
    }
    assert set(expected) == set(FEATURE_NAMES)
    for name, value in expected.items():
        assert feature(x, name) == pytest.approx(value, rel=1e-6), name


def test_no_history_uses_the_stated_priors():
    h = history(visits=(Visit(28, None),), doses=(), adverse_events=())
    x = dropout_features(h, 0)
    assert feature(x, "missed_visit_rate") == 0.5 and feature(x, "adherence_overall") == 0.5
    assert feature(x, "days_since_last_ae") == 365 and feature(x, "last_visit_missed") == 0


def test_no_look_ahead_future_outcomes_do_not_change_features():
    as_of = 60.0
    future_filled = history(visits=(Visit(28, True), Visit(56, False, "remote"), Visit(84, False),
                                    Visit(112, True, "remote")),
                            adverse_events=(AdverseEventRecord(10, 1), AdverseEventRecord(60, 3),
                                            AdverseEventRecord(65, 2)))
    np.testing.assert_array_equal(dropout_features(history(), as_of), dropout_features(future_filled, as_of))


def completed(**changes):
    return history(visits=(Visit(28, True), Visit(56, False, "remote"), Visit(84, True), Visit(112, True, "remote")),
                   **changes)


def test_remote_next_visit_has_no_travel():
    x = dropout_features(completed(), 90)
    assert feature(x, "next_visit_remote") == 1 and feature(x, "next_visit_travel_km") == 0


@pytest.mark.parametrize("changes, message", [
    (dict(age_years=float("nan")), "age_years"),
    (dict(weight_kg=None), "weight_kg"),
    (dict(egfr=-3), "egfr"),
    (dict(sex="unknown"), "sex"),
    (dict(arm=""), "arm"),
])
def test_history_rejects_missing_or_invalid_covariates(changes, message):
    with pytest.raises(ValueError, match=message):
        history(**changes)


def test_value_objects_validate():
    with pytest.raises(ValueError, match="modality"):
        Visit(28, True, "phone")
    with pytest.raises(ValueError, match="severity"):
        AdverseEventRecord(3, 5)
    with pytest.raises(ValueError, match="day"):
        Dose(float("nan"), True)


def test_features_refuse_impossible_questions():
    with pytest.raises(ValueError, match="no scheduled visit after"):
        dropout_features(completed(), 200)
    with pytest.raises(ValueError, match="no outcome"):
        dropout_features(history(), 90)  # visit 84 has no outcome yet lies in the past
    with pytest.raises(ValueError, match="as_of_day"):
        dropout_features(history(), float("nan"))


def test_replace_revalidates():
    assert history().replace(age_years=30).age_years == 30
    with pytest.raises(ValueError):
        history().replace(age_years=float("inf"))


def test_matrix_stacks_rows():
    m = dropout_feature_matrix([(history(), 30), (history(), 69)])
    assert m.shape == (2, N_FEATURES)
    np.testing.assert_array_equal(m[1], dropout_features(history(), 69))


def test_check_feature_matrix_names_the_bad_feature():
    x = np.zeros((3, N_FEATURES))
    x[2, FEATURE_NAMES.index("egfr")] = np.nan
    with pytest.raises(ValueError, match=r"'egfr' \(column \d+\) is NaN or infinite in row 2"):
        check_feature_matrix(x)
    x[2] = 0
    x[0, 0] = np.inf
    with pytest.raises(ValueError, match="'days_on_study'"):
        check_feature_matrix(x)
    with pytest.raises(ValueError, match=f"expected {N_FEATURES} features per row, got 3"):
        check_feature_matrix(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="numeric"):
        check_feature_matrix(np.array([["a"] * N_FEATURES]))
    with pytest.raises(ValueError, match="infinite"), np.errstate(over="ignore"):  # overflows float32
        check_feature_matrix(np.full((1, N_FEATURES), 1e300))
    out = check_feature_matrix(np.zeros(N_FEATURES, dtype=np.int64))
    assert out.dtype == np.float32 and out.shape == (1, N_FEATURES) and out.flags.c_contiguous
