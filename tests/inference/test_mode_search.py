"""The mode search's cost structure (stacked finite differences, calls per iteration) and that its
faster path still lands on the optimum of the log posterior, checked against scipy's optimizer."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize

from inference import twin
from inference.model_definition import example_regimen
from inference.datasets import ssfol
from inference.estimation import _Stacked, find_modes
from inference.population import (PopulationModel, ResidualError, predict, residual_log_likelihood,
                                  typical_parameters)

pytestmark = pytest.mark.unit

MODEL = example_regimen()

THEOPH_MODEL = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
                               np.diag([0.64, 0.17]) ** 2, ResidualError("combined", additive=0.3, proportional=0.1))


class Counting:
    """A structural model that records the number of subjects of each call it answers."""

    def __init__(self, structural):
        self.structural = structural
        self.subjects: list[int] = []

    def __call__(self, phi, data):
        self.subjects.append(data.n_subjects)
        return self.structural(phi, data)


def _tt201_participant(shift, seed=5, days=112, visit_days=(0, 28, 56, 84, 112)):
    """A participant simulated from the twin at the typical values shifted by ``shift`` (with assay noise)."""
    rng = np.random.default_rng(seed)
    truth = np.array(MODEL.population.theta, dtype=float)
    truth[MODEL.population.random_index] += np.asarray(shift)
    outputs, times = [], []
    for d in visit_days:
        outputs += [0, 1, 2]
        times += [24.0 * d + rng.uniform(1.0, 10.0), 24.0 * d + 2.0, 24.0 * d + 2.0]
    data = twin.ParticipantData(24.0 * np.arange(days), np.full(days, 100.0), outputs, times,
                                np.full(len(times), np.nan), {"WT": 85.0, "EGFR": 80.0})
    f = MODEL.structural(truth[None, :], data.observation_data())
    out = np.asarray(outputs)
    sd = np.sqrt(np.where(out == 0, 1.0 + (0.15 * f) ** 2, np.where(out == 1, 64.0, 0.0144)))
    return data.replace(obs_values=f + sd * rng.standard_normal(f.shape))


def test_stacked_points_equal_separate_calls(theoph):
    rng = np.random.default_rng(0)
    typical = typical_parameters(THEOPH_MODEL, theoph)
    points = [typical + rng.normal(0, 0.1, typical.shape) for _ in range(5)]
    stacked = _Stacked(ssfol, theoph)
    for together, alone in zip(stacked(points), points):
        assert np.array_equal(together, predict(ssfol, alone, theoph))

    data = _tt201_participant(np.zeros(7)).observation_data()
    phi = np.asarray(MODEL.population.theta)[None, :]
    points = [phi + rng.normal(0, 0.05, phi.shape) for _ in range(9)]
    for together, alone in zip(_Stacked(MODEL.structural, data)(points), points):
        assert np.allclose(together, MODEL.structural(alone, data), rtol=1e-12, atol=0)


def test_stacked_calls_are_split_beyond_the_row_budget(theoph):
    rng = np.random.default_rng(1)
    typical = typical_parameters(THEOPH_MODEL, theoph)
    points = [typical + rng.normal(0, 0.1, typical.shape) for _ in range(7)]
    counting = Counting(ssfol)
    small = _Stacked(counting, theoph)
    small.per_call = 3
    split = small(points)
    assert counting.subjects == [3 * 12, 3 * 12, 12]
    whole = _Stacked(ssfol, theoph)(points)
    assert all(np.array_equal(a, b) for a, b in zip(split, whole))


def test_mode_search_costs_one_structural_call_per_iteration(theoph):
    counting = Counting(ssfol)
    modes = find_modes(THEOPH_MODEL, counting, theoph)
    assert modes.converged.all()
    q = THEOPH_MODEL.n_random_effects
    # one stacked call per iteration: the trial point with its 2q + q(q-1) finite-difference points
    assert set(counting.subjects) == {theoph.n_subjects * (1 + 2 * q + q * (q - 1))}
    assert len(counting.subjects) <= modes.n_iterations + 1
    reference = find_modes(THEOPH_MODEL, ssfol, theoph)
    assert np.array_equal(modes.eta, reference.eta)


def _neg_log_posterior(model, data, eta):
    typical = typical_parameters(model, data)
    phi = typical.copy()
    phi[:, model.random_index] += eta
    f = predict(MODEL.structural, phi, data)
    loglik = residual_log_likelihood(model.error, data.value, f, data.design["output"]).sum()
    return -2.0 * loglik + eta @ np.linalg.solve(model.omega, eta)


def test_a_far_glucose_offset_is_reached_in_a_few_iterations():
    """Baseline glucose 35 mg/dL above the ADAG line (2.3 prior SDs of FPG0dev): with the step
    limit in prior SDs for linear-scale effects the search takes a handful of iterations; an
    absolute limit of 2 (right for log-scale effects) made it walk there in 2 mg/dL steps (24)."""
    data = _tt201_participant([0, 0, 0, 0, 0, 0, 35.0]).observation_data()
    modes = find_modes(MODEL.population, MODEL.structural, data)
    assert modes.converged.all()
    assert modes.eta[0, 6] > 20.0
    assert modes.n_iterations <= 10


def test_tt201_mode_is_the_optimum_scipy_finds():
    """The mode search (stacked derivatives, exact-Hessian steps) lands where scipy's BFGS on the same
    log posterior lands: an independent optimizer, started from the prior."""
    model = MODEL.population
    data = _tt201_participant([0.2, -0.1, 0.1, 0.1, -0.3, 0.5, 35.0]).observation_data()
    modes = find_modes(model, MODEL.structural, data)
    assert modes.converged.all()
    eta = modes.eta[0]
    scale = np.sqrt(np.diag(model.omega))
    result = optimize.minimize(lambda z: _neg_log_posterior(model, data, z * scale), np.zeros_like(eta),
                               method="BFGS", options={"gtol": 1e-7, "maxiter": 2000})
    ours = _neg_log_posterior(model, data, eta)
    assert ours <= result.fun + 1e-6
    posterior_sd = np.sqrt(np.diag(np.linalg.inv(modes.observed_hessian[0])))
    assert np.all(np.abs(result.x * scale - eta) < 0.01 * posterior_sd), (result.x * scale - eta) / posterior_sd



@pytest.mark.parametrize("error", [ResidualError("additive", additive=0.7),
                                   ResidualError("combined", additive=0.5, proportional=0.1)])
def test_last_newton_step_without_evaluation_keeps_modes_and_objective(monkeypatch, error):
    # the search takes its last Newton step (all steps < _LAST_STEP) without evaluating the model
    # there, moving Q and the expected information with the step; the same search with that
    # shortcut switched off (one more evaluation per search) is the reference
    from inference import estimation
    from inference.datasets import load_theoph
    data = load_theoph()
    model = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
                            np.diag([0.64, 0.17]) ** 2, error)
    rng = np.random.default_rng(3)
    for _ in range(5):
        point = model.replace(theta=model.theta + 0.05 * rng.standard_normal(3))
        start = find_modes(point.replace(theta=point.theta + 0.02), ssfol, data).eta  # a warm start nearby
        fast = find_modes(point, ssfol, data, eta0=start)
        with monkeypatch.context() as m:
            m.setattr(estimation, "_LAST_STEP", 0.0)
            full = find_modes(point, ssfol, data, eta0=start)
        assert fast.converged.all() and full.converged.all()
        assert fast.n_iterations == full.n_iterations - 1  # the shortcut was taken
        np.testing.assert_allclose(fast.eta, full.eta, atol=1e-8)
        np.testing.assert_allclose(fast.hessian, full.hessian, rtol=1e-6)
        assert abs(estimation.objective_function(point, fast) - estimation.objective_function(point, full)) < 1e-7
