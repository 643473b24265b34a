"""The one place training data for learned models are gathered from a study's FHIR resources.

Every participant whose secondary-use Consent is withdrawn is left out here (and named, for the
Provenance); nothing else reads a study's data for training.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

from fhir_ops.errors import FhirError
from fhir_ops.mapping import consent as consent_map
from fhir_ops.mapping.history import participant_history
from fhir_ops.mapping.model_definition import study_participants
from fhir_ops.mapping.participant import load_participant
from inference.features import dropout_feature_matrix
from inference.model_loop import TrainingRows

__all__ = ["StudyTrainingData", "gather_training_data", "MAX_LEAD_DAYS"]

#: rows are taken 1 to this many days before each visit (drawn per row, seeded), as in the
#: simulated training data of the committed model (inference.training.dropout)
MAX_LEAD_DAYS = 14
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class StudyTrainingData:
    """Labelled rows of one study and what they were built from.

    Attributes
    ----------
    rows : inference.model_loop.TrainingRows
        Features (``times``: days since 1970 of the visit each label is about).
    inputs : list of str
        Versioned references of every resource that went into a row (pinned by the Provenance).
    participants : list of str
        Patient ids with at least one row.
    left_out : list of fhir_ops.mapping.consent.Withdrawal
        Participants left out because they withdrew consent to secondary use.
    skipped : list of str
        Why other participants gave no rows (no data, missing covariates).
    window : tuple of datetime or None
        First as-of moment and last labelled visit.
    """

    rows: TrainingRows
    inputs: list[str]
    participants: list[str]
    left_out: list
    skipped: list[str] = field(default_factory=list)
    window: tuple[datetime, datetime] | None = None


def _days(when: datetime) -> float:
    return (when - _EPOCH).total_seconds() / 86400.0


def _missed_visit_rows(record, seed: int):
    """(features, label, visit time, as-of time, inputs) of each held visit after randomization."""
    held = sorted((v for v in record.visits if v.status in ("fulfilled", "noshow") and v.start is not None),
                  key=lambda v: v.start)
    out = []
    previous = record.enrolled
    for k, visit in enumerate(held):
        gap = (visit.start.date() - previous.date()).days if previous is not None else 0
        previous = visit.start
        if gap < 2:
            continue  # the baseline visit (or one a day after the last): no day before it to predict from
        rng = np.random.default_rng([seed, zlib.crc32(record.patient_id.encode()), k])
        lead = int(rng.integers(1, min(MAX_LEAD_DAYS, gap - 1) + 1))
        day = visit.start.astimezone(timezone.utc)
        as_of = datetime(day.year, day.month, day.day, tzinfo=timezone.utc) - timedelta(days=lead)
        mapped = participant_history(record, as_of)
        if mapped.next_visit != visit.start:
            continue  # another visit was booked in between: this row would be about that one
        x = dropout_feature_matrix([(mapped.history, mapped.as_of_day)])[0]
        out.append((x, int(visit.status == "noshow"), visit.start, as_of, mapped.inputs))
    return out


#: model family -> row builder; the withdrawal family adds its own builder here
ROW_BUILDERS = {"dropout": _missed_visit_rows}


def gather_training_data(store, study_id: str, family: str = "dropout", *, seed: int = 0,
                         until: datetime | None = None, progress=None, cancelled=None) -> StudyTrainingData:
    """Labelled rows of study ``study_id`` for model ``family``, leaving out secondary-use withdrawals.

    Parameters
    ----------
    store : Store
        The server's store.
    study_id : str
        ResearchStudy id (its ResearchSubjects name the participants).
    family : str
        Model family (``dropout``: one row per held visit, label = recorded no-show).
    seed : int
        Seed of the per-row lead days (rows are reproducible).
    until : datetime, optional
        Only visits up to this moment are labels (default: everything recorded).
    progress, cancelled : callable, optional
        Job hooks (``progress(fraction, message)``, ``cancelled() -> bool``).

    Raises
    ------
    KeyError
        Unknown family.
    NotFound, Gone
        Unknown or deleted study.
    """
    builder = ROW_BUILDERS[family]
    store.read("ResearchStudy", study_id)
    subjects = study_participants(store, study_id)
    # training is secondary use of the participants' data: a recorded withdrawal takes them out
    withdrawn = consent_map.withdrawals(store, consent_map.SECONDARY_USE)
    left_out = [withdrawn[pid] for _, pid in subjects if pid in withdrawn]
    X, y, times, as_of, who, inputs, used, skipped = [], [], [], [], [], [], [], []
    for i, (_, pid) in enumerate(subjects):
        if cancelled is not None and cancelled():
            raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                            error_id="cancelled")
        if progress is not None:
            progress(0.5 * (i + 1) / len(subjects), f"read {i + 1} of {len(subjects)} participants")
        if pid in withdrawn:
            continue
        try:
            record = load_participant(store, pid)
            if record.enrolled is None:
                skipped.append(f"Patient/{pid}: no randomization date (ResearchSubject.period.start)")
                continue
            rows = builder(record, seed)
        except FhirError as exc:
            skipped.append(f"Patient/{pid}: {exc.message}")
            continue
        rows = [r for r in rows if until is None or r[2] <= until]
        if not rows:
            continue
        used.append(pid)
        for x, label, when, at, refs in rows:
            X.append(x)
            y.append(label)
            times.append(_days(when))
            as_of.append(_days(at))
            who.append(pid)
            inputs.extend(refs)
    n_features = len(X[0]) if X else 0
    data = TrainingRows(np.asarray(X, dtype=np.float32).reshape(len(X), n_features), np.asarray(y, dtype=np.int8),
                        np.asarray(times, dtype=float), np.asarray(as_of, dtype=float), tuple(who))
    window = None
    if X:
        window = (_EPOCH + timedelta(days=float(min(as_of))), _EPOCH + timedelta(days=float(max(times))))
    return StudyTrainingData(data, list(dict.fromkeys(inputs)), used, left_out, skipped, window)
