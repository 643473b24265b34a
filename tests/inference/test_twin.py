"""Tests of the participant twin of a daily-regimen definition (the shipped example): structural model
against closed forms and the engine's own steppers, calibration, posterior-predictive forecasts (coverage
on held-out data) and cohort runs."""
from __future__ import annotations

import numpy as np
import pytest

from inference import twin
from inference.model_definition import example_regimen
from inference.dosing import DoseRecord
from inference.pk import DailyOneCompartmentOral, OneCompartment, concentration
from inference.population import ObservationData

pytestmark = pytest.mark.unit

MODEL = example_regimen()
#: every parameter, log or linear scale, at its typical value (fixed ones included)
TYPICAL = np.asarray(MODEL.population.theta, dtype=float)
#: columns of the calibrated (random-effect) parameters
Q = MODEL.population.random_index


def shifted(delta):
    """Typical parameters with the random-effect columns moved by ``delta``."""
    phi = TYPICAL.copy()
    phi[Q] += np.asarray(delta, dtype=float)
    return phi


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
                                np.full(len(times), np.nan), {"WT": weight, "EGFR": egfr})
    f = MODEL.structural(phi[None, :], data.observation_data())
    sd = np.sqrt(np.where(np.asarray(outputs) == 0, 1.0 + (0.15 * f) ** 2,
                          np.where(np.asarray(outputs) == 1, 8.0 ** 2, 0.12 ** 2)))
    return data.replace(obs_values=f + sd * rng.standard_normal(f.shape))


def test_population_prior_is_the_cohort_population():
    """The twin's prior and the cohort's virtual participants come from the same definition."""
    from inference.covariates import Covariates

    model = MODEL.population
    natural = dict(zip(model.parameters, model.theta))
    doc = {p["name"]: p for p in MODEL.definition.document["parameters"]}
    assert np.exp(natural["CL"]) == pytest.approx(doc["CL"]["typical"])
    assert natural["HBA1C0"] == pytest.approx(doc["HBA1C0"]["typical"])
    assert model.omega_sd == pytest.approx([doc[n]["iiv"] for n in model.random_effects])
    reference = Covariates(weight_kg=[70.0], age_y=[50.0], egfr=[90.0], sex_female=[0], distance_km=[1.0], site=[0])
    typical = MODEL.sample_parameters(reference, None)
    assert typical["cl"][0] == pytest.approx(np.exp(natural["CL"]))
    assert typical["named"]["FPG0"][0] == pytest.approx(28.7 * 8.2 - 46.7)
    assert MODEL.covariate_model is not None and (MODEL.name, MODEL.version) == ("tt201-twin", "1.1.0")


def test_daily_activity_filter_equals_the_day_stepper():
    rng = np.random.default_rng(1)
    phi = np.tile(TYPICAL, (6, 1))
    phi[:, Q] += rng.normal(0.0, 0.3, (6, Q.size))
    p = MODEL.natural(phi)
    amounts = np.where(rng.random((6, 90)) < 0.8, 100.0, 0.0)
    activity = MODEL.daily_activity(p, 24.0 * np.arange(90), amounts, 120)
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
    p = MODEL.natural(TYPICAL[None, :])
    dose_t = 24.0 * np.arange(40)
    times = np.linspace(38 * 24.0, 39 * 24.0, 2401)
    ours = MODEL.concentration(p, dose_t, np.full(40, 100.0), times, 0)[0]
    model = OneCompartment(cl=p["cl"], v=p["v"], ka=p["ka"], tlag=p["tlag"], f=p["f"])
    direct = 1000.0 * concentration(model, DoseRecord(times=dose_t, amounts=np.full(40, 100.0)), times)[0]
    np.testing.assert_allclose(ours, direct, rtol=1e-6, atol=1e-6)
    average = np.trapezoid(ours, times) / 24.0
    expected = 1000.0 * 0.8 * 100.0 / (5.0 * 24.0)  # ng/mL
    assert average == pytest.approx(expected, rel=2e-3)


def test_structural_needs_no_drug_for_placebo_and_drifts_hba1c():
    data = twin.ParticipantData([0.0, 24.0], [0.0, 0.0], [0, 1, 2, 2], [30.0, 2.0, 2.0, 24.0 * 365 + 2.0],
                                [np.nan] * 4, {"WT": 70.0, "EGFR": 90.0}).observation_data()
    f = MODEL.structural(TYPICAL[None, :], data)
    assert f[0] == 0.0
    assert f[1] == pytest.approx(28.7 * 8.2 - 46.7)  # ADAG relation at baseline (Nathan et al. 2008)
    assert f[3] - f[2] == pytest.approx(0.2, abs=1e-3)  # 0.2 %/year natural drift


def test_calibration_recovers_the_simulating_parameters():
    truth = shifted([0.3, -0.15, 0.2, 0.2, -0.4, 0.6, 10.0])
    data = _participant(truth, days=140, visit_days=(0, 28, 56, 84, 112, 140), seed=3)
    post = twin.calibrate_participant(MODEL, data)
    assert post.converged
    z = np.abs(post.mean - truth[Q]) / post.sd
    assert np.all(z < 3.5), z
    assert post.sd[0] < 0.3 and post.sd[5] < 0.8  # CL and HbA1c0 are learned from the data


def test_forecast_is_seeded_and_responds_to_dose_and_missed_doses():
    data = _participant(TYPICAL, seed=5)
    post = twin.calibrate_participant(MODEL, data)
    start = 24.0 * 85
    times = np.arange(0.0, 24.0 * 14 + 1, 12.0)
    base = twin.TwinScenario(dose=100.0, start_h=start, horizon_days=14)
    a = twin.forecast(MODEL, post, base, times, seed=7)
    b = twin.forecast(MODEL, post, base, times, seed=7)
    for name in MODEL.outputs:
        np.testing.assert_array_equal(a.median[name], b.median[name])
        np.testing.assert_array_equal(a.low[name], b.low[name])
        assert np.all(a.low[name] <= a.median[name]) and np.all(a.median[name] <= a.high[name])
    higher = twin.forecast(MODEL, post, base.replace(dose=200.0), times, seed=7)
    assert np.mean(higher.median["concentration"]) > 1.5 * np.mean(a.median["concentration"])
    assert higher.median["fpg"][-1] < a.median["fpg"][-1]
    missed = twin.forecast(MODEL, post, base.replace(missed_dose_days=(3, 4, 5)), times, seed=7)
    assert np.mean(missed.median["concentration"]) < np.mean(a.median["concentration"])
    day6 = np.searchsorted(times, 24.0 * 6)
    assert missed.median["concentration"][day6] < 0.5 * a.median["concentration"][day6]
    assert not np.array_equal(twin.forecast(MODEL, post, base, times, seed=8).median["concentration"],
                              a.median["concentration"])


def test_lower_adherence_lowers_exposure():
    post = twin.calibrate_participant(MODEL, _participant(TYPICAL, seed=6))
    scenario = twin.TwinScenario(dose=100.0, start_h=24.0 * 85, horizon_days=28)
    times = np.arange(0.0, 24.0 * 28 + 1, 24.0)
    full = twin.forecast(MODEL, post, scenario, times, samples=500, seed=1)
    half = twin.forecast(MODEL, post, scenario.replace(adherence=0.5), times, samples=500, seed=1)
    assert np.mean(half.median["concentration"]) < 0.8 * np.mean(full.median["concentration"])


@pytest.mark.parametrize("changes, match", [({"horizon_days": 0}, "horizon_days"), ({"dose": -1.0}, "dose"),
                                             ({"adherence": 1.5}, "adherence"), ({"interval_h": 0.5}, "interval_h"),
                                             ({"missed_dose_days": (30,)}, "missed_dose_days")])
def test_scenario_refuses_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        twin.TwinScenario(**{"dose": 50.0, "start_h": 0.0, "horizon_days": 28, **changes})


def test_forecast_beyond_the_models_horizon_limit_is_refused():
    post = twin.calibrate_participant(MODEL, _participant(TYPICAL, seed=6))
    scenario = twin.TwinScenario(dose=100.0, start_h=24.0 * 85, horizon_days=MODEL.horizon_limit_days + 1)
    with pytest.raises(ValueError, match=f"not validated beyond {MODEL.horizon_limit_days} days"):
        twin.forecast(MODEL, post, scenario, [0.0])


def test_more_data_narrows_the_forecast():
    truth = shifted([0.2, 0.1, -0.2, 0.1, 0.3, -0.5, -5.0])
    full = _participant(truth, days=112, visit_days=(0, 28, 56, 84, 112), seed=9)
    early = full.obs_times_h < 24.0 * 60
    first = full.replace(obs_output=full.obs_output[early], obs_times_h=full.obs_times_h[early],
                         obs_values=full.obs_values[early])
    scenario = twin.TwinScenario(dose=100.0, start_h=24.0 * 113, horizon_days=28)
    times = np.arange(0.0, 24.0 * 28 + 1, 24.0)
    widths = []
    for data in (first, full):
        fc = twin.forecast(MODEL, twin.calibrate_participant(MODEL, data), scenario, times, samples=2000, seed=2)
        widths.append({o: np.mean(fc.high[o] - fc.low[o]) for o in MODEL.outputs})
    assert widths[1]["concentration"] < widths[0]["concentration"]
    assert widths[1]["hba1c"] < widths[0]["hba1c"]


@pytest.mark.slow
def test_prediction_interval_coverage_on_held_out_visits():
    """90% intervals from the visits up to day 56 cover about 90% of the held-out day-84 values.

    Participants are drawn from the population prior itself and dosed exactly as the forecast
    scenario says, so the nominal level is the right target; 36 participants x 3 outputs give a
    binomial SD of about 3 points, and the Laplace posterior may under-cover a little.
    """
    model = MODEL.population
    rng = np.random.default_rng(11)
    start = 24.0 * 60
    scenario = twin.TwinScenario(dose=100.0, start_h=start, horizon_days=25)
    hits = []
    for i in range(36):
        truth = TYPICAL.copy()
        truth[Q] = rng.multivariate_normal(TYPICAL[Q], model.omega)
        full = _participant(truth, days=85, seed=100 + i, adherence=1.0, jitter_h=0.0)
        seen, dosed = full.obs_times_h < start, full.dose_times_h < start
        post = twin.calibrate_participant(MODEL, full.replace(
            obs_output=full.obs_output[seen], obs_times_h=full.obs_times_h[seen], obs_values=full.obs_values[seen],
            dose_times_h=full.dose_times_h[dosed], doses=full.doses[dosed]))
        for k, t, y in zip(full.obs_output[~seen], full.obs_times_h[~seen], full.obs_values[~seen]):
            name = MODEL.outputs[k]
            fc = twin.forecast(MODEL, post, scenario, [t - start], samples=1000, seed=i, outputs=[name])
            hits.append(fc.low[name][0] <= y <= fc.high[name][0])
    coverage = float(np.mean(hits))
    assert 0.8 <= coverage <= 0.98, coverage


def test_simulate_population_summarizes_arms_reproducibly():
    arms = np.repeat([0, 1, 2], 400)
    a = twin.simulate_population(MODEL, [0.0, 50.0, 100.0], arms, horizon_days=84, seed=3, step_days=7,
                                 arm_names=["placebo", "50 mg", "100 mg"])
    b = twin.simulate_population(MODEL, [0.0, 50.0, 100.0], arms, horizon_days=84, seed=3, step_days=7,
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

    res = twin.simulate_population(MODEL, [100.0], np.zeros(3000, dtype=int), horizon_days=7, on_chunk=stop_after_first)
    assert seen == [(1, 3)] and not res.completed
    assert np.sum(np.isfinite(res.member_end["hba1c"])) == 1000


def test_participant_data_rejects_inconsistent_arrays():
    with pytest.raises(ValueError):
        twin.ParticipantData([0.0], [1.0, 2.0], [], [], [])
    with pytest.raises(ValueError):
        twin.calibrate_participant(MODEL, twin.ParticipantData([0.0], [1.0], [3], [1.0], [1.0]))
    empty = twin.ParticipantData([0.0], [1.0], [], [], [])
    with pytest.raises(ValueError, match="no outcome"):
        twin.calibrate_participant(MODEL, empty)
    assert isinstance(_participant(TYPICAL).observation_data(), ObservationData)


def test_regimen_runs_through_the_end_of_the_forecast_window():
    """On a steady regimen the last forecast day looks like the days before it (a dose schedule
    that stopped one day short made glucose rebound by ~20 mg/dL on the final day)."""
    data = _participant(TYPICAL, seed=3)
    post = twin.calibrate_participant(MODEL, data)
    start = 24.0 * 85
    times = np.arange(0.0, 24.0 * 28 + 1, 24.0)
    scenario = twin.TwinScenario(dose=100.0, start_h=start, horizon_days=28)
    fc = twin.forecast(MODEL, post, scenario, times, samples=2000, seed=11)
    fpg = fc.median["fpg"]
    day_to_day = np.abs(np.diff(fpg[-8:-1]))
    assert abs(fpg[-1] - fpg[-2]) < 3 * day_to_day.max() + 1.0
    assert scenario.dose_times_h().max() >= start + 24.0 * 28 - scenario.interval_h
