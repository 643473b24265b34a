"""Tests of the TT-201 participant twin: structural model against closed forms and the engine's own
steppers, calibration, posterior-predictive forecasts (coverage on held-out data) and cohort runs."""
from __future__ import annotations

import numpy as np
import pytest

from inference import twin
from inference.cohort import TT201Population
from inference.dosing import DoseRecord
from inference.pk import DailyOneCompartmentOral, OneCompartment, concentration
from inference.population import ObservationData

pytestmark = pytest.mark.unit

TYPICAL = np.asarray(twin.population_model().theta)


def _participant(phi, days=84, dose=100.0, seed=0, visit_days=(0, 28, 56, 84), adherence=0.9,
                 weight=80.0, egfr=85.0, jitter_h=0.5):
    """Data simulated from the twin itself at ``phi``: daily doses, PK/FPG/HbA1c at visits, assay noise."""
    rng = np.random.default_rng(seed)
    dose_t = 24.0 * np.arange(days) + rng.normal(0.0, jitter_h, days).clip(-2, 2)
    dose_t[0] = 0.0
    taken = rng.random(days) < adherence
    taken[0] = True
    outputs, times = [], []
    for d in visit_days:
        outputs += [0, 1, 2]
        times += [24.0 * d + rng.uniform(1.0, 10.0), 24.0 * d + 2.0, 24.0 * d + 2.0]
    data = twin.ParticipantData(dose_t[taken], np.full(taken.sum(), dose), outputs, times,
                                np.full(len(times), np.nan), weight, egfr)
    f = twin.structural(phi[None, :], data.observation_data())
    sd = np.sqrt(np.where(np.asarray(outputs) == 0, 1.0 + (0.15 * f) ** 2,
                          np.where(np.asarray(outputs) == 1, 8.0 ** 2, 0.12 ** 2)))
    return data.replace(obs_values=f + sd * rng.standard_normal(f.shape))


def test_population_prior_is_the_cohort_population():
    pop = TT201Population()
    model = twin.population_model(pop)
    natural = dict(zip(model.parameters, model.theta))
    assert np.exp(natural["CL"]) == pytest.approx(pop.cl)
    assert np.exp(natural["V"]) == pytest.approx(pop.v)
    assert np.exp(natural["Emax"]) == pytest.approx(pop.fpg_emax)
    assert natural["HbA1c0"] == pytest.approx(pop.hba1c_mean)
    assert model.omega_sd == pytest.approx([pop.omega_cl, pop.omega_v, pop.omega_ka, pop.omega_fpg_emax,
                                            pop.omega_ec50, pop.hba1c_sd, pop.fpg_residual_sd])
    assert (twin.MODEL_NAME, twin.MODEL_VERSION) == ("tt201-twin", "1.0.0")


def test_daily_activity_filter_equals_the_day_stepper():
    rng = np.random.default_rng(1)
    phi = TYPICAL[None, :] + rng.normal(0.0, 0.3, (6, TYPICAL.size))
    p = twin._natural(phi)
    amounts = np.where(rng.random((6, 90)) < 0.8, 100.0, 0.0)
    activity = twin._daily_activity(p, 24.0 * np.arange(90), amounts, 120)
    pk = DailyOneCompartmentOral(cl=p["cl"], v=p["v"], ka=p["ka"], tlag=p["tlag"], f=p["f"])
    state, per_day, ref = pk.start(6), np.zeros((6, 120)), []
    per_day[:, :90] = amounts
    for d in range(120):
        state, avg = pk.step(state, per_day[:, d])
        ref.append(avg.copy())
    cavg = np.array(ref).T
    np.testing.assert_allclose(activity, cavg / (p["ec50"][:, None] + cavg), rtol=1e-10, atol=1e-13)


def test_concentration_equals_superposition_and_steady_state_average():
    """Folded single-dose rows equal pk.concentration's superposition; at steady state the average
    over one interval is F * dose / (CL * tau) (closed form, e.g. Gibaldi & Perrier, Pharmacokinetics)."""
    p = twin._natural(TYPICAL[None, :])
    dose_t = 24.0 * np.arange(40)
    times = np.linspace(38 * 24.0, 39 * 24.0, 2401)
    ours = twin._concentration(p, dose_t, np.full(40, 100.0), times)[0]
    model = OneCompartment(cl=p["cl"], v=p["v"], ka=p["ka"], tlag=p["tlag"], f=p["f"])
    direct = 1000.0 * concentration(model, DoseRecord(times=dose_t, amounts=np.full(40, 100.0)), times)[0]
    np.testing.assert_allclose(ours, direct, rtol=1e-6, atol=1e-6)
    average = np.trapezoid(ours, times) / 24.0
    expected = 1000.0 * 0.8 * 100.0 / (5.0 * 24.0)  # ng/mL
    assert average == pytest.approx(expected, rel=2e-3)


def test_structural_needs_no_drug_for_placebo_and_drifts_hba1c():
    data = twin.ParticipantData([0.0, 24.0], [0.0, 0.0], [0, 1, 2, 2], [30.0, 2.0, 2.0, 24.0 * 365 + 2.0],
                                [np.nan] * 4).observation_data()
    f = twin.structural(TYPICAL[None, :], data)
    assert f[0] == 0.0
    assert f[1] == pytest.approx(28.7 * 8.2 - 46.7)  # ADAG relation at baseline (Nathan et al. 2008)
    assert f[3] - f[2] == pytest.approx(0.2, abs=1e-3)  # 0.2 %/year natural drift


def test_calibration_recovers_the_simulating_parameters():
    truth = TYPICAL + np.array([0.3, -0.15, 0.2, 0.2, -0.4, 0.6, 10.0])
    data = _participant(truth, days=140, visit_days=(0, 28, 56, 84, 112, 140), seed=3)
    post = twin.calibrate_participant(data)
    assert post.converged
    z = np.abs(post.mean - truth) / post.sd
    assert np.all(z < 3.5), z
    assert post.sd[0] < 0.3 and post.sd[5] < 0.8  # CL and HbA1c0 are learned from the data


def test_forecast_is_seeded_and_responds_to_dose_and_missed_doses():
    data = _participant(TYPICAL, seed=5)
    post = twin.calibrate_participant(data)
    start = 24.0 * 85
    times = np.arange(0.0, 24.0 * 14 + 1, 12.0)
    base = twin.TwinScenario(dose_mg=100.0, start_h=start, horizon_days=14)
    a = twin.forecast(post, base, times, seed=7)
    b = twin.forecast(post, base, times, seed=7)
    for name in twin.OUTPUTS:
        np.testing.assert_array_equal(a.median[name], b.median[name])
        np.testing.assert_array_equal(a.low[name], b.low[name])
        assert np.all(a.low[name] <= a.median[name]) and np.all(a.median[name] <= a.high[name])
    higher = twin.forecast(post, base.replace(dose_mg=200.0), times, seed=7)
    assert np.mean(higher.median["concentration"]) > 1.5 * np.mean(a.median["concentration"])
    assert higher.median["fpg"][-1] < a.median["fpg"][-1]
    missed = twin.forecast(post, base.replace(missed_dose_days=(3, 4, 5)), times, seed=7)
    assert np.mean(missed.median["concentration"]) < np.mean(a.median["concentration"])
    day6 = np.searchsorted(times, 24.0 * 6)
    assert missed.median["concentration"][day6] < 0.5 * a.median["concentration"][day6]
    assert not np.array_equal(twin.forecast(post, base, times, seed=8).median["concentration"],
                              a.median["concentration"])


def test_lower_adherence_lowers_exposure():
    post = twin.calibrate_participant(_participant(TYPICAL, seed=6))
    scenario = twin.TwinScenario(dose_mg=100.0, start_h=24.0 * 85, horizon_days=28)
    times = np.arange(0.0, 24.0 * 28 + 1, 24.0)
    full = twin.forecast(post, scenario, times, samples=500, seed=1)
    half = twin.forecast(post, scenario.replace(adherence=0.5), times, samples=500, seed=1)
    assert np.mean(half.median["concentration"]) < 0.8 * np.mean(full.median["concentration"])


@pytest.mark.parametrize("changes, match", [({"horizon_days": 366}, "365"), ({"dose_mg": -1.0}, "dose_mg"),
                                             ({"adherence": 1.5}, "adherence"), ({"interval_h": 0.5}, "interval_h"),
                                             ({"missed_dose_days": (30,)}, "missed_dose_days")])
def test_scenario_refuses_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        twin.TwinScenario(**{"dose_mg": 50.0, "start_h": 0.0, "horizon_days": 28, **changes})


def test_more_data_narrows_the_forecast():
    truth = TYPICAL + np.array([0.2, 0.1, -0.2, 0.1, 0.3, -0.5, -5.0])
    full = _participant(truth, days=112, visit_days=(0, 28, 56, 84, 112), seed=9)
    early = full.obs_times_h < 24.0 * 60
    first = full.replace(obs_output=full.obs_output[early], obs_times_h=full.obs_times_h[early],
                         obs_values=full.obs_values[early])
    scenario = twin.TwinScenario(dose_mg=100.0, start_h=24.0 * 113, horizon_days=28)
    times = np.arange(0.0, 24.0 * 28 + 1, 24.0)
    widths = []
    for data in (first, full):
        fc = twin.forecast(twin.calibrate_participant(data), scenario, times, samples=2000, seed=2)
        widths.append({o: np.mean(fc.high[o] - fc.low[o]) for o in twin.OUTPUTS})
    assert widths[1]["concentration"] < widths[0]["concentration"]
    assert widths[1]["hba1c"] < widths[0]["hba1c"]


@pytest.mark.slow
def test_prediction_interval_coverage_on_held_out_visits():
    """90% intervals from the visits up to day 56 cover about 90% of the held-out day-84 values.

    Participants are drawn from the population prior itself and dosed exactly as the forecast
    scenario says, so the nominal level is the right target; 36 participants x 3 outputs give a
    binomial SD of about 3 points, and the Laplace posterior may under-cover a little.
    """
    model = twin.population_model()
    rng = np.random.default_rng(11)
    start = 24.0 * 60
    scenario = twin.TwinScenario(dose_mg=100.0, start_h=start, horizon_days=25)
    hits = []
    for i in range(36):
        truth = rng.multivariate_normal(model.theta, model.omega)
        full = _participant(truth, days=85, seed=100 + i, adherence=1.0, jitter_h=0.0)
        seen, dosed = full.obs_times_h < start, full.dose_times_h < start
        post = twin.calibrate_participant(full.replace(
            obs_output=full.obs_output[seen], obs_times_h=full.obs_times_h[seen], obs_values=full.obs_values[seen],
            dose_times_h=full.dose_times_h[dosed], dose_mg=full.dose_mg[dosed]))
        for k, t, y in zip(full.obs_output[~seen], full.obs_times_h[~seen], full.obs_values[~seen]):
            name = twin.OUTPUTS[k]
            fc = twin.forecast(post, scenario, [t - start], samples=1000, seed=i, outputs=[name])
            hits.append(fc.low[name][0] <= y <= fc.high[name][0])
    coverage = float(np.mean(hits))
    assert 0.8 <= coverage <= 0.98, coverage


def test_simulate_population_summarizes_arms_reproducibly():
    arms = np.repeat([0, 1, 2], 400)
    a = twin.simulate_population([0.0, 50.0, 100.0], arms, horizon_days=84, seed=3, step_days=7,
                                 arm_names=["placebo", "50 mg", "100 mg"])
    b = twin.simulate_population([0.0, 50.0, 100.0], arms, horizon_days=84, seed=3, step_days=7,
                                 arm_names=["placebo", "50 mg", "100 mg"])
    assert a.participants == (400, 400, 400)
    assert a.days[-1] == 83 and a.days[1] == 7
    np.testing.assert_array_equal(a.median[2]["hba1c"], b.median[2]["hba1c"])
    end = [a.median[k]["hba1c"][-1] - a.median[k]["hba1c"][0] for k in range(3)]
    assert end[2] < end[1] < end[0]
    assert np.all(a.median[0]["concentration"] == 0.0)
    assert a.median[2]["concentration"][-1] > a.median[1]["concentration"][-1] > 0
    assert np.all(np.isfinite(a.member_end["fpg"]))


def test_simulate_population_stops_when_asked():
    seen = []

    def stop_after_first(done, total):
        seen.append((done, total))
        return False

    res = twin.simulate_population([100.0], np.zeros(3000, dtype=int), horizon_days=7, on_chunk=stop_after_first)
    assert seen == [(1, 3)] and not res.completed
    assert np.sum(np.isfinite(res.member_end["hba1c"])) == 1000


def test_participant_data_rejects_inconsistent_arrays():
    with pytest.raises(ValueError):
        twin.ParticipantData([0.0], [1.0, 2.0], [], [], [])
    with pytest.raises(ValueError):
        twin.ParticipantData([0.0], [1.0], [3], [1.0], [1.0])
    empty = twin.ParticipantData([0.0], [1.0], [], [], [])
    with pytest.raises(ValueError, match="no outcome"):
        twin.calibrate_participant(empty)
    assert isinstance(_participant(TYPICAL).observation_data(), ObservationData)
