"""What the study view reads about a trial's results: the enrollment forecast and the stored treatment-effect reports.

Both come over HTTP from the FHIR server (``$forecast-enrollment`` with ``persist=false``; a DocumentReference
search); a refused or missing call becomes a plain sentence on the page, never a raw HTTP status.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass, field

from .clinician import PLAIN_ERRORS, FhirApi, FhirCallError, Problem, _parse_time, parameter_rows, parameter_value

TRIALTWIN_CS = "https://trialtwin.org/fhir/CodeSystem/trialtwin"
EFFECT_REPORT_PROFILE = "https://trialtwin.org/fhir/StructureDefinition/effect-report"
#: ResearchSubject statuses that are not randomizations (docs/enrollment.md: screen failures, and candidates not
#: yet screened); the observed curve counts everyone else, as the server's forecast does
NOT_RANDOMIZED = frozenset({"ineligible", "not-registered", "candidate", "potential-candidate"})
#: the largest target the form takes (a typo of a few digits too many would only make a flat forecast)
MAX_TARGET = 100_000


def _date(text: str | None) -> dt.date | None:
    when = _parse_time(text)
    return when.date() if when is not None else None


# --- enrollment ----------------------------------------------------------------------------------------

@dataclass
class Enrollment:
    """The enrollment panel: the target and where it came from, the observed and forecast curves, the sites.

    ``message`` is set (and the rest mostly empty) when no forecast could be made; ``missing`` when the server
    does not offer ``$forecast-enrollment`` at all.
    """

    target: int | None = None
    target_source: str | None = None         # "form" or "study" (the planned Group of ResearchStudy.enrollment)
    as_of: dt.date | None = None
    screened: int | None = None
    randomized: int | None = None
    remaining: int | None = None
    observed: list = field(default_factory=list)     # (date, cumulative randomized) steps
    curve: dict = field(default_factory=dict)        # date, expected, low80, high80, low95, high95 (lists)
    time_to_target: dict = field(default_factory=dict)
    sites: list = field(default_factory=list)        # {"name", "screened", "randomized", "rate"}
    warnings: list = field(default_factory=list)
    message: str | None = None
    missing: bool = False

    @property
    def forecast(self) -> bool:
        return bool(self.curve.get("date"))


def planned_target(api: FhirApi, study: dict | None) -> int | None:
    """Participants the study plans to enrol, if it says so: R4 has no target count on ResearchStudy or its arms;
    the planned population is ``ResearchStudy.enrollment`` -> a Group with ``actual = false`` and ``quantity``."""
    total = 0
    for ref in (study or {}).get("enrollment") or []:
        reference = (ref or {}).get("reference") or ""
        if not reference.startswith("Group/"):
            continue
        try:
            group = api.get(reference)
        except FhirCallError:
            continue  # an unreadable Group only means the form asks for the target
        if group.get("actual") is False and isinstance(group.get("quantity"), int) and group["quantity"] > 0:
            total += group["quantity"]
    return total or None


def observed_randomizations(subjects: list[dict], until: dt.date | None = None) -> list[tuple]:
    """Cumulative randomized participants by ``ResearchSubject.period.start`` date, one step per date.

    Examples
    --------
    >>> rs = lambda d, s="on-study": {"status": s, "period": {"start": d}}
    >>> observed_randomizations([rs("2026-01-03"), rs("2026-01-01"), rs("2026-01-03"), rs("2026-01-02", "ineligible")])
    [(datetime.date(2026, 1, 1), 1), (datetime.date(2026, 1, 3), 3)]
    """
    days = sorted(d for rs in subjects if (rs.get("status") or "") not in NOT_RANDOMIZED
                  for d in [_date((rs.get("period") or {}).get("start"))] if d and (until is None or d <= until))
    steps: list[tuple] = []
    for i, day in enumerate(days, start=1):
        if steps and steps[-1][0] == day:
            steps[-1] = (day, i)
        else:
            steps.append((day, i))
    return steps


def enrollment_message(error: FhirCallError) -> tuple[str, bool]:
    """The panel's sentence for a failed ``$forecast-enrollment`` call, and whether the operation is missing."""
    if error.status in (404, 501) and error.error_id in (None, "unknown-operation", "operation-not-supported-here"):
        return "The FHIR server does not offer $forecast-enrollment, so there is no enrollment forecast.", True
    if error.status in (401, 403):
        return "This launch's access token does not allow forecasting this study's enrollment.", False
    if error.error_id in PLAIN_ERRORS:
        return PLAIN_ERRORS[error.error_id], False
    if 400 <= error.status < 500 and error.detail:
        return f"The server could not forecast the enrollment: {error.detail}", False
    return "The enrollment could not be forecast just now; try again later, or see the server's log.", False


def load_enrollment(api: FhirApi, study_id: str, study: dict | None, subjects: list[dict] | None,
                    target: int | None, problems: list[Problem]) -> Enrollment:
    """Forecast the study's enrollment with ``$forecast-enrollment`` (``persist=false``: a page view stores nothing).

    Parameters
    ----------
    study, subjects : dict, list of dict or None
        The ResearchStudy and its ResearchSubjects as already read for the page (None: not readable).
    target : int or None
        From the form; None takes the study's planned participants (see :func:`planned_target`).
    """
    en = Enrollment(target=target, target_source="form" if target else None)
    if target is None:
        en.target = planned_target(api, study)
        en.target_source = "study" if en.target else None
    if en.target is None:
        en.message = "The study does not say how many participants it plans to randomize: enter a target."
        return en
    params = [{"name": "target", "valueInteger": en.target}, {"name": "persist", "valueBoolean": False}]
    try:
        result = api.operation(f"ResearchStudy/{study_id}/$forecast-enrollment", params)
    except FhirCallError as err:
        en.message, en.missing = enrollment_message(err)
        return en
    cut = _parse_time(parameter_value(result, "asOf"))
    en.as_of = cut.date() if cut else None
    en.screened, en.randomized = parameter_value(result, "screened"), parameter_value(result, "randomized")
    en.remaining = parameter_value(result, "remaining")
    rows = [r for r in parameter_rows(result, "curve") if _date(r.get("date"))]
    rows.sort(key=lambda r: r["date"])
    en.curve = {"date": [_date(r["date"]) for r in rows]}
    for key in ("expected", "low80", "high80", "low95", "high95"):
        en.curve[key] = [float(r[key]) for r in rows]
    ttt = (parameter_rows(result, "timeToTarget") or [{}])[0]
    en.time_to_target = {k: (_date(v) if k in ("median", "low80", "high80", "low95", "high95") else v)
                         for k, v in ttt.items()}
    for row in parameter_rows(result, "site"):
        en.sites.append({"name": row.get("name") or "—", "screened": row.get("screened"),
                         "randomized": row.get("randomized"), "rate": row.get("ratePer30Days")})
    issues = parameter_value(result, "issues") or {}
    en.warnings = [i.get("diagnostics") for i in issues.get("issue") or [] if i.get("diagnostics")]
    if subjects is not None:
        en.observed = observed_randomizations(subjects, en.as_of)
    return en


# --- treatment-effect reports --------------------------------------------------------------------------

@dataclass
class EffectReport:
    """One stored ``$estimate-effect`` report (a DocumentReference with the rendered HTML attached)."""

    id: str
    date: str | None
    description: str
    html: str | None = None      # the newest report's page only; the others are listed


def _is_effect_report_of(doc: dict, study_ref: str) -> bool:
    codes = {(c.get("system"), c.get("code")) for c in ((doc.get("type") or {}).get("coding") or [])}
    related = {(r or {}).get("reference") for r in ((doc.get("context") or {}).get("related") or [])}
    return (TRIALTWIN_CS, "effect-report") in codes and study_ref in related


def _html_of(doc: dict) -> str | None:
    for content in doc.get("content") or []:
        attachment = content.get("attachment") or {}
        if (attachment.get("contentType") or "").split(";")[0].strip() == "text/html" and attachment.get("data"):
            try:
                return base64.b64decode(attachment["data"], validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                return None
    return None


def load_effect_reports(api: FhirApi, study_id: str, problems: list[Problem], limit: int = 50) -> list[EffectReport]:
    """The study's effect reports, newest first; the newest carries its HTML.

    The embedded server indexes no DocumentReference-specific search parameter, so the search asks for the
    effect-report profile (``_profile``, which every server has) and keeps the reports whose type is
    ``effect-report`` and whose ``context.related`` is this study.
    """
    study_ref = f"ResearchStudy/{study_id}"
    try:
        found = api.search("DocumentReference", {"_profile": EFFECT_REPORT_PROFILE, "_sort": "-_lastUpdated",
                                                 "_count": limit})
    except FhirCallError as err:
        if err.status in (401, 403):
            problems.append(Problem("Treatment effects", "Not allowed with this launch's access token to read the "
                                                         "study's effect reports."))
        else:
            problems.append(Problem("Treatment effects", "The study's effect reports could not be read just now."))
        return []
    docs = [d for d in found if _is_effect_report_of(d, study_ref)]
    docs.sort(key=lambda d: d.get("date") or "", reverse=True)
    reports = [EffectReport(d.get("id", ""), d.get("date"), d.get("description") or "Treatment effect report")
               for d in docs]
    if reports:
        reports[0].html = _html_of(docs[0])
    return reports
