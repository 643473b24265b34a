"""``$predict-dropout``: missed-next-visit or withdrawal risk for a participant or a whole study, as RiskAssessments.

Flagged participants get one open outreach Task (refreshed on re-runs); outputs and their Provenance
are written in one transaction.
"""
from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from fhir_ops.errors import FhirError, Gone, InvalidRequest, NotFound, Unprocessable, outcome
from fhir_ops.mapping.history import MappedHistory, load_history
from fhir_ops.mapping.model_device import ensure_model_device
from fhir_ops.mapping.participant import parse_datetime
from fhir_ops.mapping import risk_drivers
from fhir_ops.mapping.outreach_policy import outreach_target
from fhir_ops.mapping.provenance import build_provenance, requesting_agent
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.store.bundle import put_entry
from inference.dropout_risk import DEFAULT_THRESHOLD, DropoutRisk, assess_dropout_risk
from inference.features import FEATURE_NAMES
from inference.outreach import choose_threshold
from inference.service import UnknownModel, get_service
from inference.withdrawal import (DEFAULT_HORIZON_DAYS, MAX_HORIZON_DAYS, WITHDRAWAL_FEATURES,
                                  assess_withdrawal_risk)

TRIALTWIN_CS = "https://trialtwin.org/fhir/CodeSystem/trialtwin"
SD = "https://trialtwin.org/fhir/StructureDefinition/"
DROPOUT_RISK_PROFILE = SD + "dropout-risk"
OUTREACH_TASK_PROFILE = SD + "outreach-task"
#: Task statuses in which an outreach is still to be done; a re-run refreshes such a Task.
OPEN_TASK_STATUSES = ("requested", "received", "accepted", "ready", "in-progress")
#: ResearchSubject statuses that end participation: nothing left to predict.
ENDED_STATUSES = ("withdrawn", "off-study")
DEFAULT_MODEL = "dropout"
MISSED_VISIT, WITHDRAWAL = "missed-visit", "withdrawal"
#: Per outcome: the model family (registry name), its input columns and the RiskAssessment outcome concept.
OUTCOMES = {
    MISSED_VISIT: {"model": DEFAULT_MODEL, "features": FEATURE_NAMES, "code": "missed-next-visit",
                   "display": "Misses the next scheduled visit",
                   "text": "Misses the next scheduled visit (no-show or withdrawal before it)"},
    WITHDRAWAL: {"model": "withdrawal", "features": WITHDRAWAL_FEATURES, "code": "withdrawal",
                 "display": "Withdraws from the study within the horizon",
                 "text": "Withdraws from the study (leaves or is lost to follow-up) within the horizon"},
}
ACTIVITY = "$predict-dropout"
_WRITE_LOCK = threading.Lock()


@dataclass
class _Assessed:
    patient_id: str
    mapped: MappedHistory
    risk: DropoutRisk


@operation("OperationDefinition-predict-dropout.json", async_allowed=True,
           writes=Writes(("RiskAssessment", "Task", "Provenance"), flag="persist", default=True))
def handle(ctx: OperationContext, params: dict) -> dict:
    """Assess the participant (Patient) or every on-study participant (ResearchStudy)."""
    threshold = params.get("threshold")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise InvalidRequest(f"Parameter 'threshold' must lie strictly between 0 and 1; got {threshold}",
                             error_id="threshold-out-of-range", expression=["Parameters.parameter:threshold"])
    outcome_code = params.get("outcome", MISSED_VISIT)
    if outcome_code not in OUTCOMES:
        raise InvalidRequest(f"Parameter 'outcome' must be one of {', '.join(OUTCOMES)}; got {outcome_code!r}",
                             error_id="unknown-outcome", expression=["Parameters.parameter:outcome"])
    withdrawal = outcome_code == WITHDRAWAL
    horizon = params.get("horizonDays")
    if horizon is not None and horizon < 1:
        raise InvalidRequest(f"Parameter 'horizonDays' must be at least 1; got {horizon}",
                             error_id="horizon-out-of-range", expression=["Parameters.parameter:horizonDays"])
    if withdrawal:
        horizon = DEFAULT_HORIZON_DAYS if horizon is None else horizon
        if horizon > MAX_HORIZON_DAYS:
            raise InvalidRequest(f"Parameter 'horizonDays' must be at most {MAX_HORIZON_DAYS} for the withdrawal "
                                 f"outcome (the horizons the model was trained on); got {horizon}",
                                 error_id="horizon-out-of-range", expression=["Parameters.parameter:horizonDays"])
    as_of = parse_datetime(params["asOf"]) if params.get("asOf") else None
    persist = params.get("persist", True)
    create_tasks = params.get("createTasks", True) and persist
    name, version, sha256 = _resolve_model(params.get("model"), outcome_code)
    store = ctx.store

    issues: list[dict] = []
    threshold, threshold_basis = _resolve_threshold(ctx, store, threshold, outcome_code, name, version, issues)
    skipped = 0
    if ctx.resource_type == "Patient":
        patient_ids = [ctx.resource_id]
    else:
        patient_ids, skipped, skip_issue = _study_participants(store, ctx.resource_id)
        if skip_issue:
            issues.append(skip_issue)

    mapped: list[tuple[str, MappedHistory]] = []
    for i, pid in enumerate(patient_ids):
        if ctx.cancelled():
            raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                            error_id="cancelled")
        try:
            m = _load_history(store, pid, as_of, withdrawal)
        except (Unprocessable, NotFound, Gone) as exc:
            if ctx.resource_type == "Patient":
                raise
            issues.append(outcome("warning", exc.code, exc.message, error_id=exc.error_id,
                                  expression=[f"Patient/{pid}"]))
            continue
        if not withdrawal and horizon is not None and m.next_visit is not None:
            days_ahead = (m.next_visit - m.as_of).total_seconds() / 86400.0
            if days_ahead > horizon:
                issues.append(outcome("information", "informational",
                                      f"Patient/{pid}: the next visit ({m.next_visit.date().isoformat()}) is "
                                      f"{days_ahead:.1f} days after asOf, beyond horizonDays={horizon}; not assessed",
                                      error_id="next-visit-beyond-horizon", expression=[f"Patient/{pid}"]))
                continue
        mapped.append((pid, m))
        ctx.progress(0.8 * (i + 1) / max(len(patient_ids), 1), f"read {i + 1} of {len(patient_ids)} participants")

    try:
        if withdrawal:
            risks = assess_withdrawal_risk([m.history for _, m in mapped], [m.as_of_day for _, m in mapped],
                                           horizon_days=horizon, threshold=threshold, version=version,
                                           service=_service())
        else:
            risks = assess_dropout_risk([m.history for _, m in mapped], [m.as_of_day for _, m in mapped],
                                        threshold=threshold, version=version, service=_service())
    except ValueError as exc:
        raise Unprocessable(f"The {name} model could not assess the participants: {exc}",
                            error_id="invalid-features") from None
    assessed = [_Assessed(pid, m, r) for (pid, m), r in zip(mapped, risks)]

    outputs_per_participant: list[dict] = [_prediction_part(a) for a in assessed]
    counts = {"tasksCreated": 0, "tasksUpdated": 0}
    device_ref = None
    if persist and assessed:
        device = ensure_model_device(store, name, version, sha256, description=_DEVICE_DESCRIPTION[outcome_code])
        device_ref = _versioned(device)
        agent = requesting_agent(ctx.headers, _config_agent())
        # From looking up open Tasks to committing: concurrent calls in this process must not both see
        # "no open Task" and each create one. (Across processes, If-Match on updates still holds.)
        with _WRITE_LOCK:
            entries = []
            now = datetime.now(timezone.utc)
            for a, part in zip(assessed, outputs_per_participant):
                entries += _participant_entries(store, a, part, device, device_ref, agent, threshold,
                                                create_tasks, now, counts)
            if ctx.cancelled():  # last point at which stopping leaves nothing behind
                raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                                error_id="cancelled")
            store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    ctx.progress(1.0, "stored")

    not_assessed = sum(1 for i in issues if i["severity"] == "warning")
    out = {
        "model": f"{name}@{version}",
        "outcome": outcome_code,
        "threshold": threshold,
        "thresholdBasis": threshold_basis,
        "prediction": outputs_per_participant,
        "evaluated": len(assessed),
        "flagged": sum(a.risk.flagged for a in assessed),
        "tasksCreated": counts["tasksCreated"],
        "tasksUpdated": counts["tasksUpdated"],
        "skipped": skipped,
        "notAssessed": not_assessed,
    }
    if withdrawal:
        out["horizonDays"] = horizon
    if device_ref:
        out["modelDevice"] = {"reference": device_ref}
    if issues:
        out["issues"] = {"resourceType": "OperationOutcome", "issue": issues}
    return out


_DEVICE_DESCRIPTION = {
    MISSED_VISIT: ("Learned model of the probability that a trial participant misses the next scheduled visit "
                   "(no-show or withdrawal before it); ONNX logistic regression over 21 behaviour features"),
    WITHDRAWAL: ("Learned discrete-time hazard of a trial participant withdrawing from the study (7-day periods); "
                 "ONNX logistic regression over 14 landmark features and the period offset"),
}


def _resolve_model(spec: str | None, outcome_code: str = MISSED_VISIT) -> tuple[str, str, str]:
    """``name[@version]`` → (name, version, sha256) from the registry; 404 when unknown."""
    family = OUTCOMES[outcome_code]
    text = (spec or family["model"]).strip()
    name, _, version = text.partition("@")
    if not name or (("@" in text) and not version):
        raise InvalidRequest(f"Parameter 'model' must be name or name@version; got {spec!r}",
                             error_id="invalid-model", expression=["Parameters.parameter:model"])
    service = _service()
    try:
        entry = service.registry.get(name, version or None)
    except (KeyError, UnknownModel) as exc:
        known = ", ".join(sorted({f"{e.name}@{e.version}" for e in service.registry.entries()})) or "none"
        raise NotFound(f"Unknown model {text!r} ({exc.args[0] if exc.args else 'not registered'}); "
                       f"registered models: {known}", error_id="unknown-model",
                       expression=["Parameters.parameter:model"]) from None
    if name != family["model"] or tuple(entry.feature_names) != tuple(family["features"]):
        raise InvalidRequest(f"Model {name}@{entry.version} is not a {outcome_code} model; for outcome "
                             f"{outcome_code} $predict-dropout needs {family['model']}[@version]",
                             error_id="model-not-applicable", expression=["Parameters.parameter:model"])
    return entry.name, entry.version, entry.metadata.get("sha256")


def _load_history(store, pid: str, as_of, withdrawal: bool) -> MappedHistory:
    try:
        return load_history(store, pid, as_of)
    except Unprocessable as exc:
        if withdrawal and exc.error_id == "no-next-visit":
            # the withdrawal model covers participants with visits ahead (it was trained inside the schedule)
            raise Unprocessable(f"Patient/{pid} has no visit scheduled after asOf: the visit schedule is complete, "
                                "so there is no withdrawal left to predict (the withdrawal model covers participants "
                                "with visits ahead)", error_id="no-next-visit") from None
        raise


def _resolve_threshold(ctx: OperationContext, store, given: float | None, outcome_code: str, name: str,
                       version: str, issues: list[dict]) -> tuple[float, str]:
    """The parameter if given, else the study's outreach policy for the outcome, else the model's default.

    The study is the target (ResearchStudy level) or that of the participant's ResearchSubject; both
    reads pass the same visibility check as a search (a token that cannot see the study gets the default).
    """
    if given is not None:
        return given, "parameter"
    entry = _service().registry.get(name, version)
    study = _policy_study(ctx, store)
    target = outreach_target(study, outcome_code) if study else None
    if target is not None:
        points = entry.metadata.get("validation", {}).get("operating_points")
        where = [f"ResearchStudy/{study['id']}"]
        if not points:
            raise Unprocessable(f"ResearchStudy/{study['id']} states an outreach policy for {outcome_code}, but model "
                                f"{name}@{version} records no held-out operating points to derive a threshold from; "
                                "pass the threshold parameter", error_id="outreach-policy-unsupported",
                                expression=where)
        n_on_study = None
        if target.kind == "weekly-capacity":
            n_on_study = len(_study_participants(store, study["id"])[0])
        try:
            point = choose_threshold(points, target, n_on_study)
        except ValueError as exc:
            raise Unprocessable(f"ResearchStudy/{study['id']} outreach policy for {outcome_code}: {exc}",
                                error_id="outreach-policy-unreachable", expression=where) from None
        stated = (f"precision >= {target.value:g}" if target.kind == "precision"
                  else f"{target.value:g} contacts per week among {n_on_study} participants on study")
        return point["threshold"], (
            f"ResearchStudy/{study['id']} outreach policy ({stated}): threshold {point['threshold']:g}, where "
            f"{name}@{version}'s held-out data give precision {_pct(point['precision'])}, recall "
            f"{_pct(point['recall'])}, {point['flagged_fraction']:.1%} flagged")
    if outcome_code == MISSED_VISIT:
        return DEFAULT_THRESHOLD, f"product default {DEFAULT_THRESHOLD:g}"
    default = entry.metadata["output"]["product_threshold"]
    point = entry.metadata["validation"]["default_outreach"]
    return default, (f"model default {default:g} ({name}@{version}: lowest held-out threshold with precision >= "
                     f"{point['target']['value']:g}; precision {_pct(point['precision'])}, recall "
                     f"{_pct(point['recall'])})")


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _policy_study(ctx: OperationContext, store) -> dict | None:
    from fhir_ops.auth import visible

    if ctx.resource_type == "ResearchStudy":
        study_id = ctx.resource_id
    else:
        subjects = [s for s in store.search_all("ResearchSubject", [("individual", f"Patient/{ctx.resource_id}")])
                    if visible(ctx.access, s)]
        refs = sorted({s.get("study", {}).get("reference", "") for s in subjects})
        refs = [r for r in refs if r.startswith("ResearchStudy/")]
        if len(refs) != 1:  # none, or enrolled in several studies: no single policy applies
            return None
        study_id = refs[0].split("/", 1)[1]
    try:
        study = store.read("ResearchStudy", study_id)
    except (NotFound, Gone):
        return None
    return study if visible(ctx.access, study) else None


def _service():
    """The inference service of this server's data directory: its active model versions (the learning loop's
    registry, ``inference.model_loop``); outside an app, the process-wide one."""
    try:
        from flask import current_app

        data_dir = current_app.config.get("DATA_DIR")
    except RuntimeError:
        data_dir = None
    if not data_dir:
        return get_service()
    from inference.model_loop import loop_service

    return loop_service(data_dir)


def _study_participants(store, study_id: str) -> tuple[list[str], int, dict | None]:
    store.read("ResearchStudy", study_id)  # 404 / 410 for an unknown or deleted study
    subjects = store.search_all("ResearchSubject", [("study", f"ResearchStudy/{study_id}")])
    ids: list[str] = []
    ended: dict[str, int] = {}
    for subject in subjects:
        status = subject.get("status")
        if status in ENDED_STATUSES:
            ended[status] = ended.get(status, 0) + 1
            continue
        ref = subject.get("individual", {}).get("reference", "")
        if ref.startswith("Patient/"):
            ids.append(ref.split("/")[1])
    ids = list(dict.fromkeys(ids))
    skipped = sum(ended.values())
    issue = None
    if skipped:
        detail = ", ".join(f"{n} {s}" for s, n in sorted(ended.items()))
        issue = outcome("information", "informational",
                        f"Skipped {skipped} of {len(subjects)} participants of ResearchStudy/{study_id} who are no "
                        f"longer on study ({detail})", error_id="participants-skipped")
    return ids, skipped, issue


def _config_agent():
    try:
        from flask import current_app

        return current_app.config.get("REQUESTING_AGENT")
    except RuntimeError:  # outside an app context (direct calls in scripts)
        return None


def _versioned(resource: dict) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"


def _instant(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _is_withdrawal(a: _Assessed) -> bool:
    return hasattr(a.risk, "horizon_days")


def _period_end(a: _Assessed) -> datetime:
    """End of the predicted period: the next visit (missed-visit) or asOf + horizon (withdrawal)."""
    if _is_withdrawal(a):
        return a.mapped.as_of + timedelta(days=a.risk.horizon_days)
    return a.mapped.next_visit


def _prediction_part(a: _Assessed) -> dict:
    timing = ({"horizonEnd": _instant(_period_end(a))} if _is_withdrawal(a)
              else {"nextVisit": _instant(a.mapped.next_visit)})
    if _is_withdrawal(a) and a.mapped.next_visit is not None:
        timing["nextVisit"] = _instant(a.mapped.next_visit)
    return {
        "subject": {"reference": f"Patient/{a.patient_id}"},
        "probability": round(a.risk.probability, 6),
        "flagged": a.risk.flagged,
        "asOf": _instant(a.mapped.as_of),
        **timing,
        "driver": [{"feature": d.feature, "value": _feature_value(d.value), "contribution": round(d.log_odds, 6)}
                   for d in a.risk.drivers],
    }


def _driver_words(d) -> list[dict]:
    # what a clinician reads: the feature's plain-language label and its value in words (label table in data)
    label, text = risk_drivers.describe(d.feature, _feature_value(d.value))
    return [{"url": "label", "valueString": label}, {"url": "valueText", "valueString": text}]


def _feature_value(x: float) -> float:
    # features are float32: 7 significant digits say all they hold (79.9, not 79.900002)
    return float(f"{x:.7g}")


def _why(a: _Assessed, threshold: float) -> str:
    drivers = "; ".join(f"{d.feature} = {d.value:g}" + (f" {d.unit}" if d.unit not in ("", "1") else "")
                        for d in a.risk.drivers) or "none above average"
    if _is_withdrawal(a):
        event = (f"withdrawing from the study within {a.risk.horizon_days:g} days (by "
                 f"{_period_end(a).date().isoformat()})")
    else:
        event = f"missing the next visit on {a.mapped.next_visit.date().isoformat()}"
    return (f"Contact the participant: predicted probability {a.risk.probability:.2f} of {event} "
            f"(threshold {threshold:.2f}, model {a.risk.model}@{a.risk.version}). Main drivers: {drivers}.")


def _risk_assessment(a: _Assessed, ra_id: str, device_ref: str, now: datetime) -> dict:
    family = OUTCOMES[WITHDRAWAL if _is_withdrawal(a) else MISSED_VISIT]
    outcome_cc = {"coding": [{"system": TRIALTWIN_CS, "code": family["code"], "display": family["display"]}],
                  "text": family["text"]}
    return {
        "resourceType": "RiskAssessment", "id": ra_id,
        "meta": {"profile": [DROPOUT_RISK_PROFILE]},
        "extension": [
            {"url": SD + "twin-model", "valueReference": {"reference": device_ref}},
            *({"url": SD + "risk-driver", "extension": [
                {"url": "feature", "valueCode": d.feature},
                {"url": "value", "valueDecimal": _feature_value(d.value)},
                {"url": "contribution", "valueDecimal": round(d.log_odds, 6)},
                *_driver_words(d)]} for d in a.risk.drivers),
        ],
        "status": "final",
        "method": {"coding": [{"system": TRIALTWIN_CS, "code": "learned-model", "display": "Learned risk model"}]},
        "code": outcome_cc,
        "subject": {"reference": f"Patient/{a.patient_id}"},
        "occurrenceDateTime": _instant(now),
        "performer": {"reference": device_ref},
        "basis": [{"reference": ref} for ref in a.mapped.inputs],
        "prediction": [{
            "outcome": outcome_cc,
            "probabilityDecimal": round(a.risk.probability, 6),
            "whenPeriod": {"start": _instant(a.mapped.as_of), "end": _instant(_period_end(a))},
            "rationale": (f"Data up to {_instant(a.mapped.as_of)} (study day {a.mapped.as_of_day}); "
                          f"{'flagged' if a.risk.flagged else 'not flagged'} at threshold {a.risk.threshold:g}"),
        }],
    }


def _open_outreach_task(store, patient_id: str) -> dict | None:
    tasks = store.search_all("Task", [("patient", f"Patient/{patient_id}"), ("code", f"{TRIALTWIN_CS}|outreach"),
                                      ("status", ",".join(OPEN_TASK_STATUSES))])
    tasks = [t for t in tasks if t.get("status") in OPEN_TASK_STATUSES]  # whatever the store's search did
    if not tasks:
        return None
    return max(tasks, key=lambda t: t.get("meta", {}).get("lastUpdated", ""))


def _participant_entries(store, a: _Assessed, part: dict, device: dict, device_ref: str, agent: dict,
                         threshold: float, create_tasks: bool, now: datetime, counts: dict) -> list[dict]:
    ra_id = str(uuid.uuid4())
    ra = _risk_assessment(a, ra_id, device_ref, now)
    entries = [put_entry(ra)]
    targets = [f"RiskAssessment/{ra_id}/_history/1"]
    part["riskAssessment"] = {"reference": f"RiskAssessment/{ra_id}"}
    if a.risk.flagged and create_tasks:
        existing = _open_outreach_task(store, a.patient_id)
        task = {
            "resourceType": "Task",
            "meta": {"profile": [OUTREACH_TASK_PROFILE]},
            "status": "requested",
            "intent": "proposal",
            "priority": "urgent" if a.risk.probability >= (1 + threshold) / 2 else "routine",
            "code": {"coding": [{"system": TRIALTWIN_CS, "code": "outreach", "display": "Participant outreach"}]},
            "description": _why(a, threshold),
            "focus": {"reference": f"RiskAssessment/{ra_id}"},
            "for": {"reference": f"Patient/{a.patient_id}"},
            "authoredOn": _instant(now),
            "lastModified": _instant(now),
            "restriction": {"period": {"end": _instant(_period_end(a))}},
        }
        if existing is None:
            task["id"] = str(uuid.uuid4())
            entries.append(put_entry(task))
            version = "1"
            counts["tasksCreated"] += 1
            part["taskAction"] = "created"
        else:
            # keep what staff did with it (status, owner, notes) and when it was first raised
            task = {**existing, **{k: v for k, v in task.items() if k not in ("status", "authoredOn")},
                    "meta": {**existing.get("meta", {}), "profile": [OUTREACH_TASK_PROFILE]}}
            current = existing["meta"]["versionId"]
            entries.append(put_entry(task, if_match=f'W/"{current}"'))
            version = str(int(current) + 1)
            counts["tasksUpdated"] += 1
            part["taskAction"] = "updated"
        targets.append(f"Task/{task['id']}/_history/{version}")
        part["task"] = {"reference": f"Task/{task['id']}"}
    provenance = build_provenance(targets, a.mapped.inputs, device, agent, ACTIVITY, recorded=now)
    provenance["id"] = str(uuid.uuid4())
    entries.append(put_entry(provenance))
    part["provenance"] = {"reference": f"Provenance/{provenance['id']}"}
    return entries
