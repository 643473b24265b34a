"""Global sensitivity analysis: Sobol indices of any vectorized model, and of a daily-regimen
definition's drug effect over its variable parameters and adherence.

Sampling (Sobol sequence, Saltelli scheme) and estimation are SALib's; this module adapts models.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from inference.pk import DailyOneCompartmentOral
from inference.regimen import with_derived

__all__ = [
    "sobol_indices",
    "regimen_factors",
    "regimen_drug_effect",
    "regimen_sensitivity",
    "plot_sensitivity",
]
#: z of the 5th and 95th percentiles: the factor ranges span the middle 90 % of the population prior
_Z90 = 1.6448536269514722


def sobol_indices(model: Callable[[np.ndarray], np.ndarray], bounds: Sequence[tuple[float, float]],
                  names: Sequence[str] | None = None, n_base: int = 2 ** 12, seed: int = 0,
                  num_resamples: int = 100, executor=None, chunk_size: int = 8192) -> list[dict]:
    """First-order and total Sobol indices of ``model`` over independent uniform inputs.

    Parameters
    ----------
    model : callable
        Vectorized model ``f(X) -> Y`` with ``X`` of shape ``(N, d)`` and ``Y`` of shape ``(N,)``.
    bounds : sequence of (low, high)
        Uniform range of each of the ``d`` inputs.
    names : sequence of str, optional
        Input names (``x1 .. xd`` by default).
    n_base : int
        Base sample size, a power of 2; the model is evaluated ``n_base * (d + 2)`` times.
    seed : int
        Seed of the scrambled Sobol sequence and of the bootstrap confidence intervals.
    num_resamples : int
        Bootstrap resamples of the confidence intervals.
    executor : optional
        Where the model runs: None in this process, in one call; otherwise anything with
        ``submit(fn, *args)`` (a ``dask.distributed.Client``, a ``concurrent.futures`` executor)
        gets the sample in row chunks of ``chunk_size``. The indices are identical to the
        in-process run when ``model`` treats rows independently (as a vectorized model does);
        on a cluster of processes ``model`` must pickle (a module-level function, or a closure
        that cloudpickle can send).
    chunk_size : int
        Rows per chunk sent to ``executor``.

    Returns
    -------
    list of dict
        One row per input, ranked by total index: ``name``, ``S1``, ``S1_conf``, ``ST``,
        ``ST_conf`` (95 % bootstrap half-widths).

    Examples
    --------
    >>> rows = sobol_indices(lambda x: x[:, 0] + 0.1 * x[:, 1], [(0, 1), (0, 1)], ["a", "b"], 2 ** 10)
    >>> [r["name"] for r in rows], round(rows[0]["S1"], 2)
    (['a', 'b'], 0.99)
    """
    from SALib.analyze import sobol as sobol_analyze
    from SALib.sample import sobol as sobol_sample

    bounds = [tuple(map(float, b)) for b in bounds]
    d = len(bounds)
    if d < 2:
        raise ValueError("Sobol indices need at least two inputs")
    if any(not (lo < hi) or not (math.isfinite(lo) and math.isfinite(hi)) for lo, hi in bounds):
        raise ValueError("every bound must be a finite (low, high) with low < high")
    names = [f"x{i + 1}" for i in range(d)] if names is None else list(names)
    if len(names) != d or len(set(names)) != d:
        raise ValueError("names must be unique and one per input")
    if n_base < 2 or n_base & (n_base - 1):
        raise ValueError("n_base must be a power of 2")
    problem = {"num_vars": d, "names": names, "bounds": [list(b) for b in bounds]}
    x = sobol_sample.sample(problem, n_base, calc_second_order=False, seed=seed)
    if executor is None:
        y = np.asarray(model(x), dtype=float)
    else:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        futures = [executor.submit(model, x[i:i + chunk_size]) for i in range(0, x.shape[0], chunk_size)]
        y = np.concatenate([np.atleast_1d(np.asarray(f.result(), dtype=float)) for f in futures])
    if y.shape != (x.shape[0],):
        raise ValueError(f"model must return shape ({x.shape[0]},), got {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("model returned non-finite values")
    res = sobol_analyze.analyze(problem, y, calc_second_order=False, num_resamples=num_resamples,
                                seed=seed)
    rows = [{"name": names[i], "S1": float(res["S1"][i]), "S1_conf": float(res["S1_conf"][i]),
             "ST": float(res["ST"][i]), "ST_conf": float(res["ST_conf"][i])} for i in range(d)]
    return sorted(rows, key=lambda r: -r["ST"])


def regimen_factors(model, adherence: tuple[float, float] = (0.6, 1.0)) -> dict[str, tuple[float, float]]:
    """Inputs of :func:`regimen_drug_effect` and their ranges: every parameter with inter-individual
    variability over the middle 90 % of its population distribution (natural scale, typical covariates),
    and ``adherence`` (share of doses taken).

    Examples
    --------
    >>> from inference.model_definition import example_regimen
    >>> f = regimen_factors(example_regimen())
    >>> [round(x, 2) for x in f["CL"]], f["adherence"]
    ([3.05, 8.19], (0.6, 1.0))
    """
    pop = model.population
    theta, sd = np.asarray(pop.theta, dtype=float), pop.omega_sd
    scales = {name: scale for name, scale, _ in model.parameters}
    out = {}
    for name, j, s in zip(pop.random_effects, pop.random_index, sd):
        lo, hi = theta[j] - _Z90 * s, theta[j] + _Z90 * s
        out[name] = (float(np.exp(lo)), float(np.exp(hi))) if scales[name] == "log" else (float(lo), float(hi))
    out["adherence"] = (float(adherence[0]), float(adherence[1]))
    return out


def regimen_drug_effect(model, x: np.ndarray, names: Sequence[str], dose: float, n_days: int = 168) -> np.ndarray:
    """Drug effect on the disease output (or, without a disease model, on the PD output) after ``n_days``
    of once-daily ``dose``: the model's biomarker pathway with natural drift excluded.

    Columns of ``x`` are natural values of the parameters ``names`` (others stay typical, derived ones
    follow), ``"adherence"`` scales the expected daily dose (mean behaviour, no randomness). The daily
    average concentration drives the Emax activity, followed with the disease model's first-order onset,
    exactly as in :func:`inference.cohort.simulate_cohort`.

    Examples
    --------
    >>> from inference.model_definition import example_regimen
    >>> m = example_regimen()
    >>> x = np.array([[5.0, 50.0, 1.0, 45.0, 0.5, 1.0]])
    >>> float(np.round(regimen_drug_effect(m, x, ["CL", "V", "KA", "EMAX", "EC50", "adherence"], 100.0), 2)[0])
    -0.88
    """
    x = np.asarray(x, dtype=float)
    names = list(names)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"x must have shape (N, {len(names)})")
    n = x.shape[0]
    typical = model.named(np.asarray(model.population.theta, dtype=float)[None, :])
    declared = {p["name"] for p in model.definition.document["parameters"]}
    values = {k: np.repeat(v, n) for k, v in typical.items() if k in declared}
    adherence = np.ones(n)
    for j, name in enumerate(names):
        if name == "adherence":
            adherence = x[:, j]
        elif name in declared:
            values[name] = x[:, j]
        else:
            raise ValueError(f"unknown factor {name!r}")
    p = model.roles(with_derived(model.definition.document, values), n)
    pk = DailyOneCompartmentOral(cl=p["cl"], v=p["v"], ka=p["ka"], tlag=p["tlag"], f=p["f"])
    state = pk.start(n)
    daily = dose * adherence
    a = 1.0 - np.exp(-p["k_onset"]) if "k_onset" in p else 1.0
    offset = np.zeros(n)
    for _ in range(n_days):
        state, c = pk.step(state, daily)
        offset += a * (c / (p["ec50"] + c) - offset)
    effect = p["sign"] * p["emax"]
    if "base" not in p:
        return effect * offset  # no disease model: no onset (a = 1), the last day's activity
    return p["effscale"] * effect * offset


def regimen_sensitivity(model, dose: float, n_days: int = 168, n_base: int = 2 ** 12, seed: int = 0) -> list[dict]:
    """Ranked Sobol table of a daily-regimen model's drug effect over :func:`regimen_factors`.

    Examples
    --------
    >>> from inference.model_definition import example_regimen
    >>> m = example_regimen()
    >>> rows = regimen_sensitivity(m, 100.0, n_base=2 ** 8)
    >>> sorted(r["name"] for r in rows) == sorted(regimen_factors(m))
    True
    """
    factors = regimen_factors(model)
    names = list(factors)
    return sobol_indices(lambda x: regimen_drug_effect(model, x, names, dose, n_days), list(factors.values()), names,
                         n_base=n_base, seed=seed)


def plot_sensitivity(rows: Sequence[dict], path, title: str = "Sobol indices") -> str:
    """Write a horizontal bar chart of S1 and ST (with 95 % intervals) as a PNG; return the path.

    Examples
    --------
    >>> import tempfile, os
    >>> rows = [{"name": "a", "S1": 0.6, "S1_conf": 0.02, "ST": 0.7, "ST_conf": 0.03}]
    >>> out = plot_sensitivity(rows, os.path.join(tempfile.mkdtemp(), "s.png"))
    >>> out.endswith("s.png") and os.path.getsize(out) > 1000
    True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    if not rows:
        raise ValueError("no sensitivity rows to plot")
    names = [r["name"] for r in rows][::-1]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    ax.barh(y + 0.2, [r["S1"] for r in rows][::-1], 0.4, xerr=[r["S1_conf"] for r in rows][::-1],
            label="first order S1")
    ax.barh(y - 0.2, [r["ST"] for r in rows][::-1], 0.4, xerr=[r["ST_conf"] for r in rows][::-1],
            label="total ST")
    ax.set_yticks(y, names)
    ax.set_xlabel("Sobol index")
    ax.set_xlim(left=min(0.0, min(r["S1"] for r in rows)))
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
