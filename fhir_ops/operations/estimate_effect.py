"""``ResearchStudy/{id}/$estimate-effect``: treatment effects with PROCOVA, external and hybrid controls.

Reads the analysis tables through :mod:`fhir_ops.mapping.evidence`, runs :mod:`inference.evidence`,
and (``persist``) stores each participant's prognostic score, a rendered report and one Provenance
in one transaction.
"""
from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np

from fhir_ops.errors import FhirError, InvalidRequest, Unprocessable, outcome
from fhir_ops.mapping.evidence import AGE, BASELINE, SEX, AnalysisTable, Endpoint, load_table, parse_token
from fhir_ops.mapping.participant import parse_datetime
from fhir_ops.mapping.model_device import ensure_model_device
from fhir_ops.mapping.provenance import build_provenance, requesting_agent
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.reports.effect_report import render_effect_report
from fhir_ops.store.bundle import latest_version, put_entry
from inference import evidence
from terminology.catalog import TRIALTWIN_CS

PROGNOSTIC_SCORE_PROFILE = "https://trialtwin.org/fhir/StructureDefinition/prognostic-score"
EFFECT_REPORT_PROFILE = "https://trialtwin.org/fhir/StructureDefinition/effect-report"
ACTIVITY = "$estimate-effect"
DEFAULT_COVARIATES = [BASELINE, AGE]
METHOD_DEVICE = ("trialtwin-evidence", "0.1.0")


def _param_error(name: str, message: str, error_id: str) -> InvalidRequest:
    return InvalidRequest(message, error_id=error_id, expression=[f"Parameters.parameter:{name}"])


def _settings(params: dict) -> dict:
    window = params.get("windowDays", 14)
    if params["timepointDays"] < 1:
        raise _param_error("timepointDays", f"'timepointDays' must be at least 1; got {params['timepointDays']}",
                           "timepoint-out-of-range")
    if window < 0:
        raise _param_error("windowDays", f"'windowDays' must not be negative; got {window}", "window-out-of-range")
    trim = params.get("trim", 0.05)
    if not 0.0 <= trim < 0.25:
        raise _param_error("trim", f"'trim' must lie in [0, 0.25); got {trim}", "trim-out-of-range")
    caliper = params.get("caliper", 0.2)
    if caliper <= 0:
        raise _param_error("caliper", f"'caliper' must be positive; got {caliper}", "caliper-out-of-range")
    weighting = params.get("weighting", "weighting")
    if weighting not in ("weighting", "matching"):
        raise _param_error("weighting", f"'weighting' must be weighting or matching; got {weighting!r}", "unknown-code")
    borrowing = params.get("borrowing", "test-then-pool")
    if borrowing not in ("fixed", "test-then-pool"):
        raise _param_error("borrowing", f"'borrowing' must be fixed or test-then-pool; got {borrowing!r}", "unknown-code")
    fraction = params.get("borrowFraction", 0.5)
    if not 0.0 <= fraction <= 1.0:
        raise _param_error("borrowFraction", f"'borrowFraction' must lie in [0, 1]; got {fraction}",
                           "fraction-out-of-range")
    if params["treatmentArm"] == params["controlArm"]:
        raise _param_error("controlArm", "treatmentArm and controlArm name the same arm; an effect needs two arms",
                           "single-arm")
    source = params.get("prognosticSource", "historical")
    if source not in ("historical", "twin"):
        raise _param_error("prognosticSource", f"'prognosticSource' must be historical or twin; got {source!r}",
                           "unknown-code")
    if source == "twin" and params.get("historicalControl"):
        raise _param_error("prognosticSource", "prognosticSource=twin takes the score from the study's twin model; "
                           "it cannot be combined with historicalControl", "prognostic-source-conflict")
    covariates = list(dict.fromkeys(params.get("covariate") or DEFAULT_COVARIATES))
    for c in covariates:
        if c not in (AGE, SEX, BASELINE):
            parse_token(c, "covariate")
    system, code = parse_token(params["endpoint"], "endpoint")
    return {"endpoint": Endpoint(system, code, float(params["timepointDays"]), float(window)),
            "covariates": covariates, "trim": trim, "caliper": caliper, "weighting": weighting,
            "borrowing": borrowing, "fraction": fraction, "source": source}


def _complete(table: AnalysisTable, covariates: list[str]) -> np.ndarray:
    ok = np.isfinite(table.outcome)
    for name in covariates:
        ok &= np.isfinite(table.covariates[name])
    return ok


def _effect_part(e: evidence.Effect) -> dict:
    return {"method": e.method, "estimate": e.estimate, "standardError": e.se, "ciLow": e.ci_low,
            "ciHigh": e.ci_high, "pValue": e.p_value, "n": e.n,
            "coefficient": [{"term": k, "value": v, "standardError": e.standard_errors[k]}
                            for k, v in e.coefficients.items()]}


def _reference(params: dict, name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    ref = value.get("reference") if isinstance(value, dict) else None
    if not ref:
        raise _param_error(name, f"'{name}' must be a Reference with a literal reference", "invalid-reference")
    return ref


@operation("OperationDefinition-estimate-effect.json", async_allowed=True,
           writes=Writes(("Observation", "DocumentReference", "Provenance"), flag="persist", default=True))
def handle(ctx: OperationContext, params: dict) -> dict:
    """Unadjusted, ANCOVA and PROCOVA effects; external and hybrid controls when asked."""
    s = _settings(params)
    store, endpoint, covariates = ctx.store, s["endpoint"], s["covariates"]
    treat_arm, control_arm = params["treatmentArm"], params["controlArm"]
    study_ref = f"ResearchStudy/{ctx.resource_id}"
    issues: list[dict] = []

    ctx.progress(0.05, "reading the trial")
    trial, notes = load_table(store, study_ref, endpoint, covariates, arms={treat_arm, control_arm},
                              parameter="treatmentArm")
    _unit_notes(notes, issues, study_ref)
    if not np.any(np.isfinite(trial.outcome)):
        raise Unprocessable(f"No participant of {study_ref} has a record of {endpoint.token} within "
                            f"{endpoint.window:g} days of day {endpoint.day:g}", error_id="no-endpoint-data",
                            expression=["Parameters.parameter:endpoint"])
    ok = _complete(trial, covariates)
    excluded = int((~ok).sum())
    if excluded:
        issues.append(outcome("warning", "incomplete",
                              f"{excluded} participant(s) of {study_ref} lack the outcome or a covariate and were left out",
                              error_id="excluded-participants"))
    trial = trial.rows(ok)
    treated = trial.arms == treat_arm
    for arm, n in ((treat_arm, int(treated.sum())), (control_arm, int((~treated).sum()))):
        if n < 2:
            raise Unprocessable(f"Arm {arm!r} of {study_ref} has {n} participant(s) with complete data; at least 2 "
                                "are needed", error_id="arm-too-small",
                                expression=["Parameters.parameter:treatmentArm" if arm == treat_arm
                                            else "Parameters.parameter:controlArm"])
    covs = trial.covariates

    out: dict = {"unit": trial.unit, "excluded": excluded}
    score = None
    model = None
    hist_ref = _reference(params, "historicalControl")
    if hist_ref:
        ctx.progress(0.35, "fitting the prognostic model on the historical controls")
        hist, hnotes = load_table(store, hist_ref, endpoint, covariates,
                                  arms=None if hist_ref.startswith("Group/") else {params.get("historicalArm", control_arm)},
                                  parameter="historicalControl")
        _unit_notes(hnotes, issues, hist_ref)
        hist = hist.rows(_complete(hist, covariates))
        if trial.unit and hist.unit and trial.unit != hist.unit:
            raise Unprocessable(f"The endpoint is recorded in {trial.unit!r} in the trial and {hist.unit!r} in "
                                f"{hist_ref}", error_id="inconsistent-units")
        try:
            model = evidence.fit_prognostic_model(hist.outcome, hist.covariates)
        except ValueError as exc:
            raise Unprocessable(f"The prognostic model could not be fitted on {hist_ref}: {exc}",
                                error_id="prognostic-model-failed",
                                expression=["Parameters.parameter:historicalControl"]) from None
        score = model.predict(covs)
        outside = model.out_of_range(covs)
        if outside:
            issues.append(outcome("warning", "business-rule",
                                  "Trial participants lie outside the prognostic model's training range: "
                                  + ", ".join(f"{k} ({v})" for k, v in outside.items()) + " — their scores extrapolate",
                                  error_id="score-out-of-range"))
        inputs_hist = hist.inputs
        out["prognosticModel"] = {
            "trainedOn": {"reference": hist_ref}, "covariate": list(model.names), "nTrain": model.n_train,
            "nTest": model.n_test, "r2": model.r2_test, "rmse": model.rmse_test,
            "calibrationSlope": model.calibration_slope, "calibrationIntercept": model.calibration_intercept,
            "outOfRange": [f"{k}: {v} participant(s)" for k, v in outside.items()]}
    elif s["source"] == "twin":
        ctx.progress(0.35, "calibrating each participant's twin on their baseline records")
        score, model, inputs_hist, twin_part, missing = _twin_scores(store, ctx.resource_id, trial, endpoint)
        if missing.any():
            issues.append(outcome("warning", "incomplete",
                                  f"{int(missing.sum())} participant(s) of {study_ref} have no {endpoint.token} record "
                                  "up to day 1 for their twin to start from and were left out",
                                  error_id="excluded-participants"))
            out["excluded"] = excluded + int(missing.sum())
            keep = ~missing
            trial, score, treated = trial.rows(keep), score[keep], treated[keep]
            covs = trial.covariates
            for arm, n in ((treat_arm, int(treated.sum())), (control_arm, int((~treated).sum()))):
                if n < 2:
                    raise Unprocessable(f"Arm {arm!r} of {study_ref} has {n} participant(s) with a twin score; at "
                                        "least 2 are needed", error_id="arm-too-small")
        r2, rmse, slope, intercept = evidence.validate_scores(trial.outcome[~treated], score[~treated])
        out["prognosticModel"] = twin_part | {"nTrain": 0, "nTest": int((~treated).sum()), "r2": r2, "rmse": rmse,
                                              "calibrationSlope": slope, "calibrationIntercept": intercept}
    else:
        inputs_hist = []

    try:
        effects = evidence.estimate_effects(trial.outcome, treated, covs, score=score)
    except ValueError as exc:
        raise Unprocessable(f"The effect could not be estimated: {exc}", error_id="estimation-failed") from None
    effect_list = list(effects.values())
    if score is not None:
        control = ~treated
        rho = float(np.corrcoef(score[control], trial.outcome[control])[0, 1])
        pro, un = effects["procova"], effects["unadjusted"]
        out.update(rho=rho, expectedVarianceFactor=1.0 - rho ** 2,
                   varianceReduction=1.0 - (pro.se / un.se) ** 2,
                   equivalentSampleSize=evidence.equivalent_sample_size(pro.n, pro.se, un.se))

    balance = None
    ext_ref = _reference(params, "externalControl")
    inputs_ext: list[str] = []
    if ext_ref:
        ctx.progress(0.6, "weighting the external controls")
        balance, ext_effects, extra = _external(store, ext_ref, params.get("externalArm", control_arm), endpoint,
                                                covariates, trial, treated, s, issues)
        effect_list += ext_effects
        out.update(extra)
        inputs_ext = extra.pop("_inputs")
        out.pop("_inputs", None)
    out["effect"] = [_effect_part(e) for e in effect_list]
    if balance is not None:
        out["balance"] = [{"covariate": b.name, "smdBefore": b.smd_before, "smdAfter": b.smd_after,
                           "varianceRatioBefore": b.variance_ratio_before,
                           "varianceRatioAfter": b.variance_ratio_after} for b in balance]

    if params.get("persist", True):
        ctx.progress(0.85, "storing scores, report and provenance")
        refs = _persist(ctx, params, study_ref, trial, score, model, endpoint, effect_list, balance, out,
                        trial.inputs + inputs_hist + inputs_ext)
        out.update(refs)
    if issues:
        out["issues"] = {"resourceType": "OperationOutcome", "issue": issues}
    out = {k: v for k, v in out.items() if v is not None and not k.startswith("_")}
    return out


def _unit_notes(notes: dict, issues: list, where: str) -> None:
    for token, n in notes.get("droppedForUnit", {}).items():
        issues.append(outcome("warning", "processing",
                              f"{n} record(s) of {token} in {where} have a unit that does not convert to the first "
                              "record's unit and were not used", error_id="unit-not-convertible"))


def _external(store, ext_ref: str, ext_arm: str, endpoint: Endpoint, covariates: list[str], trial: AnalysisTable,
              treated: np.ndarray, s: dict, issues: list) -> tuple:
    ext, notes = load_table(store, ext_ref, endpoint, covariates,
                            arms=None if ext_ref.startswith("Group/") else {ext_arm}, parameter="externalControl")
    _unit_notes(notes, issues, ext_ref)
    missing = [c for c in covariates if not np.any(np.isfinite(ext.covariates[c]))]
    if missing:
        raise Unprocessable(f"The external controls in {ext_ref} have no values for covariate(s) {missing}",
                            error_id="external-covariates-missing",
                            expression=["Parameters.parameter:externalControl"])
    ext = ext.rows(_complete(ext, covariates))
    if ext.outcome.size < 2:
        raise Unprocessable(f"{ext_ref} has fewer than 2 external controls with the outcome and every covariate",
                            error_id="external-too-small", expression=["Parameters.parameter:externalControl"])
    if trial.unit and ext.unit and trial.unit != ext.unit:
        raise Unprocessable(f"The endpoint is recorded in {trial.unit!r} in the trial and {ext.unit!r} in {ext_ref}",
                            error_id="inconsistent-units")
    # Treated participants of the trial against the external controls.
    y = np.concatenate([trial.outcome[treated], ext.outcome])
    t = np.concatenate([np.ones(int(treated.sum()), bool), np.zeros(ext.outcome.size, bool)])
    cov = {c: np.concatenate([trial.covariates[c][treated], ext.covariates[c]]) for c in covariates}
    try:
        ps = evidence.propensity_weights(cov, t, trim=s["trim"])
    except ValueError as exc:
        raise Unprocessable(f"External controls {ext_ref}: {exc}", error_id="no-overlap",
                            expression=["Parameters.parameter:externalControl"]) from None
    if s["weighting"] == "matching":
        w = evidence.match_on_propensity(ps.score, t, caliper_sd=s["caliper"]) * ps.keep
        if w[t].sum() < 2 or w[~t].sum() < 2:
            raise Unprocessable(f"No matches within a caliper of {s['caliper']} SD of the logit propensity score",
                                error_id="no-overlap", expression=["Parameters.parameter:caliper"])
        method = "external-matched"
    else:
        w = ps.weights
        method = "external-weighted"
    balance = evidence.balance_table(cov, t, w)
    effect = evidence.weighted_effect(y, t, w, method=method)
    bad = [b.name for b in balance if abs(b.smd_after) >= 0.1]
    if bad:
        issues.append(outcome("warning", "business-rule",
                              f"Covariates still imbalanced after {s['weighting']} (|SMD| >= 0.1): {', '.join(bad)}",
                              error_id="residual-imbalance"))
    # Hybrid arm: all trial participants plus a share of the external controls, weighted as above.
    hybrid = evidence.borrow_external_controls(trial.outcome, treated, ext.outcome, w[~t],
                                               rule=s["borrowing"], fraction=s["fraction"])
    extra = {"effectiveSampleSize": evidence.effective_sample_size(w[~t]),
             "trimmed": int((~ps.keep).sum()), "borrowedFraction": hybrid.borrowed_fraction,
             "_inputs": ext.inputs}
    return balance, [effect, hybrid.effect], extra


def _twin_scores(store, study_id: str, trial: AnalysisTable, endpoint: Endpoint) -> tuple:
    """Each trial participant's predicted control outcome from the study's twin model (nan: no baseline record).

    The twin is calibrated on the participant's records of the endpoint up to one day after time zero
    (randomization) with the study's prior, and predicts the endpoint at the time point with no
    treatment after time zero (``inference.model_definition.control_prediction``).
    """
    from fhir_ops.mapping import model_definition as fm
    from fhir_ops.operations import twin_common
    from inference import model_definition as md

    sm = twin_common.study_model_of(store, store.read("ResearchStudy", study_id))
    model = sm.definition
    output = next((o for o in model.outputs
                   if any(c.get("system") == endpoint.system and c.get("code") == endpoint.code
                          for c in o["observation"]["codes"])), None)
    if output is None:
        raise Unprocessable(f"The twin model of ResearchStudy/{study_id}, {model.canonical}, has no output coded "
                            f"{endpoint.token}: it cannot predict this endpoint", error_id="endpoint-not-in-model",
                            expression=["Parameters.parameter:endpoint"])
    factor = fm.ucum_factor(output["unit"], trial.unit) if trial.unit else 1.0
    day = 24.0 / fm.HOURS_PER_UNIT[model.time_unit]  # one day in the model's time unit
    zero_of = {pid: (subject.get("period") or {}).get("start")
               for subject, pid in fm.study_participants(store, study_id)}
    scores = np.full(len(trial.patient_ids), np.nan)
    inputs = list(sm.inputs)
    for k, pid in enumerate(trial.patient_ids):
        zero = parse_datetime(zero_of[pid]) if zero_of.get(pid) else None
        if zero is None:
            continue  # no time zero: nothing marks what is baseline
        # only the records up to day 1 are read: the score must not see later data, and a long record is not read
        record, _, read = fm.subject_record(store, pid, model, origin=zero, until=zero + timedelta(days=1))
        baseline = tuple(o for o in record.observations if o[1] == output["name"] and o[0] <= day and np.isfinite(o[2]))
        if not baseline:
            continue
        record = md.SubjectRecord(record.id, record.doses, baseline, record.covariates)
        try:
            scores[k] = factor * md.control_prediction(model, sm.prior, record, output["name"],
                                                        endpoint.day * day)
        except (ValueError, np.linalg.LinAlgError):  # no usable posterior: left out and counted like no record
            continue
        inputs += read
    part = {"trainedOn": {"reference": twin_common.versioned_reference(sm.library)},
            "covariate": [f"{output['name']} (twin {model.canonical}, records up to day 1)"]}
    return scores, None, inputs, part, ~np.isfinite(scores)


def _score_id(study_ref: str, patient_id: str, endpoint: Endpoint, hist_ref: str) -> str:
    key = json.dumps([study_ref, patient_id, endpoint.token, endpoint.day, hist_ref])
    return "ps-" + hashlib.sha256(key.encode()).hexdigest()[:24]



def _persist(ctx: OperationContext, params: dict, study_ref: str, trial: AnalysisTable, score, model,
             endpoint: Endpoint, effects: list, balance, out: dict, inputs: list[str]) -> dict:
    """Scores (one Observation per participant, updated in place on re-runs), the report and their
    Provenance, in one transaction: either all of it is stored or none."""
    store = ctx.store
    device = ensure_model_device(store, *METHOD_DEVICE,
                                 description="TrialTwin evidence methods: PROCOVA (ANCOVA on a prognostic score), "
                                             "propensity weighting/matching, hybrid control borrowing")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    entries, targets = [], []
    if score is not None:
        hist_ref = out["prognosticModel"]["trainedOn"]["reference"]
        for pid, value in zip(trial.patient_ids, score):
            obs = {
                "resourceType": "Observation", "id": _score_id(study_ref, pid, endpoint, hist_ref),
                "meta": {"profile": [PROGNOSTIC_SCORE_PROFILE]},
                "status": "final",
                "category": [{"coding": [{"system": TRIALTWIN_CS, "code": "prognostic-score",
                                          "display": "Prognostic score"}]}],
                "code": {"coding": [{"system": endpoint.system, "code": endpoint.code}],
                         "text": f"Predicted control outcome of {endpoint.token} at day {endpoint.day:g}"},
                "subject": {"reference": f"Patient/{pid}"},
                "focus": [{"reference": study_ref}],
                "effectiveDateTime": now,
                "method": {"coding": [{"system": TRIALTWIN_CS, "code": "prognostic-score",
                                       "display": "Prognostic score"}],
                           "text": (f"Linear prognostic model on {', '.join(model.names)} trained on {hist_ref}"
                                    if model is not None else f"Twin model {hist_ref}: posterior mean without "
                                    "treatment, calibrated on the records up to day 1")},
                "valueQuantity": {"value": round(float(value), 6)},
            }
            if trial.unit:
                obs["valueQuantity"].update(unit=trial.unit, system="http://unitsofmeasure.org", code=trial.unit)
            version = latest_version(store, "Observation", obs["id"])
            entries.append(put_entry(obs, if_match=f'W/"{version}"' if version else None))
            targets.append(f"Observation/{obs['id']}/_history/{version + 1}")
    html = render_effect_report(study_ref, endpoint, params["treatmentArm"], params["controlArm"], trial.unit,
                                effects, balance, out)
    doc = {
        "resourceType": "DocumentReference", "id": str(uuid.uuid4()),
        "meta": {"profile": [EFFECT_REPORT_PROFILE]},
        "status": "current",
        "type": {"coding": [{"system": TRIALTWIN_CS, "code": "effect-report", "display": "Treatment effect report"}]},
        "date": now,
        "description": f"Effect of {params['treatmentArm']} vs {params['controlArm']} on {endpoint.token} at day "
                       f"{endpoint.day:g}",
        "content": [{"attachment": {"contentType": "text/html", "title": "Treatment effect report",
                                    "data": base64.b64encode(html.encode()).decode()}}],
        "context": {"related": [{"reference": study_ref}]},
    }
    entries.append(put_entry(doc))
    targets.append(f"DocumentReference/{doc['id']}/_history/1")
    prov = build_provenance(targets, inputs, device, requesting_agent(ctx.headers), ACTIVITY)
    prov["id"] = str(uuid.uuid4())
    entries.append(put_entry(prov))
    if ctx.cancelled():  # last point at which stopping leaves nothing behind
        raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                        error_id="cancelled")
    store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return {"report": {"reference": f"DocumentReference/{doc['id']}"},
            "provenance": {"reference": f"Provenance/{prov['id']}"}}
