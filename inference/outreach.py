"""Outreach thresholds derived from a stated target: a precision target, or a capacity of k contacts per week.

Operating points (threshold -> flagged share, precision, recall) come from a model's held-out data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["OutreachTarget", "TARGETS", "operating_points", "choose_threshold"]

TARGETS = ("precision", "weekly-capacity")
#: Thresholds at which operating points are tabulated.
GRID = tuple(round(t, 3) for t in np.arange(0.01, 0.991, 0.01))
#: A precision estimated from fewer flagged held-out rows is noise (1 of 1 is "precision 1.0"): such
#: operating points are never chosen for a precision target.
MIN_FLAGGED = 30


@dataclass(frozen=True)
class OutreachTarget:
    """What a study wants from its outreach threshold.

    Parameters
    ----------
    kind : str
        ``"precision"``: at least ``value`` of flagged participants should go on to have the outcome
        (the lowest such threshold, i.e. the most recall under that precision);
        ``"weekly-capacity"``: staff can contact ``value`` participants per week; with ``n_on_study``
        participants assessed weekly, flag at most that share (the lowest threshold whose held-out
        flagged share does not exceed ``value / n_on_study``).
    value : float
        The precision (0-1) or the contacts per week (>= 1).
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGETS:
            raise ValueError(f"outreach target must be one of {TARGETS}, got {self.kind!r}")
        if self.kind == "precision" and not 0.0 < self.value < 1.0:
            raise ValueError(f"a precision target must lie strictly between 0 and 1, got {self.value}")
        if self.kind == "weekly-capacity" and not self.value >= 1:
            raise ValueError(f"a weekly capacity must be at least 1 participant, got {self.value}")


def operating_points(y, p, grid=GRID) -> list[dict]:
    """Flagged share, precision and recall of ``p >= t`` for each threshold ``t`` in ``grid``.

    Examples
    --------
    >>> pts = operating_points([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9], grid=(0.5, 0.8))
    >>> [(q["threshold"], q["flagged_fraction"], round(q["precision"], 3), q["recall"]) for q in pts]
    [(0.5, 0.75, 0.667, 1.0), (0.8, 0.25, 1.0, 0.5)]
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=float)
    out = []
    for t in grid:
        flagged = p >= t
        out.append({"threshold": float(t), "n_flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean()),
                    "precision": float(y[flagged].mean()) if flagged.any() else None,
                    "recall": float(flagged[y].mean()) if y.any() else None})
    return out


def choose_threshold(points: list[dict], target: OutreachTarget, n_on_study: int | None = None,
                     min_flagged: int = MIN_FLAGGED) -> dict:
    """The operating point that meets ``target`` (a copy of the point, with ``target`` added).

    Raises
    ------
    ValueError
        No tabulated threshold meets the target, or a capacity target without ``n_on_study``.

    Examples
    --------
    >>> pts = operating_points([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9], grid=(0.5, 0.8))
    >>> choose_threshold(pts, OutreachTarget("precision", 0.9), min_flagged=1)["threshold"]
    0.8
    >>> choose_threshold(pts, OutreachTarget("weekly-capacity", 3), n_on_study=4)["threshold"]
    0.5
    """
    if target.kind == "precision":
        usable = [q for q in points if q["precision"] is not None and q["n_flagged"] >= min_flagged]
        ok = [q for q in usable if q["precision"] >= target.value]
        if not ok:
            best = max((q["precision"] for q in usable), default=None)
            raise ValueError(f"no threshold reaches precision {target.value:g} on the model's held-out data "
                             f"(best {best:.3f} among thresholds flagging at least {min_flagged} held-out rows)" if best is not None else "the model flags no held-out participant")
    else:
        if not n_on_study or n_on_study < 1:
            raise ValueError("a weekly-capacity target needs the number of participants on study")
        share = target.value / n_on_study
        ok = [q for q in points if q["flagged_fraction"] <= share and q["flagged_fraction"] > 0]
        if not ok:
            ok = points[-1:]
    chosen = min(ok, key=lambda q: q["threshold"])
    return {**chosen, "target": {"kind": target.kind, "value": target.value}}
