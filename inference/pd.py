"""Pharmacodynamic models: direct Emax / sigmoid Emax and the four indirect-response models.

Vectorized over participants; the indirect-response ODEs are solved as one stacked system.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.integrate import solve_ivp

__all__ = ["emax", "sigmoid_emax", "IndirectResponse", "idr_steady_state", "simulate_idr"]


def sigmoid_emax(c, emax, ec50, hill=1.0, e0=0.0):
    """Sigmoid Emax (Hill) model ``e0 + emax * c^h / (ec50^h + c^h)``, broadcasting over arrays.

    Parameters
    ----------
    c : array_like
        Concentrations (>= 0).
    emax, ec50, hill, e0 : array_like
        Maximal effect, concentration at half effect (> 0), Hill coefficient (> 0), baseline.

    Examples
    --------
    >>> sigmoid_emax([0.0, 1.0, 3.0], emax=10.0, ec50=1.0, hill=2.0)
    array([0., 5., 9.])
    """
    c = np.asarray(c, dtype=float)
    ec50, hill = np.asarray(ec50, dtype=float), np.asarray(hill, dtype=float)
    if np.any(c < 0):
        raise ValueError("concentrations must be >= 0")
    if np.any(ec50 <= 0) or np.any(hill <= 0):
        raise ValueError("ec50 and hill must be > 0")
    # c / ec50 first keeps large Hill coefficients from overflowing
    r = (c / ec50) ** hill
    return e0 + emax * r / (1.0 + r)


def emax(c, emax, ec50, e0=0.0):
    """Hyperbolic Emax model ``e0 + emax * c / (ec50 + c)``.

    Examples
    --------
    >>> float(emax(2.0, emax=30.0, ec50=2.0, e0=1.0))
    16.0
    """
    return sigmoid_emax(c, emax, ec50, 1.0, e0)


_KINDS = {1: "inhibition of kin", 2: "inhibition of kout", 3: "stimulation of kin",
          4: "stimulation of kout"}


@dataclass(frozen=True, eq=False)
class IndirectResponse:
    """Indirect-response model ``dR/dt = kin * (1 +/- D(C)) - kout * (1 +/- D(C)) * R`` (Dayneka et al. 1993).

    ``kind`` 1: inhibition of kin, 2: inhibition of kout (drug term ``1 - imax C^h/(ic50^h + C^h)``);
    3: stimulation of kin, 4: stimulation of kout (drug term ``1 + emax C^h/(ec50^h + C^h)``).
    ``effect_max`` is Imax (in (0, 1]) for kinds 1-2 and Emax (> 0) for kinds 3-4.

    Examples
    --------
    >>> m = IndirectResponse(kind=1, kin=10.0, kout=0.5, effect_max=0.8, c50=2.0)
    >>> float(idr_steady_state(m, 0.0)[0]), float(idr_steady_state(m, 2.0)[0])
    (20.0, 12.0)
    """

    kind: int
    kin: np.ndarray
    kout: np.ndarray
    effect_max: np.ndarray
    c50: np.ndarray
    hill: np.ndarray = 1.0

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)} ({_KINDS}), got {self.kind!r}")
        arrays = {}
        for name in ("kin", "kout", "effect_max", "c50", "hill"):
            arr = np.atleast_1d(np.asarray(getattr(self, name), dtype=float))
            if arr.ndim != 1 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
                raise ValueError(f"{name} must be finite, > 0, scalar or shape (n,)")
            arrays[name] = arr
        if self.kind in (1, 2) and np.any(arrays["effect_max"] > 1):
            raise ValueError("Imax (effect_max) must lie in (0, 1] for inhibition models")
        shape = np.broadcast_shapes(*(a.shape for a in arrays.values()))
        for name, arr in arrays.items():
            arr = np.array(np.broadcast_to(arr, shape))
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def n(self) -> int:
        """Number of participants."""
        return int(self.kin.shape[0])

    def drug_factor(self, c) -> np.ndarray:
        """Multiplier of kin (kinds 1, 3) or kout (kinds 2, 4) at concentration ``c``."""
        s = sigmoid_emax(c, self.effect_max, self.c50, self.hill)
        return 1.0 - s if self.kind in (1, 2) else 1.0 + s

    def rate(self, c, r) -> np.ndarray:
        """dR/dt at concentration ``c`` and response ``r``."""
        g = self.drug_factor(c)
        if self.kind in (1, 3):
            return self.kin * g - self.kout * r
        return self.kin - self.kout * g * r

    def replace(self, **changes) -> "IndirectResponse":
        """Return a validated copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


def idr_steady_state(model: IndirectResponse, c) -> np.ndarray:
    """Response at steady state under a constant concentration ``c``.

    ``R_ss = kin/kout`` without drug; the drug multiplies it by the drug factor (kinds 1, 3) or
    divides it by the drug factor (kinds 2, 4).

    Examples
    --------
    >>> m = IndirectResponse(kind=4, kin=5.0, kout=0.5, effect_max=1.0, c50=1.0)
    >>> float(idr_steady_state(m, 1.0)[0])   # 10 / (1 + 0.5)
    6.666666666666667
    """
    g = model.drug_factor(c)
    base = model.kin / model.kout
    return base * g if model.kind in (1, 3) else base / g


def simulate_idr(model: IndirectResponse, conc: Callable[[float], np.ndarray], times,
                 r0=None, rtol: float = 1e-8, atol: float = 1e-10) -> np.ndarray:
    """Integrate the indirect-response ODE of ``n`` participants as one stacked ``solve_ivp`` system.

    Parameters
    ----------
    model : IndirectResponse
        Parameters of shape ``(n,)``.
    conc : callable
        ``conc(t) -> (n,)`` concentrations at time ``t`` (same time unit as 1/kout).
    times : array_like
        Increasing output times; integration starts at ``times[0]``.
    r0 : array_like, optional
        Initial response; the drug-free baseline ``kin/kout`` by default.

    Returns
    -------
    numpy.ndarray
        Responses of shape ``(n, n_times)``.

    Examples
    --------
    >>> m = IndirectResponse(kind=3, kin=2.0, kout=0.2, effect_max=1.0, c50=1.0)
    >>> r = simulate_idr(m, lambda t: np.array([1.0]), [0.0, 200.0])
    >>> np.round(r, 4)   # from kin/kout = 10 to the steady state 10 * (1 + 0.5)
    array([[10., 15.]])
    """
    t = np.asarray(times, dtype=float)
    if t.ndim != 1 or t.size == 0 or np.any(np.diff(t) <= 0):
        raise ValueError("times must be a non-empty strictly increasing 1-D array")
    y0 = model.kin / model.kout if r0 is None else np.broadcast_to(np.asarray(r0, float), (model.n,))
    if t.size == 1:
        return np.asarray(y0, dtype=float)[:, None].copy()
    sol = solve_ivp(lambda time, r: model.rate(np.asarray(conc(time), dtype=float), r),
                    (t[0], t[-1]), np.array(y0, dtype=float), method="LSODA", t_eval=t,
                    rtol=rtol, atol=atol)
    if not sol.success:
        raise ValueError(f"indirect-response ODE failed: {sol.message}")
    return sol.y
