"""Global sensitivity analysis: Sobol indices of any vectorized model, and the TT-201 ranking.

Sampling (Sobol sequence, Saltelli scheme) and estimation are SALib's; this module adapts models.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from inference.pk import DailyOneCompartmentOral

__all__ = [
    "sobol_indices",
    "TT201_FACTORS",
    "tt201_week24_change",
    "tt201_sensitivity",
    "plot_sensitivity",
]


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


#: inputs of the TT-201 week-24 HbA1c change and their ranges (about the 5th-95th percentiles
#: of the population model in :mod:`inference.cohort`, adherence from 60 % to full)
TT201_FACTORS = {
    "cl_L_per_h": (2.5, 10.0),
    "v_L": (30.0, 80.0),
    "ka_per_h": (0.5, 2.0),
    "ec50_mg_per_L": (0.2, 1.2),
    "fpg_emax_mg_per_dL": (30.0, 65.0),
    "hba1c_delay_days": (25.0, 60.0),
    "adherence": (0.6, 1.0),
}


def tt201_week24_change(x: np.ndarray, dose_mg: float = 100.0, n_days: int = 168,
                        tlag_h: float = 0.5, f: float = 0.8) -> np.ndarray:
    """Drug effect on HbA1c (%, negative = improvement) after ``n_days`` of once-daily dosing.

    Columns of ``x`` follow :data:`TT201_FACTORS`. Adherence scales the expected daily dose
    (mean behaviour, no randomness), the daily average concentration drives an Emax reduction of
    fasting glucose, converted to HbA1c by the ADAG slope 28.7 mg/dL per % with a first-order delay,
    exactly as in :func:`inference.cohort.simulate_cohort` (natural drift excluded).

    Examples
    --------
    >>> x = np.array([[5.0, 50.0, 1.0, 0.5, 45.0, 40.0, 1.0]])
    >>> float(np.round(tt201_week24_change(x), 2)[0])
    -0.88
    """
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or x.shape[1] != len(TT201_FACTORS):
        raise ValueError(f"x must have shape (N, {len(TT201_FACTORS)})")
    cl, v, ka, ec50, emax_fpg, delay, adherence = x.T
    pk = DailyOneCompartmentOral(cl=cl, v=v, ka=ka, tlag=tlag_h, f=f)
    state = pk.start(x.shape[0])
    dose = dose_mg * adherence
    a = 1.0 - np.exp(-1.0 / delay)
    offset = np.zeros(x.shape[0])
    for _ in range(n_days):
        state, c = pk.step(state, dose)
        offset += a * (c / (ec50 + c) - offset)
    return -emax_fpg / 28.7 * offset


def tt201_sensitivity(n_base: int = 2 ** 12, seed: int = 0, dose_mg: float = 100.0) -> list[dict]:
    """Ranked Sobol table of the TT-201 week-24 HbA1c drug effect over :data:`TT201_FACTORS`.

    Examples
    --------
    >>> rows = tt201_sensitivity(n_base=2 ** 8)
    >>> sorted(r["name"] for r in rows) == sorted(TT201_FACTORS)
    True
    """
    return sobol_indices(lambda x: tt201_week24_change(x, dose_mg=dose_mg),
                         list(TT201_FACTORS.values()), list(TT201_FACTORS), n_base=n_base, seed=seed)


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
