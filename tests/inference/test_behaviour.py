"""Behaviour model: reproducibility, causal constraints and the direction of burden effects."""
import numpy as np
import pytest

from inference.behaviour import BehaviourModel, VisitSchedule, simulate_behaviour
from tests.inference.virtual_participants import make_covariates

pytestmark = pytest.mark.unit

SCHEDULE = VisitSchedule.every(28, 6)
COVARIATES_500 = make_covariates(500, seed=11)


def test_same_seed_same_result_and_different_seed_differs():
    a = simulate_behaviour(BehaviourModel(), COVARIATES_500, SCHEDULE, 169, np.random.default_rng(3), 100.0)
    b = simulate_behaviour(BehaviourModel(), COVARIATES_500, SCHEDULE, 169, np.random.default_rng(3), 100.0)
    c = simulate_behaviour(BehaviourModel(), COVARIATES_500, SCHEDULE, 169, np.random.default_rng(4), 100.0)
    for name in ("taken", "ae", "attended", "dropout_day"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.taken, c.taken)


def test_nothing_happens_after_dropout():
    # a high hazard makes many dropouts, so the constraint is actually exercised
    model = BehaviourModel(dropout_log_hazard=-4.0, ae_background=0.05)
    cov = make_covariates(400, seed=1)
    res = simulate_behaviour(model, cov, SCHEDULE, 169, np.random.default_rng(0), 50.0)
    assert res.dropped_out.mean() > 0.3
    after = np.arange(169)[None, :] >= res.dropout_day[:, None]
    assert not res.taken[after].any()
    assert not res.ae[after].any()
    assert not res.attended[~res.scheduled].any()
    # and participants were dosing before they left
    assert res.taken[~after].mean() > 0.8


def test_higher_burden_means_more_missed_visits():
    near = make_covariates(3000, seed=2, distance_km=2.0)
    far = near.replace(distance_km=np.full(3000, 80.0))
    model = BehaviourModel()
    in_person = VisitSchedule.every(28, 6, remote=False)
    remote = VisitSchedule.every(28, 6, remote=True)
    miss = {}
    for label, cov, sched in (("near", near, in_person), ("far", far, in_person), ("remote", far, remote)):
        res = simulate_behaviour(model, cov, sched, 169, np.random.default_rng(7))
        miss[label] = res.missed.sum() / res.scheduled.sum()
    assert miss["far"] > miss["near"] + 0.05
    assert miss["remote"] < miss["far"] - 0.05
    # weekly visits are more burdensome than monthly ones
    weekly = simulate_behaviour(model, near, VisitSchedule.every(7, 24), 169, np.random.default_rng(7))
    monthly = simulate_behaviour(model, near, in_person, 169, np.random.default_rng(7))
    assert weekly.missed.sum() / weekly.scheduled.sum() > monthly.missed.sum() / monthly.scheduled.sum()
    assert weekly.dropped_out.mean() > monthly.dropped_out.mean()


def test_adherence_chain_matches_its_stationary_distribution():
    # without AEs and age effects the daily intake is a 2-state Markov chain with
    # P(take|taken)=p, P(take|missed)=q, whose stationary share of taken days is q / (1 - p + q)
    model = BehaviourModel(ae_background=0.0, ae_max=0.0, adherence_age_per_decade=0.0,
                           dropout_log_hazard=-50.0, adherence_after_taken=2.0, adherence_after_missed=0.0)
    cov = make_covariates(4000, seed=5)
    res = simulate_behaviour(model, cov, SCHEDULE, 200, np.random.default_rng(1))
    p, q = 1 / (1 + np.exp(-2.0)), 0.5
    expected = q / (1 - p + q)
    assert abs(res.taken[:, 50:].mean() - expected) < 0.01


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="Generator"):
        simulate_behaviour(BehaviourModel(), COVARIATES_500, SCHEDULE, 10, 42)
    with pytest.raises(ValueError, match="strictly increasing"):
        VisitSchedule(days=[28, 28], remote=False)
    with pytest.raises(ValueError, match="dose_mg"):
        simulate_behaviour(BehaviourModel(), COVARIATES_500, SCHEDULE, 10, np.random.default_rng(0), -1.0)


def test_site_offsets_change_attendance_only_at_that_site():
    cov = make_covariates(4000, seed=8)
    base = simulate_behaviour(BehaviourModel(), cov, SCHEDULE, 169, np.random.default_rng(2))
    worse = simulate_behaviour(BehaviourModel(attend_site_offsets=(0.0, -2.0)), cov, SCHEDULE, 169,
                               np.random.default_rng(2))
    site1 = cov.site == 1
    rate = lambda r, mask: r.missed[mask].sum() / r.scheduled[mask].sum()
    assert rate(worse, site1) > rate(base, site1) + 0.1
    # participants are independent and site 0 (offset 0) and site 2 (none given) are unchanged,
    # so with the same draws their visits are identical
    np.testing.assert_array_equal(worse.attended[~site1], base.attended[~site1])
