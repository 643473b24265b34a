"""``$simulate`` on a Patient (calibrated twin forecast, optionally persisted with Provenance), a Group
or a ResearchStudy (one vectorized cohort simulation summarized per arm; may run asynchronously).

The model is the study's definition: outputs, units, parameters, arms' doses and the virtual
population come from it; arms from ``ResearchStudy.arm`` and ``ResearchSubject.assignedArm``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fhir_ops import executor
from fhir_ops.errors import InvalidRequest, NotFound, Unprocessable
from fhir_ops.mapping import twin as twin_fhir
from fhir_ops.mapping.participant import load_participant
from fhir_ops.operations import twin_common as common
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.store.bundle import put_entry
from inference import twin

ACTIVITY = "$simulate"
#: output times per output in one Patient forecast (a year at 1-hour steps would be ~9000)
MAX_OUTPUT_TIMES = 1000
#: participants in one Group/ResearchStudy simulation
MAX_PARTICIPANTS = 100_000


@operation("OperationDefinition-simulate.json", async_allowed=True,
           writes=Writes(("Basic", "Observation", "Provenance"), flag="persist", default=False),
           study_summary="a cohort call answers per-arm medians and bands of simulated outcomes")
def handle(ctx: OperationContext, params: dict) -> dict:
    if ctx.resource_type == "Patient":
        if params.get("memberOutputs"):
            raise InvalidRequest("Parameter 'memberOutputs' applies to Group and ResearchStudy, not Patient",
                                 error_id="parameter-not-applicable")
        if params.get("virtualParticipants") is not None:
            raise InvalidRequest("Parameter 'virtualParticipants' applies to ResearchStudy, not Patient",
                                 error_id="parameter-not-applicable")
        sm = common.participant_model(ctx.store, ctx.resource_id)
        if sm.regimen is None:
            return _simulate_defined(ctx, params, common.defined_twin(ctx.store, ctx.resource_id, sm))
        checks = _scenario_params(params, sm.regimen.outputs, sm.regimen.horizon_limit_days,
                                  twin_fhir.model_version(sm.regimen))
        if params.get("persist"):
            with common.participant_lock(ctx.resource_id):
                return _simulate_patient(ctx, params, checks, sm)
        return _simulate_patient(ctx, params, checks, sm)
    if params.get("persist"):
        raise InvalidRequest(f"Parameter 'persist' applies to Patient only; a {ctx.resource_type} simulation "
                             "returns its summaries without storing resources", error_id="parameter-not-applicable")
    return _simulate_cohort(ctx, params)


def _scenario_params(params: dict, known_outputs: tuple[str, ...], limit_days: int, model_name: str) -> dict:
    days = common.horizon(params, limit_days, model_name)
    step = int(common.number(params, "stepHours", 24, 1, 168))
    n_times = int(24 * days // step) + 1
    if n_times > MAX_OUTPUT_TIMES:
        raise InvalidRequest(f"Parameters 'horizonDays'={days} and 'stepHours'={step} ask for {n_times} output "
                             f"times per output; at most {MAX_OUTPUT_TIMES} are returned (use a larger stepHours)",
                             error_id="parameter-out-of-range")
    missed = sorted(set(params.get("missedDoseDay") or []))
    bad = [d for d in missed if not 0 <= d < days]
    if bad:
        raise InvalidRequest(f"Parameter 'missedDoseDay' must lie within the horizon (0 to {days - 1}); got {bad}",
                             error_id="parameter-out-of-range")
    outputs = list(dict.fromkeys(params.get("output") or known_outputs))
    unknown = [o for o in outputs if o not in known_outputs]
    if unknown:
        raise InvalidRequest(f"Parameter 'output' must be one of {', '.join(known_outputs)} (the twin model's "
                             f"outputs); got {', '.join(unknown)}", error_id="invalid-code", code="code-invalid")
    return {
        "horizon_days": days, "step_hours": step, "missed": tuple(missed), "outputs": tuple(outputs),
        "dose": common.number(params, "dose", None, 0.0, 1000.0, " mg"),
        "interval": common.number(params, "intervalHours", 24.0, 1.0, 168.0, " h"),
        "adherence": common.number(params, "adherence", 1.0, 0.0, 1.0),
        "samples": int(common.number(params, "samples", 200, 10, 5000)),
        "seed": int(common.number(params, "seed", 0, 0, 2 ** 31 - 1)),
        "level": common.number(params, "level", 0.9, 0.5, 0.99),
    }


# -------------------------------------------------------------------------------------- Patient

def _simulate_patient(ctx: OperationContext, params: dict, s: dict, sm: common.StudyModel) -> dict:
    store = ctx.store
    pt = common.participant_twin(store, ctx.resource_id, sm)
    model = pt.model
    start_h, start = twin_fhir.forecast_start(pt.record)
    dose = twin_fhir.current_dose(pt.record, model) if s["dose"] is None else s["dose"] * twin_fhir.dose_factor(model)
    scenario = twin.TwinScenario(
        dose=dose, start_h=start_h, interval_h=s["interval"], horizon_days=s["horizon_days"],
        missed_dose_days=s["missed"], adherence=s["adherence"])
    fc = twin.forecast(model, pt.posterior, scenario, twin_fhir.forecast_times(s["horizon_days"], s["step_hours"]),
                       samples=s["samples"], seed=s["seed"], level=s["level"], outputs=s["outputs"])
    out = {
        "forecast": twin_fhir.forecast_parameters(fc, start, model),
        "observed": twin_fhir.observed_parameters(pt.record, s["outputs"], model),
        "summary": twin_fhir.summary_parameters(fc, model) + [
            {"name": "dose", "value": scenario.dose, "unit": model.dose_unit},
            {"name": "twin-reused", "value": 1 if pt.reused else 0}],
        "modelVersion": twin_fhir.model_version(model),
    }
    if sm.estimate:
        out["populationEstimate"] = {"reference": sm.estimate}
    if pt.reused:
        out["twinState"] = {"reference": pt.stored.ref}
    if not pt.posterior.converged:
        out["information"] = {"resourceType": "OperationOutcome", "issue": [{
            "severity": "warning", "code": "informational",
            "diagnostics": f"The calibration of Patient/{ctx.resource_id} did not converge; the intervals may be "
                           "too narrow or misplaced"}]}
    if params.get("persist"):
        now = common.utcnow()
        entries, targets, inputs = [], [], list(pt.inputs)
        if pt.reused:
            state_ref = pt.stored.ref
            inputs.append(state_ref)
        else:
            entry, state_ref = common.state_entry(pt, now)
            entries.append(entry)
            targets.append(state_ref)
        observations = twin_fhir.forecast_observations(pt.record, fc, start, pt.device, state_ref, now, model)
        entries += [put_entry(o) for o in observations]
        obs_refs = [f"Observation/{o['id']}/_history/1" for o in observations]
        provenance = common.commit(store, entries, targets + obs_refs, inputs, pt.device, ctx.headers, ACTIVITY,
                                   _agent_default(), now)
        out.update({"twinState": {"reference": state_ref},
                    "forecastObservation": [{"reference": r} for r in obs_refs],
                    "provenance": {"reference": provenance}})
    return out


def _simulate_defined(ctx: OperationContext, params: dict, pt: common.DefinedTwin) -> dict:
    """Forecast of a participant under their study's model definition (prior: the study's estimate)."""
    from fhir_ops.mapping import model_definition as fm
    from inference import model_definition as md

    model = pt.model
    s = _scenario_params(params, model.output_names, int(model.document.get("horizonLimitDays", 365)),
                         model.canonical)
    if params.get("persist"):
        raise InvalidRequest("persist=true is not yet supported for twins of a model definition: the forecast is "
                             "returned without storing it", error_id="parameter-not-supported")
    per_hour = 1.0 / {"h": 1.0, "d": 24.0, "wk": 168.0}[model.time_unit]
    record = pt.record
    last = max([d.time for d in record.doses] + [t for t, _, _ in record.observations])
    entry = model.dosing[0]
    previous = record.doses[-1] if record.doses else None
    if s["dose"] is None:
        if previous is None:
            raise InvalidRequest(f"Patient/{pt.patient_id} has no dose on record: give the scenario dose",
                                 error_id="parameter-required")
        amount = previous.amount
    else:
        try:
            amount = s["dose"] * fm.ucum_factor("mg", entry["unit"])
        except ValueError as exc:
            raise InvalidRequest(f"Parameter 'dose' is in mg, which does not convert to the model's dose unit "
                                 f"{entry['unit']}: {exc}", error_id="parameter-unit") from None
    # the scenario repeats doses every intervalHours, else at the definition's cohort interval, else daily
    cohort_interval = model.document.get("cohort", {}).get("interval")
    interval = (s["interval"] * per_hour if params.get("intervalHours") is not None or cohort_interval is None
                else float(cohort_interval))
    horizon = 24.0 * s["horizon_days"] * per_hour
    duration = previous.duration if previous is not None and previous.route == entry["route"] else 0.0
    starts = last + interval * np.arange(int(np.floor(horizon / interval)) + 1)
    missed = set(s["missed"])
    future = [md.Dose(float(t), amount, duration, entry["route"]) for t in starts
              if int(np.floor((t - last) / (24.0 * per_hour))) not in missed]
    times = last + np.arange(0.0, horizon + 1e-9, s["step_hours"] * per_hour)
    fc = md.forecast_subject(model, pt.posterior, record, future, {o: times for o in s["outputs"]},
                             samples=s["samples"], seed=s["seed"], level=s["level"])
    rows = []
    for name in s["outputs"]:
        unit = model.output_units[name]
        display = model.outputs[model.output_index(name)].get("display", name)
        for t, mid, lo, hi in zip(fc.times[name], fc.median[name], fc.low[name], fc.high[name]):
            rows.append({"output": name, "time": fm.hours_to_datetime(pt.origin, float(t), model.time_unit),
                         "day": round(float(t - last) / (24.0 * per_hour), 6), "median": round(float(mid), 6),
                         "low": round(float(lo), 6), "high": round(float(hi), 6), "unit": unit,
                         "display": display})
    observed = [{"output": name, "time": fm.hours_to_datetime(pt.origin, float(t), model.time_unit),
                 "value": round(float(v), 6)} for t, name, v in record.observations if name in s["outputs"]]
    out = {"forecast": rows, "observed": observed,
           "summary": [{"name": "dose", "value": round(float(amount), 6), "unit": entry["unit"]},
                       {"name": "twin-reused", "value": 0}],
           "modelVersion": model.canonical}
    if pt.estimate:
        out["populationEstimate"] = {"reference": pt.estimate}
    warnings = []
    if s["adherence"] != 1.0:
        warnings.append("adherence is applied by the built-in twin's behaviour model only; this forecast takes "
                        "every scenario dose")
    if not pt.posterior.converged:
        warnings.append(f"The calibration of Patient/{pt.patient_id} did not converge; the intervals may be too "
                        "narrow or misplaced")
    if warnings:
        out["information"] = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "informational", "diagnostics": w} for w in warnings]}
    return out


def _agent_default():
    try:
        from flask import current_app

        return current_app.config.get("REQUESTING_AGENT")
    except RuntimeError:  # outside an app context (not expected: jobs run inside one)
        return None


# ------------------------------------------------------------------------------ Group, ResearchStudy

def _simulate_cohort(ctx: OperationContext, params: dict) -> dict:
    store = ctx.store
    warnings: list[str] = []
    if ctx.resource_type == "Group":
        if params.get("virtualParticipants") is not None:
            raise InvalidRequest("Parameter 'virtualParticipants' applies to ResearchStudy; a Group of virtual "
                                 "participants says how many with Group.actual=false and Group.quantity",
                                 error_id="parameter-not-applicable")
        sm, arms, member_arm, records, subjects = _group_members(ctx, store, warnings)
    elif ctx.resource_type == "ResearchStudy" and params.get("virtualParticipants") is not None:
        sm, arms, member_arm, records, subjects = _study_virtual(ctx, store, params)
    elif ctx.resource_type == "ResearchStudy":
        sm, arms, member_arm, records, subjects = _study_members(ctx, store, warnings)
    else:  # the registry only routes the definition's resource types here
        raise InvalidRequest(f"$simulate does not apply to {ctx.resource_type}", error_id="operation-not-supported-here")
    if sm.regimen is None:
        return _simulate_defined_cohort(ctx, params, sm, arms, member_arm, records, subjects, warnings)
    model = sm.regimen
    s = _scenario_params(params, model.outputs, model.horizon_limit_days, twin_fhir.model_version(model))
    if s["adherence"] != 1.0 or s["missed"] or params.get("intervalHours") is not None:
        warnings.append("adherence, missedDoseDay and intervalHours shape Patient forecasts; cohort simulations "
                        "dose once daily with the behaviour model's adherence")
    covariates = twin_fhir.member_covariates(records, model) if records is not None else None
    doses = []
    used = set(np.unique(member_arm).tolist())
    for a, arm in enumerate(arms):
        if a not in used:  # an arm nobody is in (e.g. listed by the study, not yet randomized to)
            doses.append(0.0)
            continue
        dose = s["dose"] * twin_fhir.dose_factor(model) if s["dose"] is not None else _arm_dose(sm, arm)
        if dose is None:
            raise Unprocessable(f"Arm {arm!r} has no dose: {model.canonical} lists no arm of that name and the "
                                "study's arm does not state one in mg (e.g. '50 mg' or 'placebo'); give the "
                                "scenario dose with the 'dose' parameter", error_id="arm-without-dose")
        doses.append(dose)
    ctx.progress(0.5 if ctx.resource_type == "ResearchStudy" or covariates is not None else 0.0,
                 f"simulating {len(member_arm)} participants")
    base = 0.5 if covariates is not None else 0.0

    def on_chunk(done: int, total: int) -> bool:
        ctx.progress(base + (1.0 - base) * done / total, f"simulated {done}/{total} chunks")
        return not ctx.cancelled()

    result = twin.simulate_population(model, doses, member_arm, horizon_days=s["horizon_days"], covariates=covariates,
                                      seed=s["seed"], level=s["level"], step_days=max(1, s["step_hours"] // 24),
                                      arm_names=arms, on_chunk=on_chunk, executor=executor.get_executor())
    out = {"armSummary": twin_fhir.arm_summary_parameters(result, model),
           "summary": [{"name": "participants", "value": int(sum(result.participants))},
                       {"name": "arms", "value": len([n for n in result.participants if n])}],
           "modelVersion": twin_fhir.model_version(model)}
    if sm.estimate:
        out["populationEstimate"] = {"reference": sm.estimate}
    # the change over the horizon of the disease marker (else of the last output), per arm
    marker = model.output_of("disease") or model.outputs[-1]
    for a, arm in enumerate(arms):
        if result.participants[a]:
            end = result.median[a][marker][-1] - result.median[a][marker][0]
            out["summary"].append({"name": f"{marker}-change-median:{arm.replace(' ', '')}",
                                   "value": round(float(end), 6), "unit": model.output_units[marker]})
    if params.get("memberOutputs"):
        out["member"] = twin_fhir.member_parameters(result, subjects, model)
    if not result.completed:
        warnings.append("the simulation was cancelled before all participants were simulated")
    if warnings:
        out["information"] = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "informational", "diagnostics": w} for w in warnings]}
    return out




@dataclass(frozen=True)
class _Member:
    """A member of a cohort of an event-engine definition: their arm and baseline covariates."""

    patient_id: str
    arm: str | None
    covariates: dict


def _defined_member(store, patient_id: str, sm: common.StudyModel) -> _Member:
    from fhir_ops.mapping import model_definition as fm

    store.read("Patient", patient_id)  # 404 / 410 -> skipped with a warning
    study_ref = f"ResearchStudy/{sm.study.get('id')}"
    subjects = store.search_all("ResearchSubject", [("individual", f"Patient/{patient_id}")])
    mine = [s for s in subjects if (s.get("study") or {}).get("reference") == study_ref] or subjects
    arm = next((s.get("assignedArm") for s in mine if s.get("assignedArm")), None)
    # covariates as of now (the latest value); origin given, so a member without data is no error
    record, _, _ = fm.subject_record(store, patient_id, sm.definition, origin=common.utcnow())
    return _Member(patient_id, arm, dict(record.covariates))


def _defined_arm_dose(sm: common.StudyModel, arm: str, dose_unit: str) -> float | None:
    """An arm's dose per administration in the definition's dose unit: the definition's arm of that name,
    else what the study's arm (name, then description) states in mg."""
    from fhir_ops.mapping import model_definition as fm

    for a in sm.definition.document.get("arms", ()):
        if a["name"] == arm:
            return float(a["dose"])
    texts = [arm] + [a.get("description") or "" for a in sm.study.get("arm", []) if a.get("name") == arm]
    for text in texts:
        mg = twin_fhir.arm_dose(text)
        if mg is not None:
            return mg * fm.ucum_factor("mg", dose_unit)
    return None


def _simulate_defined_cohort(ctx: OperationContext, params: dict, sm: common.StudyModel, arms, member_arm, records,
                             subjects, warnings: list[str]) -> dict:
    """A cohort of an event-engine definition: each member from randomization under their arm's doses
    (``cohort`` section of the definition: dosing interval, infusion duration, summary defaults)."""
    from fhir_ops.mapping import model_definition as fm
    from inference import model_definition as md

    model = sm.definition
    cohort = model.document.get("cohort", {})
    given = dict(params)
    given.setdefault("horizonDays", cohort.get("horizonDays", 28))
    given.setdefault("stepHours", cohort.get("stepHours", 24))
    s = _scenario_params(given, model.output_names, int(model.document.get("horizonLimitDays", 365)),
                         model.canonical)
    if s["adherence"] != 1.0 or s["missed"]:
        warnings.append("adherence and missedDoseDay shape Patient forecasts; this cohort takes every dose")
    entry = model.dosing[0]
    per_hour = 1.0 / (24.0 * md.DAYS_PER_UNIT[model.time_unit])
    horizon = 24.0 * s["horizon_days"] * per_hour
    interval = s["interval"] * per_hour if params.get("intervalHours") is not None else cohort.get("interval")
    duration = float(cohort.get("duration", 0.0))
    if interval is not None and duration > interval:
        raise InvalidRequest(f"Parameter 'intervalHours' ({params.get('intervalHours')} h) is shorter than the "
                             f"infusion of {model.canonical} ({duration} {model.time_unit})",
                             error_id="parameter-out-of-range")
    starts = [0.0] if interval is None else list(interval * np.arange(int(np.floor(horizon / interval + 1e-9)) + 1))
    used = set(np.unique(member_arm).tolist())
    arm_doses = []
    for a, arm in enumerate(arms):
        if a not in used:
            arm_doses.append(())
            continue
        if s["dose"] is not None:
            try:
                amount = s["dose"] * fm.ucum_factor("mg", entry["unit"])
            except ValueError as exc:
                raise InvalidRequest(f"Parameter 'dose' is in mg, which does not convert to the model's dose unit "
                                     f"{entry['unit']}: {exc}", error_id="parameter-unit") from None
        else:
            amount = _defined_arm_dose(sm, arm, entry["unit"])
        if amount is None:
            raise Unprocessable(f"Arm {arm!r} has no dose: {model.canonical} lists no arm of that name and the "
                                "study's arm does not state one in mg (e.g. '320 mg' or 'placebo'); give the "
                                "scenario dose with the 'dose' parameter", error_id="arm-without-dose")
        arm_doses.append(tuple(md.Dose(float(t), amount, duration, entry["route"]) for t in starts))
    if records is None:
        covariates = [{}] * len(member_arm)  # virtual participants: each covariate at its declared default
        lacking = [c["name"] for c in model.covariates if c.get("default") is None]
        if lacking:
            raise Unprocessable(f"{ctx.resource_type}/{ctx.resource_id} asks for virtual participants, but "
                                f"{model.canonical} gives no default for covariate(s) {', '.join(lacking)} and has "
                                "no virtual population to draw them from; simulate the study's actual members, or "
                                "give the covariates a 'default' in the definition",
                                error_id="model-without-virtual-population")
    else:
        covariates = _filled_covariates(records, model, warnings)
    times = np.arange(0.0, horizon + 1e-9, s["step_hours"] * per_hour)
    ctx.progress(0.5 if records is not None else 0.0, f"simulating {len(member_arm)} participants")
    base = 0.5 if records is not None else 0.0

    def on_chunk(done: int, total: int) -> bool:
        ctx.progress(base + (1.0 - base) * done / total, f"simulated {done}/{total} chunks")
        return not ctx.cancelled()

    result = md.simulate_arms(model, sm.prior, arm_doses, member_arm, covariates, times, seed=s["seed"],
                              level=s["level"], arm_names=arms, on_chunk=on_chunk)
    rows = []
    for a, arm in enumerate(result.arms):
        if not result.participants[a]:
            continue
        for k, name in enumerate(model.output_names):
            for i, day in enumerate(result.days):
                rows.append({"arm": arm, "participants": result.participants[a], "output": name,
                             "day": round(float(day), 6), "median": round(float(result.median[a][name][i]), 6),
                             "low": round(float(result.low[a][name][i]), 6),
                             "high": round(float(result.high[a][name][i]), 6),
                             "unit": model.output_units[name], "display": model.outputs[k].get("display", name)})
    out = {"armSummary": rows,
           "summary": [{"name": "participants", "value": int(sum(result.participants))},
                       {"name": "arms", "value": len([n for n in result.participants if n])}],
           "modelVersion": model.canonical}
    if sm.estimate:
        out["populationEstimate"] = {"reference": sm.estimate}
    marker = next((o["name"] for o in model.outputs if o["source"] == "disease"), model.output_names[-1])
    for a, arm in enumerate(arms):
        if result.participants[a]:
            change = result.median[a][marker][-1] - result.median[a][marker][0]
            out["summary"].append({"name": f"{marker}-change-median:{arm.replace(' ', '')}",
                                   "value": round(float(change), 6), "unit": model.output_units[marker]})
    if params.get("memberOutputs"):
        out["member"] = [dict({"index": i, "arm": result.arms[a], "output": name,
                               "value": round(float(result.member_end[name][i]), 6)},
                              **({"subject": {"reference": subjects[i]}} if subjects[i] else {}))
                         for i, a in enumerate(result.member_arm) if not np.isnan(result.member_end[marker][i])
                         for name in model.output_names]
    if not result.completed:
        warnings.append("the simulation was cancelled before all participants were simulated")
    if warnings:
        out["information"] = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "informational", "diagnostics": w} for w in warnings]}
    return out


def _filled_covariates(records: list[_Member], model, warnings: list[str]) -> list[dict]:
    """Members' covariates; a missing one takes its declared default, else the median (numeric) or most
    frequent (categorical) value of the other members; 422 when no member has it and there is no default."""
    from collections import Counter

    filled = [dict(r.covariates) for r in records]
    for c in model.covariates:
        name = c["name"]
        known = [r.covariates[name] for r in records if r.covariates.get(name) is not None]
        missing = [r.patient_id for r in records if r.covariates.get(name) is None]
        if not missing:
            continue
        if c.get("default") is not None:
            value = c["default"]
        elif known and c["type"] == "categorical":
            value = Counter(map(str, known)).most_common(1)[0][0]
        elif known:
            value = float(np.median(np.asarray(known, dtype=float)))
        else:
            raise Unprocessable(f"no member has a value of covariate {name!r} (an Observation coded "
                                f"{c.get('observation', {}).get('codes', [{}])[0].get('code')}) and {model.canonical} "
                                "gives no default: the cohort simulation needs it", error_id="participant-without-data")
        for f, r in zip(filled, records):
            if r.covariates.get(name) is None:
                f[name] = value
        warnings.append(f"{len(missing)} member(s) without {name} simulated at {value} "
                        f"({'the definition default' if c.get('default') is not None else 'the median of the others'})")
    return filled


def _arm_dose(sm: common.StudyModel, arm: str) -> float | None:
    """An arm's daily dose in the model's dose unit: the definition's arm of that name, else what the
    study's arm (name, then description) states in mg."""
    model = sm.regimen
    if arm in model.arms:
        return model.arms[arm]
    for study_arm in sm.study.get("arm", []):
        if study_arm.get("name") == arm:
            for text in (arm, study_arm.get("description") or ""):
                mg = twin_fhir.arm_dose(text)
                if mg is not None:
                    return mg * twin_fhir.dose_factor(model)
    mg = twin_fhir.arm_dose(arm)
    return None if mg is None else mg * twin_fhir.dose_factor(model)


def _cohort_model(sm: common.StudyModel, what: str) -> common.StudyModel:
    """The study model a cohort runs under: a daily-regimen definition on the fast cohort engine, any
    other on the event engine (``inference.model_definition.simulate_arms``)."""
    return sm


def _load_members(ctx: OperationContext, store, patient_ids: list[str], warnings: list[str],
                  sm: common.StudyModel | None = None):
    records = []
    for i, pid in enumerate(patient_ids):
        if ctx.cancelled():
            break
        try:
            if sm is not None and sm.regimen is None:
                records.append(_defined_member(store, pid, sm))
            else:
                records.append(load_participant(store, pid))
        except (NotFound, Unprocessable) as exc:
            warnings.append(f"Patient/{pid} skipped: {exc.message}")
        if i % 10 == 9:
            ctx.progress(0.5 * (i + 1) / len(patient_ids), f"loaded {i + 1}/{len(patient_ids)} members")
    return records


def _group_study(ctx: OperationContext, store, group: dict, patient_ids: list[str]) -> dict:
    """The ResearchStudy a Group is simulated under: its ``research-study`` characteristic, else the study
    of its first member; 422 when it has neither."""
    ref = twin_fhir.group_study(group)
    if ref:
        kind, _, rid = ref.partition("/")
        if kind != "ResearchStudy" or not rid:
            raise Unprocessable(f"Group/{ctx.resource_id}: its research-study characteristic refers to {ref!r}, not a "
                                "ResearchStudy", error_id="group-without-study")
        try:
            return store.read("ResearchStudy", rid)
        except NotFound:
            raise Unprocessable(f"Group/{ctx.resource_id} names {ref}, which does not exist",
                                error_id="group-without-study") from None
    for pid in patient_ids[:1]:
        study = common.study_of_patient(store, pid)
        if study is not None:
            return study
    raise Unprocessable(f"Group/{ctx.resource_id} names no ResearchStudy (a characteristic coded "
                        f"{twin_fhir.TRIALTWIN_CS}|{twin_fhir.STUDY_CHARACTERISTIC} with valueReference) and has no "
                        "member enrolled in one: its twin model is unknown", error_id="group-without-study")


def _group_members(ctx: OperationContext, store, warnings: list[str]):
    group = store.read("Group", ctx.resource_id)
    arm = twin_fhir.group_arm(group)
    if group.get("actual", True) is False:
        quantity = group.get("quantity")
        if not isinstance(quantity, int) or quantity < 1:
            raise Unprocessable(f"Group/{ctx.resource_id} is not actual (virtual participants) but has no positive "
                                "quantity: say how many participants to simulate", error_id="group-without-quantity")
        if quantity > MAX_PARTICIPANTS:
            raise Unprocessable(f"Group/{ctx.resource_id} asks for {quantity} participants; at most "
                                f"{MAX_PARTICIPANTS} are simulated in one call", error_id="too-many-participants")
        sm = _cohort_model(common.study_model_of(store, _group_study(ctx, store, group, [])), f"Group/{ctx.resource_id}")
        if sm.regimen is not None and sm.regimen.covariate_model is None:
            raise Unprocessable(f"Group/{ctx.resource_id} asks for virtual participants, but {sm.definition.canonical} "
                                "has no virtualPopulation to draw them from", error_id="model-without-virtual-population")
        arms = (arm,) if arm else _study_arm_names(sm)
        # virtual participants are randomized 1:1:... in order, as a block randomization would
        return sm, arms, np.arange(quantity) % len(arms), None, [None] * quantity
    references = [m.get("entity", {}).get("reference", "") for m in group.get("member", [])
                  if not m.get("inactive", False)]
    patient_ids = []
    for ref in references:
        kind, _, rid = ref.partition("/")
        if kind == "Patient" and rid:
            patient_ids.append(rid)
        elif kind == "ResearchSubject" and rid:
            subject = store.read("ResearchSubject", rid)
            patient_ids.append(subject.get("individual", {}).get("reference", "").partition("/")[2])
        else:
            warnings.append(f"member {ref!r} skipped: only Patient and ResearchSubject members are simulated")
    patient_ids = [p for p in patient_ids if p]
    sm = _cohort_model(common.study_model_of(store, _group_study(ctx, store, group, patient_ids)),
                       f"Group/{ctx.resource_id}")
    records = _load_members(ctx, store, patient_ids, warnings, sm)
    return (sm,) + _arms_of(records, arm, warnings, f"Group/{ctx.resource_id}")


def _study_arm_names(sm: common.StudyModel) -> tuple[str, ...]:
    """The arms of the study (``ResearchStudy.arm``), else of the model definition."""
    arms = tuple(a.get("name") for a in sm.study.get("arm", []) if a.get("name")) or \
        tuple(a["name"] for a in sm.definition.document.get("arms", ()))
    if not arms:
        raise Unprocessable(f"ResearchStudy/{sm.study.get('id')} has no arms and {sm.definition.canonical} lists "
                            "none: say which arm to simulate (a Group characteristic 'study-arm')",
                            error_id="study-without-arms")
    return arms


def _study_members(ctx: OperationContext, store, warnings: list[str]):
    study = store.read("ResearchStudy", ctx.resource_id)
    sm = _cohort_model(common.study_model_of(store, study), f"ResearchStudy/{ctx.resource_id}")
    subjects = store.search_all("ResearchSubject", [("study", f"ResearchStudy/{ctx.resource_id}")])
    patient_ids = [s.get("individual", {}).get("reference", "").partition("/")[2] for s in subjects]
    records = _load_members(ctx, store, [p for p in patient_ids if p], warnings, sm)
    arms = [a.get("name") for a in study.get("arm", []) if a.get("name")]
    return (sm,) + _arms_of(records, None, warnings, f"ResearchStudy/{ctx.resource_id}", arms)


def _study_virtual(ctx: OperationContext, store, params: dict):
    """Virtual participants of a study: its arms, randomized in turn, covariates sampled by the engine."""
    quantity = int(common.number(params, "virtualParticipants", None, 1, MAX_PARTICIPANTS))
    study = store.read("ResearchStudy", ctx.resource_id)
    sm = _cohort_model(common.study_model_of(store, study), f"ResearchStudy/{ctx.resource_id}")
    arms = tuple(a.get("name") for a in study.get("arm", []) if a.get("name"))
    if not arms:
        raise Unprocessable(f"ResearchStudy/{ctx.resource_id} names no arms (ResearchStudy.arm.name) to randomize "
                            "virtual participants to", error_id="study-without-arms")
    return sm, arms, np.arange(quantity) % len(arms), None, [None] * quantity


def _arms_of(records, fixed_arm, warnings, what, study_arms=None):
    arms: list[str] = list(study_arms or [])
    kept, member_arm = [], []
    for r in records:
        arm = fixed_arm or r.arm
        if not arm:
            warnings.append(f"Patient/{r.patient_id} skipped: no assigned arm")
            continue
        if arm not in arms:
            arms.append(arm)
        kept.append(r)
        member_arm.append(arms.index(arm))
    if not kept:
        raise Unprocessable(f"{what} has no members with an assigned arm to simulate", error_id="no-members")
    return tuple(arms), np.asarray(member_arm), kept, [f"Patient/{r.patient_id}" for r in kept]
