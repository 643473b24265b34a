"""Individual Bayesian calibration: exactness on a conjugate model, honesty of intervals, updates, sampling."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from inference.calibration import (
    calibrate,
    calibrate_each,
    forecast,
    importance_resample,
    sample_posterior,
    update,
)
from inference.datasets import ssfol
from inference.population import (
    ObservationData,
    PopulationModel,
    ResidualError,
    individual_parameters,
    simulate_observations,
)

pytestmark = pytest.mark.unit


def linear(phi: np.ndarray, data: ObservationData) -> np.ndarray:
    """A straight line a + b t: with an additive error the posterior is exactly Gaussian."""
    p = phi[data.subject]
    return p[:, 0] + p[:, 1] * data.time


LINEAR = PopulationModel(("a", "b"), [1.0, 0.5], ("a", "b"), np.array([[0.5, 0.1], [0.1, 0.2]]),
                         ResidualError("additive", additive=0.3), omega_structure="full")


def test_laplace_is_exact_for_the_conjugate_linear_gaussian_model():
    # closed form (Bayesian linear regression): C = (Omega^-1 + X'X / s^2)^-1,
    # m = C (Omega^-1 theta + X'y / s^2)
    t = np.array([0.0, 1.0, 2.5, 4.0])
    y = np.array([1.4, 1.7, 2.9, 3.1])
    post = calibrate(LINEAR, linear, ObservationData.single(t, y))
    x = np.column_stack([np.ones_like(t), t])
    prec = np.linalg.inv(LINEAR.omega) + x.T @ x / 0.3**2
    cov = np.linalg.inv(prec)
    mean = cov @ (np.linalg.inv(LINEAR.omega) @ LINEAR.theta + x.T @ y / 0.3**2)
    np.testing.assert_allclose(post.mean, mean, atol=1e-7)
    np.testing.assert_allclose(post.cov, cov, rtol=1e-5)
    # posterior-predictive of a new observation at t = 6: N(x m, x C x' + s^2)
    fc = forecast(post, linear, ObservationData.single([6.0], [np.nan]), n_samples=200_000, seed=4)
    x6 = np.array([1.0, 6.0])
    sd6 = np.sqrt(x6 @ cov @ x6 + 0.3**2)
    expected = stats.norm(x6 @ mean, sd6).ppf([0.05, 0.5, 0.95])
    np.testing.assert_allclose([fc.lower[0], fc.median[0], fc.upper[0]], expected, atol=0.02 * sd6 + 0.01)


def test_sequential_update_equals_single_update_for_the_conjugate_model():
    t = np.array([0.0, 1.0, 2.5, 4.0, 6.0, 8.0])
    y = np.array([1.4, 1.7, 2.9, 3.1, 4.2, 5.0])
    first = calibrate(LINEAR, linear, ObservationData.single(t[:3], y[:3]))
    later = ObservationData.single(t[3:], y[3:])
    sequential = update(first, linear, later, sequential=True)
    batch = update(first, linear, later)
    np.testing.assert_allclose(sequential.mean, batch.mean, atol=1e-7)
    np.testing.assert_allclose(sequential.cov, batch.cov, rtol=1e-5)
    assert sequential.n_observations == batch.n_observations == 6
    assert sequential.method == "laplace-sequential"


def test_sequential_update_close_to_single_update_for_the_oral_pk_model(oral_population, make_design):
    # Non-linear model: carrying a Gaussian between updates is an approximation, exact only for
    # the conjugate case above. Over 50 simulated participants, calibrated on samples up to 4 h
    # and then updated with 8-24 h, the sequential means must sit within a few hundredths of a
    # posterior SD of the all-data update typically (median), within 0.3 SD for 90 % of them and
    # never a whole SD away; the SDs within 10 %.
    design = make_design([0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0], 50)
    data, _ = simulate_observations(oral_population, ssfol, design, seed=7)
    gaps, ratios = [], []
    for i in range(50):
        one = data.select_subjects([i])
        early = one.select_rows(one.time <= 4.0)
        late = ObservationData.single(one.time[one.time > 4.0], one.value[one.time > 4.0],
                                      design={"dose": [4.0] * 3})
        first = calibrate(oral_population, ssfol, early)
        seq = update(first, ssfol, late, sequential=True)
        full = update(first, ssfol, late)
        gaps.append(np.abs(seq.mean - full.mean) / full.sd)
        ratios.append(seq.sd / full.sd)
    gaps, ratios = np.array(gaps), np.array(ratios)
    assert np.all(np.median(gaps, axis=0) < 0.05), np.median(gaps, axis=0)
    assert np.all(np.percentile(gaps, 90, axis=0) < 0.3)
    assert gaps.max() < 1.0
    assert np.all((0.9 < ratios) & (ratios < 1.1))


def test_posterior_narrows_as_data_arrive(oral_population, make_design):
    design = make_design([0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0], 200)
    data, _ = simulate_observations(oral_population, ssfol, design, seed=8)
    prior_sd = oral_population.omega_sd
    widths = []
    for times in ([1.0], [1.0, 8.0], [0.5, 1.0, 2.0, 8.0, 24.0], [0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0]):
        keep = np.isin(data.time, times)
        posts = calibrate_each(oral_population, ssfol, data.select_rows(keep))
        widths.append(np.mean([p.sd for p in posts], axis=0))
    widths = np.array(widths)
    assert np.all(widths[0] < prior_sd)
    assert np.all(np.diff(widths, axis=0) < 0), widths


def test_calibrate_each_equals_calibrate_one_by_one(oral_population, make_design):
    data, _ = simulate_observations(oral_population, ssfol, make_design([1.0, 4.0, 12.0], 5), seed=9)
    together = calibrate_each(oral_population, ssfol, data)
    for i, post in enumerate(together):
        alone = calibrate(oral_population, ssfol, data.select_subjects([i]))
        np.testing.assert_allclose(post.mean, alone.mean, atol=1e-8)
        np.testing.assert_allclose(post.cov, alone.cov, rtol=1e-6)


def test_importance_resampling_matches_quadrature_of_the_exact_posterior(oral_population):
    # one early sample leaves the absorption rate barely identified: the posterior is skewed.
    # Reference: the exact posterior mean and SD from quadrature on a fine 2-D grid.
    data = ObservationData.single([0.5], [4.5], design={"dose": [4.0]})
    post = calibrate(oral_population, ssfol, data)
    grid_ka = np.linspace(0.3 - 6 * 0.4, 0.3 + 6 * 0.4, 301)
    grid_cl = np.linspace(-3.2 - 6 * 0.25, -3.2 + 6 * 0.25, 301)
    ka, cl = np.meshgrid(grid_ka, grid_cl, indexing="ij")
    points = np.column_stack([ka.ravel(), cl.ravel()])
    phi = np.column_stack([np.full(len(points), -2.3), points])
    tiled = data.tile(len(points))
    f = ssfol(phi, tiled)
    var = 0.2**2 + (0.1 * f) ** 2
    log_post = stats.norm.logpdf(4.5, f, np.sqrt(var)) + stats.multivariate_normal(
        oral_population.theta[1:], oral_population.omega).logpdf(points)
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    exact_mean = w @ points
    exact_sd = np.sqrt(w @ (points - exact_mean) ** 2)
    draws = importance_resample(post, ssfol, 20000, seed=12, n_proposals=100_000)
    sir = draws.parameters[:, 1:]
    assert draws.effective_sample_size > 2000
    np.testing.assert_allclose(sir.mean(axis=0), exact_mean, atol=0.03)
    np.testing.assert_allclose(sir.std(axis=0), exact_sd, rtol=0.05)


def test_sampling_is_seeded_and_keeps_fixed_parameters(oral_population):
    post = calibrate(oral_population, ssfol, ObservationData.single([1.0, 6.0], [6.0, 5.0], design={"dose": [4.0] * 2}))
    a, b = sample_posterior(post, 500, seed=3), sample_posterior(post, 500, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[:, 0], -2.3)
    assert np.cov(a[:, 1:].T) == pytest.approx(post.cov, rel=0.2)


def test_calibration_rejects_bad_input(oral_population, make_design):
    with pytest.raises(ValueError, match="one participant"):
        calibrate(oral_population, ssfol, make_design([1.0], 2).replace(value=[1.0, 1.0]))
    with pytest.raises(ValueError, match="observed"):
        calibrate(oral_population, ssfol, ObservationData.single([1.0], [np.nan], design={"dose": [4.0]}))
    post = calibrate(oral_population, ssfol, ObservationData.single([1.0], [5.0], design={"dose": [4.0]}))
    with pytest.raises(ValueError, match="level"):
        post.interval(1.5)


def test_intervals_are_honest_over_600_simulated_participants(oral_population, make_design):
    # Participants drawn from the population (seeded); each is calibrated on samples up to 6 h
    # and forecast at 12 h and 24 h. Nominal 90 % posterior intervals must cover the true
    # parameters, and 90 % forecast intervals the held-out observations, 85-95 % of the time.
    n = 600
    times = [0.5, 1.0, 2.0, 4.0, 6.0, 12.0, 24.0]
    design = make_design(times, n)
    data, eta = simulate_observations(oral_population, ssfol, design, seed=2025)
    true_phi = individual_parameters(oral_population, eta, data)[:, oral_population.random_index]
    past = data.select_rows(data.time <= 6.0)
    posts = calibrate_each(oral_population, ssfol, past)
    assert all(p.converged for p in posts)

    inside = np.array([(lo <= true) & (true <= hi) for p, true in zip(posts, true_phi) for lo, hi in [p.interval(0.9)]])
    parameter_coverage = inside.mean(axis=0)

    future_times = np.array([12.0, 24.0])
    future = ObservationData.single(future_times, [np.nan, np.nan], design={"dose": [4.0, 4.0]})
    held_out = data.value[~(data.time <= 6.0)].reshape(n, 2)
    hits = []
    for i, post in enumerate(posts):
        fc = forecast(post, ssfol, future, level=0.9, n_samples=1000, seed=i)
        hits.append((fc.lower <= held_out[i]) & (held_out[i] <= fc.upper))
    forecast_coverage = np.mean(hits, axis=0)

    print("parameter coverage", parameter_coverage, "forecast coverage", forecast_coverage)
    assert np.all((0.85 <= parameter_coverage) & (parameter_coverage <= 0.95)), parameter_coverage
    assert np.all((0.85 <= forecast_coverage) & (forecast_coverage <= 0.95)), forecast_coverage


def pk_biomarker(phi: np.ndarray, data: ObservationData) -> np.ndarray:
    """Output 0: 1-compartment oral concentration; output 1: inhibitory Emax biomarker driven by it."""
    conc = ssfol(phi[:, :3], data)
    ec50 = np.exp(phi[data.subject, 3])
    biomarker = 10.0 * (1.0 - conc / (conc + ec50))
    return np.where(data.design["output"] == 0, conc, biomarker)


def test_joint_pk_and_biomarker_calibration_is_honest():
    # a two-output twin (drug concentration + biomarker, each with its own residual error),
    # 400 simulated participants with sparse PK and a few biomarker readings: nominal 90 %
    # posterior intervals of clearance and EC50 cover the truth 85-95 % of the time, and adding
    # the biomarker rows narrows the EC50 posterior compared with the prior
    model = PopulationModel(
        ("lKe", "lKa", "lCl", "lEC50"), [-2.3, 0.3, -3.2, 1.5], ("lCl", "lEC50"),
        np.diag([0.25, 0.4]) ** 2,
        (ResidualError("proportional", proportional=0.15), ResidualError("additive", additive=0.5)),
    )
    n = 400
    times = np.array([1.0, 6.0, 2.0, 4.0, 8.0, 24.0])
    outputs = np.array([0, 0, 1, 1, 1, 1])
    t = np.tile(times, n)
    design = ObservationData(np.repeat(np.arange(n), times.size), t, np.full(t.size, np.nan),
                             design={"dose": np.full(t.size, 4.0), "output": np.tile(outputs, n)})
    data, eta = simulate_observations(model, pk_biomarker, design, seed=31)
    truth = individual_parameters(model, eta, data)[:, model.random_index]
    posts = calibrate_each(model, pk_biomarker, data)
    inside = np.array([(lo <= x) & (x <= hi) for p, x in zip(posts, truth) for lo, hi in [p.interval(0.9)]])
    coverage = inside.mean(axis=0)
    assert np.all((0.85 <= coverage) & (coverage <= 0.95)), coverage
    assert np.mean([p.sd[1] for p in posts]) < 0.75 * model.omega_sd[1]
