"""``Patient/{id}/$optimize-schedule`` and ``ResearchStudy/{id}/$optimize-schedule``: day and modality of upcoming visits.

Reads the protocol's visit plan and the participants through :mod:`fhir_ops.mapping.schedule`, solves the
assignment and replays both schedules with :mod:`inference.schedule`, and writes proposed Appointments,
CarePlans and one Provenance in one transaction (stable ids: a re-run with the same inputs writes nothing).
"""
from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np

from fhir_ops.errors import FhirError, Gone, InvalidRequest, NotFound, Unprocessable, outcome
from fhir_ops.mapping.model_device import ensure_model_device
from fhir_ops.mapping.participant import parse_datetime
from fhir_ops.mapping.provenance import build_provenance, requesting_agent
from fhir_ops.mapping.schedule import (Enrolled, StudyPlan, capacity_in_use, load_participants, load_plan,
                                       proposal_resources)
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.store.bundle import put_entry
from inference.behaviour import BehaviourModel
from inference.schedule import (IN_PERSON, MODALITIES, PlanError, Schedule, check_schedule, default_schedule,
                                information_weights, optimize_schedule, replay_schedules)

ACTIVITY = "$optimize-schedule"
METHOD_DEVICE = ("trialtwin-schedule", "0.1.0")
SOLVER = "scipy.optimize.milp (HiGHS)"
_WRITE_LOCK = threading.Lock()


def _bad(name: str, message: str, error_id: str) -> InvalidRequest:
    return InvalidRequest(message, error_id=error_id, expression=[f"Parameters.parameter:{name}"])


def _study_of_patient(store, patient_id: str, given: dict | None) -> str:
    if given:
        ref = given.get("reference", "")
        if not ref.startswith("ResearchStudy/"):
            raise _bad("study", f"'study' must reference a ResearchStudy, got {ref!r}", "invalid-study")
        return ref.split("/", 1)[1]
    store.read("Patient", patient_id)  # 404 / 410 for an unknown or deleted participant
    subjects = store.search_all("ResearchSubject", [("individual", f"Patient/{patient_id}")])
    studies = list(dict.fromkeys((s.get("study") or {}).get("reference", "") for s in subjects))
    with_plan = []
    for ref in studies:
        if not ref.startswith("ResearchStudy/"):
            continue
        try:
            study = store.read("ResearchStudy", ref.split("/", 1)[1])
        except (NotFound, Gone):
            continue
        if any((p.get("reference") or "").startswith("PlanDefinition/") for p in study.get("protocol", []) or []):
            with_plan.append(study["id"])
    if len(with_plan) == 1:
        return with_plan[0]
    if not studies:
        raise Unprocessable(f"Patient/{patient_id} is not a participant of any study (no ResearchSubject)",
                            error_id="not-a-participant", expression=["Patient"])
    if not with_plan:
        raise Unprocessable(f"No study of Patient/{patient_id} has a visit plan (ResearchStudy.protocol names no "
                            "PlanDefinition)", error_id="no-visit-plan", expression=["ResearchStudy.protocol"])
    raise _bad("study", f"Patient/{patient_id} takes part in several studies with a visit plan "
                        f"({', '.join(with_plan)}); name one in 'study'", "study-ambiguous")


def _check_params(params: dict) -> None:
    cap = params.get("capacityHoursPerDay")
    if cap is not None and not (np.isfinite(cap) and cap > 0):
        raise _bad("capacityHoursPerDay", f"'capacityHoursPerDay' must be > 0; got {cap}", "capacity-out-of-range")
    spacing = params.get("minSpacingDays")
    if spacing is not None and spacing < 1:
        raise _bad("minSpacingDays", f"'minSpacingDays' must be at least 1; got {spacing}", "spacing-out-of-range")
    cost = params.get("siteHourCost")
    if cost is not None and not (np.isfinite(cost) and cost >= 0):
        raise _bad("siteHourCost", f"'siteHourCost' must be >= 0; got {cost}", "cost-out-of-range")
    reps = params.get("replicates", 200)
    if not 20 <= reps <= 2000:
        raise _bad("replicates", f"'replicates' must lie in 20..2000; got {reps}", "replicates-out-of-range")


@operation("OperationDefinition-optimize-schedule.json", async_allowed=True,
           writes=Writes(("Appointment", "CarePlan", "Provenance"), flag="persist", default=True),
           cross_patient="weighs the site's daily capacity against other participants' appointments",
           study_summary="proposed visit days and modalities, and expected missed visits and site hours")
def handle(ctx: OperationContext, params: dict) -> dict:
    """Optimise the upcoming visits of one participant or of every on-study participant of a study."""
    _check_params(params)
    store = ctx.store
    as_of = parse_datetime(params["asOf"]) if params.get("asOf") else datetime.now(timezone.utc)
    patient_id = ctx.resource_id if ctx.resource_type == "Patient" else None
    if patient_id is not None:
        study_id = _study_of_patient(store, patient_id, params.get("study"))
    else:
        if params.get("study"):
            raise _bad("study", "'study' is for Patient/[id]/$optimize-schedule; this call is on the study itself",
                       "study-not-applicable")
        study_id = ctx.resource_id
    plan = load_plan(store, study_id, params.get("capacityHoursPerDay"), params.get("minSpacingDays"))
    enrolled = load_participants(store, plan, as_of, patient_id)
    people = enrolled.people
    issues = []
    if enrolled.skipped:
        issues.append(outcome("information", "informational", f"Skipped {enrolled.skipped} participant(s) of "
                              f"ResearchStudy/{study_id} who are no longer (or not yet) on study",
                              error_id="participants-skipped"))
    no_site = [pid for pid, loc in zip(enrolled.patient_ids, enrolled.location_ids) if loc is None]
    if no_site:
        issues.append(outcome("warning", "incomplete", f"{len(no_site)} participant(s) have no known site "
                              "(Patient.managingOrganization matches no study site); their visits count against "
                              "one shared capacity", error_id="participants-without-site"))
    todo = people.first_visit < plan.plan.n_visits
    if not todo.any():
        raise Unprocessable(f"No visit of the plan lies after {as_of.date().isoformat()} for "
                            f"{'Patient/' + patient_id if patient_id else 'any participant of ResearchStudy/' + study_id}"
                            ": nothing to schedule", error_id="nothing-to-schedule",
                            expression=["Parameters.parameter:asOf"])
    used = capacity_in_use(store, enrolled, plan)
    info = information_weights(plan.plan, *_marker_noise(store, study_id))
    model = BehaviourModel()
    try:
        solution = optimize_schedule(plan.plan, people, model, information=info,
                                     hour_cost=params.get("siteHourCost", 0.01), capacity_used=used)
    except PlanError as exc:
        raise _plan_error(exc, enrolled) from None
    proposal = solution.schedule
    violations = check_schedule(plan.plan, people, proposal, used)
    if violations:  # the solver's answer is checked, never trusted blindly
        raise FhirError("The solver returned a schedule that breaks a hard constraint: " + "; ".join(violations[:3]),
                        status=500, code="exception", error_id="schedule-check-failed")
    default = default_schedule(plan.plan, people)
    ctx.progress(0.4, "solved; replaying the behaviour model")
    replay = replay_schedules(plan.plan, people, default, proposal, model, reps=params.get("replicates", 200),
                              seed=params.get("seed", 0))
    exp_default, exp_prop, se_default, se_prop = replay.expected()
    gain, gain_se, low, high = replay.gain()
    hours_default, hours_prop = _hours(plan, people, default), _hours(plan, people, proposal)
    out = {
        "participants": int(todo.sum()),
        "visits": int(np.sum(plan.plan.n_visits - people.first_visit[todo])),
        "protocolDefault": {"expectedMissedVisits": exp_default, "standardError": se_default,
                            "siteHours": hours_default,
                            "capacityExceededDays": _exceeded(plan, people, default, used)},
        "proposal": {"expectedMissedVisits": exp_prop, "standardError": se_prop, "siteHours": hours_prop,
                     "capacityExceededDays": 0},
        "expectedGain": {"missedVisits": gain, "standardError": gain_se, "low95": low, "high95": high,
                         "siteHours": hours_default - hours_prop},
        "solver": {"name": SOLVER, "status": solution.status, "mipGap": solution.mip_gap,
                   "variables": solution.n_variables},
    }
    visits = _visit_parts(plan, enrolled, proposal)
    if params.get("persist", True):
        out.update(_persist(ctx, plan, enrolled, proposal, visits, issues))
    out["visit"] = visits
    if issues:
        out["issues"] = {"resourceType": "OperationOutcome", "issue": issues}
    return out


def _plan_error(exc: PlanError, enrolled: Enrolled) -> FhirError:
    text = str(exc)
    if text.startswith("participant "):  # name the participant by its Patient id, not the engine's index
        index, _, rest = text[len("participant "):].partition(": ")
        if index.isdigit():
            text = f"Patient/{enrolled.patient_ids[int(index)]}: {rest}"
    error_id = {"window-unsatisfiable": "window-unsatisfiable", "capacity-infeasible": "capacity-infeasible"}.get(
        exc.kind, "schedule-infeasible")
    return Unprocessable(text, error_id=error_id,
                         expression=[f"PlanDefinition.action.where(title='{exc.visit}')"] if exc.visit else None)


def _hours(plan: StudyPlan, people, schedule: Schedule) -> float:
    total = 0.0
    for p in range(people.n):
        for v in range(int(people.first_visit[p]), plan.plan.n_visits):
            total += plan.plan.visits[v].hours(MODALITIES[1] if schedule.remote[p, v] else IN_PERSON)
    return total


def _exceeded(plan: StudyPlan, people, schedule: Schedule, used: dict) -> int:
    return len({msg.split(":")[0] for msg in check_schedule(plan.plan, people, schedule, used)
                if msg.startswith("site ")})


def _visit_parts(plan: StudyPlan, enrolled: Enrolled, schedule: Schedule) -> list[dict]:
    parts = []
    for p, pid in enumerate(enrolled.patient_ids):
        for v in range(int(enrolled.people.first_visit[p]), plan.plan.n_visits):
            visit = plan.plan.visits[v]
            day = int(schedule.day[p, v])
            parts.append({"subject": {"reference": f"Patient/{pid}"}, "visit": visit.name, "day": day,
                          "date": (enrolled.randomized[p] + timedelta(days=day)).date().isoformat(),
                          "modality": MODALITIES[1] if schedule.remote[p, v] else IN_PERSON,
                          "defaultDay": visit.target_day, "defaultModality": visit.default_modality,
                          "onSite": visit.on_site})
    return parts


def _same(existing: dict, new: dict) -> bool:
    strip = {"meta", "id", "resourceType"}
    return {k: v for k, v in existing.items() if k not in strip} == {k: v for k, v in new.items() if k not in strip}


def _stale_proposals(store, careplan: dict | None, keep: set[str]) -> list[dict]:
    """Appointments the stored CarePlan links that are still ``proposed`` but not proposed again: cancelled now."""
    stale = []
    for activity in (careplan or {}).get("activity", []):
        ref = (activity.get("reference") or {}).get("reference", "")
        if not ref.startswith("Appointment/") or ref in keep:
            continue
        try:
            appt = store.read("Appointment", ref.split("/", 1)[1])
        except (NotFound, Gone):
            continue
        if appt.get("status") == "proposed":
            stale.append({**appt, "status": "cancelled",
                          "cancelationReason": {"text": "No longer proposed: a later $optimize-schedule run for "
                                                        "another data cut does not schedule this visit"}})
    return stale


def _persist(ctx: OperationContext, plan: StudyPlan, enrolled: Enrolled, schedule: Schedule, visits: list[dict],
             issues: list[dict]) -> dict:
    store = ctx.store
    entries, targets, careplans = [], [], []
    written = unchanged = 0
    by_subject: dict[str, list[dict]] = {}
    for part in visits:
        by_subject.setdefault(part["subject"]["reference"], []).append(part)
    with _WRITE_LOCK:  # from reading the stored proposals to committing: no concurrent call in between
        for p, pid in enumerate(enrolled.patient_ids):
            if enrolled.people.first_visit[p] >= plan.plan.n_visits:
                continue
            resources = proposal_resources(plan, enrolled, schedule, p)
            existing = {}
            for r in resources:
                try:
                    existing[r["id"]] = store.read(r["resourceType"], r["id"])
                except (NotFound, Gone):
                    pass
            acted = [r for r in resources if r["resourceType"] == "Appointment" and r["id"] in existing
                     and existing[r["id"]].get("status") != "proposed"]
            if acted:
                issues.append(outcome("warning", "business-rule", f"Patient/{pid}: the proposal was already acted on "
                                      f"(Appointment/{acted[0]['id']} is {existing[acted[0]['id']].get('status')}); "
                                      "not overwritten", error_id="proposal-acted-on", expression=[f"Patient/{pid}"]))
                continue
            refs = {r["id"]: f"{r['resourceType']}/{r['id']}" for r in resources}
            careplans.append({"reference": refs[resources[-1]["id"]]})
            for part in by_subject.get(f"Patient/{pid}", []):
                appt = next(r for r in resources if r["resourceType"] == "Appointment"
                            and r["description"].startswith(part["visit"] + ":"))
                part["appointment"] = {"reference": refs[appt["id"]]}
            # proposed visits of an earlier run that this run no longer schedules (their target day passed)
            stale = _stale_proposals(store, existing.get(resources[-1]["id"]), set(refs.values()))
            if not stale and all(r["id"] in existing and _same(existing[r["id"]], r) for r in resources):
                unchanged += 1
                continue
            written += 1
            for r in resources:
                old = existing.get(r["id"])
                version = int(old["meta"]["versionId"]) if old else 0
                entries.append(put_entry(r, f'W/"{version}"' if old else None))
                targets.append(f"{refs[r['id']]}/_history/{version + 1}")
            for appt in stale:
                version = int(appt["meta"]["versionId"])
                entries.append(put_entry({k: v for k, v in appt.items() if k != "meta"}, f'W/"{version}"'))
                targets.append(f"Appointment/{appt['id']}/_history/{version + 1}")
        out = {"carePlan": careplans, "written": written, "unchanged": unchanged}
        if not entries:
            return out
        device = ensure_model_device(store, *METHOD_DEVICE,
                                     description="Visit-schedule optimisation: behaviour-model missed-visit costs, "
                                                 "mixed-integer assignment (scipy.optimize.milp, HiGHS), "
                                                 "common-random-numbers replay")
        prov = build_provenance(targets, plan.inputs + enrolled.inputs, device, requesting_agent(ctx.headers),
                                ACTIVITY, recorded=datetime.now(timezone.utc))
        prov["id"] = str(uuid.uuid4())
        entries.append(put_entry(prov))
        if ctx.cancelled():
            raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                            error_id="cancelled")
        store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    out["provenance"] = {"reference": f"Provenance/{prov['id']}"}
    return out


def _marker_noise(store, study_id: str) -> tuple[float, float]:
    """``(sigma, tau per sqrt(day))`` of the information value of a visit (``inference.schedule.information_weights``),
    both from the study's model definition: its disease marker's residual error (the fitted estimate's when the
    study has one) and its typical yearly drift, taken as the random-walk SD per sqrt(year) a missed visit leaves
    unseen. A study without a model, or whose model has no disease marker, weighs every visit alike (tau 0)."""
    from fhir_ops.operations import twin_common as common
    from inference.model_definition import marker_noise

    try:
        sm = common.study_model_of(store, store.read("ResearchStudy", study_id))
    except FhirError:
        return 1.0, 0.0
    noise = marker_noise(sm.definition, sm.prior)
    if noise is None or not noise.assay_sd > 0:
        return 1.0, 0.0
    return noise.assay_sd, noise.drift_per_day * 365.25 / np.sqrt(365.25)
