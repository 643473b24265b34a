"""Nonparametric (case) bootstrap of a population fit: subjects resampled with replacement and refitted.

Replicates are independent fits, so they run in this process or on an executor (a Dask cluster).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from inference.estimation import fit_population
from inference.population import ObservationData, PopulationModel, Structural

__all__ = ["BootstrapResult", "bootstrap_fit", "resample_subjects"]


@dataclass(frozen=True)
class BootstrapResult:
    """Estimates of every bootstrap replicate.

    Attributes
    ----------
    names : tuple of str
        Optimizer-scale parameter names (as ``PopulationFit.estimates``).
    estimates : ndarray, shape (n_boot, n_parameters)
        One row per replicate; ``nan`` where the replicate's fit failed.
    converged : ndarray of bool, shape (n_boot,)
    subjects : ndarray of int, shape (n_boot, n_subjects)
        The subjects drawn for each replicate (indices into the original data).
    seed : int
    """

    names: tuple[str, ...]
    estimates: np.ndarray
    converged: np.ndarray
    subjects: np.ndarray
    seed: int

    def interval(self, level: float = 0.95) -> Mapping[str, tuple[float, float]]:
        """Percentile interval of each parameter over the converged replicates."""
        if not 0.0 < level < 1.0:
            raise ValueError("level must lie in (0, 1)")
        kept = self.estimates[self.converged]
        if kept.shape[0] == 0:
            raise ValueError("no bootstrap replicate converged")
        tail = 100.0 * (1.0 - level) / 2.0
        low, high = np.percentile(kept, [tail, 100.0 - tail], axis=0)
        return {n: (float(lo), float(hi)) for n, lo, hi in zip(self.names, low, high)}


def resample_subjects(data: ObservationData, indices) -> ObservationData:
    """A data set of the given subjects (repeats allowed), numbered ``0 .. len(indices) - 1``.

    A subject drawn twice becomes two subjects (``id#0``, ``id#1``...), as a case bootstrap needs.
    ``data.context`` is passed through unchanged, so per-subject information must live in
    ``covariates`` or ``design``.

    Examples
    --------
    >>> data = ObservationData([0, 1, 1], [1.0, 1.0, 2.0], [2.0, 3.0, 5.0], subject_ids=("a", "b"))
    >>> twice = resample_subjects(data, [1, 1])
    >>> twice.subject_ids, twice.subject.tolist(), twice.value.tolist()
    (('b#0', 'b#1'), [0, 0, 1, 1], [3.0, 5.0, 3.0, 5.0])
    """
    indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
    if indices.size == 0 or indices.min() < 0 or indices.max() >= data.n_subjects:
        raise ValueError("subject indices out of range")
    parts = data.split()
    chosen = [parts[i] for i in indices]
    seen: dict[int, int] = {}
    ids = []
    for i in indices:
        ids.append(f"{data.subject_ids[i]}#{seen.get(int(i), 0)}")
        seen[int(i)] = seen.get(int(i), 0) + 1
    return data.replace(
        subject=np.repeat(np.arange(indices.size), [p.n_rows for p in chosen]),
        time=np.concatenate([p.time for p in chosen]),
        value=np.concatenate([p.value for p in chosen]),
        subject_ids=tuple(ids),
        covariates={k: v[indices] for k, v in data.covariates.items()},
        design={k: np.concatenate([p.design[k] for p in chosen]) for k in data.design},
    )


def _replicate(model: PopulationModel, structural: Structural, data: ObservationData, indices: np.ndarray,
               max_iter: int) -> tuple[tuple[str, ...], np.ndarray | None, bool]:
    """Fit one replicate; a failed fit is recorded, not raised (a bootstrap reports its failures)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # boundary warnings of single replicates are expected noise
            fit = fit_population(model, structural, resample_subjects(data, indices), max_iter=max_iter,
                                 standard_errors=False)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError):
        return (), None, False
    return tuple(fit.estimates), np.array([fit.estimates[k] for k in fit.estimates], dtype=float), fit.converged


def bootstrap_fit(model: PopulationModel, structural: Structural, data: ObservationData, *, n_boot: int = 200,
                  seed: int = 0, max_iter: int = 500, executor=None) -> BootstrapResult:
    """Refit ``model`` on ``n_boot`` resamples of ``data``'s subjects (with replacement).

    Parameters
    ----------
    model : PopulationModel
        Starting values of every replicate's fit (the original fit's ``model`` saves iterations).
    structural : callable
        ``structural(phi, data)``; must pickle for a cluster of processes (module-level function).
    data : ObservationData
    n_boot : int
        Number of replicates.
    seed : int
        The resampled subjects are drawn here, before any fit runs, from this seed alone.
    max_iter : int
        BFGS iteration limit of each replicate.
    executor : optional
        None: replicates run one after the other in this process; otherwise anything with
        ``submit(fn, *args)`` (``dask.distributed.Client``, ``concurrent.futures``) runs them side
        by side. The fits are deterministic, so the result is identical either way.

    Returns
    -------
    BootstrapResult

    Examples
    --------
    >>> from inference.datasets import load_theoph, ssfol
    >>> from inference.population import ResidualError
    >>> start = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
    ...     np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    >>> boot = bootstrap_fit(start, ssfol, load_theoph(), n_boot=2, seed=1)
    >>> boot.estimates.shape, boot.names[:3]
    ((2, 6), ('lKe', 'lKa', 'lCl'))
    """
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError("n_boot must be a positive integer")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError("seed must be a non-negative integer")
    rng = np.random.default_rng(seed)
    subjects = rng.integers(0, data.n_subjects, size=(int(n_boot), data.n_subjects))
    if executor is None:
        results = [_replicate(model, structural, data, idx, max_iter) for idx in subjects]
    else:
        futures = [executor.submit(_replicate, model, structural, data, idx, max_iter) for idx in subjects]
        results = [f.result() for f in futures]
    names = next((r[0] for r in results if r[1] is not None), ())
    if not names:
        raise ValueError("no bootstrap replicate could be fitted")
    estimates = np.array([r[1] if r[1] is not None else np.full(len(names), np.nan) for r in results])
    converged = np.array([r[2] for r in results], dtype=bool)
    return BootstrapResult(names=names, estimates=estimates, converged=converged, subjects=subjects, seed=int(seed))
