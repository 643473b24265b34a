"""A/B of the population fit against an earlier revision, in one process: best-of-N CPU time.

Loads ``inference/estimation.py`` and ``inference/datasets.py`` of a git revision (default: the
commit before this work, ``3cd8f07``) as separate modules next to the working tree's, and fits
Theoph (fm3Theo) and Indometh (SSbiexp; data exported from R, see population_profile.py) with
both, alternating, so that both sides see the same load. Writes bench/results/population_ab.json
with the CPU times, their ratio, the structural calls with derivatives (Newton iterations) and the
largest difference between the two fits' estimates and objectives.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import inference.datasets as datasets_new
import inference.estimation as estimation_new
from inference.datasets import load_theoph
from population_bench import machine
from population_profile import INDOMETH_START, START, load_indometh

ROOT = Path(__file__).resolve().parents[1]


def load_revision(rev: str, tmp: Path) -> tuple:
    modules = []
    for name in ("estimation", "datasets"):
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:inference/{name}.py"], check=True,
                                capture_output=True, text=True).stdout
        path = tmp / f"{name}_{rev}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        modules.append(module)
    return tuple(modules)


def count_newton(estimation, *args) -> tuple[int, object]:
    calls = {"n": 0}
    original = estimation._predict_with_derivatives

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    estimation._predict_with_derivatives = counting
    try:
        fit = estimation.fit_population(*args)
    finally:
        estimation._predict_with_derivatives = original
    return calls["n"], fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", default="3cd8f07")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="variance of")  # Indometh: SD(lrc1) at the boundary, both sides
    with tempfile.TemporaryDirectory() as tmp:
        estimation_old, datasets_old = load_revision(args.baseline, Path(tmp))
        sides = {"baseline": (estimation_old, datasets_old), "current": (estimation_new, datasets_new)}
        cases = {"theoph_fm3Theo": (START, "ssfol", load_theoph()),
                 "indometh_biexponential": (INDOMETH_START, "ssbiexp", load_indometh())}
        result = {"machine": machine(), "baseline_revision": args.baseline,
                  "note": f"CPU time, best of {args.repeats}, both sides alternating in one process; fits with "
                          "standard errors; current_over_baseline < 1 means the current code is faster"}
        for case, (start, structural, data) in cases.items():
            best, fits, newton = {}, {}, {}
            for side, (estimation, datasets) in sides.items():
                newton[side], fits[side] = count_newton(estimation, start, getattr(datasets, structural), data)
                best[side] = np.inf
            for _ in range(args.repeats):
                for side, (estimation, datasets) in sides.items():
                    t = time.process_time()
                    estimation.fit_population(start, getattr(datasets, structural), data)
                    best[side] = min(best[side], time.process_time() - t)
            result[case] = {
                "cpu_seconds": best,
                "current_over_baseline": best["current"] / best["baseline"],
                "newton_iterations_all_searches": newton,
                "mode_searches": {side: fit.n_evaluations for side, fit in fits.items()},
                "max_abs_estimate_difference": float(max(abs(fits["current"].estimates[k] - fits["baseline"].estimates[k])
                                                         for k in fits["current"].estimates)),
                "objective_difference": fits["current"].objective - fits["baseline"].objective,
            }
            print(f"{case}: baseline {best['baseline'] * 1e3:.1f} ms, current {best['current'] * 1e3:.1f} ms "
                  f"(x{best['current'] / best['baseline']:.3f}); Newton iterations {newton['baseline']} -> "
                  f"{newton['current']}; max |estimate difference| {result[case]['max_abs_estimate_difference']:.1e}")
    out = ROOT / "bench" / "results" / "population_ab.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
