"""Benchmark of population fitting and individual calibration against a straightforward scipy baseline.

Writes bench/results/population_bench.json with the machine description.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import scipy
from scipy import optimize, stats

from inference.calibration import calibrate_each
from inference.datasets import load_theoph, ssfol
from inference.estimation import fit_population
from inference.population import ObservationData, PopulationModel, ResidualError, simulate_observations
from _machine import cpu_model

N_PARTICIPANTS = 500


def machine() -> dict:
    cpu = cpu_model()
    return {
        "platform": platform.platform(),
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "note": "shared development VM (2 cores, other jobs running): absolute times are noisy, ratios less so",
    }


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def baseline_calibration(model: PopulationModel, data: ObservationData) -> np.ndarray:
    """One scipy BFGS MAP per participant (the obvious loop), Gaussian covariance from BFGS's inverse Hessian."""
    omega_inv = np.linalg.inv(model.omega)
    means = []
    for i in range(data.n_subjects):
        one = data.select_subjects([i])

        def neg_log_post(eta: np.ndarray) -> float:
            phi = model.theta.copy()
            phi[model.random_index] += eta
            f = ssfol(phi[None], one)
            sd = np.sqrt(model.error.additive**2 + (model.error.proportional * f) ** 2)
            return -stats.norm.logpdf(one.value, f, sd).sum() + 0.5 * eta @ omega_inv @ eta

        res = optimize.minimize(neg_log_post, np.zeros(model.n_random_effects), method="BFGS")
        means.append(model.theta[model.random_index] + res.x)
    return np.array(means)


def main() -> None:
    results: dict = {"machine": machine()}

    start_model = PopulationModel(("lKe", "lKa", "lCl"), [-2.5, 0.5, -3.0], ("lKa", "lCl"),
                                  np.diag([0.5, 0.5]) ** 2, ResidualError("additive", additive=1.0))
    theoph = load_theoph()
    fit_time, fit = best_of(lambda: fit_population(start_model, ssfol, theoph))
    results["theoph_fit"] = {
        "seconds_with_standard_errors": fit_time,
        "objective": fit.objective,
        "theta": dict(zip(fit.model.parameters, fit.model.theta.tolist())),
        "sigma": fit.model.error.additive,
        "bfgs_iterations": fit.n_iterations,
        "mode_searches": fit.n_evaluations,
    }
    print(f"Theoph FOCE fit incl. standard errors: {fit_time:.2f} s ({fit.n_evaluations} all-subject mode searches)")

    population = PopulationModel(("lKe", "lKa", "lCl"), [-2.3, 0.3, -3.2], ("lKa", "lCl"),
                                 np.diag([0.4, 0.25]) ** 2, ResidualError("combined", additive=0.2, proportional=0.1))
    times = np.array([0.5, 1.0, 2.0, 4.0, 6.0])
    t = np.tile(times, N_PARTICIPANTS)
    design = ObservationData(np.repeat(np.arange(N_PARTICIPANTS), times.size), t, np.full(t.size, np.nan),
                             design={"dose": np.full(t.size, 4.0)})
    data, _ = simulate_observations(population, ssfol, design, seed=1)
    ours_time, posteriors = best_of(lambda: calibrate_each(population, ssfol, data))
    base_time, base_means = best_of(lambda: baseline_calibration(population, data), repeats=1)
    ours_means = np.array([p.mean for p in posteriors])
    agreement = float(np.max(np.abs(ours_means - base_means)))
    results["calibration"] = {
        "participants": N_PARTICIPANTS,
        "observations_each": int(times.size),
        "vectorized_calibrate_each_seconds": ours_time,
        "baseline_scipy_bfgs_loop_seconds": base_time,
        "speedup": base_time / ours_time,
        "max_abs_difference_of_map": agreement,
        "baseline": "per-participant scipy.optimize.minimize(BFGS) of the negative log posterior (MAP only)",
    }
    print(f"calibrate {N_PARTICIPANTS} participants: vectorized {ours_time:.3f} s, scipy loop {base_time:.3f} s, "
          f"ratio {base_time / ours_time:.1f}x; max |MAP difference| {agreement:.1e}")
    out = Path(__file__).parent / "results" / "population_bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
