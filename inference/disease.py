"""Disease progression of a biomarker: natural drift (linear or exponential) plus a drug effect.

Evaluated on a daily grid for ``n`` participants at once, from a daily drug-effect input in [0, 1].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

__all__ = ["DiseaseProgression", "progress"]


@dataclass(frozen=True, eq=False)
class DiseaseProgression:
    """Biomarker ``B(t)`` with natural drift and a drug effect acting as an offset or on the slope.

    Natural course: ``linear`` ``B0 + slope * t`` or ``exponential`` ``B0 * exp(slope * t)``
    (t in days). The daily drug activity ``E_t`` in [0, 1] (for example an Emax function of the
    average concentration) acts

    * as an ``offset``: ``B(t) = natural(t) - max_offset * D(t)`` where ``D`` follows ``E`` with
      first-order delay ``dD/dt = k_onset * (E - D)`` (exact for ``E`` constant within a day), or
    * on the ``slope``: the drift rate is scaled by ``1 - E`` (for ``exponential``, the growth
      rate), so ``B(t) = B0 + slope * sum_{s<t} (1 - E_s)``.

    Parameters
    ----------
    baseline, slope : array_like
        ``B0`` and the natural drift (per day), shape ``(n,)`` or scalar.
    drift : {"linear", "exponential"}
    effect : {"offset", "slope"}
    max_offset : array_like
        Size of the full drug offset (biomarker units), used by ``effect="offset"``.
    k_onset : float
        Rate (1/day) at which the offset follows the drug activity; ``inf`` for no delay.

    Examples
    --------
    >>> m = DiseaseProgression(baseline=8.0, slope=0.002, max_offset=1.0, k_onset=np.inf)
    >>> progress(m, np.full((1, 3), 0.5))
    array([[7.5  , 7.502, 7.504]])
    """

    baseline: np.ndarray
    slope: np.ndarray
    drift: str = "linear"
    effect: str = "offset"
    max_offset: np.ndarray = 0.0
    k_onset: float = np.inf

    def __post_init__(self):
        if self.drift not in ("linear", "exponential"):
            raise ValueError(f"drift must be 'linear' or 'exponential', got {self.drift!r}")
        if self.effect not in ("offset", "slope"):
            raise ValueError(f"effect must be 'offset' or 'slope', got {self.effect!r}")
        if not self.k_onset > 0:
            raise ValueError("k_onset must be > 0 (use numpy.inf for an immediate effect)")
        for name in ("baseline", "slope", "max_offset"):
            arr = np.atleast_1d(np.asarray(getattr(self, name), dtype=float))
            if arr.ndim != 1 or not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} must be finite, scalar or shape (n,)")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    def replace(self, **changes) -> "DiseaseProgression":
        """Return a validated copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


def progress(model: DiseaseProgression, activity) -> np.ndarray:
    """Biomarker at the start-of-day grid ``t = 0, 1, ..., n_days - 1`` given the daily drug activity.

    Parameters
    ----------
    model : DiseaseProgression
    activity : array_like
        ``(n, n_days)`` drug activity in [0, 1] on each day (0 for placebo or no drug).

    Returns
    -------
    numpy.ndarray
        ``(n, n_days)`` biomarker values; with the offset effect, day ``t`` reflects the activity
        of days ``0..t`` (the day's dose acts on the same day's value); with the slope effect, the
        value at day ``t`` integrates the drift of days ``0..t-1``.

    Examples
    --------
    >>> m = DiseaseProgression(baseline=[8.0], slope=0.01, effect="slope")
    >>> progress(m, [[0.0, 0.5, 1.0, 1.0]])
    array([[8.   , 8.01 , 8.015, 8.015]])
    """
    e = np.asarray(activity, dtype=float)
    if e.ndim != 2:
        raise ValueError("activity must have shape (n, n_days)")
    if np.any(e < 0) or np.any(e > 1) or not np.all(np.isfinite(e)):
        raise ValueError("activity must lie in [0, 1]")
    n, n_days = e.shape
    b0 = model.baseline[:, None]
    slope = model.slope[:, None]
    t = np.arange(n_days, dtype=float)[None, :]
    if model.effect == "slope":
        elapsed = np.concatenate([np.zeros((n, 1)), np.cumsum(1.0 - e[:, :-1], axis=1)], axis=1)
        if model.drift == "linear":
            return np.broadcast_to(b0 + slope * elapsed, (n, n_days)).copy()
        return np.broadcast_to(b0 * np.exp(slope * elapsed), (n, n_days)).copy()
    natural = b0 + slope * t if model.drift == "linear" else b0 * np.exp(slope * t)
    if np.isinf(model.k_onset):
        d = e
    else:
        # exact one-day update of dD/dt = k (E - D) with E constant over the day
        a = 1.0 - np.exp(-model.k_onset)
        d = lfilter([a], [1.0, a - 1.0], e, axis=1)
    return np.broadcast_to(natural - model.max_offset[:, None] * d, (n, n_days)).copy()
