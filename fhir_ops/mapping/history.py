"""One participant's trial behaviour (visits, doses, adverse events, covariates) as the dropout model's history.

Turns a :class:`~fhir_ops.mapping.participant.ParticipantRecord` into the FHIR-free
``inference.features.ParticipantHistory`` plus the exact resource versions it was built from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from fhir_ops.errors import Unprocessable
from fhir_ops.mapping.participant import ParticipantRecord, load_participant
from fhir_ops.store.base import Store
from inference.features import AdverseEventRecord, Dose, ParticipantHistory, Visit

__all__ = ["MappedHistory", "participant_history", "load_history", "study_day", "study_date",
           "DOSES_PER_DAY"]

#: The protocols the dropout model was trained for dose once daily. No MedicationRequest carries the
#: regimen in the demo study, and an e-diary leaves no record for a missed dose, so a study day
#: without a completed MedicationAdministration counts as a missed dose.
DOSES_PER_DAY = 1

#: Resource types whose content feeds the dropout features (Observations only for the covariates).
_EVENT_TYPES = ("Appointment", "MedicationAdministration", "AdverseEvent")


@dataclass(frozen=True)
class MappedHistory:
    """A participant's history on one as-of day and what it was read from.

    Attributes
    ----------
    history : inference.features.ParticipantHistory
        Days are study days: whole days since randomization (``ResearchSubject.period.start``).
    as_of : datetime
        The moment of the prediction (aware, UTC).
    as_of_day : int
        Study day of ``as_of``; the model sees events of this day and earlier.
    randomized : datetime
        Midnight UTC of the randomization date (study day 0).
    inputs : list of str
        Versioned references (``Type/id/_history/n``) of every resource whose content went into the
        features: Patient, ResearchSubject, the covariate Observations, the Appointments up to and
        including the next visit, and the dose and adverse-event records up to ``as_of``.
    next_visit : datetime or None
        Start of the next scheduled visit after ``as_of``.
    """

    history: ParticipantHistory
    as_of: datetime
    as_of_day: int
    randomized: datetime
    inputs: list[str]
    next_visit: datetime | None


def study_day(randomized: datetime, when: datetime) -> int:
    """Whole study days from the randomization date to ``when`` (calendar days, UTC).

    Examples
    --------
    >>> from datetime import datetime, timezone
    >>> study_day(datetime(2026, 5, 4, tzinfo=timezone.utc), datetime(2026, 6, 1, 9, 30, tzinfo=timezone.utc))
    28
    """
    return (when.astimezone(timezone.utc).date() - randomized.astimezone(timezone.utc).date()).days


def study_date(randomized: datetime, day: float) -> datetime:
    """Midnight UTC of study day ``day``."""
    start = randomized.astimezone(timezone.utc)
    return datetime(start.year, start.month, start.day, tzinfo=timezone.utc) + timedelta(days=float(day))


def _without_history(patient_id: str, why: str) -> Unprocessable:
    return Unprocessable(f"Patient/{patient_id} {why}: there is no trial behaviour to predict from",
                         error_id="participant-without-history")


def participant_history(record: ParticipantRecord, as_of: datetime | None = None) -> MappedHistory:
    """Build the dropout model's view of ``record`` as of ``as_of``.

    Parameters
    ----------
    record : ParticipantRecord
        From :func:`fhir_ops.mapping.participant.load_participant`.
    as_of : datetime, optional
        When the prediction is made; defaults to the participant's last recorded data (dose,
        observation, held or missed visit, adverse event), which is what a data cut knows.

    Returns
    -------
    MappedHistory

    Raises
    ------
    Unprocessable
        422 ``participant-without-history`` when there are neither visits nor doses (or no
        randomization date); ``missing-covariate`` when age, sex, weight, eGFR or travel distance is
        unknown; ``as-of-before-randomization``; ``visit-without-outcome`` when a visit before
        ``as_of`` is still only booked; ``no-next-visit`` when nothing is scheduled after ``as_of``.

    Notes
    -----
    Today's dose counts as due only once it is recorded (taken or not-done), so a prediction made in
    the morning does not count the not-yet-taken dose of that day as missed. Doses stop being due at
    the end of participation (``ResearchSubject.period.end``).
    """
    pid = record.patient_id
    if not record.visits and not record.dose_records:
        raise _without_history(pid, "has no visits (Appointment) and no dosing records (MedicationAdministration)")
    if record.enrolled is None:
        raise _without_history(pid, "has no randomization date (ResearchSubject.period.start)")
    randomized = record.enrolled
    if as_of is None:
        as_of = _last_data(record) or datetime.now(timezone.utc)
    as_of_day = study_day(randomized, as_of)
    if as_of_day < 0:
        raise Unprocessable(f"asOf {as_of.isoformat()} lies before the randomization of Patient/{pid} "
                            f"({randomized.date().isoformat()})", error_id="as-of-before-randomization")

    visits = []
    next_visit: tuple[int, datetime | None] | None = None
    for v in record.visits:
        when = v.start or (record.origin + timedelta(days=v.day))
        day = study_day(randomized, when)
        held = when <= as_of
        if v.status == "booked" or not held:
            attended = None
        else:
            attended = v.status != "noshow"
        if held and attended is None:
            raise Unprocessable(f"Patient/{pid}: the visit of {when.date().isoformat()} ({v.source}) is before asOf "
                                f"{as_of.isoformat()} but is still only booked; record it as fulfilled or noshow "
                                "or predict as of an earlier time", error_id="visit-without-outcome")
        if day <= as_of_day and not held:
            day = as_of_day + 1  # later today: for the model it is the next visit, not a past one
        visits.append(Visit(day, attended, "remote" if v.remote else "in-person"))
        if not held and (next_visit is None or when < next_visit[1]):
            next_visit = (day, when)
    if next_visit is None:
        raise Unprocessable(f"Patient/{pid} has no visit scheduled after {as_of.isoformat()}: there is no next "
                            "visit to predict attendance at", error_id="no-next-visit")

    last_due = as_of_day
    if record.ended is not None:
        last_due = min(last_due, study_day(randomized, record.ended) - 1)
    recorded = {}
    for when, taken, _ in record.dose_records:
        if when <= as_of:
            day = study_day(randomized, when)
            recorded[day] = recorded.get(day, False) or taken
    doses = [Dose(day, recorded.get(day, False)) for day in range(0, last_due + 1)
             if day < as_of_day or day in recorded]

    aes = []
    for day_since_origin, grade in zip(record.adverse_event_days, record.adverse_event_grades):
        when = record.origin + timedelta(days=float(day_since_origin))
        if when <= as_of:
            aes.append(AdverseEventRecord(max(study_day(randomized, when), 0), int(grade)))

    cov = record.covariates
    missing = [name for name, key in (("age (Patient.birthDate)", "age"),
                                      ("weight (Observation 29463-7)", "weight"),
                                      ("eGFR (Observation 62238-1)", "egfr"),
                                      ("travel distance (Observation covariate#travel-distance)", "travel_km"))
               if key not in cov or not math.isfinite(cov[key])]
    if missing:
        raise Unprocessable(f"Patient/{pid} lacks covariates the dropout model needs: {', '.join(missing)}",
                            error_id="missing-covariate")
    # covariates are relative to the first dose in the record; the model wants age at randomization
    age = cov["age"] - (record.origin - randomized).days / 365.25
    try:
        history = ParticipantHistory(
            visits=tuple(visits), doses=tuple(doses), adverse_events=tuple(aes), age_years=age,
            sex="female" if cov.get("female") else "male", weight_kg=cov["weight"], egfr=cov["egfr"],
            travel_distance_km=cov["travel_km"], site_id=record.site or "unknown", arm=record.arm or "unknown",
            participant_id=pid)
    except ValueError as exc:
        raise Unprocessable(f"Patient/{pid}: {exc}", error_id="invalid-history") from None
    return MappedHistory(history, as_of, as_of_day, study_date(randomized, 0),
                         _inputs(record, as_of, next_visit[1]), next_visit[1])


def _last_data(record: ParticipantRecord) -> datetime | None:
    times = [t for ref, t in record.source_times.items() if t is not None and ref.startswith(
        ("Observation/", "MedicationAdministration/", "AdverseEvent/"))]
    times += [v.start for v in record.visits if v.start is not None and v.status in ("fulfilled", "noshow")]
    return max(times) if times else None


def _inputs(record: ParticipantRecord, as_of: datetime, next_visit: datetime) -> list[str]:
    used = []
    for ref, when in record.source_times.items():
        kind = ref.split("/", 1)[0]
        if kind in ("Patient", "ResearchSubject"):
            used.append(ref)
        elif kind in _EVENT_TYPES and when is not None:
            limit = next_visit if kind == "Appointment" else as_of
            if when <= limit:
                used.append(ref)
    used.extend(sorted(set(record.covariate_sources.values())))
    return used


def load_history(store: Store, patient_id: str, as_of: datetime | None = None) -> MappedHistory:
    """Read a participant from ``store`` and map it (see :func:`participant_history`).

    Raises
    ------
    NotFound
        The Patient does not exist.
    Unprocessable
        As :func:`participant_history`; also ``participant-without-history`` when the Patient has no
        ResearchSubject and no dosing records at all.
    """
    try:
        record = load_participant(store, patient_id)
    except Unprocessable as exc:
        if exc.error_id == "participant-without-data":
            raise _without_history(patient_id, "has no ResearchSubject enrolment and no dosing records") from None
        raise
    return participant_history(record, as_of)
