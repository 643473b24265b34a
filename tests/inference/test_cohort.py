"""Cohort simulation: reproducibility, chunk-size independence, consistency of its two code paths,
virtual-population fitting and the TT-201 dose response against closed-form expectations."""
import numpy as np
import pytest

from inference.behaviour import BehaviourModel, VisitSchedule
from inference.cohort import (BLOCK_SIZE, Scenario, fit_covariate_model, sample_covariates, summarize)
from inference.cohort import simulate_cohort as _simulate_cohort
from inference.cohort import sweep as _sweep
from inference.model_definition import example_regimen
from inference.dosing import DoseRecord
from inference.pk import OneCompartment, concentration
from tests.inference.virtual_participants import make_covariates

pytestmark = pytest.mark.unit

#: the shipped daily-regimen example definition, compiled
MODEL = example_regimen()


def simulate_cohort(*args, **kwargs):
    return _simulate_cohort(*args, model=MODEL, **kwargs)


def sweep(*args, **kwargs):
    return _sweep(*args, model=MODEL, **kwargs)


def test_same_seed_same_cohort_other_seed_differs():
    a = simulate_cohort(Scenario(), n=1500, seed=5)
    b = simulate_cohort(Scenario(), n=1500, seed=5)
    c = simulate_cohort(Scenario(), n=1500, seed=6)
    for k in a.summary:
        np.testing.assert_array_equal(a.summary[k], b.summary[k], err_msg=k)
    assert not np.array_equal(a.summary["HBA1C0"], c.summary["HBA1C0"])


def test_result_does_not_depend_on_chunk_size():
    n = 2 * BLOCK_SIZE + 357  # a partial last block too
    small = simulate_cohort(Scenario(dose_mg=50.0), n=n, seed=9, chunk_size=BLOCK_SIZE)
    large = simulate_cohort(Scenario(dose_mg=50.0), n=n, seed=9, chunk_size=10 * BLOCK_SIZE)
    for k in small.summary:
        np.testing.assert_array_equal(small.summary[k], large.summary[k], err_msg=k)
    # and the first participants do not change when the cohort grows
    bigger = simulate_cohort(Scenario(dose_mg=50.0), n=n + 1000, seed=9)
    np.testing.assert_array_equal(bigger.summary["dropout_day"][:n], small.summary["dropout_day"])


def test_summaries_agree_with_trajectories():
    # summaries come from an in-place day loop, trajectories from disease.progress: two code paths
    res = simulate_cohort(Scenario(dose_mg=100.0), n=400, seed=2, trajectories=True)
    s, tr = res.summary, res.trajectories
    last = np.minimum(s["dropout_day"], res.scenario.n_days) - 1
    rows = np.arange(res.n)
    np.testing.assert_allclose(tr["hba1c"][rows, last], s["hba1c_last"], rtol=1e-12)
    np.testing.assert_allclose(tr["hba1c"][:, -1] - s["HBA1C0"], s["hba1c_change_end"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(tr["fpg"][rows, last], s["fpg_last"], rtol=1e-12)
    mask = np.arange(res.scenario.n_days)[None, :] <= last[:, None]
    np.testing.assert_allclose((tr["concentration"] * mask).sum(1) / (last + 1), s["cavg_on_study"], rtol=1e-12)
    assert not tr["taken"][~mask].any()
    # trough at the end of day t vs the closed-form superposition of the doses actually taken
    i = 7
    days = np.flatnonzero(tr["taken"][i])
    doses = DoseRecord(times=24.0 * days, amounts=np.full(days.size, 100.0))
    model = OneCompartment(cl=s["CL"][i], v=s["V"][i], ka=s["KA"][i], tlag=0.5, f=0.8)
    check = np.array([20, 90, 160])
    np.testing.assert_allclose(tr["trough"][i, check], concentration(model, doses, 24.0 * (check + 1))[0],
                               rtol=1e-9)


def test_exposure_and_placebo_match_closed_form():
    perfect = BehaviourModel(adherence_after_taken=40.0, adherence_after_missed=40.0,
                             adherence_age_per_decade=0.0, adherence_recent_ae=0.0,
                             dropout_log_hazard=-60.0)
    res = simulate_cohort(Scenario(dose_mg=100.0, behaviour=perfect), n=2000, seed=4)
    s = res.summary
    # steady-state average concentration F * dose / (24 h * CL); the first day's build-up shifts
    # the 169-day average by well under 1 %
    expected = 0.8 * 100.0 / (24.0 * s["CL"])
    np.testing.assert_allclose(s["cavg_on_study"], expected, rtol=0.01)
    placebo = simulate_cohort(Scenario(dose_mg=0.0), n=1000, seed=4)
    drift = 24.0 * MODEL.named(np.asarray(MODEL.population.theta)[None, :])["DRIFT"][0] * 168
    np.testing.assert_allclose(placebo.summary["hba1c_change_end"], drift, rtol=1e-12)


def test_dose_response_and_sweep_over_behaviour():
    rows = sweep(Scenario(), "dose_mg", [0.0, 50.0, 100.0], n=2000, seed=1)
    change = [r["hba1c_change_last_mean"] for r in rows]
    assert change[0] > change[1] > change[2]
    assert rows[2]["ae_per_participant_year"] > rows[0]["ae_per_participant_year"]
    rows = sweep(Scenario(), "behaviour.dropout_log_hazard", [-9.5, -7.5], n=2000, seed=1)
    assert rows[1]["dropout_rate"] > rows[0]["dropout_rate"]
    remote = Scenario(schedule=VisitSchedule.every(28, 6, remote=True))
    in_person = summarize(simulate_cohort(Scenario(), n=2000, seed=1))
    assert summarize(simulate_cohort(remote, n=2000, seed=1))["missed_visit_rate"] < in_person["missed_visit_rate"]
    with pytest.raises(ValueError, match="unknown"):
        sweep(Scenario(), "behaviour.nope", [1.0], n=10)


def test_virtual_population_matches_the_cohort_it_was_fitted_to():
    observed = make_covariates(3000, seed=21)
    model = fit_covariate_model(observed)
    virtual = sample_covariates(model, 50000, np.random.default_rng(0))
    for name in ("weight_kg", "age_y", "egfr"):
        obs, virt = observed.as_dict()[name], virtual.as_dict()[name]
        assert virt.mean() == pytest.approx(obs.mean(), rel=0.02), name
        assert virt.std() == pytest.approx(obs.std(), rel=0.12), name
    assert virtual.sex_female.mean() == pytest.approx(observed.sex_female.mean(), abs=0.01)
    corr_obs = np.corrcoef(np.log(observed.weight_kg), observed.age_y)[0, 1]
    corr_virt = np.corrcoef(np.log(virtual.weight_kg), virtual.age_y)[0, 1]
    assert corr_virt == pytest.approx(corr_obs, abs=0.05)
    # a cohort twin: simulate the observed participants themselves
    twin = simulate_cohort(Scenario(), covariates=observed.take(slice(0, 500)), seed=1)
    np.testing.assert_array_equal(twin.summary["weight_kg"], observed.weight_kg[:500])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of BLOCK_SIZE"):
        simulate_cohort(Scenario(), n=10, chunk_size=1500)
    with pytest.raises(ValueError, match="positive integer"):
        simulate_cohort(Scenario(), n=0)
    with pytest.raises(ValueError, match="dose_mg"):
        Scenario(dose_mg=-5.0)
    with pytest.raises(ValueError, match="positive definite"):
        MODEL.covariate_model.replace(cov=np.zeros((2, 4, 4)))
