"""What the app shows of visit-schedule proposals: the study's proposal with its expected gains, and a participant's
proposed visits.

The study panel runs ``$optimize-schedule`` with ``persist=false`` (a page view stores nothing); the participant
panel reads the proposed Appointments stored by an earlier run. A refused or failed call becomes a plain sentence.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from .clinician import FhirApi, FhirCallError, _parse_time, parameter_rows, parameter_value

MODALITY_CS = "https://trialtwin.org/fhir/CodeSystem/visit-modality"
MODALITY_WORDS = {"in-person": "In person", "virtual": "Remote (virtual)"}
#: replicates of the behaviour replay behind a page view: enough for a gain and its interval, quick to compute
PAGE_REPLICATES = 50
SCHEDULE_ERRORS = {
    "no-visit-plan": "The study has no visit plan (ResearchStudy.protocol names no PlanDefinition), so there is no "
                     "schedule to optimise.",
    "nothing-to-schedule": "No participant has a protocol visit still to come: there is nothing to schedule.",
    "no-subjects": "The study has no participant on study to schedule.",
    "window-unsatisfiable": None,  # the server's sentence names the visit
    "capacity-infeasible": "The sites' daily staff hours cannot hold the visits that must be done in person; the "
                           "visit plan needs more capacity or wider windows.",
}


@dataclass
class StudySchedule:
    """The study's schedule proposal: totals under the protocol default and the proposal, and the changed visits."""

    participants: int | None = None
    visits: int | None = None
    default: dict = field(default_factory=dict)
    proposal: dict = field(default_factory=dict)
    gain: dict = field(default_factory=dict)
    changes: list = field(default_factory=list)    # {"subject", "visit", "date", "modality", "moved", "switched"}
    message: str | None = None
    missing: bool = False


def schedule_message(error: FhirCallError) -> tuple[str, bool]:
    """The panel's sentence for a failed ``$optimize-schedule`` call, and whether the operation is missing."""
    if error.status in (404, 501) and error.error_id in (None, "unknown-operation", "operation-not-supported-here"):
        return "The FHIR server does not offer $optimize-schedule, so there is no schedule proposal.", True
    if error.status in (401, 403):
        return "This launch's access token does not allow optimising this study's visit schedule.", False
    if error.error_id in SCHEDULE_ERRORS:
        return SCHEDULE_ERRORS[error.error_id] or f"The schedule could not be optimised: {error.detail}", False
    if 400 <= error.status < 500 and error.detail:
        return f"The schedule could not be optimised: {error.detail}", False
    return "The schedule could not be optimised just now; try again later, or see the server's log.", False


def load_study_schedule(api: FhirApi, study_id: str) -> StudySchedule:
    """Run ``$optimize-schedule`` on the study without storing anything; keep the visits the proposal changes."""
    out = StudySchedule()
    params = [{"name": "persist", "valueBoolean": False}, {"name": "replicates", "valueInteger": PAGE_REPLICATES}]
    try:
        result = api.operation(f"ResearchStudy/{study_id}/$optimize-schedule", params)
    except FhirCallError as err:
        out.message, out.missing = schedule_message(err)
        return out
    out.participants, out.visits = parameter_value(result, "participants"), parameter_value(result, "visits")
    out.default = (parameter_rows(result, "protocolDefault") or [{}])[0]
    out.proposal = (parameter_rows(result, "proposal") or [{}])[0]
    out.gain = (parameter_rows(result, "expectedGain") or [{}])[0]
    for row in parameter_rows(result, "visit"):
        moved = row.get("day") != row.get("defaultDay")
        switched = row.get("modality") != row.get("defaultModality")
        if moved or switched:
            out.changes.append({"subject": ((row.get("subject") or {}).get("reference") or "").split("/")[-1],
                                "visit": row.get("visit"), "date": _date(row.get("date")),
                                "modality": MODALITY_WORDS.get(row.get("modality"), row.get("modality")),
                                "moved": (row.get("day") or 0) - (row.get("defaultDay") or 0), "switched": switched})
    return out


def _date(text: str | None) -> dt.date | None:
    when = _parse_time(text)
    return when.date() if when is not None else None


@dataclass
class ProposedVisit:
    """One proposed Appointment of the participant."""

    date: dt.date | None
    modality: str
    description: str


def load_proposed_visits(api: FhirApi, patient_id: str) -> tuple[list[ProposedVisit], str | None]:
    """The participant's proposed visits (stored Appointments with status ``proposed``), by date; or a sentence."""
    try:
        found = api.search("Appointment", {"patient": f"Patient/{patient_id}", "status": "proposed",
                                           "_sort": "date", "_count": 100})
    except FhirCallError as err:
        if err.status in (401, 403):
            return [], "This launch's access token does not allow reading the participant's proposed visits."
        return [], "The participant's proposed visits could not be read just now."
    visits = []
    for appt in found:
        codes = [c.get("code") for st in appt.get("serviceType") or [] for c in st.get("coding") or []
                 if c.get("system") == MODALITY_CS]
        visits.append(ProposedVisit(_date(appt.get("start")), MODALITY_WORDS.get(codes[0], codes[0]) if codes else "—",
                                    (appt.get("description") or "").split(":")[0] or "Visit"))
    visits.sort(key=lambda v: v.date or dt.date.max)
    return visits, None
