"""What the study view reads about responder strata and safety: the stored ``$stratify`` Groups and the
newest stored ``$safety-signal`` report with its open signals.

Both are read (never computed) over HTTP from the FHIR server, so a page view stores nothing; a refused
or failed read becomes a plain sentence on the page.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .clinician import FhirApi, FhirCallError, Problem

TRIALTWIN_CS = "https://trialtwin.org/fhir/CodeSystem/trialtwin"
SAFETY_REPORT_PROFILE = "https://trialtwin.org/fhir/StructureDefinition/safety-signal-report"
SIGNAL_PROFILE = "https://trialtwin.org/fhir/StructureDefinition/safety-signal-issue"
EXT_ARM = "https://trialtwin.org/fhir/StructureDefinition/study-arm"
EXT_PROBABILITY = "https://trialtwin.org/fhir/StructureDefinition/exceedance-probability"


def _code(concept: dict | None) -> str | None:
    return next((c.get("code") for c in (concept or {}).get("coding") or []), None)


def _ext(holder: dict, url: str):
    for e in holder.get("extension") or []:
        if e.get("url") == url:
            return next((v for k, v in e.items() if k.startswith("value")), None)
    return None


@dataclass
class Stratum:
    """One stored stratum: its name, size, rule (with precision and recall) and median response per arm."""

    id: str
    size: int
    rule: str
    precision: float | None = None
    recall: float | None = None
    stability: float | None = None
    responses: list = field(default_factory=list)   # (arm, value, unit)


def strata_of(groups: list[dict], study_ref: str) -> list[Stratum]:
    """The active stratum Groups stratified from ``study_ref``, in stratum order.

    Examples
    --------
    >>> g = {"id": "s-1", "active": True, "quantity": 3, "characteristic": [
    ...   {"code": {"coding": [{"code": "stratified-from"}]}, "valueReference": {"reference": "ResearchStudy/x"}},
    ...   {"code": {"coding": [{"code": "stratum-rule"}]}, "valueCodeableConcept": {"text": "egfr <= 60"}},
    ...   {"code": {"coding": [{"code": "stratum-response"}]}, "valueQuantity": {"value": 12.5, "unit": "mg/dL"},
    ...    "extension": [{"url": EXT_ARM, "valueString": "50 mg"}]}]}
    >>> s = strata_of([g], "ResearchStudy/x")[0]
    >>> s.rule, s.responses
    ('egfr <= 60', [('50 mg', 12.5, 'mg/dL')])
    """
    out = []
    for g in groups:
        if g.get("active") is False:
            continue
        chars = g.get("characteristic") or []
        source = next(((c.get("valueReference") or {}).get("reference") for c in chars
                       if _code(c.get("code")) == "stratified-from"), None)
        if source != study_ref:
            continue
        s = Stratum(id=g.get("id", ""), size=int(g.get("quantity") or len(g.get("member") or [])), rule="")
        for c in chars:
            code = _code(c.get("code"))
            q = c.get("valueQuantity") or {}
            if code == "stratum-rule":
                s.rule = (c.get("valueCodeableConcept") or {}).get("text", "")
            elif code == "stratum-rule-precision":
                s.precision = q.get("value")
            elif code == "stratum-rule-recall":
                s.recall = q.get("value")
            elif code == "stratification-stability":
                s.stability = q.get("value")
            elif code == "stratum-response":
                s.responses.append((_ext(c, EXT_ARM) or (c.get("code") or {}).get("text"), q.get("value"),
                                    q.get("unit")))
        out.append(s)
    out.sort(key=lambda s: s.id)
    return out


@dataclass
class SafetyPanel:
    """The newest safety report of the study: per-arm rates, posterior probabilities, forecasts, open signals."""

    date: str | None = None
    cut: str | None = None
    rates: list = field(default_factory=list)      # {"arm", "term", "events", "participants", "rate", "probability"}
    forecasts: list = field(default_factory=list)  # {"text", "expected"}
    signals: list = field(default_factory=list)    # {"id", "text", "severity", "detail"}
    message: str | None = None


def safety_of(report: dict) -> SafetyPanel:
    """Plain rows of one stored safety-signal report (MeasureReport)."""
    panel = SafetyPanel(date=report.get("date"), cut=(report.get("period") or {}).get("end"))
    for g in report.get("group") or []:
        codes = [c.get("code") for c in (g.get("code") or {}).get("coding") or []]
        score = (g.get("measureScore") or {}).get("value")
        if "forecast-events" in codes:
            panel.forecasts.append({"text": (g.get("code") or {}).get("text", ""), "expected": score})
            continue
        pops = {_code(p.get("code")): p.get("count") for p in g.get("population") or []}
        text = (g.get("code") or {}).get("text", "")
        panel.rates.append({"arm": _ext(g, EXT_ARM), "term": text.split(": ", 1)[-1], "events": pops.get("numerator"),
                            "participants": pops.get("denominator"), "rate": score,
                            "probability": _ext(g, EXT_PROBABILITY)})
    return panel


def load_strata(api: FhirApi, study_id: str, problems: list[Problem]) -> list[Stratum]:
    """The study's stored responder strata (``$stratify`` Groups)."""
    try:
        groups = api.search("Group", {"code": f"{TRIALTWIN_CS}|responder-stratum", "_count": 200})
    except FhirCallError as err:
        problems.append(Problem("Responder strata", "Not allowed with this launch's access token to read the study's "
                                "strata." if err.status in (401, 403) else "The study's strata could not be read "
                                "just now."))
        return []
    return strata_of(groups, f"ResearchStudy/{study_id}")


def load_safety(api: FhirApi, study_id: str, problems: list[Problem]) -> SafetyPanel | None:
    """The newest stored safety report of the study and its signals (None when there is none)."""
    study_ref = f"ResearchStudy/{study_id}"
    try:
        reports = api.search("MeasureReport", {"_profile": SAFETY_REPORT_PROFILE, "_sort": "-_lastUpdated",
                                               "_count": 50})
    except FhirCallError as err:
        problems.append(Problem("Safety", "Not allowed with this launch's access token to read the study's safety "
                                "reports." if err.status in (401, 403) else "The study's safety reports could not "
                                "be read just now."))
        return None
    mine = [r for r in reports if any((e or {}).get("reference") == study_ref for e in r.get("evaluatedResource") or [])]
    if not mine:
        return None
    mine.sort(key=lambda r: ((r.get("period") or {}).get("end") or "", r.get("date") or ""), reverse=True)
    panel = safety_of(mine[0])
    try:
        issues = api.search("DetectedIssue", {"_profile": SIGNAL_PROFILE, "_count": 200})
    except FhirCallError:
        panel.message = "The open safety signals could not be read with this launch's access token."
        return panel
    for i in issues:
        if any((r or {}).get("reference") == study_ref for r in i.get("implicated") or []):
            panel.signals.append({"id": i.get("id"), "text": (i.get("code") or {}).get("text", ""),
                                  "severity": i.get("severity"), "detail": i.get("detail", "")})
    return panel
