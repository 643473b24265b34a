"""Missed-next-visit risk for participants: probability, flag at the product threshold, and the main drivers.

What the ``$predict-dropout`` operation calls after mapping FHIR resources to ``ParticipantHistory``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from inference.features import FEATURE_SCHEMA, ParticipantHistory, dropout_feature_matrix

__all__ = ["DEFAULT_THRESHOLD", "RiskDriver", "DropoutRisk", "assess_dropout_risk"]

#: The product flags a participant whose probability of missing the next visit is at least this.
DEFAULT_THRESHOLD = 0.8
_UNITS = {spec.name: spec.unit for spec in FEATURE_SCHEMA}
_MEANING = {spec.name: spec.meaning for spec in FEATURE_SCHEMA}


@dataclass(frozen=True)
class RiskDriver:
    """One feature's push on the log-odds relative to the average training participant."""

    feature: str
    value: float
    unit: str
    log_odds: float
    meaning: str


@dataclass(frozen=True)
class DropoutRisk:
    """Risk of one participant missing their next scheduled visit.

    Attributes
    ----------
    participant_id : str or None
        From the history.
    as_of_day, next_visit_day : float
        When the prediction is made and for which visit.
    probability : float
        Probability of missing the next visit (no-show or withdrawal before it).
    flagged : bool
        ``probability >= threshold``; the product creates an outreach Task for these.
    threshold : float
        Threshold applied.
    drivers : tuple of RiskDriver
        Features that raise the risk most (largest positive log-odds contributions), at most 3.
    model, version, sha256, provider : str
        Which model produced it and where it ran (for Provenance).
    """

    participant_id: str | None
    as_of_day: float
    next_visit_day: float
    probability: float
    flagged: bool
    threshold: float
    drivers: tuple[RiskDriver, ...]
    model: str
    version: str
    sha256: str
    provider: str


def assess_dropout_risk(histories: Sequence[ParticipantHistory], as_of_day: float | Sequence[float], *,
                        threshold: float = DEFAULT_THRESHOLD, service=None, version: str | None = None,
                        n_drivers: int = 3) -> list[DropoutRisk]:
    """Predict the missed-next-visit risk of several participants in one batch.

    Parameters
    ----------
    histories : sequence of ParticipantHistory
        One per participant.
    as_of_day : float or sequence of float
        Prediction day, shared or one per history.
    threshold : float
        Flag threshold (default 0.8).
    service : inference.service.InferenceService, optional
        Defaults to the process-wide :func:`inference.service.get_service`.
    version : str, optional
        Model version (latest when omitted).
    n_drivers : int
        How many drivers to report.

    Returns
    -------
    list of DropoutRisk

    Raises
    ------
    ValueError
        Invalid history, a day with no later visit, or a threshold outside (0, 1].

    Examples
    --------
    >>> from inference.features import Visit, Dose
    >>> from inference.service import InferenceService
    >>> far = ParticipantHistory(visits=(Visit(28, False), Visit(56, False), Visit(84, None)),
    ...     doses=tuple(Dose(d, d % 4 != 0) for d in range(80)), adverse_events=(), age_years=45,
    ...     sex="male", weight_kg=90, egfr=95, travel_distance_km=120, site_id="site-1", arm="50 mg")
    >>> near = far.replace(travel_distance_km=2, visits=(Visit(28, True), Visit(56, True), Visit(84, None)))
    >>> svc = InferenceService(force_cpu=True, micro_batching=False)
    >>> hi, lo = assess_dropout_risk([far, near], 80, service=svc)
    >>> hi.probability > 0.8 > 0.2 > lo.probability, hi.flagged, lo.flagged
    (True, True, False)
    >>> hi.drivers[0].feature in {"next_visit_travel_km", "consecutive_missed", "missed_visit_rate"}
    True
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if service is None:
        from inference.service import get_service

        service = get_service()
    days = ([float(as_of_day)] * len(histories) if np.isscalar(as_of_day) else [float(d) for d in as_of_day])
    if len(days) != len(histories):
        raise ValueError(f"{len(days)} as-of days for {len(histories)} histories")
    if not histories:
        return []
    X = dropout_feature_matrix(zip(histories, days))
    result = service.predict("dropout", X, version=version)
    entry = service.registry.get(result.model, result.version)
    est = entry.metadata["estimator"]
    names = entry.feature_names
    coef = np.array([est["coefficients"][n] for n in names])
    contributions = coef * (X - np.array(est["scaler_mean"])) / np.array(est["scaler_scale"])
    out = []
    for h, day, x, p, contrib in zip(histories, days, X, result.probabilities, contributions):
        top = [j for j in np.argsort(-contrib)[:n_drivers] if contrib[j] > 0]
        drivers = tuple(RiskDriver(names[j], float(x[j]), _UNITS.get(names[j], ""), float(contrib[j]),
                                   _MEANING.get(names[j], "")) for j in top)
        out.append(DropoutRisk(h.participant_id, day, h.next_visit(day).day, float(p), bool(p >= threshold),
                               threshold, drivers, result.model, result.version, entry.metadata["sha256"],
                               result.provider))
    return out
