"""What the clinician app reads from the FHIR server: participant summary, twin forecasts, dropout risk, cohort overview.

Each loader returns plain values plus a list of problems, so one missing operation or refused read is shown on the
page next to everything that did work.
"""
from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

import requests

FHIR_JSON = "application/fhir+json"
RISK_DRIVER = "https://trialtwin.org/fhir/StructureDefinition/risk-driver"
#: ResearchSubject.status values (R4 research-subject-status) of a participant who receives no more study
#: intervention: their twin is forecast without doses after the last one given
NO_MORE_DOSES = frozenset({"off-study", "withdrawn", "follow-up", "on-study-observation", "not-registered",
                           "ineligible"})
#: ... and of one who has left the study: no next visit, so no visit-attendance risk to assess
LEFT_STUDY = frozenset({"off-study", "withdrawn", "not-registered", "ineligible"})
#: R4 ResearchSubject.status (http://hl7.org/fhir/research-subject-status) in words for the pages
STATUS_WORDS = {
    "candidate": "Candidate", "eligible": "Eligible", "follow-up": "Follow-up (no more intervention)",
    "ineligible": "Ineligible", "not-registered": "Not registered", "off-study": "Off study",
    "on-study": "On study", "on-study-intervention": "On study, receiving the intervention",
    "on-study-observation": "On study, observation only", "pending-on-study": "Pending on study",
    "potential-candidate": "Potential candidate", "screening": "Screening", "withdrawn": "Withdrawn",
}


def status_words(code: str | None) -> str:
    """A ResearchSubject status for people (the code itself when it is not an R4 status)."""
    return STATUS_WORDS.get(code or "", code or "—")


#: what the page says for the server's stable error ids (OperationOutcome issue.details.coding code)
PLAIN_ERRORS = {
    "no-next-visit": "No visit is scheduled for this participant, so there is no next visit to assess.",
    "participant-without-data": "The participant has no observations of the twin's outputs yet, so the twin cannot be "
                       "calibrated.",
    # $forecast-enrollment (docs/enrollment.md)
    "no-sites": "The study lists no sites (ResearchStudy.site), so there is no site recruitment to forecast from.",
    "no-subjects": "No participant of this study has a screening date yet, so there is no recruitment to forecast "
                   "from.",
    "target-reached": "The study has already randomized at least as many participants as the target: there is "
                      "nothing left to forecast.",
    "fit-failed": "The recruitment model could not be fitted to this study's screening so far (too few sites or "
                  "screenings).",
    "target-out-of-range": "The enrollment target must be at least 1.",
}


@dataclass
class Problem:
    """Something the page could not show, said plainly (``missing`` marks an operation the server lacks)."""

    what: str
    message: str
    missing: bool = False


class FhirCallError(Exception):
    """A refused or failed FHIR call: HTTP status, the server's message and its stable error id (if any)."""

    def __init__(self, status: int, message: str, error_id: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_id = error_id
        self.detail = detail    # the OperationOutcome's own words, without the HTTP status


class FhirApi:
    """The FHIR server as the signed-in clinician sees it: every call carries the launch's access token."""

    def __init__(self, base: str, access_token: str, timeout: float = 60, http: requests.Session | None = None):
        self.base = base.rstrip("/")
        self.http = http or requests.Session()
        self.http.headers.update({"Authorization": f"Bearer {access_token}", "Accept": FHIR_JSON})
        self.timeout = timeout

    def _answer(self, response: requests.Response) -> dict:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            message, error_id, detail = f"HTTP {response.status_code}", None, ""
            if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
                issues = body.get("issue") or []
                texts = [i.get("diagnostics") or (i.get("details") or {}).get("text", "") for i in issues]
                detail = "; ".join(t for t in texts if t)
                message += ": " + detail
                error_id = next((c.get("code") for i in issues for c in (i.get("details") or {}).get("coding") or []
                                 if c.get("code")), None)
            raise FhirCallError(response.status_code, message, error_id, detail)
        if not isinstance(body, dict):
            raise FhirCallError(502, "the FHIR server did not answer with JSON")
        return body

    def get(self, path: str, params=None) -> dict:
        try:
            return self._answer(self.http.get(f"{self.base}/{path}", params=params, timeout=self.timeout))
        except requests.RequestException as exc:
            raise FhirCallError(502, f"the FHIR server could not be reached: {exc}") from None

    def search(self, path: str, params=None) -> list[dict]:
        bundle = self.get(path, params)
        return [e["resource"] for e in bundle.get("entry") or []
                if (e.get("search") or {}).get("mode", "match") == "match" and isinstance(e.get("resource"), dict)]

    def operation(self, path: str, parameters: list[dict]) -> dict:
        body = {"resourceType": "Parameters", "parameter": parameters}
        try:
            return self._answer(self.http.post(f"{self.base}/{path}", json=body, timeout=self.timeout,
                                               headers={"Content-Type": FHIR_JSON}))
        except requests.RequestException as exc:
            raise FhirCallError(502, f"the FHIR server could not be reached: {exc}") from None


def problem(what: str, error: FhirCallError, operation: str | None = None) -> Problem:
    """Turn a failed call into a Problem; 404/501 on an operation means the server does not offer it."""
    if operation and error.status in (404, 501):
        return Problem(what, f"The FHIR server does not offer {operation} yet ({error.message}).", missing=True)
    if error.status == 403:
        return Problem(what, f"Not allowed with this launch's access token ({error.message}).")
    if error.error_id in PLAIN_ERRORS:
        return Problem(what, PLAIN_ERRORS[error.error_id])
    return Problem(what, error.message)


# --- Parameters ----------------------------------------------------------------------------------------

def _value(p: dict):
    for key, value in p.items():
        if key.startswith("value"):
            return value
    return p.get("valueReference") or p.get("resource")


def _parts(p: dict) -> dict:
    return {part["name"]: _value(part) for part in p.get("part") or [] if "name" in part}


def parameter_rows(parameters: dict, name: str) -> list[dict]:
    """All parameters called ``name`` of a Parameters resource, each as a dict of its parts."""
    return [_parts(p) for p in parameters.get("parameter") or [] if p.get("name") == name]


def parameter_value(parameters: dict, name: str):
    for p in parameters.get("parameter") or []:
        if p.get("name") == name:
            return _value(p)
    return None


@dataclass
class Forecast:
    """The forecast of one ``$simulate`` call, per output in the server's order.

    ``series[output]`` holds ``time`` (aware datetimes), ``day``, ``median``, ``low``, ``high``; ``observed[output]``
    the calibration data as (datetime, value); ``labels`` and ``units`` what the server calls each output.
    """

    series: dict = field(default_factory=dict)
    observed: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    model_version: str | None = None
    start: dt.datetime | None = None
    dose: tuple | None = None        # (value, unit) of the dose the forecast assumed, as the server reports it

    @property
    def outputs(self) -> list[str]:
        return list(self.series)


def _parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def parse_forecast(parameters: dict) -> Forecast:
    """Read the ``forecast`` and ``observed`` rows of a Patient ``$simulate`` result.

    Labels come from the rows' ``display`` part (the model definition's name for the output), else the code.
    """
    fc = Forecast(model_version=parameter_value(parameters, "modelVersion"))
    for row in parameter_rows(parameters, "forecast"):
        out = row.get("output")
        when = _parse_time(row.get("time"))
        if not out or when is None:
            continue
        s = fc.series.setdefault(out, {"time": [], "day": [], "median": [], "low": [], "high": []})
        s["time"].append(when)
        for key in ("day", "median", "low", "high"):
            s[key].append(float(row[key]))
        fc.units.setdefault(out, row.get("unit") or "")
        fc.labels.setdefault(out, row.get("display") or out)
        if fc.start is None:
            fc.start = when - dt.timedelta(days=float(row["day"]))
    for s in fc.series.values():
        order = sorted(range(len(s["day"])), key=s["day"].__getitem__)
        for key in s:
            s[key] = [s[key][i] for i in order]
    for row in parameter_rows(parameters, "summary"):
        if row.get("name") == "dose" and row.get("value") is not None:
            fc.dose = (float(row["value"]), row.get("unit") or "")
    for row in parameter_rows(parameters, "observed"):
        when = _parse_time(row.get("time"))
        if when is not None and row.get("output") in fc.series:
            fc.observed.setdefault(row["output"], []).append((when, float(row["value"])))
    return fc


def simulate_parameters(horizon: int, *, dose: float | None = None, missed_days: list[int] = (),
                        adherence: float | None = None, samples: int = 200, seed: int = 20240, level: float = 0.9) -> list:
    """The ``Parameters.parameter`` list of a Patient ``$simulate`` call (fixed seed: the page is reproducible)."""
    params = [{"name": "horizonDays", "valueInteger": int(horizon)}, {"name": "samples", "valueInteger": samples},
              {"name": "seed", "valueInteger": seed}, {"name": "level", "valueDecimal": level}]
    if dose is not None:
        params.append({"name": "dose", "valueDecimal": dose})
    params += [{"name": "missedDoseDay", "valueInteger": int(d)} for d in missed_days]
    if adherence is not None:
        params.append({"name": "adherence", "valueDecimal": adherence})
    return params


# --- participant ---------------------------------------------------------------------------------------

@dataclass
class Participant:
    id: str
    name: str = ""
    age: int | None = None
    gender: str | None = None
    arm: str | None = None
    status: str | None = None
    site: str | None = None
    study: str | None = None
    left_on: str | None = None          # ResearchSubject.period.end (date) once the participant left
    last_dose: dt.datetime | None = None

    @property
    def doses_stopped(self) -> bool:
        """Whether the participant receives no more study doses (off study, withdrawn, follow-up only)."""
        return (self.status or "") in NO_MORE_DOSES

    @property
    def left_study(self) -> bool:
        return (self.status or "") in LEFT_STUDY


def _name(resource: dict) -> str:
    names = resource.get("name") or [{}]
    first = names[0]
    return first.get("text") or " ".join([*first.get("given", []), first.get("family", "")]).strip()


def age_on(birth_date: str | None, today: dt.date) -> int | None:
    """Completed years between ``birth_date`` (YYYY[-MM[-DD]]) and ``today``.

    Examples
    --------
    >>> age_on("1960-06-15", dt.date(2026, 6, 14)), age_on("1960-06-15", dt.date(2026, 6, 15))
    (65, 66)
    """
    if not birth_date:
        return None
    parts = [int(x) for x in birth_date.split("-")]
    year, month, day = (parts + [1, 1])[:3]
    return today.year - year - ((today.month, today.day) < (month, day))


def load_participant(api: FhirApi, patient_id: str, problems: list[Problem]) -> Participant:
    """Name, age, arm, status and site of one participant."""
    who = Participant(patient_id)
    try:
        patient = api.get(f"Patient/{patient_id}")
    except FhirCallError as err:
        problems.append(problem("Participant", err))
        return who
    who.name, who.gender = _name(patient) or patient_id, patient.get("gender")
    who.age = age_on(patient.get("birthDate"), dt.date.today())
    try:
        subjects = api.search("ResearchSubject", {"patient": f"Patient/{patient_id}"})
    except FhirCallError as err:
        problems.append(problem("Study enrolment", err))
        subjects = []
    if subjects:
        rs = subjects[0]
        who.arm, who.status = rs.get("actualArm") or rs.get("assignedArm"), rs.get("status")
        who.study = ((rs.get("study") or {}).get("reference") or "").rpartition("/")[2] or None
        who.left_on = (rs.get("period") or {}).get("end")
    if who.doses_stopped:
        who.last_dose = last_dose(api, patient_id, problems)
    org = ((patient.get("managingOrganization") or {}).get("reference") or "")
    if org.startswith("Organization/"):
        try:
            who.site = api.get(org).get("name") or org
        except FhirCallError:
            who.site = (patient.get("managingOrganization") or {}).get("display") or org
    return who


def last_dose(api: FhirApi, patient_id: str, problems: list[Problem]) -> dt.datetime | None:
    """When the participant's last recorded dose (a completed MedicationAdministration) was given."""
    try:
        given = api.search("MedicationAdministration", {"patient": f"Patient/{patient_id}", "status": "completed",
                                                        "_sort": "-effective-time", "_count": 1})
    except FhirCallError as err:
        problems.append(problem("Last dose", err))
        return None
    if not given:
        return None
    mar = given[0]
    return _parse_time(mar.get("effectiveDateTime") or (mar.get("effectivePeriod") or {}).get("end")
                       or (mar.get("effectivePeriod") or {}).get("start"))


@dataclass
class Risk:
    """The latest dropout-risk RiskAssessment: predictions (label, probability) and drivers (label, value in words,
    contribution to the log-odds). Labels and values in words come from the resource (the model's label table);
    a driver without them shows its feature code and raw value."""

    id: str
    when: str | None
    predictions: list = field(default_factory=list)
    drivers: list = field(default_factory=list)


def parse_risk(resource: dict) -> Risk:
    """Read a dropout-risk RiskAssessment (profile ``dropout-risk``, drivers as ``risk-driver`` extensions)."""
    predictions = []
    for p in resource.get("prediction") or []:
        outcome = p.get("outcome") or {}
        label = outcome.get("text") or next((c.get("display") or c.get("code") for c in outcome.get("coding") or []), "risk")
        if p.get("probabilityDecimal") is not None:
            predictions.append((label, float(p["probabilityDecimal"])))
    drivers = []
    for ext in resource.get("extension") or []:
        if ext.get("url") != RISK_DRIVER:
            continue
        parts = {e.get("url"): _value(e) for e in ext.get("extension") or []}
        if parts.get("feature") is not None and parts.get("contribution") is not None:
            value = parts.get("valueText")
            if value is None:
                value = "—" if parts.get("value") is None else f"{float(parts['value']):g}"
            drivers.append((parts.get("label") or parts["feature"], value, float(parts["contribution"])))
    drivers.sort(key=lambda d: -abs(d[2]))
    return Risk(resource.get("id", ""), resource.get("occurrenceDateTime"), predictions, drivers[:5])


def _is_dropout_risk(resource: dict) -> bool:
    profiles = (resource.get("meta") or {}).get("profile") or []
    methods = [c.get("code") for c in ((resource.get("method") or {}).get("coding") or [])]
    return any(p.endswith("/dropout-risk") for p in profiles) or "learned-model" in methods


def latest_risk(api: FhirApi, patient_id: str, problems: list[Problem]) -> Risk | None:
    try:
        found = api.search("RiskAssessment", {"patient": f"Patient/{patient_id}", "_sort": "-date", "_count": 20})
    except FhirCallError as err:
        problems.append(problem("Risk of missing the next visit", err))
        return None
    found = [r for r in found if _is_dropout_risk(r)]
    found.sort(key=lambda r: r.get("occurrenceDateTime") or "", reverse=True)
    return parse_risk(found[0]) if found else None


def outreach_tasks(api: FhirApi, patient_id: str, problems: list[Problem]) -> list[dict]:
    try:
        tasks = api.search("Task", {"patient": f"Patient/{patient_id}", "_count": 20})
    except FhirCallError as err:
        problems.append(problem("Outreach tasks", err))
        return []
    return [{"id": t.get("id"), "status": t.get("status"), "description": t.get("description", ""),
             "authored": t.get("authoredOn")} for t in tasks]


# --- cohort --------------------------------------------------------------------------------------------

@dataclass
class Cohort:
    id: str
    title: str = ""
    status: str | None = None
    arms: list = field(default_factory=list)                   # names in the study's order
    enrolment: Counter = field(default_factory=Counter)        # arm -> participants
    status_counts: Counter = field(default_factory=Counter)    # ResearchSubject.status -> count
    arm_series: dict = field(default_factory=dict)             # output -> arm -> {"day","time","median","low","high"}
    units: dict = field(default_factory=dict)                  # output -> UCUM unit (from the server)
    labels: dict = field(default_factory=dict)                 # output -> display name (from the server)
    horizon: float | None = None                               # days simulated from randomization (the server's)
    day0: dt.datetime | None = None                            # calendar date of day 0 on the time axis
    level: float = 0.9                                         # coverage of the across-participant band
    randomized: tuple | None = None                            # (first, last) ResearchSubject.period.start
    flagged: list = field(default_factory=list)                # (patient id, label, probability)
    assessed: int = 0                                          # participants with a dropout-risk assessment
    study: dict | None = None                                  # the ResearchStudy as read (None: not readable)
    subjects: list | None = None                               # its ResearchSubjects (None: not readable)


def load_cohort(api: FhirApi, study_id: str, problems: list[Problem], horizon: int | None = None,
                threshold: float = 0.8) -> Cohort:
    """Study, enrolment per arm, status counts, per-arm forecast and the participants flagged for outreach.

    ``horizon`` (days) is asked of ``$simulate`` when given; by default the server's (the study model's)
    default horizon and step apply, so a single-dose PK study is summarized over hours and a tumour model
    over weeks. Day 0 of the time axis is the first randomization (else the study's start, else today).
    """
    cohort = Cohort(study_id, horizon=horizon)
    members: set[str] = set()
    try:
        study = cohort.study = api.get(f"ResearchStudy/{study_id}")
        cohort.title, cohort.status = study.get("title") or study_id, study.get("status")
        cohort.arms = [a.get("name") for a in study.get("arm") or [] if a.get("name")]
    except FhirCallError as err:
        problems.append(problem("Study", err))
    try:
        subjects = cohort.subjects = api.search("ResearchSubject", {"study": f"ResearchStudy/{study_id}",
                                                                    "_count": 5000})
        starts = sorted(d for d in ((rs.get("period") or {}).get("start") for rs in subjects) if d)
        cohort.randomized = (starts[0], starts[-1]) if starts else None
        if starts:
            cohort.day0 = _parse_time(starts[0])
        for rs in subjects:
            cohort.enrolment[rs.get("actualArm") or rs.get("assignedArm") or "(unassigned)"] += 1
            cohort.status_counts[rs.get("status") or "unknown"] += 1
            members.add(((rs.get("individual") or {}).get("reference") or "").rpartition("/")[2])
    except FhirCallError as err:
        problems.append(problem("Enrolment", err))
    try:
        if cohort.day0 is None:
            cohort.day0 = (_parse_time(((cohort.study or {}).get("period") or {}).get("start"))
                           or dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0))
        asked = [{"name": "horizonDays", "valueInteger": horizon}] if horizon is not None else []
        result = api.operation(f"ResearchStudy/{study_id}/$simulate",
                               asked + [{"name": "seed", "valueInteger": 20240},
                                        {"name": "level", "valueDecimal": cohort.level}])
        for row in parameter_rows(result, "armSummary"):
            s = cohort.arm_series.setdefault(row["output"], {}).setdefault(
                row["arm"], {"day": [], "median": [], "low": [], "high": []})
            for key in s:
                s[key].append(float(row[key]))
            cohort.horizon = max(cohort.horizon or 0.0, float(row["day"]))
            cohort.units.setdefault(row["output"], row.get("unit") or "")
            cohort.labels.setdefault(row["output"], row.get("display") or row["output"])
        for arms in cohort.arm_series.values():
            for s in arms.values():
                order = sorted(range(len(s["day"])), key=s["day"].__getitem__)
                for key in s:
                    s[key] = [s[key][i] for i in order]
                s["time"] = [cohort.day0 + dt.timedelta(days=d) for d in s["day"]]
    except FhirCallError as err:
        problems.append(problem("Per-arm forecast", err, "$simulate on ResearchStudy"))
    try:
        risks = api.search("RiskAssessment", {"_sort": "-date", "_count": 1000})
        latest: dict = {}
        for r in risks:
            if not _is_dropout_risk(r):
                continue
            pid = ((r.get("subject") or {}).get("reference") or "").rpartition("/")[2]
            if pid in members and (pid not in latest or (r.get("occurrenceDateTime") or "") > (latest[pid].get("occurrenceDateTime") or "")):
                latest[pid] = r
        cohort.assessed = len(latest)
        for pid, r in sorted(latest.items()):
            for label, prob in parse_risk(r).predictions:
                if prob >= threshold:
                    cohort.flagged.append((pid, label, prob))
    except FhirCallError as err:
        problems.append(problem("Flagged participants", err))
    return cohort
