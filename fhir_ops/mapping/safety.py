"""Safety monitoring <-> FHIR: a study's adverse events and time on study in, the signal report,
``DetectedIssue`` and reviewer ``Task`` out.

Time on study of a participant runs from ``ResearchSubject.period.start`` to ``period.end`` (or the
data cut ``asOf``). An adverse event counts when it is ``actuality = actual``, concerns a participant
of the study and falls within that participant's time on study up to the cut. Its term is the
SNOMED CT coding of ``AdverseEvent.event`` (added on ingest by the terminology maps for local codes),
else its first coding.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime


from fhir_ops.errors import NotFound
from fhir_ops.mapping.participant import parse_datetime, versioned
from terminology.catalog import CANONICAL, SNOMED, TRIALTWIN_CS, UCUM

REPORT_PROFILE = f"{CANONICAL}/StructureDefinition/safety-signal-report"
ISSUE_PROFILE = f"{CANONICAL}/StructureDefinition/safety-signal-issue"
TASK_PROFILE = f"{CANONICAL}/StructureDefinition/safety-review-task"
MEASURE = f"{CANONICAL}/Measure/safety-signal"
EXT_ARM = f"{CANONICAL}/StructureDefinition/study-arm"
EXT_PROBABILITY = f"{CANONICAL}/StructureDefinition/exceedance-probability"
POPULATION_CS = "http://terminology.hl7.org/CodeSystem/measure-population"
DAYS_PER_YEAR = 365.25


@dataclass
class Participant:
    patient_id: str
    arm: str | None
    start: datetime | None
    end: datetime | None


@dataclass
class SafetyData:
    """Plain values of one study's safety data; ``inputs`` are the versioned references read."""

    study: dict
    participants: list[Participant]
    events: list[tuple[str, str, str, datetime]]  # (patient id, term token, display, date)
    displays: dict[str, str]
    codings: dict[str, dict]
    inputs: list[str] = field(default_factory=list)
    not_actual: int = 0

    def latest(self) -> datetime | None:
        dates = [e[3] for e in self.events] + [d for p in self.participants for d in (p.start, p.end) if d]
        return max(dates) if dates else None


def term_of(event: dict, translate=None) -> dict | None:
    """The coding that names an AdverseEvent's term: SNOMED CT when present, else the SNOMED CT target of
    a local coding through ``translate(system, code)`` (the terminology maps), else the first coding."""
    codings = [c for c in (event.get("event") or {}).get("coding", []) if c.get("system") and c.get("code")]
    snomed = next((c for c in codings if c["system"] == SNOMED), None)
    if snomed is None and translate is not None:
        snomed = next((t for c in codings for t in [translate(c["system"], c["code"])] if t), None)
    return snomed or (codings[0] if codings else None)


def load_safety_data(store, study_id: str, translate=None) -> SafetyData:
    """The study, its participants (arm, time on study) and their adverse events (404 for an unknown study);
    ``translate(system, code)`` gives the SNOMED CT coding of a local code, or None."""
    ref = f"ResearchStudy/{study_id}"
    try:
        study = store.read("ResearchStudy", study_id)
    except NotFound:
        raise NotFound(f"{ref} does not exist", error_id="not-found") from None
    inputs = [versioned(study)]
    participants: dict[str, Participant] = {}
    for s in store.search_all("ResearchSubject", [("study", ref)]):
        who = (s.get("individual") or {}).get("reference", "")
        if not who.startswith("Patient/"):
            continue
        period = s.get("period") or {}
        pid = who.partition("/")[2]
        participants[pid] = Participant(pid, s.get("actualArm") or s.get("assignedArm"),
                                        parse_datetime(period["start"]) if period.get("start") else None,
                                        parse_datetime(period["end"]) if period.get("end") else None)
        inputs.append(versioned(s))
    events, displays, codings, not_actual = [], {}, {}, 0
    for ae in store.search_all("AdverseEvent", [("study", ref)]):
        if ae.get("actuality", "actual") != "actual":
            not_actual += 1
            continue
        pid = (ae.get("subject") or {}).get("reference", "").removeprefix("Patient/")
        coding = term_of(ae, translate)
        if pid not in participants or coding is None or not ae.get("date"):
            continue
        token = f"{coding['system']}|{coding['code']}"
        displays.setdefault(token, coding.get("display") or (ae.get("event") or {}).get("text") or coding["code"])
        codings.setdefault(token, {k: coding[k] for k in ("system", "code", "display") if k in coding})
        events.append((pid, token, displays[token], parse_datetime(ae["date"])))
        inputs.append(versioned(ae))
    return SafetyData(study, list(participants.values()), events, displays, codings, inputs, not_actual)


def person_years(p: Participant, cut: datetime) -> float:
    if p.start is None or p.start > cut:
        return 0.0
    stop = min(p.end, cut) if p.end else cut
    return max((stop - p.start).total_seconds() / 86400.0, 0.0) / DAYS_PER_YEAR


def on_study(p: Participant, cut: datetime) -> bool:
    return p.start is not None and p.start <= cut and (p.end is None or p.end > cut)


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


def _instant(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def build_report(report_id: str, study_ref: str, cut: datetime, start: datetime | None, rates: list[dict],
                 forecasts: list[dict], codings: dict[str, dict], now: datetime) -> dict:
    """The MeasureReport of one run: per arm and term the events, participants, rate per 100
    person-years and (non-control arms) the exceedance probability; per term the forecast."""
    groups = []
    for r in rates:
        group = {"extension": [{"url": EXT_ARM, "valueString": r["arm"]}]}
        if r.get("probabilityExceeds") is not None:
            group["extension"].append({"url": EXT_PROBABILITY, "valueDecimal": round(r["probabilityExceeds"], 8)})
        group["code"] = {"coding": [codings[r["term"]]], "text": f"{r['arm']}: {r['display']}"}
        group["population"] = [
            {"code": {"coding": [{"system": POPULATION_CS, "code": "numerator"}]}, "count": r["events"]},
            {"code": {"coding": [{"system": POPULATION_CS, "code": "denominator"}]}, "count": r["participants"]}]
        group["measureScore"] = {"value": round(r["ratePer100PersonYears"], 6), "unit": "/100 person-years",
                                 "system": UCUM, "code": "/(100.a)"}
        groups.append(group)
    for f in forecasts:
        groups.append({"code": {"coding": [{"system": TRIALTWIN_CS, "code": "forecast-events",
                                            "display": "Forecast adverse events in the next period"},
                                           codings[f["term"]]],
                                "text": f"{f['display']}: expected events in the next {f['days']} days "
                                        f"(80 % interval {f['low80']:g}-{f['high80']:g})"},
                       "measureScore": {"value": round(f["expected"], 6), "unit": "events", "system": UCUM,
                                        "code": "1"}})
    return {"resourceType": "MeasureReport", "id": report_id, "meta": {"profile": [REPORT_PROFILE]},
            "status": "complete", "type": "summary", "measure": MEASURE, "date": _instant(now),
            "period": {"start": _instant(start or cut), "end": _instant(cut)},
            "group": groups, "evaluatedResource": [{"reference": study_ref}]}


def build_issue(issue_id: str, study_ref: str, row: dict, control: str, margin: float, threshold: float,
                cut: datetime, report_ref: str) -> dict:
    p = row["probabilityExceeds"]
    return {"resourceType": "DetectedIssue", "id": issue_id, "meta": {"profile": [ISSUE_PROFILE]},
            "status": "preliminary",
            "code": {"coding": [{"system": TRIALTWIN_CS, "code": "safety-signal", "display": "Safety signal"}],
                     "text": f"{row['display']} on {row['arm']}"},
            "severity": "high" if p > 0.999 else "moderate",
            "identifiedDateTime": _instant(cut),
            "implicated": [{"reference": study_ref}],
            "evidence": [{"code": [{"coding": [{"system": TRIALTWIN_CS, "code": "exposure-adjusted-incidence"}]}],
                          "detail": [{"reference": report_ref}]}],
            "detail": (f"{row['display']}: {row['events']} event(s) over {row['personYears']:.2f} person-years on "
                       f"{row['arm']} ({row['ratePer100PersonYears']:.1f} per 100 person-years) against "
                       f"{row['controlRatePer100PersonYears']:.1f} on {control}. Posterior probability that the rate "
                       f"exceeds control by more than {margin:g} per 100 person-years: {p:.4f} (threshold "
                       f"{threshold:g}), data up to {cut.date().isoformat()}.")}


def build_task(task_id: str, issue_id: str, row: dict, reviewer: dict | None, now: datetime) -> dict:
    task = {"resourceType": "Task", "id": task_id, "meta": {"profile": [TASK_PROFILE]},
            "status": "requested", "intent": "order", "priority": "urgent",
            "code": {"coding": [{"system": TRIALTWIN_CS, "code": "safety-review", "display": "Safety review"}]},
            "description": f"Review the safety signal for {row['display']} on {row['arm']}",
            "focus": {"reference": f"DetectedIssue/{issue_id}"},
            "authoredOn": _instant(now)}
    if reviewer:
        task["owner"] = reviewer
    return task


__all__ = ["SafetyData", "Participant", "load_safety_data", "term_of", "person_years", "on_study", "digest",
           "build_report", "build_issue", "build_task"]
