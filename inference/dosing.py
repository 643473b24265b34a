"""Dose records: when, how much, over how long and by which route a drug is given.

One record describes ``n`` participants at once so that PK models can superpose doses as arrays.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

__all__ = ["DoseRecord", "regimen", "with_missed", "with_delays"]

ROUTES = ("oral", "iv")


@dataclass(frozen=True, eq=False)
class DoseRecord:
    """Doses of ``n`` participants as ``(n, n_doses)`` arrays (0 mg marks a missed or absent dose).

    Parameters
    ----------
    times : array_like
        Dose times in hours, shape ``(n_doses,)`` (shared) or ``(n, n_doses)``.
    amounts : array_like
        Amounts in mg (>= 0), shape ``(n_doses,)`` or ``(n, n_doses)``.
    durations : array_like, optional
        Infusion durations in hours (0 = bolus or oral), scalar or broadcastable to the amounts.
    route : {"oral", "iv"}
        ``"oral"`` applies the absorption rate, lag time and bioavailability of the PK model;
        ``"iv"`` gives a bolus (duration 0) or a zero-order infusion (duration > 0).

    Examples
    --------
    >>> rec = DoseRecord(times=[0, 24], amounts=[[100, 100], [100, 0]])
    >>> rec.n, rec.n_doses
    (2, 2)
    >>> rec.amounts
    array([[100., 100.],
           [100.,   0.]])
    """

    times: np.ndarray
    amounts: np.ndarray
    durations: np.ndarray = 0.0
    route: str = "oral"

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {self.route!r}")
        times = np.asarray(self.times, dtype=float)
        amounts = np.asarray(self.amounts, dtype=float)
        durations = np.asarray(self.durations, dtype=float)
        if times.ndim not in (1, 2) or amounts.ndim not in (1, 2):
            raise ValueError("times and amounts must have shape (n_doses,) or (n, n_doses)")
        try:
            shape = np.broadcast_shapes(np.atleast_2d(times).shape, np.atleast_2d(amounts).shape,
                                        durations.shape)
        except ValueError:
            raise ValueError(f"times {times.shape}, amounts {amounts.shape} and durations "
                             f"{durations.shape} do not broadcast to one (n, n_doses) shape") from None
        arrays = {}
        for name, arr in (("times", times), ("amounts", amounts), ("durations", durations)):
            arr = np.array(np.broadcast_to(np.atleast_2d(arr), shape))
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"dose {name} must be finite")
            arr.setflags(write=False)
            arrays[name] = arr
        if np.any(arrays["amounts"] < 0):
            raise ValueError("dose amounts must be >= 0")
        if np.any(arrays["durations"] < 0):
            raise ValueError("dose durations must be >= 0")
        if self.route == "oral" and np.any(arrays["durations"] > 0):
            raise ValueError("oral doses have no duration; use route='iv' for infusions")
        for name, arr in arrays.items():
            object.__setattr__(self, name, arr)

    @property
    def n(self) -> int:
        """Number of participants (1 when the record is shared)."""
        return int(self.amounts.shape[0])

    @property
    def n_doses(self) -> int:
        """Number of dose slots."""
        return int(self.amounts.shape[1])

    def broadcast(self, n: int) -> "DoseRecord":
        """Return the record expanded to ``n`` participants."""
        if self.n == n:
            return self
        if self.n != 1:
            raise ValueError(f"dose record is for {self.n} participants, not {n}")
        shape = (n, self.n_doses)
        return DoseRecord(np.broadcast_to(self.times, shape), np.broadcast_to(self.amounts, shape),
                          np.broadcast_to(self.durations, shape), self.route)

    def replace(self, **changes) -> "DoseRecord":
        """Return a validated copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


def regimen(amount_mg, interval_h: float, n_doses: int, start_h: float = 0.0,
            duration_h: float = 0.0, route: str = "oral") -> DoseRecord:
    """Repeated dosing: ``amount_mg`` every ``interval_h`` hours, ``n_doses`` times.

    ``amount_mg`` may be an array of shape ``(n,)`` (e.g. one dose level per arm).

    Examples
    --------
    >>> regimen(50.0, 24.0, 3).times
    array([[ 0., 24., 48.]])
    >>> regimen([50.0, 100.0], 12.0, 2).amounts
    array([[ 50.,  50.],
           [100., 100.]])
    """
    if interval_h <= 0 or n_doses <= 0:
        raise ValueError("interval_h and n_doses must be positive")
    times = start_h + interval_h * np.arange(int(n_doses))
    amount = np.asarray(amount_mg, dtype=float)
    if amount.ndim > 1:
        raise ValueError("amount_mg must be a scalar or shape (n,)")
    amounts = np.broadcast_to(np.atleast_1d(amount)[:, None], (amount.size, times.size))
    return DoseRecord(times=times, amounts=amounts, durations=duration_h, route=route)


def with_missed(record: DoseRecord, missed) -> DoseRecord:
    """Set the amount of missed doses to 0; ``missed`` is a boolean mask of shape ``(n_doses,)`` or ``(n, n_doses)``.

    Examples
    --------
    >>> with_missed(regimen(100.0, 24.0, 3), [False, True, False]).amounts
    array([[100.,   0., 100.]])
    """
    mask = np.asarray(missed, dtype=bool)
    if mask.shape[-1] != record.n_doses:
        raise ValueError(f"missed mask has {mask.shape[-1]} doses, record has {record.n_doses}")
    n = max(record.n, mask.shape[0] if mask.ndim == 2 else 1)
    rec = record.broadcast(n)
    return rec.replace(amounts=np.where(mask, 0.0, rec.amounts))


def with_delays(record: DoseRecord, delay_h) -> DoseRecord:
    """Shift dose times by ``delay_h`` hours (late doses > 0), shape ``(n_doses,)`` or ``(n, n_doses)``.

    Examples
    --------
    >>> with_delays(regimen(100.0, 24.0, 2), [0.0, 5.5]).times
    array([[ 0. , 29.5]])
    """
    delay = np.asarray(delay_h, dtype=float)
    if delay.shape[-1] != record.n_doses:
        raise ValueError(f"delays have {delay.shape[-1]} doses, record has {record.n_doses}")
    n = max(record.n, delay.shape[0] if delay.ndim == 2 else 1)
    rec = record.broadcast(n)
    return rec.replace(times=rec.times + delay)
