"""The compiled (Numba) mode-search and gradient kernels against the numpy path they replace.

The numpy code in ``inference.estimation`` is the reference (itself checked against nlme's published
Theoph fit, central differences of the objective and scipy's optimizer in test_estimation.py and
test_mode_search.py); ``TRIALTWIN_FOCE_KERNEL=numpy`` selects it. Cases: Theoph (fm3Theo), Indometh
(SSbiexp, three random effects), and the simulated cases of the gradient test (combined error with a
full Omega, three covariate effects, two outputs with their own residual errors).

Tolerances: on the same modes the gradient and the modes' sensitivity agree to 1e-10 (the kernels do
the numpy path's arithmetic; only the order of a few sums and the LU/Cholesky rounding differ). A
mode search's result is a Newton iterate, and the two paths' solves round differently, so the modes
agree to ~1e-12 rather than bit for bit: everything from first differences (eta, -2 log L, the
expected information) agrees to 1e-10, the observed Hessian (second differences of the predictions,
whose rounding noise is ~eps / h^2 = 1e-8 relative at h = 1e-4) to 1e-6.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from inference import estimation_kernel
from inference.datasets import load_indometh, ssbiexp, ssfol
from inference.estimation import (BoundaryWarning, _objective_gradient, _Parameterization, _Stacked, find_modes,
                                  fit_population, objective_function)
from inference.population import CovariateEffect, ObservationData, PopulationModel, ResidualError, simulate_observations

pytest.importorskip("numba")
pytestmark = pytest.mark.unit

CASES = ["theoph", "indometh", "combined-full-omega", "covariates-three-effects", "two-outputs"]


def _pk_biomarker(phi, data):
    conc = ssfol(phi[:, :3], data)
    biomarker = 10.0 * (1.0 - conc / (conc + np.exp(phi[data.subject, 3])))
    return np.where(data.design["output"] == 0, conc, biomarker)


def case(name, theoph):
    """(structural, data, model) of a case, the model away from the optimum (as a fit starts)."""
    base = PopulationModel(("lKe", "lKa", "lCl"), [-2.5, 0.5, -3.0], ("lKa", "lCl"), np.diag([0.5, 0.5]) ** 2,
                           ResidualError("additive", additive=1.0))
    if name == "theoph":
        return ssfol, theoph, base
    if name == "indometh":
        return ssbiexp, load_indometh(), PopulationModel(
            ("A1", "lrc1", "A2", "lrc2"), [2.0, 0.5, 0.5, -1.0], ("A1", "lrc1", "A2"), np.diag([0.5, 0.3, 0.2]) ** 2,
            ResidualError("additive", additive=0.1))
    if name == "combined-full-omega":
        return ssfol, theoph, base.replace(error=ResidualError("combined", additive=0.3, proportional=0.1),
                                           omega=np.array([[0.36, 0.03], [0.03, 0.04]]), omega_structure="full")
    if name == "covariates-three-effects":
        data = theoph.replace(covariates={"wt": np.linspace(60, 90, theoph.n_subjects)})
        return ssfol, data, base.replace(
            error=ResidualError("combined", additive=0.4, proportional=0.15),
            covariate_effects=(CovariateEffect("lCl", "wt", "power", 70.0, 0.5),
                               CovariateEffect("lKe", "wt", "linear", 70.0, 0.01),
                               CovariateEffect("lKa", "wt", "exponential", 70.0, -0.01)),
            random_effects=("lKe", "lKa", "lCl"), omega=np.diag([0.1, 0.6, 0.2]) ** 2)
    truth = PopulationModel(("lKe", "lKa", "lCl", "lEC50"), [-2.3, 0.3, -3.2, 1.5], ("lKa", "lCl", "lEC50"),
                            np.diag([0.4, 0.25, 0.4]) ** 2,
                            (ResidualError("proportional", proportional=0.15), ResidualError("additive", additive=0.5)))
    times, outputs, n = np.array([0.5, 1.0, 3.0, 6.0, 12.0, 2.0, 4.0, 8.0]), np.array([0, 0, 0, 0, 0, 1, 1, 1]), 8
    design = ObservationData(np.repeat(np.arange(n), times.size), np.tile(times, n), np.full(n * times.size, np.nan),
                             design={"dose": np.full(n * times.size, 4.0), "output": np.tile(outputs, n)})
    data, _ = simulate_observations(truth, _pk_biomarker, design, seed=3)
    return _pk_biomarker, data, truth.replace(theta=[-2.2, 0.2, -3.3, 1.3])


def both_paths(monkeypatch, fn, counter):
    """``fn()`` on the numpy path (the kernel must not run) and on the compiled one (it must)."""
    monkeypatch.setenv("TRIALTWIN_FOCE_KERNEL", "numpy")
    calls = estimation_kernel.kernel_info()[counter]
    reference = fn()
    assert estimation_kernel.kernel_info()[counter] == calls
    monkeypatch.setenv("TRIALTWIN_FOCE_KERNEL", "auto")
    compiled = fn()
    assert estimation_kernel.kernel_info()[counter] > calls
    return compiled, reference


def assert_rel(got, want, rtol):
    got, want = np.asarray(got, float), np.asarray(want, float)
    scale = max(float(np.max(np.abs(want))), 1e-300)
    assert np.max(np.abs(got - want)) <= rtol * scale, (got, want)


@pytest.mark.parametrize("name", CASES)
def test_mode_search_matches_numpy_path(monkeypatch, theoph, name):
    structural, data, model = case(name, theoph)
    compiled, reference = both_paths(monkeypatch, lambda: find_modes(model, structural, data), "mode_calls")
    assert reference.converged.all() and np.array_equal(compiled.converged, reference.converged)
    assert compiled.n_iterations == reference.n_iterations
    assert np.max(np.abs(compiled.eta - reference.eta)) < 1e-10
    for field in ("data_term", "prior_term", "hessian"):
        assert_rel(getattr(compiled, field), getattr(reference, field), 1e-10)
    assert_rel(compiled.observed_hessian, reference.observed_hessian, 1e-6)
    assert_rel(objective_function(model, compiled), objective_function(model, reference), 1e-10)
    # a short search (a fit's first check) stops after the same iteration as the numpy path
    short, short_reference = both_paths(monkeypatch, lambda: find_modes(model, structural, data, max_iter=1),
                                        "mode_calls")
    assert short.n_iterations == short_reference.n_iterations == 1
    assert np.max(np.abs(short.eta - short_reference.eta)) < 1e-10


@pytest.mark.parametrize("name", CASES)
def test_gradient_matches_numpy_path_on_the_same_modes(monkeypatch, theoph, name):
    structural, data, model = case(name, theoph)
    monkeypatch.setenv("TRIALTWIN_FOCE_KERNEL", "numpy")
    modes = find_modes(model, structural, data)
    param = _Parameterization(model)
    x = param.pack(model)
    (gradient, sensitivity), (ref_gradient, ref_sensitivity) = both_paths(
        monkeypatch, lambda: _objective_gradient(param, x, model, modes, structural, data, _Stacked(structural, data)),
        "gradient_calls")
    assert_rel(gradient, ref_gradient, 1e-10)
    assert_rel(sensitivity, ref_sensitivity, 1e-10)


@pytest.mark.parametrize("name", ["theoph", "indometh", "two-outputs"])
def test_fit_matches_numpy_path(monkeypatch, theoph, name):
    """Whole fits (BFGS on the kernels' values and gradients): the same iterations, -2 log L equal to
    1e-10 and estimates to 1e-6 relative.

    The two paths take exp/log from different libraries (numpy's SIMD loops, chosen per CPU, and LLVM's
    libm), so their objectives differ by rounding, ~1e-12 relative; an optimum is only determined to
    about the square root of that along the objective's flat directions. 1e-8 held on the AMD EPYC
    hosts and failed on an AVX-512 Xeon (up to 1.2e-8 relative, objective still equal to 1e-10)."""
    structural, data, model = case(name, theoph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundaryWarning)  # Indometh's SD(lrc1) goes to ~0, on both paths
        compiled, reference = both_paths(
            monkeypatch, lambda: fit_population(model, structural, data, standard_errors=name == "theoph"),
            "gradient_calls")
    assert (compiled.n_iterations, compiled.n_evaluations) == (reference.n_iterations, reference.n_evaluations)
    assert compiled.boundary == reference.boundary
    assert compiled.objective == pytest.approx(reference.objective, rel=1e-10)
    got, want = np.array(list(compiled.estimates.values())), np.array(list(reference.estimates.values()))
    assert np.all(np.abs(got - want) <= 1e-6 * np.maximum(np.abs(want), 1e-2)), np.c_[got, want]
    if name == "theoph":
        # standard errors are forward differences (step 1e-4) of gradients whose own finite-difference
        # noise is ~1e-7: the two paths' SEs agree to that, not to 1e-10
        for key, value in reference.standard_errors.items():
            assert compiled.standard_errors[key] == pytest.approx(value, rel=1e-4)


@pytest.mark.parametrize("kernel", ["numpy", "auto"])
def test_a_singular_prior_precision_is_a_linalg_error_on_both_paths(monkeypatch, theoph, kernel):
    monkeypatch.setenv("TRIALTWIN_FOCE_KERNEL", kernel)
    model = case("theoph", theoph)[2]
    with pytest.raises(np.linalg.LinAlgError):
        find_modes(model, ssfol, theoph, prior_precision=np.zeros((2, 2)))
