"""Population model value objects, residual-error likelihoods, covariates and sampling."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from inference.datasets import ssfol
from inference.population import (
    CovariateEffect,
    ObservationData,
    PopulationModel,
    ResidualError,
    conditional_log_likelihood,
    individual_parameters,
    residual_log_likelihood,
    residual_variance,
    sample_individual_parameters,
    simulate_observations,
    typical_parameters,
)

pytestmark = pytest.mark.unit

Y = np.array([0.3, 2.5, 7.9, 11.0, 4.2])
F = np.array([0.5, 2.0, 8.4, 10.1, 4.0])


@pytest.mark.parametrize(
    ("error", "sd"),
    [
        (ResidualError("additive", additive=0.7), np.full(F.shape, 0.7)),
        (ResidualError("proportional", proportional=0.15), 0.15 * F),
        (ResidualError("combined", additive=0.2, proportional=0.1), np.sqrt(0.2**2 + (0.1 * F) ** 2)),
    ],
)
def test_residual_likelihood_matches_scipy(error, sd):
    expected = stats.norm(loc=F, scale=sd).logpdf(Y)
    np.testing.assert_allclose(residual_log_likelihood(error, Y, F), expected, rtol=1e-12)
    np.testing.assert_allclose(residual_variance(error, F), sd**2, rtol=1e-12)


def test_unobserved_rows_contribute_nothing():
    error = ResidualError("additive", additive=1.0)
    out = residual_log_likelihood(error, [np.nan, 1.0], [3.0, 1.0])
    assert out[0] == 0.0
    assert out[1] == pytest.approx(stats.norm.logpdf(0.0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "additive", "additive": 0.0},
        {"kind": "additive", "additive": 0.5, "proportional": 0.1},
        {"kind": "proportional", "additive": 0.0, "proportional": -0.1},
        {"kind": "combined", "additive": 0.1},
        {"kind": "exponential", "additive": 0.1},
    ],
)
def test_residual_error_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        ResidualError(**kwargs)


def test_model_validation_names_the_problem():
    error = ResidualError("additive", additive=1.0)
    with pytest.raises(ValueError, match="positive definite"):
        PopulationModel(("a", "b"), [0, 0], ("a", "b"), [[1.0, 2.0], [2.0, 1.0]], error, omega_structure="full")
    with pytest.raises(ValueError, match="off-diagonal"):
        PopulationModel(("a", "b"), [0, 0], ("a", "b"), [[1.0, 0.1], [0.1, 1.0]], error)
    with pytest.raises(ValueError, match="random_effects"):
        PopulationModel(("a",), [0], ("b",), [[1.0]], error)
    with pytest.raises(ValueError, match="theta"):
        PopulationModel(("a", "b"), [0], ("a",), [[1.0]], error)
    model = PopulationModel(("a",), [0.0], ("a",), [[1.0]], error)
    with pytest.raises(ValueError, match="positive definite"):
        model.replace(omega=[[-1.0]])
    with pytest.raises(AttributeError):
        model.theta = np.zeros(1)  # frozen
    with pytest.raises(ValueError):
        model.theta[0] = 3.0  # read-only array


def test_covariate_effects_on_typical_parameters():
    # allometric clearance (power 0.75 on weight / 70) and an exponential age effect on lKa
    effects = (
        CovariateEffect("lCl", "weight", "power", 70.0, 0.75),
        CovariateEffect("lKa", "age", "exponential", 40.0, -0.01),
        CovariateEffect("lKe", "egfr", "linear", 90.0, 0.005),
    )
    model = PopulationModel(("lKe", "lKa", "lCl"), [-2.0, 0.5, -3.0], ("lCl",), [[0.04]],
                            ResidualError("additive", additive=1.0), effects)
    data = ObservationData([0, 1], [1.0, 1.0], [np.nan, np.nan],
                           covariates={"weight": [70.0, 35.0], "age": [40.0, 60.0], "egfr": [90.0, 60.0]})
    phi = typical_parameters(model, data)
    np.testing.assert_allclose(phi[0], [-2.0, 0.5, -3.0])
    assert np.exp(phi[1, 2] - phi[0, 2]) == pytest.approx(0.5**0.75)
    assert phi[1, 1] - phi[0, 1] == pytest.approx(-0.2)
    assert np.exp(phi[1, 0] - phi[0, 0]) == pytest.approx(1 + 0.005 * (60 - 90))
    with pytest.raises(ValueError, match="weight"):
        typical_parameters(model, data.replace(covariates={"age": [1.0, 2.0], "egfr": [90.0, 90.0]}))


def test_sampled_random_effects_have_omega_covariance():
    omega = np.array([[0.16, 0.06], [0.06, 0.09]])
    model = PopulationModel(("lKe", "lKa", "lCl"), [-2.3, 0.3, -3.2], ("lKa", "lCl"), omega,
                            ResidualError("additive", additive=0.5), omega_structure="full")
    n = 40000
    data = ObservationData(np.arange(n), np.ones(n), np.full(n, np.nan))
    phi, eta = sample_individual_parameters(model, data, seed=11)
    # sampling error of a covariance entry with n = 40000 is about 0.001
    np.testing.assert_allclose(np.cov(eta.T), omega, atol=0.004)
    np.testing.assert_allclose(phi[:, 0], -2.3)
    np.testing.assert_allclose(phi, individual_parameters(model, eta, data))
    again, _ = sample_individual_parameters(model, data, seed=11)
    np.testing.assert_array_equal(phi, again)


def test_simulated_observations_have_the_residual_spread(oral_population, make_design):
    data = make_design([1.0, 4.0, 12.0], 4000)
    eta = np.zeros((4000, 2))
    simulated, _ = simulate_observations(oral_population, ssfol, data, seed=5, eta=eta)
    f = ssfol(individual_parameters(oral_population, eta, data), data)
    z = (simulated.value - f) / np.sqrt(residual_variance(oral_population.error, f))
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    # the conditional likelihood is the sum of the per-row normal densities
    ll = conditional_log_likelihood(oral_population, ssfol, eta, simulated)
    sd = np.sqrt(0.2**2 + (0.1 * f) ** 2)
    expected = np.bincount(data.subject, weights=stats.norm.logpdf(simulated.value, f, sd))
    np.testing.assert_allclose(ll, expected, rtol=1e-10)


def test_observation_data_operations():
    data = ObservationData([0, 0, 1], [1.0, 2.0, 1.0], [3.0, 2.0, 5.0], subject_ids=("a", "b"),
                           covariates={"weight": [60.0, 80.0]}, design={"dose": [1.0, 1.0, 2.0]})
    b = data.select_subjects([1])
    assert b.subject_ids == ("b",) and b.value.tolist() == [5.0] and b.covariates["weight"].tolist() == [80.0]
    tiled = b.tile(3)
    assert tiled.n_subjects == 3 and tiled.subject.tolist() == [0, 1, 2]
    more = b.append(ObservationData([0], [4.0], [1.0], subject_ids=("b",), design={"dose": [2.0]}))
    assert more.time.tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="without rows"):
        data.select_rows([True, True, False])
    with pytest.raises(ValueError, match="gaps"):
        ObservationData([0, 2], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="length"):
        ObservationData([0, 1], [1.0, 1.0], [1.0, 1.0], covariates={"weight": [1.0]})


def test_each_output_uses_its_own_residual_error():
    # e.g. drug concentration (proportional) and a biomarker (additive) in one data set
    errors = (ResidualError("proportional", proportional=0.15), ResidualError("additive", additive=0.4))
    output = np.array([0, 1, 0, 1, 1])
    sd = np.where(output == 0, 0.15 * F, 0.4)
    np.testing.assert_allclose(residual_log_likelihood(errors, Y, F, output),
                               stats.norm(loc=F, scale=sd).logpdf(Y), rtol=1e-12)
    with pytest.raises(ValueError, match="output index"):
        residual_variance(errors, F)
    with pytest.raises(ValueError, match="output indices"):
        residual_variance(errors, F, output=[0, 1, 2, 0, 0])
    model = PopulationModel(("a",), [0.0], ("a",), [[0.1]], list(errors))
    assert model.errors == errors and model.error == errors


def test_unchecked_replace_equals_the_validated_copy_and_still_refuses_what_would_break_a_fit():
    from inference.population import _unchecked_replace

    model = PopulationModel(("a", "b"), [0.0, 1.0], ("a", "b"), np.diag([0.1, 0.2]),
                            ResidualError("additive", additive=1.0), omega_structure="full")
    fast = _unchecked_replace(model, theta=[0.5, 1.5], omega=[[0.2, 0.05], [0.05, 0.3]])
    slow = model.replace(theta=[0.5, 1.5], omega=[[0.2, 0.05], [0.05, 0.3]])
    for field in ("parameters", "random_effects", "error", "covariate_effects", "omega_structure"):
        assert getattr(fast, field) == getattr(slow, field)
    np.testing.assert_array_equal(fast.theta, slow.theta)
    np.testing.assert_array_equal(fast.omega, slow.omega)
    assert not fast.theta.flags.writeable and not fast.omega.flags.writeable
    # the optimizer's overflowing or non-positive-definite trial points are errors, as in the constructor
    with pytest.raises(ValueError, match="theta must be finite"):
        _unchecked_replace(model, theta=[np.inf, 0.0])
    with pytest.raises(ValueError, match="positive definite"):
        _unchecked_replace(model, omega=[[0.1, 0.2], [0.2, 0.1]])
