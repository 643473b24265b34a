"""Where a population fit's time goes: cProfile of the Theoph FOCEI fit (fm3Theo, with standard errors),
or with ``--data indometh`` of the Indometh biexponential fit (nlme's SSbiexp on R's datasets::Indometh,
as shipped in inference/data). ``TRIALTWIN_FOCE_KERNEL=numpy`` profiles the numpy path instead of
the compiled kernels (the result records which ran).

Writes bench/results/population_profile-<label>.json (``-indometh-<label>`` for Indometh): CPU time (best of a few unprofiled runs), the
number of all-subject mode searches and BFGS iterations, and the profile's internal time grouped
by what it is spent on (structural model, mode search, outer gradient, optimizer and the rest) plus
the top functions. Run it on another checkout's ``inference`` with
``PYTHONPATH=/path/to/checkout python bench/population_profile.py --label before``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import sys
import warnings
import json
import pstats
import time
from pathlib import Path

import numpy as np

import inference
from inference import estimation_kernel
from inference.datasets import load_theoph, ssbiexp, ssfol
from inference.estimation import BoundaryWarning, fit_population
from inference.population import PopulationModel, ResidualError
from population_bench import machine

START = PopulationModel(("lKe", "lKa", "lCl"), [-2.5, 0.5, -3.0], ("lKa", "lCl"), np.diag([0.5, 0.5]) ** 2,
                        ResidualError("additive", additive=1.0))

INDOMETH_START = PopulationModel(("A1", "lrc1", "A2", "lrc2"), [2.0, 0.5, 0.5, -1.0], ("A1", "lrc1", "A2"),
                                 np.diag([0.5, 0.3, 0.2]) ** 2, ResidualError("additive", additive=0.1))


def load_indometh():
    """R's datasets::Indometh as shipped in inference/data (bench/population_bench.py checks that copy
    against R's own in every run)."""
    from inference.datasets import load_indometh as shipped
    return shipped()


# which function (by file:name) counts towards which part of a fit
GROUPS = {
    "structural model (ssfol / ssbiexp, numpy)": ("datasets.py:ssfol", "datasets.py:ssbiexp"),
    "mode search (Newton iterations, finite-difference stacking)": (
        "estimation.py:_find_modes", "estimation.py:_find_modes_compiled", "estimation.py:at_points",
        "estimation.py:_row_constants", "estimation.py:_error_arrays", "estimation.py:gradient_and_hessian", "estimation.py:evaluate",
        "estimation.py:terms", "estimation.py:_predict_with_derivatives", "estimation.py:shifted",
        "estimation.py:__call__", "estimation.py:_data", "estimation.py:find_modes", "estimation.py:_per_subject_sum",
        "population.py:predict", "population.py:residual_variance", "population.py:_variance_slope",
        "population.py:_error_coefficients", "population.py:_errors", "population.py:typical_parameters"),
    "outer gradient and information (analytical)": (
        "estimation.py:_objective_gradient", "estimation.py:_objective_gradient_compiled", "estimation.py:_phi_derivatives", "estimation.py:_subject_sums",
        "estimation.py:_linearized_information", "estimation.py:_padded", "estimation.py:omega_slopes",
        "estimation.py:_error_rows", "estimation.py:_shift_slope"),
    "compiled kernels (mode-search step, gradient, log det; Numba)": ("estimation_kernel.py",),
    "outer objective by finite differences (stacked searches)": (
        "estimation.py:_batched_objectives", "estimation.py:_central_gradients", "estimation.py:evaluate_many",
        "estimation.py:_tile_subjects", "estimation.py:grad"),
    "optimizer and parameter mapping": (
        "estimation.py:_bfgs", "estimation.py:unpack", "estimation.py:pack", "population.py:_unchecked_replace",
        "estimation.py:fun", "estimation.py:fun_tracked", "estimation.py:value_and_gradient",
        "estimation.py:objective_function", "_optimize.py", "_linesearch.py", "_differentiable_functions.py"),
}

# inclusive times worth reading on their own: all mode searches, the outer gradient (analytical, or
# by stacked finite differences before), BFGS's starting information, the structural model
CUMULATIVE = ("estimation.py:_find_modes", "estimation.py:_objective_gradient",
              "estimation_kernel.py:mode_search_step", "estimation_kernel.py:objective_gradient_terms",
              "estimation.py:_batched_objectives", "estimation.py:_linearized_information", "datasets.py:ssfol",
              "datasets.py:ssbiexp")


def group_of(filename: str, name: str) -> str:
    key = f"{Path(filename).name}:{name}"
    for group, members in GROUPS.items():
        if any(key == m or Path(filename).name == m for m in members):
            return group
    return "numpy, linear algebra and the rest"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--label", default="after")
    parser.add_argument("--data", choices=("theoph", "indometh"), default="theoph")
    args = parser.parse_args()
    warnings.simplefilter("ignore", BoundaryWarning)  # Indometh: SD(lrc1) goes to the boundary, as expected
    if args.data == "theoph":
        start_model, structural, data = START, ssfol, load_theoph()
        description = "Theoph fm3Theo (lKe, lKa, lCl; random lKa, lCl diagonal; additive error), ML, with standard errors"
    else:
        start_model, structural, data = INDOMETH_START, ssbiexp, load_indometh()
        description = ("Indometh SSbiexp (A1, lrc1, A2, lrc2; random A1, lrc1, A2 diagonal; additive error), ML, "
                       "with standard errors")
    # structural calls with derivatives in the mode searches: one per Newton iteration (on the numpy
    # path through _predict_with_derivatives, on the compiled one through _Stacked.at_points)
    calls = {"n": 0}
    counted = inference.estimation._Stacked.at_points

    def counting(self, *a, **k):
        frame, in_search = sys._getframe(1), False
        while frame is not None and not in_search:
            in_search = frame.f_code.co_name in ("_find_modes", "_find_modes_compiled")
            frame = frame.f_back
        calls["n"] += in_search
        return counted(self, *a, **k)

    inference.estimation._Stacked.at_points = counting
    fit_population(start_model, structural, data)  # warm caches (tiled data) as a fit in a server would find them
    newton_iterations = calls["n"]
    inference.estimation._Stacked.at_points = counted
    best = np.inf
    for _ in range(5):
        start = time.process_time()
        fit = fit_population(start_model, structural, data)
        best = min(best, time.process_time() - start)
    profile = cProfile.Profile(time.process_time)  # CPU time: other jobs share the cores
    profile.enable()
    fit_population(start_model, structural, data)
    profile.disable()
    stats = pstats.Stats(profile).stats
    total = sum(v[2] for v in stats.values())
    groups: dict[str, float] = {}
    rows = []
    for (filename, _, name), (_, ncalls, tottime, cumtime, _) in stats.items():
        group = group_of(filename, name)
        groups[group] = groups.get(group, 0.0) + tottime
        rows.append({"function": f"{Path(filename).name}:{name}", "calls": ncalls, "internal_seconds": tottime,
                     "cumulative_seconds": cumtime})
    rows.sort(key=lambda r: -r["internal_seconds"])
    cumulative: dict[str, float] = {}
    for row in rows:
        if row["function"] in CUMULATIVE:
            cumulative[row["function"]] = cumulative.get(row["function"], 0.0) + row["cumulative_seconds"]
    result = {
        "machine": machine(),
        "label": args.label,
        "inference_package": str(Path(inference.__file__).parent),
        "kernel": "numba" if estimation_kernel.kernel_wanted() else "numpy",
        "TRIALTWIN_FOCE_KERNEL": os.environ.get("TRIALTWIN_FOCE_KERNEL", "auto"),
        "fit": description,
        "cpu_seconds_best_of_5_unprofiled": best,
        "objective": fit.objective,
        "mode_searches": fit.n_evaluations,
        "bfgs_iterations": fit.n_iterations,
        "newton_iterations_all_searches": newton_iterations,
        "profiled_seconds": total,
        "share_of_profiled_time": {k: round(v / total, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        # inclusive time (numpy calls counted with the function that makes them)
        "cumulative_share": {name: round(cumulative.get(name, 0.0) / total, 3) for name in CUMULATIVE},
        "top_functions": rows[:15],
    }
    name = args.label if args.data == "theoph" else f"indometh-{args.label}"
    out = Path(__file__).parent / "results" / f"population_profile-{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}: {best:.3f} s CPU, {fit.n_evaluations} mode searches, {fit.n_iterations} iterations, "
          f"{newton_iterations} Newton iterations (structural calls with derivatives)")
    for k, v in result["share_of_profiled_time"].items():
        print(f"  {v:6.1%}  {k}")
    for k, v in result["cumulative_share"].items():
        print(f"  {v:6.1%}  {k} (inclusive)")


if __name__ == "__main__":
    main()
