"""Withdrawal (dropout) risk: a discrete-time hazard over 7-day periods after a landmark day.

Features frozen at the as-of day plus the period's offset feed a logistic hazard (one ONNX model);
``P(withdraw within h days) = 1 - prod_k (1 - q_k) ** f_k`` over the periods that the horizon covers.

Why a discrete-time hazard (person-period logistic regression) rather than a Cox or parametric
survival model: it handles censoring exactly as a survival model does (a period only counts while the
participant is on study and observed), it gives the absolute risk over any horizon without a separate
baseline-hazard estimate, and it is a plain logistic model, so it exports to a handful of ONNX nodes and
is served by the same ONNX Runtime service as the missed-visit model (see docs/LEARNED_MODELS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from inference.features import (AE_RECENT_DAYS, FEATURE_SCHEMA, RECENT_WINDOW_DAYS, FeatureSpec,
                                ParticipantHistory)

__all__ = ["PERIOD_DAYS", "MAX_HORIZON_DAYS", "DEFAULT_HORIZON_DAYS", "WITHDRAWAL_SCHEMA", "WITHDRAWAL_FEATURES",
           "N_WITHDRAWAL_FEATURES", "landmark_features", "landmark_feature_matrix", "period_rows",
           "horizon_probability", "WithdrawalRisk", "assess_withdrawal_risk", "MODEL_NAME"]

MODEL_NAME = "withdrawal"
#: Length of one hazard period (days).
PERIOD_DAYS = 7
#: The model was trained on horizons up to this many days after the landmark.
MAX_HORIZON_DAYS = 84
DEFAULT_HORIZON_DAYS = 28

#: Landmark features: what is known about the participant at the as-of day (no look-ahead), then the
#: period offset. Site is deliberately absent (it does not transfer to new sites).
_SHARED = {spec.name: spec for spec in FEATURE_SCHEMA}  # the missed-visit model's definitions, reused as they are
WITHDRAWAL_SCHEMA: tuple[FeatureSpec, ...] = (
    *(_SHARED[name] for name in ("days_on_study", "n_past_visits", "missed_visit_rate", "last_visit_missed",
                                 "consecutive_missed", "adherence_30d", "ae_severity_30d", "ae_last_14d")),
    FeatureSpec("in_person_visits_30d", "1", "in-person visits scheduled in the 30 days up to the as-of day"),
    FeatureSpec("remote_visits_30d", "1", "remote visits scheduled in the 30 days up to the as-of day"),
    *(_SHARED[name] for name in ("log_travel_km", "age_years", "sex_female", "arm_placebo")),
    FeatureSpec("period_start_days", "d", "start of the 7-day hazard period, in days after the as-of day"),
)
WITHDRAWAL_FEATURES: tuple[str, ...] = tuple(s.name for s in WITHDRAWAL_SCHEMA)
N_WITHDRAWAL_FEATURES = len(WITHDRAWAL_SCHEMA)
N_LANDMARK_FEATURES = N_WITHDRAWAL_FEATURES - 1


def landmark_features(history: ParticipantHistory, as_of_day: float) -> np.ndarray:
    """The participant's landmark features at ``as_of_day`` (float32, without the period column).

    Only events on or before ``as_of_day`` count. Unlike the missed-visit features, no future visit
    is needed: a participant may withdraw whether or not a visit is scheduled.

    Examples
    --------
    >>> from inference.features import Visit, Dose
    >>> h = ParticipantHistory(visits=(Visit(14, False), Visit(28, True, "remote"), Visit(42, None)),
    ...     doses=tuple(Dose(d, True) for d in range(30)), adverse_events=(), age_years=60, sex="male",
    ...     weight_kg=80, egfr=90, travel_distance_km=40, site_id="s", arm="placebo")
    >>> x = landmark_features(h, 30)
    >>> [float(v) for v in x[:5]], float(x[8]), float(x[9])
    ([30.0, 2.0, 0.5, 0.0, 0.0], 1.0, 1.0)
    """
    if as_of_day is None or not math.isfinite(as_of_day) or as_of_day < 0:
        raise ValueError(f"as_of_day must be a finite day >= 0, got {as_of_day!r}")
    past = [v for v in history.visits if v.day <= as_of_day]
    undecided = [v.day for v in past if v.attended is None]
    if undecided:
        raise ValueError(f"visits on days {undecided} are on or before as_of_day={as_of_day} but have no outcome")
    missed = [not v.attended for v in past]
    consecutive = 0
    for was_missed in reversed(missed):
        if not was_missed:
            break
        consecutive += 1
    recent_doses = [d for d in history.doses if as_of_day - RECENT_WINDOW_DAYS < d.day <= as_of_day]
    recent_ae = [a for a in history.adverse_events if as_of_day - RECENT_WINDOW_DAYS < a.day <= as_of_day]
    last_ae = max((a.day for a in history.adverse_events if a.day <= as_of_day), default=None)
    recent_visits = [v for v in past if v.day > as_of_day - RECENT_WINDOW_DAYS]
    row = (
        as_of_day,
        len(past),
        (sum(missed) + 1.0) / (len(past) + 2.0),
        float(bool(missed) and missed[-1]),
        consecutive,
        (sum(d.taken for d in recent_doses) + 1.0) / (len(recent_doses) + 2.0),
        sum(a.severity for a in recent_ae),
        float(last_ae is not None and as_of_day - last_ae < AE_RECENT_DAYS),
        sum(1 for v in recent_visits if v.modality == "in-person"),
        sum(1 for v in recent_visits if v.modality == "remote"),
        math.log1p(history.travel_distance_km),
        history.age_years,
        float(history.sex == "female"),
        float(history.arm.strip().lower() == "placebo"),
    )
    return np.asarray(row, dtype=np.float32)


def landmark_feature_matrix(pairs) -> np.ndarray:
    """Stack :func:`landmark_features` for ``(history, as_of_day)`` pairs: ``(n, N_WITHDRAWAL_FEATURES - 1)``."""
    rows = [landmark_features(h, d) for h, d in pairs]
    if not rows:
        return np.zeros((0, N_LANDMARK_FEATURES), dtype=np.float32)
    return np.vstack(rows)


def _check_horizon(horizon_days: float) -> None:
    if not (isinstance(horizon_days, (int, float)) and math.isfinite(horizon_days)
            and 1 <= horizon_days <= MAX_HORIZON_DAYS):
        raise ValueError(f"horizon must lie between 1 and {MAX_HORIZON_DAYS} days (the trained range), "
                         f"got {horizon_days!r}")


def period_rows(landmarks: np.ndarray, horizon_days: float) -> tuple[np.ndarray, np.ndarray]:
    """Expand landmark rows into person-period rows covering ``horizon_days``.

    Returns ``(rows, fraction)``: ``rows`` is ``(n * K, N_WITHDRAWAL_FEATURES)`` float32 (landmark
    features, then the period's start day), participant-major; ``fraction`` is ``(K,)``, the share of
    each period inside the horizon (1 except perhaps the last).

    Examples
    --------
    >>> rows, f = period_rows(np.zeros((2, 14), np.float32), 10)
    >>> rows.shape, rows[:2, -1].tolist(), f.round(3).tolist()
    ((4, 15), [0.0, 7.0], [1.0, 0.429])
    """
    _check_horizon(horizon_days)
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.ndim != 2 or landmarks.shape[1] != N_LANDMARK_FEATURES:
        raise ValueError(f"landmarks must be (n, {N_LANDMARK_FEATURES}), got {landmarks.shape}")
    k = int(math.ceil(horizon_days / PERIOD_DAYS))
    starts = PERIOD_DAYS * np.arange(k, dtype=np.float64)
    fraction = np.clip((horizon_days - starts) / PERIOD_DAYS, 0.0, 1.0)
    n = landmarks.shape[0]
    rows = np.empty((n * k, N_WITHDRAWAL_FEATURES), dtype=np.float32)
    rows[:, :-1] = np.repeat(landmarks, k, axis=0)
    rows[:, -1] = np.tile(starts.astype(np.float32), n)
    return rows, fraction


def horizon_probability(hazards: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """``1 - prod_k (1 - q_k) ** f_k`` per participant from participant-major period hazards.

    A partial last period keeps a constant hazard within the period (``(1 - q) ** f`` survives).

    Examples
    --------
    >>> float(horizon_probability(np.array([0.1, 0.1]), np.array([1.0, 1.0]))[0])
    0.19
    """
    q = np.clip(np.asarray(hazards, dtype=float).reshape(-1, fraction.size), 0.0, 1.0 - 1e-12)
    return 1.0 - np.exp(np.sum(fraction[None, :] * np.log1p(-q), axis=1))


@dataclass(frozen=True)
class WithdrawalRisk:
    """Probability that one participant withdraws within ``horizon_days`` of ``as_of_day``.

    ``drivers`` reuse :class:`inference.dropout_risk.RiskDriver`: a landmark feature's push on the
    log-hazard relative to the average training row (the period offset is not a driver).
    """

    participant_id: str | None
    as_of_day: float
    horizon_days: float
    probability: float
    flagged: bool
    threshold: float
    drivers: tuple
    model: str
    version: str
    sha256: str
    provider: str


def assess_withdrawal_risk(histories: Sequence[ParticipantHistory], as_of_day, *, horizon_days: float,
                           threshold: float, service=None, version: str | None = None,
                           n_drivers: int = 3) -> list[WithdrawalRisk]:
    """Predict P(withdraw within ``horizon_days``) for several participants in one ONNX batch.

    Raises
    ------
    ValueError
        Invalid history, a horizon outside 1..84 days, or a threshold outside (0, 1].

    Examples
    --------
    >>> from inference.features import Visit, Dose
    >>> from inference.service import InferenceService
    >>> base = dict(doses=tuple(Dose(d, True) for d in range(60)), adverse_events=(), age_years=50,
    ...             sex="male", weight_kg=80, egfr=90, site_id="s", arm="50 mg")
    >>> near = ParticipantHistory(visits=(Visit(28, True, "remote"), Visit(56, True, "remote")),
    ...                           travel_distance_km=3, **base)
    >>> far = ParticipantHistory(visits=(Visit(28, True), Visit(42, False), Visit(56, False)),
    ...                          travel_distance_km=150, **base)
    >>> svc = InferenceService(force_cpu=True, micro_batching=False)
    >>> lo, hi = assess_withdrawal_risk([near, far], 60, horizon_days=28, threshold=0.5, service=svc)
    >>> 0 < lo.probability < hi.probability < 1, lo.horizon_days
    (True, 28)
    """
    from inference.dropout_risk import RiskDriver

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    _check_horizon(horizon_days)
    if service is None:
        from inference.service import get_service

        service = get_service()
    days = ([float(as_of_day)] * len(histories) if np.isscalar(as_of_day) else [float(d) for d in as_of_day])
    if len(days) != len(histories):
        raise ValueError(f"{len(days)} as-of days for {len(histories)} histories")
    if not histories:
        return []
    L = landmark_feature_matrix(zip(histories, days))
    rows, fraction = period_rows(L, horizon_days)
    result = service.predict(MODEL_NAME, rows, version=version)
    probs = horizon_probability(result.probabilities, fraction)
    entry = service.registry.get(result.model, result.version)
    est = entry.metadata["estimator"]
    names = entry.feature_names[:-1]
    coef = np.array([est["coefficients"][n] for n in names])
    contrib = coef * (L - np.array(est["scaler_mean"][:-1])) / np.array(est["scaler_scale"][:-1])
    units = {s.name: s.unit for s in WITHDRAWAL_SCHEMA}
    meaning = {s.name: s.meaning for s in WITHDRAWAL_SCHEMA}
    out = []
    for h, day, x, p, c in zip(histories, days, L, probs, contrib):
        top = [j for j in np.argsort(-c)[:n_drivers] if c[j] > 0]
        drivers = tuple(RiskDriver(names[j], float(x[j]), units[names[j]], float(c[j]), meaning[names[j]])
                        for j in top)
        out.append(WithdrawalRisk(h.participant_id, day, horizon_days, float(p), bool(p >= threshold), threshold,
                                  drivers, result.model, result.version, entry.metadata["sha256"],
                                  result.provider))
    return out
