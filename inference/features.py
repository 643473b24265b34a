"""Participant trial-behaviour history as a pure value object, and the dropout-model feature vector.

The same ``dropout_features`` feeds training (from simulated behaviour) and serving (from FHIR data).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace as _replace
from typing import Iterable

import numpy as np

__all__ = [
    "Visit",
    "Dose",
    "AdverseEventRecord",
    "ParticipantHistory",
    "FeatureSpec",
    "FEATURE_SCHEMA",
    "FEATURE_NAMES",
    "N_FEATURES",
    "dropout_features",
    "dropout_feature_matrix",
    "check_feature_matrix",
]

MODALITIES = ("in-person", "remote")
SEXES = ("female", "male")
#: Caps keep the features bounded where "never happened" would otherwise be infinite.
DAYS_SINCE_CAP = 365.0
RECENT_WINDOW_DAYS = 30.0
AE_RECENT_DAYS = 14.0


@dataclass(frozen=True)
class Visit:
    """One scheduled protocol visit.

    Parameters
    ----------
    day : float
        Scheduled study day (day 0 = randomization).
    attended : bool or None
        ``True`` attended, ``False`` missed (no-show, or withdrawn before it), ``None`` not yet
        happened (FHIR: Appointment.status ``fulfilled`` / ``noshow`` / ``booked``).
    modality : str
        ``"in-person"`` or ``"remote"`` (FHIR: Appointment.serviceType).
    """

    day: float
    attended: bool | None
    modality: str = "in-person"

    def __post_init__(self) -> None:
        if not math.isfinite(self.day) or self.day < 0:
            raise ValueError(f"Visit.day must be a finite day >= 0, got {self.day!r}")
        if self.modality not in MODALITIES:
            raise ValueError(f"Visit.modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.attended not in (True, False, None):
            raise ValueError(f"Visit.attended must be True, False or None, got {self.attended!r}")


@dataclass(frozen=True)
class Dose:
    """One scheduled dose (FHIR: MedicationAdministration ``completed`` vs ``not-done``).

    Parameters
    ----------
    day : float
        Study day the dose was due.
    taken : bool
        Whether it was taken.
    """

    day: float
    taken: bool

    def __post_init__(self) -> None:
        if not math.isfinite(self.day) or self.day < 0:
            raise ValueError(f"Dose.day must be a finite day >= 0, got {self.day!r}")


@dataclass(frozen=True)
class AdverseEventRecord:
    """One adverse event (FHIR: AdverseEvent.date and severity).

    Parameters
    ----------
    day : float
        Study day of onset.
    severity : int
        1 mild, 2 moderate, 3 severe (CTCAE grade 3 and above count as severe).
    """

    day: float
    severity: int

    def __post_init__(self) -> None:
        if not math.isfinite(self.day) or self.day < 0:
            raise ValueError(f"AdverseEventRecord.day must be a finite day >= 0, got {self.day!r}")
        if self.severity not in (1, 2, 3):
            raise ValueError(f"AdverseEventRecord.severity must be 1, 2 or 3, got {self.severity!r}")


@dataclass(frozen=True)
class ParticipantHistory:
    """Everything the dropout model may know about one participant, free of FHIR.

    Parameters
    ----------
    visits : tuple of Visit
        All scheduled visits, past and future, in any order.
    doses : tuple of Dose
        Scheduled doses with whether each was taken (adherence record).
    adverse_events : tuple of AdverseEventRecord
        Adverse events with onset day and severity.
    age_years : float
        Age at enrolment (FHIR: Patient.birthDate relative to enrolment).
    sex : str
        ``"female"`` or ``"male"`` (FHIR: Patient.gender).
    weight_kg : float
        Baseline body weight (LOINC 29463-7).
    egfr : float
        Baseline eGFR in mL/min/1.73 m2 (LOINC 62238-1).
    travel_distance_km : float
        Distance from home to the site (Patient.address to Location.position).
    site_id : str
        Site identifier; kept for reporting, deliberately not a model feature (site effects do not
        transfer to new sites; travel distance carries what is transferable).
    arm : str
        Assigned arm (ResearchSubject.assignedArm); the model only uses whether it is ``placebo``.
    participant_id : str, optional
        Identifier for tracing; never a feature.

    Examples
    --------
    >>> h = ParticipantHistory(visits=(Visit(28, True), Visit(56, None, "remote")), doses=(),
    ...     adverse_events=(), age_years=54, sex="female", weight_kg=82, egfr=88,
    ...     travel_distance_km=12, site_id="site-1", arm="50 mg")
    >>> h.next_visit(30).day
    56
    """

    visits: tuple[Visit, ...]
    doses: tuple[Dose, ...]
    adverse_events: tuple[AdverseEventRecord, ...]
    age_years: float
    sex: str
    weight_kg: float
    egfr: float
    travel_distance_km: float
    site_id: str
    arm: str
    participant_id: str | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "visits", tuple(sorted(self.visits, key=lambda v: v.day)))
        object.__setattr__(self, "doses", tuple(sorted(self.doses, key=lambda d: d.day)))
        object.__setattr__(self, "adverse_events", tuple(sorted(self.adverse_events, key=lambda a: a.day)))
        for name, lo, hi in (("age_years", 0, 130), ("weight_kg", 1, 500), ("egfr", 0, 250),
                             ("travel_distance_km", 0, 20000)):
            value = getattr(self, name)
            if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ParticipantHistory.{name} is missing or not a finite number: {value!r}")
            if not lo <= value <= hi:
                raise ValueError(f"ParticipantHistory.{name}={value!r} outside the plausible range [{lo}, {hi}]")
        if self.sex not in SEXES:
            raise ValueError(f"ParticipantHistory.sex must be one of {SEXES}, got {self.sex!r}")
        if not self.arm:
            raise ValueError("ParticipantHistory.arm is required")

    def replace(self, **changes) -> "ParticipantHistory":
        """Return a copy with ``changes`` applied (validated again)."""
        return _replace(self, **changes)

    def next_visit(self, as_of_day: float) -> Visit | None:
        """The first scheduled visit strictly after ``as_of_day``, or ``None``."""
        for visit in self.visits:
            if visit.day > as_of_day:
                return visit
        return None


@dataclass(frozen=True)
class FeatureSpec:
    """Name, unit and meaning of one model input column."""

    name: str
    unit: str
    meaning: str


FEATURE_SCHEMA: tuple[FeatureSpec, ...] = (
    FeatureSpec("days_on_study", "d", "as-of study day (time since randomization)"),
    FeatureSpec("n_past_visits", "1", "scheduled visits on or before the as-of day"),
    FeatureSpec("missed_visit_rate", "1",
                "Laplace-smoothed share of past visits missed: (missed + 1) / (past + 2); 0.5 with no history"),
    FeatureSpec("last_visit_missed", "1", "1 if the most recent past visit was missed, else 0 (0 with none)"),
    FeatureSpec("consecutive_missed", "1", "number of missed visits in a row up to the as-of day"),
    FeatureSpec("adherence_30d", "1",
                "Laplace-smoothed share of doses taken in the last 30 days: (taken + 1) / (due + 2)"),
    FeatureSpec("adherence_overall", "1", "Laplace-smoothed share of all due doses taken so far"),
    FeatureSpec("n_adverse_events", "1", "adverse events with onset on or before the as-of day"),
    FeatureSpec("ae_severity_30d", "1", "sum of severities (1-3) of adverse events in the last 30 days"),
    FeatureSpec("days_since_last_ae", "d", f"days since the last adverse event, capped at {DAYS_SINCE_CAP:g} (cap if none)"),
    FeatureSpec("ae_last_14d", "1", "1 if an adverse event began in the last 14 days, else 0"),
    FeatureSpec("days_to_next_visit", "d", "days from the as-of day to the next scheduled visit"),
    FeatureSpec("next_visit_remote", "1", "1 if the next visit is remote, 0 if in person"),
    FeatureSpec("next_visit_travel_km", "km", "travel distance if the next visit is in person, 0 if remote"),
    FeatureSpec("visits_30d_to_next", "1", "scheduled visits in the 30 days ending with the next visit (it included)"),
    FeatureSpec("age_years", "a", "age at enrolment"),
    FeatureSpec("sex_female", "1", "1 female, 0 male"),
    FeatureSpec("weight_kg", "kg", "baseline body weight"),
    FeatureSpec("egfr", "mL/min/{1.73_m2}", "baseline eGFR"),
    FeatureSpec("log_travel_km", "1", "ln(1 + travel distance to site in km)"),
    FeatureSpec("arm_placebo", "1", "1 if assigned to placebo, else 0"),
)
FEATURE_NAMES: tuple[str, ...] = tuple(spec.name for spec in FEATURE_SCHEMA)
N_FEATURES = len(FEATURE_SCHEMA)


def dropout_features(history: ParticipantHistory, as_of_day: float) -> np.ndarray:
    """Feature vector (float32, ``FEATURE_NAMES`` order) for predicting attendance at the next visit.

    Only events on or before ``as_of_day`` are used, so a history containing later outcomes
    yields the same features as one cut at ``as_of_day`` (no look-ahead).

    Parameters
    ----------
    history : ParticipantHistory
        The participant's record.
    as_of_day : float
        Study day at which the prediction is made.

    Returns
    -------
    numpy.ndarray
        Shape ``(N_FEATURES,)``, dtype float32.

    Raises
    ------
    ValueError
        If ``as_of_day`` is not finite, there is no visit after it, or a past visit has no outcome.

    Examples
    --------
    >>> h = ParticipantHistory(visits=(Visit(28, False), Visit(56, None, "remote")),
    ...     doses=tuple(Dose(d, d % 2 == 0) for d in range(30)), adverse_events=(),
    ...     age_years=54, sex="female", weight_kg=82, egfr=88, travel_distance_km=12,
    ...     site_id="site-1", arm="placebo")
    >>> x = dropout_features(h, 30)
    >>> round(float(x[FEATURE_NAMES.index("missed_visit_rate")]), 3)
    0.667
    >>> x.dtype, x.shape == (N_FEATURES,)
    (dtype('float32'), True)
    """
    if as_of_day is None or not math.isfinite(as_of_day) or as_of_day < 0:
        raise ValueError(f"as_of_day must be a finite day >= 0, got {as_of_day!r}")
    past = [v for v in history.visits if v.day <= as_of_day]
    undecided = [v.day for v in past if v.attended is None]
    if undecided:
        raise ValueError(f"visits on days {undecided} are on or before as_of_day={as_of_day} but have no outcome")
    nxt = history.next_visit(as_of_day)
    if nxt is None:
        raise ValueError(f"no scheduled visit after as_of_day={as_of_day}: nothing to predict")

    missed = [not v.attended for v in past]
    consecutive = 0
    for was_missed in reversed(missed):
        if not was_missed:
            break
        consecutive += 1

    due = [d for d in history.doses if d.day <= as_of_day]
    recent = [d for d in due if d.day > as_of_day - RECENT_WINDOW_DAYS]
    aes = [a for a in history.adverse_events if a.day <= as_of_day]
    recent_ae = [a for a in aes if a.day > as_of_day - RECENT_WINDOW_DAYS]

    row = (
        as_of_day,
        len(past),
        (sum(missed) + 1.0) / (len(past) + 2.0),
        float(bool(missed) and missed[-1]),
        consecutive,
        (sum(d.taken for d in recent) + 1.0) / (len(recent) + 2.0),
        (sum(d.taken for d in due) + 1.0) / (len(due) + 2.0),
        len(aes),
        sum(a.severity for a in recent_ae),
        min(as_of_day - aes[-1].day, DAYS_SINCE_CAP) if aes else DAYS_SINCE_CAP,
        float(bool(aes) and as_of_day - aes[-1].day < AE_RECENT_DAYS),
        nxt.day - as_of_day,
        float(nxt.modality == "remote"),
        0.0 if nxt.modality == "remote" else history.travel_distance_km,
        sum(1 for v in history.visits if nxt.day - RECENT_WINDOW_DAYS < v.day <= nxt.day),
        history.age_years,
        float(history.sex == "female"),
        history.weight_kg,
        history.egfr,
        math.log1p(history.travel_distance_km),
        float(history.arm.strip().lower() == "placebo"),
    )
    return np.asarray(row, dtype=np.float32)


def dropout_feature_matrix(pairs: Iterable[tuple[ParticipantHistory, float]]) -> np.ndarray:
    """Stack ``dropout_features`` for ``(history, as_of_day)`` pairs into an ``(n, N_FEATURES)`` float32 array.

    Examples
    --------
    >>> dropout_feature_matrix([]).shape
    (0, 21)
    """
    rows = [dropout_features(h, day) for h, day in pairs]
    if not rows:
        return np.zeros((0, N_FEATURES), dtype=np.float32)
    return np.vstack(rows)


def check_feature_matrix(x, n_features: int = N_FEATURES,
                         names: tuple[str, ...] | None = FEATURE_NAMES) -> np.ndarray:
    """Validate a serve-time input matrix and return it as C-contiguous float32.

    Parameters
    ----------
    x : array_like
        Rows of features; a single row may be 1-D.
    n_features : int
        Expected number of columns.
    names : tuple of str, optional
        Column names, used to name the offending feature in errors.

    Raises
    ------
    ValueError
        On a non-numeric dtype, wrong shape or column count, or any NaN/inf (the message names
        the feature and row).

    Examples
    --------
    >>> check_feature_matrix([[0.0, float("nan")]], 2, ("a", "b"))
    Traceback (most recent call last):
    ...
    ValueError: feature 'b' (column 1) is NaN or infinite in row 0; missing values are not allowed at serve time
    """
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
                                   or arr.dtype == np.bool_):
        raise ValueError(f"features must be numeric (float32 preferred), got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"features must be a 2-D array (rows x {n_features}), got {arr.ndim} dimensions")
    if arr.shape[1] != n_features:
        raise ValueError(f"expected {n_features} features per row, got {arr.shape[1]}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        label = f"'{names[col]}' (column {col})" if names and len(names) == n_features else f"column {col}"
        raise ValueError(f"feature {label} is NaN or infinite in row {row}; "
                         "missing values are not allowed at serve time")
    return arr
