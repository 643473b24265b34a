"""Missed-next-visit risk assessment: batch prediction, flagging at the threshold, drivers, direction of effects."""
import numpy as np
import pytest

from inference.dropout_risk import assess_dropout_risk
from inference.features import Dose, ParticipantHistory, Visit, dropout_features
from inference.service import InferenceService

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def service():
    svc = InferenceService(force_cpu=True, micro_batching=False)
    yield svc
    svc.close()


def person(distance=20.0, missed=0, remote_next=False, pid="p"):
    outcomes = [True] * (2 - missed) + [False] * missed
    visits = (Visit(28, outcomes[0]), Visit(56, outcomes[1]), Visit(84, None, "remote" if remote_next else "in-person"))
    return ParticipantHistory(visits=visits, doses=tuple(Dose(d, True) for d in range(80)), adverse_events=(),
                              age_years=55, sex="female", weight_kg=80, egfr=90, travel_distance_km=distance,
                              site_id="site-1", arm="100 mg", participant_id=pid)


def test_probabilities_equal_the_service_on_the_same_features(service):
    people = [person(d, m, r, f"p{i}") for i, (d, m, r) in enumerate(
        [(5, 0, False), (80, 2, False), (80, 2, True), (150, 1, False)])]
    risks = assess_dropout_risk(people, 77, service=service)
    X = np.vstack([dropout_features(p, 77) for p in people])
    np.testing.assert_allclose([r.probability for r in risks], service.predict("dropout", X).probabilities)
    assert [r.participant_id for r in risks] == ["p0", "p1", "p2", "p3"]
    assert all(r.next_visit_day == 84 and r.model == "dropout" and r.version == "1.0.1" for r in risks)
    assert all(r.flagged == (r.probability >= 0.8) for r in risks)


def test_effects_point_the_way_the_behaviour_model_says(service):
    # inference.behaviour: attendance falls with in-person travel distance and after a missed visit;
    # a remote visit carries no travel. The learned model must reproduce those directions.
    p = lambda **kw: assess_dropout_risk([person(**kw)], 77, service=service)[0].probability  # noqa: E731
    assert p(distance=5) < p(distance=50) < p(distance=150)
    assert p(missed=0) < p(missed=1) < p(missed=2)
    assert p(distance=150, remote_next=True) < p(distance=150)


def test_drivers_are_the_largest_positive_log_odds_terms(service):
    (risk,) = assess_dropout_risk([person(150, 2)], 77, service=service)
    assert 1 <= len(risk.drivers) <= 3
    assert all(d.log_odds > 0 for d in risk.drivers)
    assert [d.log_odds for d in risk.drivers] == sorted((d.log_odds for d in risk.drivers), reverse=True)
    assert "next_visit_travel_km" in {d.feature for d in risk.drivers}
    assert risk.probability > 0.5 and risk.flagged == (risk.probability >= 0.8)


def test_threshold_and_argument_checks(service):
    people = [person(150, 2), person(5, 0)]
    low = assess_dropout_risk(people, 77, service=service, threshold=0.01)
    assert all(r.flagged for r in low) and all(r.threshold == 0.01 for r in low)
    with pytest.raises(ValueError, match="threshold"):
        assess_dropout_risk(people, 77, service=service, threshold=1.5)
    with pytest.raises(ValueError, match="2 histories"):
        assess_dropout_risk(people, [77], service=service)
    with pytest.raises(ValueError, match="no outcome"):  # visit 84 passed without a recorded outcome
        assess_dropout_risk(people, 90, service=service)
    assert assess_dropout_risk([], 77, service=service) == []
    per_person = assess_dropout_risk(people, [30, 77], service=service)
    assert [r.next_visit_day for r in per_person] == [56, 84]
