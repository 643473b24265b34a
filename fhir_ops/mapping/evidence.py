"""Read a study (or a Group of external patients) into the analysis table of a treatment-effect estimate.

One row per participant: arm, the endpoint's value at the primary time point, and baseline
covariates, with the exact versions of every resource read (for Provenance). Time zero is the
randomization date (``ResearchSubject.period.start``) or, for a Group, the member's
``period.start`` (the index date of an external patient); without one, the first endpoint record.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from fhir_ops.errors import InvalidRequest, NotFound, Unprocessable
from fhir_ops.mapping.participant import parse_datetime
from fhir_ops.store.base import Store
from terminology.ucum import UcumError, convert

#: Covariate names understood besides ``system|code`` tokens of baseline Observations.
AGE, SEX, BASELINE = "age", "sex", "baseline"


@dataclass(frozen=True)
class Endpoint:
    """The analysed measurement: an Observation code, the time point and the window around it (days)."""

    system: str
    code: str
    day: float
    window: float

    @property
    def token(self) -> str:
        return f"{self.system}|{self.code}"


@dataclass
class AnalysisTable:
    """Plain arrays for the engine; ``inputs`` are versioned references of everything read."""

    patient_ids: list[str]
    arms: np.ndarray
    outcome: np.ndarray
    covariates: dict[str, np.ndarray]
    unit: str | None
    inputs: list[str] = field(default_factory=list)
    source: str = ""

    def rows(self, mask: np.ndarray) -> "AnalysisTable":
        return AnalysisTable([p for p, k in zip(self.patient_ids, mask) if k], self.arms[mask], self.outcome[mask],
                             {n: v[mask] for n, v in self.covariates.items()}, self.unit, self.inputs, self.source)


def parse_token(value: str, parameter: str) -> tuple[str, str]:
    """``system|code`` → (system, code); anything else is a 400 naming the parameter."""
    system, sep, code = value.partition("|")
    if not sep or not system or not code:
        raise InvalidRequest(f"Parameter '{parameter}' must be a token system|code; got {value!r}",
                             error_id="invalid-token", expression=[f"Parameters.parameter:{parameter}"])
    return system, code


def _versioned(resource: dict) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource.get('meta', {}).get('versionId', '1')}"


def _days(when: datetime, zero: datetime) -> float:
    return (when - zero).total_seconds() / 86400.0


def _effective(obs: dict) -> datetime | None:
    value = obs.get("effectiveDateTime") or (obs.get("effectivePeriod") or {}).get("start") or obs.get("issued")
    return parse_datetime(value) if value else None


class _Reader:
    """Reads participants one by one, converting every value of a code to one unit."""

    def __init__(self, store: Store, endpoint: Endpoint, covariates: list[str]):
        self.store, self.endpoint, self.covariates = store, endpoint, covariates
        self.units: dict[str, str] = {}
        self.inputs: list[str] = []
        self.dropped_units: dict[str, int] = {}
        self._by_code: dict[str, dict[str, list[tuple[datetime, dict]]]] = {}

    def _records(self, patient_id: str, token: str) -> list[tuple[datetime, dict]]:
        """Dated, final, non-simulated Observations of one code for one patient (one search per code)."""
        if token not in self._by_code:
            grouped: dict[str, list[tuple[datetime, dict]]] = {}
            for o in self.store.search_all("Observation", [("code", token)]):
                tags = {t.get("code") for t in o.get("meta", {}).get("tag", [])}
                when = _effective(o)
                if o.get("status") in ("final", "amended", "corrected") and "simulated" not in tags and when:
                    ref = (o.get("subject") or {}).get("reference", "")
                    grouped.setdefault(ref.removeprefix("Patient/"), []).append((when, o))
            self._by_code[token] = grouped
        return self._by_code[token].get(patient_id, [])

    def _value(self, token: str, obs: dict) -> float | None:
        q = obs.get("valueQuantity") or {}
        if "value" not in q:
            return None
        unit = q.get("code") or q.get("unit")
        target = self.units.setdefault(token, unit)
        if unit == target:
            return float(q["value"])
        try:
            return convert(q["value"], unit, target)
        except (UcumError, TypeError, ValueError):
            self.dropped_units[token] = self.dropped_units.get(token, 0) + 1
            return None

    def _closest(self, patient_id: str, token: str, zero: datetime | None, day: float, window: float
                 ) -> tuple[float, datetime | None]:
        dated = self._records(patient_id, token)
        if not dated:
            return np.nan, None
        if zero is None:  # no index date: the first record is day 0
            zero = min(w for w, _ in dated)
        best = None
        for when, obs in dated:
            d = abs(_days(when, zero) - day)
            if d <= window and (best is None or d < best[0]):
                best = (d, obs)
        if best is None:
            return np.nan, zero
        value = self._value(token, best[1])
        if value is not None:
            self.inputs.append(_versioned(best[1]))
        return (np.nan if value is None else value), zero

    def row(self, patient_id: str, zero: datetime | None) -> tuple[float, dict[str, float]]:
        e = self.endpoint
        outcome, zero = self._closest(patient_id, e.token, zero, e.day, e.window)
        covs: dict[str, float] = {}
        patient = None
        for name in self.covariates:
            if name in (AGE, SEX):
                if patient is None:
                    patient = self.store.read("Patient", patient_id)
                    self.inputs.append(_versioned(patient))
                if name == SEX:
                    covs[name] = {"female": 1.0, "male": 0.0}.get(patient.get("gender"), np.nan)
                else:
                    born = patient.get("birthDate")
                    ref = zero or datetime.now().astimezone()
                    covs[name] = _days(ref, parse_datetime(born)) / 365.25 if born else np.nan
            elif name == BASELINE:
                covs[name] = self._closest(patient_id, e.token, zero, 0.0, e.window)[0]
            else:
                system, code = parse_token(name, "covariate")
                covs[name] = self._closest(patient_id, f"{system}|{code}", zero, 0.0, e.window)[0]
        return outcome, covs


def _study_members(store: Store, study_id: str) -> list[tuple[str, str | None, datetime | None, dict]]:
    study = store.read("ResearchStudy", study_id)
    subjects = store.search_all("ResearchSubject", [("study", f"ResearchStudy/{study_id}")])
    out = []
    for s in subjects:
        ref = (s.get("individual") or {}).get("reference", "")
        if not ref.startswith("Patient/"):
            continue
        start = (s.get("period") or {}).get("start")
        out.append((ref.split("/", 1)[1], s.get("assignedArm"), parse_datetime(start) if start else None, s))
    return [(pid, arm, zero, s) for pid, arm, zero, s in out] + [("", None, None, study)]


def _group_members(store: Store, group_id: str) -> list[tuple[str, str | None, datetime | None, dict]]:
    group = store.read("Group", group_id)
    out = []
    for m in group.get("member", []):
        ref = (m.get("entity") or {}).get("reference", "")
        if ref.startswith("Patient/") and not m.get("inactive", False):
            start = (m.get("period") or {}).get("start")
            out.append((ref.split("/", 1)[1], None, parse_datetime(start) if start else None, None))
    return out + [("", None, None, group)]


def load_table(store: Store, reference: str, endpoint: Endpoint, covariates: list[str], *,
               arms: set[str] | None = None, parameter: str = "subject") -> tuple[AnalysisTable, dict]:
    """The analysis table of ``ResearchStudy/{id}`` or ``Group/{id}`` (only ``arms`` when given).

    Returns the table (rows with a missing outcome or covariate are kept as NaN; the caller drops
    them and reports how many) and a dict of reading notes (values dropped for units).
    """
    kind, _, rid = reference.partition("/")
    if kind not in ("ResearchStudy", "Group") or not rid or "/" in rid:
        raise InvalidRequest(f"Parameter '{parameter}' must reference a ResearchStudy or a Group; got {reference!r}",
                             error_id="invalid-reference", expression=[f"Parameters.parameter:{parameter}"])
    try:
        members = _study_members(store, rid) if kind == "ResearchStudy" else _group_members(store, rid)
    except NotFound:
        raise NotFound(f"{reference} (parameter '{parameter}') does not exist", error_id="not-found",
                       expression=[f"Parameters.parameter:{parameter}"]) from None
    *people, (_, _, _, container) = members
    reader = _Reader(store, endpoint, covariates)
    reader.inputs.append(_versioned(container))
    ids, arm_list, outcomes, rows = [], [], [], []
    for pid, arm, zero, subject in people:
        if arms is not None and arm not in arms:
            continue
        if subject is not None:
            reader.inputs.append(_versioned(subject))
        y, covs = reader.row(pid, zero)
        ids.append(pid)
        arm_list.append(arm)
        outcomes.append(y)
        rows.append(covs)
    if not ids:
        what = f" in arms {sorted(arms)}" if arms is not None else ""
        raise Unprocessable(f"{reference} has no participants{what}", error_id="no-participants",
                            expression=[f"Parameters.parameter:{parameter}"])
    table = AnalysisTable(ids, np.asarray(arm_list, dtype=object), np.asarray(outcomes, dtype=float),
                          {n: np.asarray([r[n] for r in rows], dtype=float) for n in covariates},
                          reader.units.get(endpoint.token), reader.inputs, reference)
    return table, {"droppedForUnit": reader.dropped_units}
