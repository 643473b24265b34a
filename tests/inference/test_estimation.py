"""Population estimation (FOCEI) against nlme's published Theophylline fit and on simulated data."""
from __future__ import annotations

import numpy as np
import pytest

from inference.datasets import ssfol
from inference.estimation import find_modes, fit_population
from inference.population import (
    CovariateEffect,
    ObservationData,
    PopulationModel,
    ResidualError,
    simulate_observations,
)

pytestmark = pytest.mark.unit

# Reference: Pinheiro & Bates (2000), "Mixed-Effects Models in S and S-PLUS", ch. 8 (script
# ch08.R shipped with R's nlme): fm3Theo.nlme = nlme(conc ~ SSfol(Dose, Time, lKe, lKa, lCl),
# Theoph, random = pdDiag(lKa + lCl ~ 1)), maximum likelihood (nlme's default). Its fixed effects
# and residual SD are the ones in the product SPEC: lKe -2.4547, lKa 0.4657, lCl -3.2272, sigma 0.709.
NLME_FIXED = {"lKe": -2.4547, "lKa": 0.4657, "lCl": -3.2272}
NLME_SIGMA = 0.709
# Random-effect SDs and fixed-effect standard errors of the same (diagonal) fit, as printed by
# summary() in nlme and quoted in a public validation write-up (GitHub, exozippy pharmacokinetics
# README: SEs given on the log10 scale, converted here by ln 10): SE lKe 0.0525, lKa 0.1986,
# lCl 0.0600; SD(lKa) 0.6439, SD(lCl) 0.1669.
NLME_SE = {"lKe": 0.02280 * np.log(10), "lKa": 0.08627 * np.log(10), "lCl": 0.02606 * np.log(10)}
NLME_OMEGA_SD = {"lKa": 0.6439, "lCl": 0.1669}


@pytest.fixture(scope="module")
def theoph_fit(theoph):
    start = PopulationModel(("lKe", "lKa", "lCl"), [-2.5, 0.5, -3.0], ("lKa", "lCl"),
                            np.diag([0.5, 0.5]) ** 2, ResidualError("additive", additive=1.0))
    return fit_population(start, ssfol, theoph)


def test_theoph_fixed_effects_match_nlme(theoph_fit):
    assert theoph_fit.converged, theoph_fit.message
    for name, value in zip(theoph_fit.model.parameters, theoph_fit.model.theta):
        # acceptance: within 0.05 on the log scale (FOCE and nlme's Lindstrom-Bates
        # linearization are different approximations of the same likelihood)
        assert abs(value - NLME_FIXED[name]) < 0.05, (name, value)


def test_theoph_residual_and_variability_match_nlme(theoph_fit):
    assert theoph_fit.model.error.additive == pytest.approx(NLME_SIGMA, rel=0.15)
    for name, sd in zip(theoph_fit.model.random_effects, theoph_fit.model.omega_sd):
        assert sd == pytest.approx(NLME_OMEGA_SD[name], rel=0.10), name


def test_theoph_standard_errors_match_nlme(theoph_fit):
    for name, se in NLME_SE.items():
        assert theoph_fit.standard_errors[name] == pytest.approx(se, rel=0.15), name
    assert set(theoph_fit.standard_errors) == {"lKe", "lKa", "lCl", "omega_sd(lKa)", "omega_sd(lCl)", "sigma_additive"}


def test_theoph_confidence_intervals_are_t_intervals_with_subjects_minus_random_effects(theoph_fit):
    from scipy import stats

    # SAS PROC NLMIXED's default DF: 12 subjects - 2 random effects; t(10) = 2.228 (tables), not 1.96
    assert theoph_fit.degrees_of_freedom == 10
    quantile = stats.t.ppf(0.975, 10)
    assert quantile == pytest.approx(2.228139, abs=1e-6)
    for name in ("lKe", "lKa", "lCl"):
        low, high = theoph_fit.confidence_interval(name)
        estimate, se = theoph_fit.estimates[name], theoph_fit.standard_errors[name]
        assert (low, high) == pytest.approx((estimate - quantile * se, estimate + quantile * se), rel=1e-12)
    low90, high90 = theoph_fit.confidence_interval("lCl", level=0.9)
    assert high90 - low90 == pytest.approx(2 * stats.t.ppf(0.95, 10) * theoph_fit.standard_errors["lCl"], rel=1e-12)
    with pytest.raises(KeyError):
        theoph_fit.confidence_interval("lVmax")


def test_theoph_fit_is_an_optimum_and_reports_individuals(theoph_fit, theoph):
    # moving any parameter away from the estimate must not lower -2LL
    from inference.estimation import objective_function

    base = theoph_fit.model
    for delta in ([0.02, 0, 0], [0, -0.05, 0], [0, 0, 0.02]):
        moved = base.replace(theta=base.theta + np.array(delta))
        assert objective_function(moved, find_modes(moved, ssfol, theoph)) > theoph_fit.objective
    assert theoph_fit.eta.shape == (12, 2)
    assert theoph_fit.individual_parameters.shape == (12, 3)
    np.testing.assert_allclose(theoph_fit.individual_parameters[:, 0], base.theta[0])
    # empirical Bayes estimates shrink towards 0 and average near 0
    assert np.all(np.abs(theoph_fit.eta.mean(axis=0)) < 0.1)
    assert theoph_fit.aic == pytest.approx(theoph_fit.objective + 12)


def test_fit_rejects_data_without_observations(theoph, theoph_start):
    with pytest.raises(ValueError, match="no observed"):
        fit_population(theoph_start, ssfol, theoph.replace(value=np.full(theoph.n_rows, np.nan)))


@pytest.mark.slow
def test_recovers_simulated_population_with_covariate_full_omega_and_combined_error():
    # FOCEI on data simulated from a known model: 120 subjects, allometric weight effect on
    # clearance (estimated), correlated random effects, combined error. Estimates must fall
    # within 3 standard errors of the truth (and the SEs must be sensible).
    truth = PopulationModel(
        ("lKe", "lKa", "lCl"), [-2.3, 0.3, -3.2], ("lKa", "lCl"),
        np.array([[0.16, 0.03], [0.03, 0.0625]]),
        ResidualError("combined", additive=0.2, proportional=0.1),
        (CovariateEffect("lCl", "weight", "power", 70.0, 0.75),),
        omega_structure="full",
    )
    rng = np.random.default_rng(2024)
    n, times = 120, np.array([0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0])
    t = np.tile(times, n)
    design = ObservationData(np.repeat(np.arange(n), times.size), t, np.full(t.size, np.nan),
                             covariates={"weight": rng.uniform(50, 110, n)}, design={"dose": np.full(t.size, 4.0)})
    data, _ = simulate_observations(truth, ssfol, design, seed=rng)
    start = truth.replace(theta=[-2.0, 0.0, -3.0], omega=np.diag([0.25, 0.25]),
                          error=ResidualError("combined", additive=0.5, proportional=0.2),
                          covariate_effects=(truth.covariate_effects[0].replace(coefficient=0.0),))
    fit = fit_population(start, ssfol, data)
    assert fit.converged, fit.message
    se = fit.standard_errors
    for name, true in zip(truth.parameters, truth.theta):
        assert abs(fit.estimates[name] - true) < 3 * se[name], name
    assert abs(fit.estimates["lCl~weight"] - 0.75) < 3 * se["lCl~weight"]
    assert fit.model.error.additive == pytest.approx(0.2, abs=3 * se["sigma_additive"])
    assert fit.model.error.proportional == pytest.approx(0.1, abs=3 * se["sigma_proportional"])
    np.testing.assert_allclose(fit.model.omega, truth.omega, atol=0.06)


def test_fit_reports_a_broken_structural_model(theoph, theoph_start):
    with pytest.raises(ValueError, match="structural model returned shape"):
        fit_population(theoph_start, lambda phi, data: phi[:, 0], theoph)


@pytest.mark.slow
def test_recovers_a_two_output_population():
    # drug concentration (proportional error) and an Emax biomarker (additive error) fitted
    # together: each output's residual parameter and the typical values come back within 3 SE
    def pk_biomarker(phi, data):
        conc = ssfol(phi[:, :3], data)
        biomarker = 10.0 * (1.0 - conc / (conc + np.exp(phi[data.subject, 3])))
        return np.where(data.design["output"] == 0, conc, biomarker)

    truth = PopulationModel(
        ("lKe", "lKa", "lCl", "lEC50"), [-2.3, 0.3, -3.2, 1.5], ("lKa", "lCl", "lEC50"),
        np.diag([0.4, 0.25, 0.4]) ** 2,
        (ResidualError("proportional", proportional=0.15), ResidualError("additive", additive=0.5)),
    )
    n = 60
    times = np.array([0.5, 1.0, 3.0, 6.0, 12.0, 2.0, 4.0, 8.0, 24.0])
    outputs = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    t = np.tile(times, n)
    design = ObservationData(np.repeat(np.arange(n), times.size), t, np.full(t.size, np.nan),
                             design={"dose": np.full(t.size, 4.0), "output": np.tile(outputs, n)})
    data, _ = simulate_observations(truth, pk_biomarker, design, seed=77)
    start = truth.replace(theta=[-2.0, 0.0, -3.0, 1.0], omega=np.diag([0.5, 0.5, 0.5]) ** 2,
                          error=(ResidualError("proportional", proportional=0.3), ResidualError("additive", additive=1.0)))
    fit = fit_population(start, pk_biomarker, data)
    assert fit.converged, fit.message
    se = fit.standard_errors
    for name, true in zip(truth.parameters, truth.theta):
        assert abs(fit.estimates[name] - true) < 3 * se[name], name
    assert abs(fit.model.errors[0].proportional - 0.15) < 3 * se["sigma_proportional[0]"]
    assert abs(fit.model.errors[1].additive - 0.5) < 3 * se["sigma_additive[1]"]


def test_callback_sees_every_iteration_and_can_stop_the_fit(theoph, theoph_fit):
    # what $fit-population turns into X-Progress messages and its cancel check
    from inference.estimation import FitCancelled
    start = PopulationModel(("lKe", "lKa", "lCl"), [-2.5, 0.5, -3.0], ("lKa", "lCl"),
                            np.diag([0.5, 0.5]) ** 2, ResidualError("additive", additive=1.0))
    seen = []
    fit = fit_population(start, ssfol, theoph, standard_errors=False, callback=lambda i, f: seen.append((i, f)))
    iterations = [i for i, _ in seen]
    # one call per BFGS iteration, then one with the final objective before the standard errors
    assert iterations == list(range(1, fit.n_iterations + 1)) + [fit.n_iterations]
    assert seen[-1][1] == pytest.approx(theoph_fit.objective, abs=1e-6)
    assert all(b <= a + 1e-9 for (_, a), (_, b) in zip(seen, seen[1:]))  # BFGS never goes up
    with pytest.raises(FitCancelled, match="after 2 iterations"):
        fit_population(start, ssfol, theoph, callback=lambda i, f: i < 2)


def test_variance_at_zero_raises_a_boundary_warning(theoph_fit):
    # truth without variability in lKa: the ML estimate of its SD collapses to ~0, where the
    # likelihood is flat in log SD and a standard error says nothing
    from inference.estimation import BoundaryWarning
    from inference.population import simulate_observations
    times = np.array([0.25, 0.5, 1, 2, 4, 6, 8, 12, 24.0])
    n = 20
    t = np.tile(times, n)
    design = ObservationData(np.repeat(np.arange(n), times.size), t, np.full(t.size, np.nan),
                             design={"dose": np.full(t.size, 4.0)})
    truth = PopulationModel(("lKe", "lKa", "lCl"), [-2.4, 0.4, -3.2], ("lKa", "lCl"),
                            np.diag([1e-6, 0.2]) ** 2, ResidualError("additive", additive=0.3))
    data, _ = simulate_observations(truth, ssfol, design, seed=0)
    with pytest.warns(BoundaryWarning, match="lKa"):
        fit = fit_population(truth.replace(omega=np.diag([0.3, 0.3]) ** 2), ssfol, data)
    assert fit.boundary == ("lKa",)
    assert fit.model.omega_sd[0] < 1e-3 < fit.model.omega_sd[1]
    assert theoph_fit.boundary == ()
    # the SD is held near the boundary (the fit probes it there): taking it all the way to ~0 gains
    # nothing that matters in -2 log L
    from inference.estimation import objective_function
    closer = fit.model.replace(omega=np.diag([1e-7, fit.model.omega_sd[1]]) ** 2)
    assert objective_function(closer, find_modes(closer, ssfol, data)) > fit.objective - 1e-4


def test_batched_objectives_equal_separate_searches(theoph):
    # several parameter sets in one stacked mode search give each set's own -2 log L: what the
    # gradient and the standard errors of fit_population rely on
    from inference.estimation import _batched_objectives, objective_function
    base = PopulationModel(("lKe", "lKa", "lCl"), [-2.46, 0.48, -3.23], ("lKa", "lCl"),
                           np.diag([0.65, 0.17]) ** 2, ResidualError("combined", additive=0.5, proportional=0.05))
    models = [base,
              base.replace(theta=np.array([-2.3, 0.6, -3.1])),
              base.replace(omega=np.diag([0.3, 0.4]) ** 2,
                           error=ResidualError("combined", additive=0.8, proportional=0.01))]
    eta0 = np.zeros((theoph.n_subjects, 2))
    values, _ = _batched_objectives(models, ssfol, theoph, eta0)
    for value, model in zip(values, models):
        alone = objective_function(model, find_modes(model, ssfol, theoph, eta0=eta0))
        assert value == pytest.approx(alone, rel=1e-10)


def _pk_biomarker(phi, data):
    conc = ssfol(phi[:, :3], data)
    biomarker = 10.0 * (1.0 - conc / (conc + np.exp(phi[data.subject, 3])))
    return np.where(data.design["output"] == 0, conc, biomarker)


_THEOPH_BASE = PopulationModel(("lKe", "lKa", "lCl"), [-2.4, 0.4, -3.1], ("lKa", "lCl"), np.diag([0.6, 0.2]) ** 2,
                               ResidualError("additive", additive=0.8))


@pytest.mark.parametrize("case", ["additive", "combined-full-omega", "covariates-three-effects", "two-outputs"])
def test_analytical_gradient_matches_central_differences_of_the_objective(theoph, case):
    """The outer gradient (envelope + implicit function theorem, what BFGS and the standard errors use)
    equals central differences of -2 log L itself, each point with its own fully converged modes,
    for every parameter kind: fixed effects, covariate coefficients, Omega (log SDs, Cholesky) and
    residual parameters of each output (FOCEI interaction included)."""
    from inference.estimation import _objective_gradient, _Parameterization, _Stacked, objective_function
    structural, data, model = ssfol, theoph, _THEOPH_BASE
    if case == "combined-full-omega":
        model = model.replace(error=ResidualError("combined", additive=0.3, proportional=0.1),
                              omega=np.array([[0.36, 0.03], [0.03, 0.04]]), omega_structure="full")
    elif case == "covariates-three-effects":
        data = theoph.replace(covariates={"wt": np.linspace(60, 90, theoph.n_subjects)})
        model = model.replace(
            error=ResidualError("combined", additive=0.4, proportional=0.15),
            covariate_effects=(CovariateEffect("lCl", "wt", "power", 70.0, 0.5),
                               CovariateEffect("lKe", "wt", "linear", 70.0, 0.01),
                               CovariateEffect("lKa", "wt", "exponential", 70.0, -0.01)),
            random_effects=("lKe", "lKa", "lCl"), omega=np.diag([0.1, 0.6, 0.2]) ** 2)
    elif case == "two-outputs":
        truth = PopulationModel(("lKe", "lKa", "lCl", "lEC50"), [-2.3, 0.3, -3.2, 1.5], ("lKa", "lCl", "lEC50"),
                                np.diag([0.4, 0.25, 0.4]) ** 2,
                                (ResidualError("proportional", proportional=0.15), ResidualError("additive", additive=0.5)))
        times, outputs, n = np.array([0.5, 1.0, 3.0, 6.0, 12.0, 2.0, 4.0, 8.0]), np.array([0, 0, 0, 0, 0, 1, 1, 1]), 8
        design = ObservationData(np.repeat(np.arange(n), times.size), np.tile(times, n), np.full(n * times.size, np.nan),
                                 design={"dose": np.full(n * times.size, 4.0), "output": np.tile(outputs, n)})
        data, _ = simulate_observations(truth, _pk_biomarker, design, seed=3)
        structural = _pk_biomarker
        model = truth.replace(theta=[-2.2, 0.2, -3.3, 1.3])
    param = _Parameterization(model)
    x = param.pack(model)

    def objective(point):
        at = param.unpack(point)
        return objective_function(at, find_modes(at, structural, data, tol=1e-12))

    modes = find_modes(model, structural, data, tol=1e-12)
    gradient, sensitivity = _objective_gradient(param, x, model, modes, structural, data, _Stacked(structural, data))
    h = 1e-5
    reference = np.array([(objective(x + h * e) - objective(x - h * e)) / (2 * h) for e in np.eye(x.size)])
    assert np.allclose(gradient, reference, rtol=1e-5, atol=1e-4), np.c_[gradient, reference]
    # the modes' sensitivity predicts where a moved point's modes go (first order)
    step = 1e-3 * np.linspace(-1, 1, x.size)
    moved = find_modes(param.unpack(x + step), structural, data, tol=1e-12).eta
    assert np.max(np.abs(modes.eta + sensitivity @ step - moved)) < 1e-5
