"""Which compiled kernel helps: the population fit with the mode-search kernel, the gradient kernel,
both, or neither (the numpy path), alternating in one process, best CPU time of 10 (with standard errors).

Theoph (fm3Theo) and Indometh (SSbiexp, the shipped copy of R's datasets::Indometh). Each kernel is
switched by intercepting ``estimation_kernel.kernel_wanted`` at its one call site (``_find_modes``
for the mode search, ``_objective_gradient`` for the gradient). Writes
bench/results/population_kernel_ab.json with the machine description.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from inference import estimation_kernel
from inference.datasets import load_indometh, load_theoph, ssbiexp, ssfol
from inference.estimation import BoundaryWarning, fit_population
from population_bench import machine
from population_profile import INDOMETH_START, START

REPEATS = 10
CONFIGS = {"numpy path": (False, False), "mode-search kernel only": (True, False),
           "gradient kernel only": (False, True), "both kernels": (True, True)}


def main() -> None:
    warnings.simplefilter("ignore", BoundaryWarning)
    wanted = estimation_kernel.kernel_wanted

    def switch(modes: bool, gradient: bool):
        def kernel_wanted() -> bool:
            caller = sys._getframe(1).f_code.co_name
            return (modes if caller == "_find_modes" else gradient) and wanted()
        return kernel_wanted

    results: dict = {"machine": machine(), "repeats": REPEATS, "fits": {}}
    try:
        for name, start, structural, data in (("theoph", START, ssfol, load_theoph()),
                                              ("indometh", INDOMETH_START, ssbiexp, load_indometh())):
            best = {k: np.inf for k in CONFIGS}
            objectives = {}
            for _ in range(REPEATS):
                for config, (modes, gradient) in CONFIGS.items():
                    estimation_kernel.kernel_wanted = switch(modes, gradient)
                    t0 = time.process_time()
                    fit = fit_population(start, structural, data)
                    best[config] = min(best[config], time.process_time() - t0)
                    objectives[config] = fit.objective
            results["fits"][name] = {
                "cpu_seconds_best_of_10": best,
                "ratio_to_numpy_path": {k: v / best["numpy path"] for k, v in best.items()},
                "minus2loglik": objectives,
            }
            print(name, ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items()))
    finally:
        estimation_kernel.kernel_wanted = wanted
    out = Path(__file__).parent / "results" / "population_kernel_ab.json"
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
