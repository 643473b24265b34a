"""Read a study's visit plan and its participants for scheduling; build the proposed Appointments and CarePlan.

The plan is the PlanDefinition in ``ResearchStudy.protocol`` (extensions visit-scheduling,
visit-plan-constraints, on-site-required; see docs/schedule.md); a participant's site is the study
Location whose managingOrganization is the Patient's, as in :mod:`fhir_ops.mapping.enrollment`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from fhir_ops.errors import Gone, NotFound, Unprocessable
from fhir_ops.mapping.participant import parse_datetime, versioned
from fhir_ops.store.base import Store
from inference.schedule import IN_PERSON, MODALITIES, PlanError, PlannedVisit, Participants, Schedule, VisitPlan

SD = "https://trialtwin.org/fhir/StructureDefinition/"
CS = "https://trialtwin.org/fhir/CodeSystem/"
MODALITY_CS = CS + "visit-modality"
COVARIATE_CS = CS + "covariate"
ENDED_STATUSES = ("withdrawn", "off-study", "ineligible", "not-registered", "candidate", "potential-candidate")
#: Appointment statuses that hold a site's time
HOLDING_STATUSES = ("proposed", "pending", "booked", "arrived", "checked-in", "waitlist")
DEFAULT_AGE_Y = 55.0
DAY = timedelta(days=1)


def _bad_plan(message: str, expression: str, error_id: str = "invalid-visit-plan") -> Unprocessable:
    return Unprocessable(message, error_id=error_id, expression=[expression])


def _ext(node: dict, url: str) -> list[dict]:
    return [e for e in node.get("extension", []) or [] if e.get("url") == url]


def _number(q: dict | None, unit: str, where: str) -> float:
    if not isinstance(q, dict) or not isinstance(q.get("value"), (int, float)):
        raise _bad_plan(f"{where} must be a quantity in {unit}", where)
    code = q.get("code") or q.get("unit")
    if code not in (unit, None):
        raise _bad_plan(f"{where} must be in UCUM {unit}, got {code}", where)
    return float(q["value"])


@dataclass
class StudyPlan:
    """The study, its visit plan (engine form) and the FHIR it came from."""

    study: dict
    plan_resource: dict
    plan: VisitPlan
    action_ids: list[str]
    sites: dict[str, str]  # Organization reference -> Location id
    inputs: list[str]


def load_plan(store: Store, study_id: str, capacity: float | None = None, min_spacing: int | None = None) -> StudyPlan:
    """The visit plan of ``ResearchStudy/{study_id}`` (capacity / spacing parameters override the plan's)."""
    study = store.read("ResearchStudy", study_id)
    refs = [(p.get("reference") or "") for p in study.get("protocol", []) or []]
    plans = [r.split("/", 1)[1] for r in refs if r.startswith("PlanDefinition/")]
    if not plans:
        raise Unprocessable(f"ResearchStudy/{study_id} has no visit plan: ResearchStudy.protocol names no "
                            "PlanDefinition", error_id="no-visit-plan", expression=["ResearchStudy.protocol"])
    try:
        plan_res = store.read("PlanDefinition", plans[0])
    except (NotFound, Gone):
        raise Unprocessable(f"ResearchStudy/{study_id} names PlanDefinition/{plans[0]} as its protocol, which does "
                            "not exist", error_id="no-visit-plan", expression=["ResearchStudy.protocol"]) from None
    constraints = _ext(plan_res, SD + "visit-plan-constraints")
    parts = {e.get("url"): e for e in (constraints[0].get("extension", []) if constraints else [])}
    if capacity is None:
        if "siteCapacity" not in parts:
            raise _bad_plan(f"PlanDefinition/{plan_res['id']} gives no site capacity (extension visit-plan-constraints"
                            ".siteCapacity) and the call gave no capacityHoursPerDay", "PlanDefinition.extension")
        capacity = _number(parts["siteCapacity"].get("valueQuantity"), "h/d", "visit-plan-constraints.siteCapacity")
    if min_spacing is None:
        min_spacing = int(_number(parts["minSpacing"].get("valueDuration"), "d", "visit-plan-constraints.minSpacing")) \
            if "minSpacing" in parts else 1
    visits, ids = [], []
    where_of: dict[str, str] = {}  # visit name -> FHIRPath of its action, to name it in errors
    for i, action in enumerate(plan_res.get("action", []) or []):
        sched = _ext(action, SD + "visit-scheduling")
        if not sched:
            continue  # not a visit (an action without scheduling)
        where = f"PlanDefinition.action[{i}]"
        name = action.get("title") or action.get("id") or f"action {i + 1}"
        where_of[name] = f"PlanDefinition.action.where(title='{name}')" if action.get("title") else where
        sub: dict[str, list] = {}
        for e in sched[0].get("extension", []):
            sub.setdefault(e.get("url"), []).append(e)
        for required in ("targetDay", "defaultModality", "siteHours"):
            if required not in sub:
                raise _bad_plan(f"visit {name}: the visit-scheduling extension lacks {required}", where)
        window = action.get("timingRange") or {}
        target = _number(sub["targetDay"][0].get("valueDuration"), "d", f"visit {name} targetDay")
        low = _number(window.get("low"), "d", f"visit {name} timingRange.low") if window else target
        high = _number(window.get("high"), "d", f"visit {name} timingRange.high") if window else target
        modalities = tuple(m.get("valueCoding", {}).get("code") for m in sub.get("modality", [])) or (IN_PERSON,)
        default = sub["defaultModality"][0].get("valueCoding", {}).get("code")
        on_site = any(e.get("valueBoolean") is True for a in action.get("action", []) or []
                      for e in _ext(a, SD + "on-site-required"))
        remote_hours = sub.get("remoteSiteHours")
        try:
            visits.append(PlannedVisit(
                name, int(round(target)), int(round(low)), int(round(high)), modalities, default, on_site,
                _number(sub["siteHours"][0].get("valueQuantity"), "h", f"visit {name} siteHours"),
                _number(remote_hours[0].get("valueQuantity"), "h", f"visit {name} remoteSiteHours")
                if remote_hours else 0.0))
        except PlanError as exc:
            raise _plan_error(exc, where) from None
        ids.append(action.get("id") or f"a{i}")
    if not visits:
        raise _bad_plan(f"PlanDefinition/{plan_res['id']} has no visit (no action with the visit-scheduling "
                        "extension)", "PlanDefinition.action", "no-visit-plan")
    order = np.argsort([v.target_day for v in visits], kind="stable")
    try:
        plan = VisitPlan(tuple(visits[i] for i in order), int(min_spacing), float(capacity))
    except PlanError as exc:
        # a capacity or spacing the call gave is checked (400) before; one that fails here is the plan's own
        raise _plan_error(exc, where_of.get(exc.visit, "PlanDefinition.action"),
                          f"PlanDefinition/{plan_res['id']}") from None
    sites = {}
    for ref in (s.get("reference") or "" for s in study.get("site", []) or []):
        if ref.startswith("Location/"):
            try:
                loc = store.read("Location", ref.split("/", 1)[1])
            except (NotFound, Gone):
                continue
            org = (loc.get("managingOrganization") or {}).get("reference")
            if org:
                sites[org] = loc["id"]
    return StudyPlan(study, plan_res, plan, [ids[i] for i in order], sites,
                     [versioned(study), versioned(plan_res)])


def _plan_error(exc: PlanError, expression: str, plan_ref: str | None = None) -> Unprocessable:
    error_id = {"window-unsatisfiable": "window-unsatisfiable", "capacity-invalid": "capacity-out-of-range",
                "spacing-invalid": "spacing-out-of-range"}.get(exc.kind, "invalid-visit-plan")
    message = str(exc)
    if exc.kind in ("capacity-invalid", "spacing-invalid"):
        expression = "PlanDefinition.extension"  # visit-plan-constraints.siteCapacity / .minSpacing
        if plan_ref:
            message = f"{plan_ref} (extension visit-plan-constraints): {message}"
    return Unprocessable(message, error_id=error_id, expression=[expression])


@dataclass
class Enrolled:
    """Who is scheduled: ids, site and randomization date per participant, and the engine's inputs."""

    patient_ids: list[str]
    location_ids: list[str | None]
    randomized: list[datetime]
    people: Participants
    origin: datetime
    inputs: list[str] = field(default_factory=list)
    skipped: int = 0


def _travel_km(store: Store, patient_id: str) -> tuple[float | None, dict | None]:
    found = store.search_all("Observation", [("subject", f"Patient/{patient_id}"),
                                             ("code", f"{COVARIATE_CS}|travel-distance")])
    found = [o for o in found if isinstance((o.get("valueQuantity") or {}).get("value"), (int, float))]
    if not found:
        return None, None
    latest = max(found, key=lambda o: o.get("effectiveDateTime") or "")
    q = latest["valueQuantity"]
    km = float(q["value"]) * (1.609344 if q.get("code") == "[mi_i]" else 1.0)
    return km, latest


def load_participants(store: Store, plan: StudyPlan, as_of: datetime, patient_id: str | None = None) -> Enrolled:
    """On-study participants of the plan's study (or the one ``patient_id``) and where each stands in the plan.

    The visits to schedule are those whose target day lies after the data cut ``as_of``; the previous one
    counts for the spacing. Participants without a travel distance are scheduled as living next to the site
    (distance 0) and reported; those whose site is unknown get no capacity constraint of a site.
    """
    study_id = plan.study["id"]
    params = [("study", f"ResearchStudy/{study_id}")]
    if patient_id is not None:
        params.append(("individual", f"Patient/{patient_id}"))
    subjects = store.search_all("ResearchSubject", params)
    if patient_id is not None and not subjects:
        raise Unprocessable(f"Patient/{patient_id} is not a participant of ResearchStudy/{study_id} (no "
                            "ResearchSubject)", error_id="not-a-participant", expression=["Patient"])
    if not subjects:
        raise Unprocessable(f"ResearchStudy/{study_id} has no participants (ResearchSubject) to schedule",
                            error_id="no-subjects")
    ids, locs, rand, dist, age, skipped, inputs = [], [], [], [], [], 0, []
    for subj in subjects:
        ref = (subj.get("individual") or {}).get("reference", "")
        start = (subj.get("period") or {}).get("start")
        if subj.get("status") in ENDED_STATUSES or not ref.startswith("Patient/") or not start:
            skipped += 1
            continue
        pid = ref.split("/", 1)[1]
        try:
            patient = store.read("Patient", pid)
        except (NotFound, Gone):
            skipped += 1
            continue
        km, obs = _travel_km(store, pid)
        born = patient.get("birthDate")
        randomized = parse_datetime(start)
        ids.append(pid)
        locs.append(plan.sites.get((patient.get("managingOrganization") or {}).get("reference")))
        rand.append(randomized)
        dist.append(km if km is not None else 0.0)
        age.append((randomized - parse_datetime(born)).days / 365.25 if born else DEFAULT_AGE_Y)
        inputs += [versioned(subj), versioned(patient)] + ([versioned(obs)] if obs else [])
    if patient_id is not None and not ids:
        raise Unprocessable(f"Patient/{patient_id} is no longer on ResearchStudy/{study_id}: nothing to schedule",
                            error_id="not-on-study", expression=["Patient"])
    if not ids:
        raise Unprocessable(f"ResearchStudy/{study_id} has no participant on study to schedule",
                            error_id="no-subjects")
    origin = min(rand)
    site_index = {loc: i for i, loc in enumerate(dict.fromkeys(sorted(l or "" for l in locs)))}
    targets = np.array([v.target_day for v in plan.plan.visits])
    as_of_day = np.array([int((as_of - r) // DAY) for r in rand])
    first = np.searchsorted(targets, as_of_day, side="right")
    previous = np.where(first > 0, targets[np.maximum(first - 1, 0)], -1)
    people = Participants(np.asarray(dist), np.asarray(age), np.array([site_index[l or ""] for l in locs]),
                          np.array([int((r - origin) // DAY) for r in rand]), first, previous, as_of_day)
    return Enrolled(ids, locs, rand, people, origin, inputs, skipped)


def capacity_in_use(store: Store, enrolled: Enrolled, plan: StudyPlan) -> dict[tuple[int, int], float]:
    """Site hours already held on each (site index, calendar day) by Appointments of other participants.

    Appointments of the participants being scheduled do not count: their upcoming visits are what
    the proposal replaces.
    """
    scheduling = {f"Patient/{p}" for p in enrolled.patient_ids}
    index = {loc: int(enrolled.people.site[i]) for i, loc in enumerate(enrolled.location_ids) if loc}
    used: dict[tuple[int, int], float] = {}
    hours = {IN_PERSON: max(v.hours_in_person for v in plan.plan.visits)}
    for loc, s in index.items():
        for appt in store.search_all("Appointment", [("location", f"Location/{loc}"),
                                                     ("status", ",".join(HOLDING_STATUSES))]):
            actors = {(p.get("actor") or {}).get("reference") for p in appt.get("participant", [])}
            if appt.get("status") not in HOLDING_STATUSES or actors & scheduling or not appt.get("start"):
                continue
            day = int((parse_datetime(appt["start"]) - enrolled.origin) // DAY)
            duration = _appointment_hours(appt, hours[IN_PERSON])
            used[(s, day)] = used.get((s, day), 0.0) + duration
    return used


def _appointment_hours(appt: dict, default: float) -> float:
    codes = {c.get("code") for st in appt.get("serviceType", []) for c in st.get("coding", [])
             if c.get("system") == MODALITY_CS}
    if "virtual" in codes:
        return 0.0 if appt.get("minutesDuration") is None else appt["minutesDuration"] / 60.0
    return default if appt.get("minutesDuration") is None else appt["minutesDuration"] / 60.0


def proposal_id(kind: str, *parts: str) -> str:
    """A stable id for a proposal resource: the same study, participant and visit give the same id."""
    return f"sched-{kind}-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _modality_cc(remote: bool) -> dict:
    code = MODALITIES[1] if remote else MODALITIES[0]
    display = "Virtual visit" if remote else "In-person visit"
    return {"coding": [{"system": MODALITY_CS, "code": code, "display": display}], "text": display}


def proposal_resources(plan: StudyPlan, enrolled: Enrolled, schedule: Schedule, p: int, hour: int = 10) -> list[dict]:
    """Proposed Appointments of participant ``p``'s upcoming visits and the CarePlan that links them (no ids of runs)."""
    pid = enrolled.patient_ids[p]
    study_id = plan.study["id"]
    first = int(enrolled.people.first_visit[p])
    appts = []
    for v in range(first, plan.plan.n_visits):
        visit = plan.plan.visits[v]
        remote = bool(schedule.remote[p, v])
        when = enrolled.randomized[p] + int(schedule.day[p, v]) * DAY
        start = datetime(when.year, when.month, when.day, hour, tzinfo=when.tzinfo)
        minutes = int(round(60 * visit.hours(MODALITIES[1] if remote else MODALITIES[0])))
        participants = [{"actor": {"reference": f"Patient/{pid}"}, "required": "required", "status": "needs-action"}]
        if enrolled.location_ids[p]:
            participants.append({"actor": {"reference": f"Location/{enrolled.location_ids[p]}"},
                                 "required": "required" if not remote else "information-only",
                                 "status": "needs-action"})
        appts.append({
            "resourceType": "Appointment", "id": proposal_id("appt", study_id, pid, plan.action_ids[v]),
            "status": "proposed", "serviceType": [_modality_cc(remote)],
            "description": f"{visit.name}: proposed {'virtual' if remote else 'in-person'} visit on study day "
                           f"{int(schedule.day[p, v])} (target {visit.target_day}, window {visit.earliest_day}.."
                           f"{visit.latest_day})",
            "start": start.isoformat().replace("+00:00", "Z"),
            "end": (start + timedelta(minutes=max(minutes, 15))).isoformat().replace("+00:00", "Z"),
            "minutesDuration": max(minutes, 15),
            "participant": participants})
    careplan = {
        "resourceType": "CarePlan", "id": proposal_id("careplan", study_id, pid),
        "status": "draft", "intent": "proposal",
        "instantiatesCanonical": [plan.plan_resource.get("url") or f"PlanDefinition/{plan.plan_resource['id']}"],
        "title": f"Proposed visit schedule ({plan.study.get('title') or study_id})",
        "subject": {"reference": f"Patient/{pid}"},
        "activity": [{"reference": {"reference": f"Appointment/{a['id']}"}} for a in appts]}
    return appts + [careplan]
