"""Read one participant's trial data from the store into plain, engine-ready arrays.

Everything FHIR-shaped about a participant (codes, references, units, statuses) is decided
here; the engine receives times in hours since the first dose and values in canonical units.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Sequence

import numpy as np

from fhir_ops.errors import NotFound, Unprocessable
from fhir_ops.store.base import Store

LOINC = "http://loinc.org"
ASSAY = "https://trialtwin.org/fhir/CodeSystem/assay"
COVARIATE = "https://trialtwin.org/fhir/CodeSystem/covariate"
AE_SEVERITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/adverse-event-severity"
#: AdverseEvent.severity code -> grade 1-3 (the scale of ``inference.features.AdverseEventRecord``)
AE_GRADES = {"mild": 1, "moderate": 2, "severe": 3}
#: An ungraded event counts as moderate, the middle grade, so it neither vanishes nor dominates.
AE_GRADE_UNKNOWN = 2

#: engine name -> (code system, code, canonical UCUM unit)
MEASUREMENTS: dict[str, tuple[str, str, str]] = {
    "hba1c": (LOINC, "4548-4", "%"),
    "fpg": (LOINC, "1558-6", "mg/dL"),
    "weight": (LOINC, "29463-7", "kg"),
    "heart_rate": (LOINC, "8867-4", "/min"),
    "sbp": (LOINC, "8480-6", "mm[Hg]"),
    "egfr": (LOINC, "62238-1", "mL/min/{1.73_m2}"),
    "concentration": (ASSAY, "TTX101-PK", "ng/mL"),
    # the demo (and an EDC export) records home-to-site distance as a social-history Observation
    "travel_distance": (COVARIATE, "travel-distance", "km"),
}
_BY_CODE = {(system, code): name for name, (system, code, _) in MEASUREMENTS.items()}

#: measurement names that are time-varying outcomes the twin forecasts
OUTCOMES = ("concentration", "fpg", "hba1c")


@dataclass(frozen=True, eq=False)
class Series:
    """Observed values of one measurement: times in hours since ``origin`` and canonical values."""

    times_h: np.ndarray
    values: np.ndarray
    unit: str


@dataclass(frozen=True, eq=False)
class Visit:
    """One scheduled visit (Appointment): ``day`` since ``origin``; ``attended`` is False for booked ones,
    so read ``status`` (``fulfilled`` / ``noshow`` / ``booked`` ...) to tell missed from not yet held."""

    day: float
    attended: bool
    remote: bool
    status: str
    start: datetime | None = None
    source: str | None = None


@dataclass(frozen=True, eq=False)
class ParticipantRecord:
    """Everything the engine needs about one participant, in plain values.

    ``origin`` is the time of the first recorded dose (or enrolment if no dose yet); all
    times are hours (PK, observations) or days (visits, adverse events) since it.
    ``sources`` are versioned references of every resource read, for Provenance.
    """

    patient_id: str
    origin: datetime
    covariates: dict[str, float]
    arm: str | None
    status: str | None
    dose_times_h: np.ndarray
    dose_amounts_mg: np.ndarray
    missed_dose_times_h: np.ndarray
    series: dict[str, Series]
    visits: list[Visit]
    adverse_event_days: np.ndarray
    site: str | None
    sources: list[str] = field(default_factory=list)
    last_data_time: datetime | None = None
    #: ResearchSubject.period: randomization (start) and end of participation (withdrawal, completion)
    enrolled: datetime | None = None
    ended: datetime | None = None
    #: grade 1-3 of each adverse event, aligned with ``adverse_event_days``
    adverse_event_grades: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    #: versioned reference -> the time its content refers to (None for timeless ones: Patient,
    #: ResearchSubject), so a caller can name exactly the inputs it used up to some time
    source_times: dict[str, datetime | None] = field(default_factory=dict)
    #: covariate name (``covariates`` key) -> versioned reference of the resource it was read from
    covariate_sources: dict[str, str] = field(default_factory=dict)
    #: versioned references of completed (taken) and not-done MedicationAdministrations, by time
    dose_records: tuple[tuple[datetime, bool, str], ...] = ()
    #: measurement name -> versioned references of the Observations behind ``series[name]``, in the
    #: same (time) order as its values, so a twin can name exactly the observations it used
    series_sources: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def n_observations(self) -> int:
        return int(sum(len(s.values) for name, s in self.series.items() if name in OUTCOMES))

    def hours(self, when: datetime) -> float:
        return (when - self.origin).total_seconds() / 3600.0


def parse_datetime(value: str) -> datetime:
    """Parse a FHIR date/dateTime/instant into an aware UTC datetime (dates at midnight UTC)."""
    if len(value) == 4:
        value += "-01-01"
    elif len(value) == 7:
        value += "-01"
    if len(value) == 10:
        d = date.fromisoformat(value)
        return datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def versioned(resource: dict) -> str:
    """``Type/id/_history/n`` of a stored resource (exact version, for Provenance)."""
    version = resource.get("meta", {}).get("versionId")
    base = f"{resource['resourceType']}/{resource['id']}"
    return f"{base}/_history/{version}" if version else base


#: molar masses (g/mol) that bridge mass and amount of substance, by measurement
MOLAR_MASS = {"fpg": 180.156}  # glucose C6H12O6


def _convert(value: float, unit: str, canonical: str, where: str, molar_mass: float | None = None) -> float:
    if unit == canonical:
        return value
    try:
        from terminology.ucum import convert  # the terminology package owns unit knowledge
    except ImportError as exc:  # pragma: no cover - terminology ships with the product
        raise Unprocessable(f"{where}: unit {unit!r} is not {canonical!r} and no converter is installed") from exc
    try:
        return float(convert(value, unit, canonical, molar_mass=molar_mass))
    except ValueError as exc:
        raise Unprocessable(f"{where}: cannot convert {unit!r} to {canonical!r}: {exc}",
                            error_id="incompatible-unit") from exc


def _measurement(observation: dict, by_code: dict = _BY_CODE) -> str | None:
    for coding in observation.get("code", {}).get("coding", []):
        name = by_code.get((coding.get("system"), coding.get("code")))
        if name:
            return name
    return None


def _effective(resource: dict) -> datetime | None:
    for key in ("effectiveDateTime", "occurrenceDateTime", "date", "start", "issued"):
        if resource.get(key):
            return parse_datetime(resource[key])
    period = resource.get("effectivePeriod") or resource.get("period")
    if period and period.get("start"):
        return parse_datetime(period["start"])
    return None


#: the tag on the twin's stored forecast Observations (``fhir_ops.mapping.twin`` writes it)
SIMULATED_TAG = {"system": "https://trialtwin.org/fhir/CodeSystem/trialtwin", "code": "simulated",
                 "display": "Simulated (not measured)"}
_SIMULATED_TAG_TOKEN = f"{SIMULATED_TAG['system']}|{SIMULATED_TAG['code']}"


def load_participant(store: Store, patient_id: str,
                     extra_codes: Sequence[tuple[str, str, str, str]] = ()) -> ParticipantRecord:
    """Read a participant's covariates, dosing, observations, visits and adverse events.

    ``extra_codes`` adds measurements this table does not know, as ``(series name, system, code,
    canonical UCUM unit)``: a model definition's outputs (``fhir_ops.mapping.twin``).

    Raises
    ------
    NotFound
        The Patient does not exist (``Gone`` propagates for a deleted one).
    """
    patient = store.read("Patient", patient_id)
    ref = f"Patient/{patient_id}"
    subjects = store.search_all("ResearchSubject", [("individual", ref)])
    # the twin's own stored forecasts are never data: the search leaves them out, so a participant
    # with many persisted forecasts costs no more to load than one without
    observations = store.search_all("Observation", [("subject", ref), ("_tag:not", _SIMULATED_TAG_TOKEN)])
    administrations = store.search_all("MedicationAdministration", [("subject", ref)])
    appointments = store.search_all("Appointment", [("actor", ref)])
    adverse = store.search_all("AdverseEvent", [("subject", ref)])
    read = [patient, *subjects, *observations, *administrations, *appointments, *adverse]

    # Placebo participants record doses as counts of tablets ({tbl}); they contribute no drug mass.
    placebo = any((sub.get("assignedArm") or "").strip().lower() == "placebo" for sub in subjects)
    doses, missed, dose_records = [], [], []
    for admin in administrations:
        when = _effective(admin)
        if when is None or admin.get("status") == "entered-in-error":
            continue
        if admin.get("status") in ("not-done", "stopped"):
            missed.append(when)
            dose_records.append((when, False, versioned(admin)))
            continue
        dose_records.append((when, True, versioned(admin)))
        dose = admin.get("dosage", {}).get("dose", {})
        unit = dose.get("code") or dose.get("unit") or "mg"
        if placebo and unit.startswith("{"):
            amount = 0.0  # a placebo tablet ({tbl}) carries no drug: its mass is not the point
        else:
            amount = _convert(float(dose.get("value", 0.0)), unit, "mg", f"MedicationAdministration/{admin['id']}")
        doses.append((when, amount))
    doses.sort(key=lambda d: d[0])

    subject = subjects[0] if subjects else None
    enrolled = subject and subject.get("period", {}).get("start")
    if doses:
        origin = doses[0][0]
    elif enrolled:
        origin = parse_datetime(enrolled)
    else:
        raise Unprocessable(f"Patient/{patient_id} has no dosing records and no ResearchSubject enrolment: "
                            "there is nothing to anchor a twin to", error_id="participant-without-data")

    def hours(when: datetime) -> float:
        return (when - origin).total_seconds() / 3600.0

    raw: dict[str, list[tuple[float, float, str]]] = {}
    units: dict[str, str] = {}
    canonical_units = {name: unit for name, (_, _, unit) in MEASUREMENTS.items()}
    by_code = dict(_BY_CODE)
    for name, system, code, unit in extra_codes:
        by_code.setdefault((system, code), name)
        canonical_units.setdefault(name, unit)
    for obs in observations:
        name = _measurement(obs, by_code)
        when = _effective(obs)
        qty = obs.get("valueQuantity")
        if name is None or when is None or qty is None or "value" not in qty:
            continue
        if obs.get("status") in ("entered-in-error", "cancelled", "preliminary"):
            continue  # preliminary = our own simulated forecasts, never data
        canonical = canonical_units[name]
        value = _convert(float(qty["value"]), qty.get("code") or qty.get("unit") or canonical, canonical,
                         f"Observation/{obs['id']}", MOLAR_MASS.get(name))
        raw.setdefault(name, []).append((hours(when), value, versioned(obs)))
        units[name] = canonical
    series, series_sources = {}, {}
    for name, points in raw.items():
        points.sort()
        arr = np.asarray([(t, v) for t, v, _ in points], dtype=float)
        series[name] = Series(times_h=arr[:, 0], values=arr[:, 1], unit=units[name])
        series_sources[name] = tuple(ref for _, _, ref in points)

    covariates, covariate_obs = _covariates(patient, series, origin)
    by_series: dict[str, list[tuple[float, dict]]] = {}
    for obs in observations:
        name, when = _measurement(obs), _effective(obs)
        if name in covariate_obs and when is not None and obs.get("status") not in (
                "entered-in-error", "cancelled", "preliminary"):
            by_series.setdefault(name, []).append((hours(when), obs))
    covariate_sources = {}
    for name, key in covariate_obs.items():
        target = series[name].times_h[int(np.argmin(np.abs(series[name].times_h)))] if key != "travel_km" \
            else series[name].times_h[-1]
        match = next(obs for t, obs in by_series[name] if t == target)
        covariate_sources[key] = versioned(match)
    visits = []
    for appt in appointments:
        when = _effective(appt)
        if when is None or appt.get("status") not in ("fulfilled", "noshow", "booked", "arrived", "checked-in"):
            continue
        remote = any(c.get("code") in ("virtual", "VR", "remote")
                     for st in appt.get("serviceType", []) for c in st.get("coding", []))
        visits.append(Visit(day=hours(when) / 24.0, attended=appt["status"] in ("fulfilled", "arrived", "checked-in"),
                            remote=remote, status=appt["status"], start=when, source=versioned(appt)))
    visits.sort(key=lambda v: v.day)
    ae_pairs = sorted((hours(w) / 24.0, _ae_grade(a)) for a, w in ((a, _effective(a)) for a in adverse)
                      if w is not None)
    ae_days = np.array([d for d, _ in ae_pairs], dtype=float)
    source_times: dict[str, datetime | None] = {versioned(r): None for r in (patient, *subjects)}
    for r in [*observations, *administrations, *appointments, *adverse]:
        source_times[versioned(r)] = _effective(r)
    # our own stored forecasts (preliminary) are not data: they must not move "the last data" forward
    data_times = [t for t in (_effective(r) for r in [*observations, *administrations]
                              if r.get("status") not in ("entered-in-error", "cancelled", "preliminary"))
                  if t is not None]
    return ParticipantRecord(
        patient_id=patient_id,
        origin=origin,
        covariates=covariates,
        arm=(subject or {}).get("assignedArm"),
        status=(subject or {}).get("status"),
        dose_times_h=np.array([hours(w) for w, _ in doses]),
        dose_amounts_mg=np.array([a for _, a in doses]),
        missed_dose_times_h=np.array(sorted(hours(w) for w in missed)),
        series=series,
        visits=visits,
        adverse_event_days=ae_days,
        site=_site(subject),
        sources=[versioned(r) for r in read],
        last_data_time=max(data_times) if data_times else None,
        enrolled=parse_datetime(enrolled) if enrolled else None,
        ended=parse_datetime(subject["period"]["end"]) if subject and subject.get("period", {}).get("end") else None,
        adverse_event_grades=np.array([g for _, g in ae_pairs], dtype=int),
        source_times=source_times,
        covariate_sources=covariate_sources,
        dose_records=tuple(sorted(dose_records, key=lambda d: d[0])),
        series_sources=series_sources,
    )


def _ae_grade(event: dict) -> int:
    for coding in event.get("severity", {}).get("coding", []):
        if coding.get("code") in AE_GRADES:
            return AE_GRADES[coding["code"]]
    return AE_GRADE_UNKNOWN


def _covariates(patient: dict, series: dict[str, Series], origin: datetime) -> tuple[dict[str, float], dict[str, str]]:
    """Covariates, and for each one read from an Observation series the series name it came from."""
    out: dict[str, float] = {}
    from_series: dict[str, str] = {}
    if patient.get("birthDate"):
        born = parse_datetime(patient["birthDate"])
        out["age"] = (origin - born).days / 365.25
    out["female"] = 1.0 if patient.get("gender") == "female" else 0.0
    for name, key in (("weight", "weight"), ("egfr", "egfr")):
        if name in series:
            # baseline = the measurement closest to the first dose
            idx = int(np.argmin(np.abs(series[name].times_h)))
            out[key] = float(series[name].values[idx])
            from_series[name] = key
    # Travel distance: the latest covariate Observation (a move changes it); a Patient extension
    # is the fallback some sources use.
    if "travel_distance" in series:
        out["travel_km"] = float(series["travel_distance"].values[-1])
        from_series["travel_distance"] = "travel_km"
    else:
        for ext in patient.get("extension", []):
            if ext.get("url", "").endswith("/travel-distance") and "valueQuantity" in ext:
                out["travel_km"] = float(ext["valueQuantity"]["value"])
    return out, from_series


def _site(subject: dict | None) -> str | None:
    if not subject:
        return None
    for ext in subject.get("extension", []):
        if ext.get("url", "").endswith("/study-site") and "valueReference" in ext:
            return ext["valueReference"]["reference"]
    return None


def require_participant(store: Store, patient_id: str) -> ParticipantRecord:
    """Like :func:`load_participant`, but a participant with no outcome data is refused (422)."""
    record = load_participant(store, patient_id)
    if record.n_observations == 0 and len(record.dose_times_h) == 0:
        raise Unprocessable(f"Patient/{patient_id} has no dosing records and no observations of "
                            f"{', '.join(OUTCOMES)}: there is nothing to calibrate a twin on",
                            error_id="participant-without-data")
    return record


__all__ = ["ParticipantRecord", "Series", "Visit", "load_participant", "require_participant",
           "parse_datetime", "versioned", "MEASUREMENTS", "OUTCOMES", "SIMULATED_TAG", "NotFound"]
