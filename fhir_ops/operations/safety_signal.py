"""``ResearchStudy/{id}/$safety-signal``: Bayesian monitoring of adverse events with a twin-driven forecast.

Reads the study's AdverseEvents and each participant's time on study through
:mod:`fhir_ops.mapping.safety`; per arm and term the exposure-adjusted incidence and the conjugate
Poisson–gamma posterior give ``P(rate_arm > rate_control + margin)`` (:mod:`inference.safety`). The
twins' simulated steady-state exposure (AUC or Cmax from each participant's posterior clearance,
volume, absorption rate and bioavailability, read by pk role from the study's daily-regimen model
definition; any other model is refused with 422 ``model-not-daily-regimen``) drives a Poisson
exposure–response regression per term, which forecasts the events of the next period among the
participants still on study. A run is stored as a MeasureReport whose id is derived from its inputs
and settings, so an unchanged re-run writes
nothing; above the threshold a DetectedIssue (one per arm and term, updated as data arrive) and a
Task for the safety reviewer (created once) are written; a Provenance names every input version.
"""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from fhir_ops.errors import FhirError, InvalidRequest, NotFound, Unprocessable, outcome
from fhir_ops.mapping import safety as fs
from fhir_ops.mapping.participant import parse_datetime
from fhir_ops.mapping.provenance import build_provenance, requesting_agent
from fhir_ops.mapping.twin import arm_dose, dose_factor
from fhir_ops.mapping.model_device import ensure_model_device
from fhir_ops.operations import twin_common
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.store.bundle import latest_version, put_entry
from inference import safety as engine
from terminology.catalog import SNOMED, default_catalog
from terminology.workflow import active_harmonizer

ACTIVITY = "$safety-signal"
METHOD_DEVICE = ("trialtwin-safety", "0.1.0")


def _bad(name: str, message: str, error_id: str) -> InvalidRequest:
    return InvalidRequest(message, error_id=error_id, expression=[f"Parameters.parameter:{name}"])


def _settings(params: dict) -> dict:
    threshold = params.get("threshold", 0.99)
    if not 0.5 <= threshold < 1.0:
        raise _bad("threshold", f"'threshold' must lie in [0.5, 1); got {threshold}", "parameter-out-of-range")
    margin = params.get("margin", 0.0)
    if margin < 0:
        raise _bad("margin", f"'margin' must not be negative; got {margin}", "parameter-out-of-range")
    days = params.get("forecastDays", 90)
    if not 1 <= days <= 365:
        raise _bad("forecastDays", f"'forecastDays' must lie in 1..365; got {days}", "parameter-out-of-range")
    metric = params.get("exposure", "auc")
    if metric not in ("auc", "cmax"):
        raise _bad("exposure", f"'exposure' must be auc or cmax; got {metric!r}", "unknown-code")
    try:
        prior = engine.GammaPrior(params.get("priorShape", engine.DEFAULT_PRIOR.shape),
                                  params.get("priorRate", engine.DEFAULT_PRIOR.rate))
    except ValueError as exc:
        raise _bad("priorShape", f"Prior: {exc}", "parameter-out-of-range") from None
    terms = []
    for t in params.get("term") or []:
        system, sep, code = t.partition("|")
        if not sep or not system or not code:
            raise _bad("term", f"'term' must be a token system|code; got {t!r}", "invalid-token")
        terms.append(t)
    reviewer = params.get("reviewer")
    if reviewer is not None and not (isinstance(reviewer, dict) and reviewer.get("reference")):
        raise _bad("reviewer", "'reviewer' must be a Reference with a literal reference", "invalid-reference")
    return {"threshold": threshold, "margin": margin, "forecastDays": days, "exposure": metric,
            "priorShape": prior.shape, "priorRate": prior.rate, "terms": terms, "reviewer": reviewer,
            "controlArm": params.get("controlArm"), "asOf": params.get("asOf"), "seed": params.get("seed", 0)}


def _control_arm(study: dict, arms: list[str], given: str | None) -> str:
    if given is not None:
        if given not in arms:
            raise _bad("controlArm", f"controlArm {given!r} is not an arm with participants (arms: {', '.join(arms)})",
                       "unknown-arm")
        return given
    for a in study.get("arm", []):
        codes = {c.get("code") for c in (a.get("type") or {}).get("coding", [])}
        if "placebo-comparator" in codes and a.get("name") in arms:
            return a["name"]
    placebo = [a for a in arms if "placebo" in a.lower()]
    if placebo:
        return placebo[0]
    raise _bad("controlArm", f"The study names no placebo-comparator arm; give controlArm (arms: {', '.join(arms)})",
               "missing-parameter")


def _exposure(store, pid: str, sm: twin_common.StudyModel, dose: float, metric: str,
              issues_count: list) -> tuple[float, list[str]]:
    """Steady-state exposure of a participant from their twin under the study's daily-regimen model:
    clearance, volume, absorption rate and bioavailability by structural role (pk CL, V, KA, F) at the
    posterior mode; the prior's typical values for a participant without a twin."""
    if dose <= 0:
        return 0.0, []
    model = sm.regimen
    try:
        pt = twin_common.participant_twin(store, pid, sm)
        phi = np.asarray(pt.posterior.parameters, dtype=float)
        inputs = [pt.stored.ref] if pt.reused and pt.stored else list(pt.inputs)
    except (NotFound, FhirError) as exc:
        if isinstance(exc, FhirError) and exc.status not in (400, 404, 422):
            raise
        phi = np.asarray(sm.prior.theta, dtype=float)
        inputs = []
        issues_count.append(pid)
    p = model.natural(phi[None, :])
    auc, cmax = engine.steady_state_exposure(float(p["cl"][0]), float(p["v"][0]), float(p["ka"][0]),
                                             dose * dose_factor(model), bioavailability=float(p["f"][0]))
    return float(auc if metric == "auc" else cmax), inputs


@operation("OperationDefinition-safety-signal.json", async_allowed=True,
           writes=Writes(("MeasureReport", "DetectedIssue", "Task", "Provenance"), flag="persist", default=True))
def handle(ctx: OperationContext, params: dict) -> dict:
    """Per-arm, per-term incidence, exceedance probabilities, forecast; issues and review tasks above threshold."""
    s = _settings(params)
    store = ctx.store
    study_ref = f"ResearchStudy/{ctx.resource_id}"
    ctx.progress(0.05, "reading adverse events")
    harmonizer = active_harmonizer(store)

    def translate(system: str, code: str) -> dict | None:
        """The SNOMED CT coding a local adverse-event code maps to (equal/equivalent) in the active maps."""
        return next((t for t in harmonizer.targets.get((system, code), []) if t.get("system") == SNOMED), None)

    data = fs.load_safety_data(store, ctx.resource_id, translate)
    issues: list[dict] = []
    if not data.participants:
        raise Unprocessable(f"{study_ref} has no participants (ResearchSubjects)", error_id="no-participants")
    if not data.events:
        raise Unprocessable(f"{study_ref} has no actual AdverseEvent of its participants to monitor",
                            error_id="no-adverse-events")
    # by stated dose (placebo first), arms without one after them by name
    arms = sorted({p.arm for p in data.participants if p.arm},
                  key=lambda a: (arm_dose(a) is None, arm_dose(a) or 0.0, a))
    if len(arms) < 2:
        raise Unprocessable(f"{study_ref} has participants in {len(arms)} arm(s); safety monitoring compares an arm "
                            "with a control arm", error_id="single-arm")
    control = _control_arm(data.study, arms, s["controlArm"])
    cut = parse_datetime(s["asOf"]) if s["asOf"] else data.latest()
    terms = sorted({e[1] for e in data.events})
    catalog = default_catalog()
    requested = []
    for t in s["terms"]:
        system, _, code = t.partition("|")
        mapped = translate(system, code) if system != SNOMED else None
        if mapped:
            issues.append(outcome("information", "informational", f"Term {t} is monitored as "
                                  f"{SNOMED}|{mapped['code']} ({mapped.get('display', '')}) through the terminology "
                                  "maps", error_id="term-translated"))
            t, system, code = f"{SNOMED}|{mapped['code']}", SNOMED, mapped["code"]
        requested.append(t)
        known_system = catalog.code_system(system) is not None
        if t not in terms and (not known_system or catalog.concept(system, code) is None):
            raise _bad("term", f"Unknown adverse-event term {t!r}: not a code of {system} known to this server and "
                       f"not recorded in {study_ref}", "unknown-code")
        if t not in terms:
            concept = catalog.concept(system, code) or {}
            data.codings[t] = {"system": system, "code": code, "display": concept.get("display", code)}
            data.displays[t] = concept.get("display", code)
    if requested:
        terms = list(dict.fromkeys(requested))
    term_index = {t: i for i, t in enumerate(terms)}
    arm_index = {a: i for i, a in enumerate(arms)}
    pid_index = {p.patient_id: i for i, p in enumerate(data.participants)}

    # exposure-adjusted incidence and the Poisson-gamma posterior
    years = np.array([fs.person_years(p, cut) for p in data.participants])
    p_arm = np.array([arm_index.get(p.arm, -1) for p in data.participants])
    kept = [(pid_index[pid], term_index[t]) for pid, t, _, when in data.events
            if t in term_index and when <= cut and data.participants[pid_index[pid]].start is not None
            and when >= data.participants[pid_index[pid]].start and p_arm[pid_index[pid]] >= 0]
    who = np.array([k[0] for k in kept], dtype=np.int64)
    what = np.array([k[1] for k in kept], dtype=np.int64)
    counts = engine.incidence(p_arm[who], what, len(arms), len(terms))
    exposure_py = np.array([years[p_arm == a].sum() for a in range(len(arms))])
    n_arm = np.array([int(np.sum((p_arm == a) & (years > 0))) for a in range(len(arms))])
    prior = engine.GammaPrior(s["priorShape"], s["priorRate"])
    shape, rate = engine.posterior(counts, np.repeat(exposure_py[:, None], len(terms), axis=1), prior)
    c = arm_index[control]
    margin_py = s["margin"] / 100.0
    rows, signals = [], []
    for a, arm in enumerate(arms):
        for j, term in enumerate(terms):
            lo, hi = (float(v) * 100 for v in _interval(shape[a, j], rate[a, j]))
            row = {"arm": arm, "term": term, "display": data.displays[term], "events": int(counts[a, j]),
                   "participants": int(n_arm[a]), "personYears": float(exposure_py[a]),
                   "ratePer100PersonYears": float(100 * counts[a, j] / exposure_py[a]) if exposure_py[a] > 0 else 0.0,
                   "posteriorMeanPer100PersonYears": float(100 * shape[a, j] / rate[a, j]),
                   "ciLow": lo, "ciHigh": hi, "control": a == c}
            if a != c:
                row["probabilityExceeds"] = engine.probability_exceeds(shape[a, j], rate[a, j], shape[c, j],
                                                                       rate[c, j], margin_py)
                row["signal"] = row["probabilityExceeds"] > s["threshold"]
                row["controlRatePer100PersonYears"] = float(100 * counts[c, j] / exposure_py[c]) if exposure_py[c] else 0.0
                if row["signal"]:
                    signals.append(row)
            rows.append(row)

    # exposure-response: twin exposure per participant, Poisson regression per term, next-period forecast
    sm = twin_common.study_model_of(store, data.study)  # the twins of the study's model
    twin_common.daily_regimen(sm, ACTIVITY)
    ctx.progress(0.3, "simulating exposure from the twins")
    exposures = np.zeros(len(data.participants))
    twin_inputs: list[str] = []
    fallback: list[str] = []
    for i, p in enumerate(data.participants):
        dose = arm_dose(p.arm) if p.arm else None
        if dose is None or years[i] <= 0:
            continue
        exposures[i], refs = _exposure(store, p.patient_id, sm, dose, s["exposure"], fallback)
        twin_inputs += refs
        if ctx.cancelled():
            raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                            error_id="cancelled")
    if fallback:
        issues.append(outcome("warning", "incomplete", f"{len(fallback)} participant(s) have no twin (no data to "
                              "calibrate on); the population's typical exposure stands in for theirs",
                              error_id="exposure-from-population"))
    unknown_dose = sorted({p.arm for p in data.participants if p.arm and arm_dose(p.arm) is None})
    if unknown_dose:
        issues.append(outcome("information", "not-supported", f"Arms whose name states no dose count as exposure 0 in "
                              f"the exposure-response model: {', '.join(unknown_dose)}", error_id="arm-dose-unknown"))
    positive = exposures[exposures > 0]
    scale = float(np.median(positive)) if positive.size else 1.0
    x = exposures / scale
    active = np.array([fs.on_study(p, cut) for p in data.participants]) & (p_arm >= 0)
    forecasts = []
    per_person = np.zeros((len(data.participants), len(terms)))
    np.add.at(per_person, (who, what), 1)
    for j, term in enumerate(terms):
        try:
            fit = engine.fit_exposure_response(x, per_person[:, j], years)
        except (ValueError, np.linalg.LinAlgError) as exc:
            issues.append(outcome("information", "informational", f"No exposure-response forecast for "
                                  f"{data.displays[term]}: {exc}", error_id="no-forecast"))
            continue
        fc = engine.forecast_events(fit, x[active], s["forecastDays"], seed=s["seed"])
        forecasts.append({"term": term, "display": data.displays[term], "days": s["forecastDays"],
                          "slope": float(fit.coef[1]), "slopeStandardError": fit.slope_se,
                          "slopePValue": fit.slope_p_value, "exposureUnit": f"{s['exposure']} / {scale:.4g}",
                          "participantsOnStudy": int(active.sum()), "expected": fc["mean"],
                          "low80": fc["low80"], "high80": fc["high80"], "low95": fc["low95"], "high95": fc["high95"]})

    out: dict = {"asOf": cut, "controlArm": control, "threshold": s["threshold"], "margin": s["margin"],
                 "prior": {"shape": prior.shape, "ratePersonYears": prior.rate},
                 "rate": [_rate_part(r) for r in rows], "forecast": forecasts, "signals": len(signals)}
    if params.get("persist", True):
        ctx.progress(0.9, "storing the report, issues and review tasks")
        inputs = data.inputs + sm.inputs + twin_inputs
        out.update(_persist(ctx, study_ref, data, cut, s, rows, forecasts, signals, control, inputs))
    if issues:
        out["issues"] = {"resourceType": "OperationOutcome", "issue": issues}
    return out


def _interval(shape: float, rate: float, level: float = 0.95) -> tuple[float, float]:
    from scipy import stats

    tail = (1 - level) / 2
    return tuple(stats.gamma.ppf([tail, 1 - tail], shape, scale=1.0 / rate))


def _rate_part(r: dict) -> dict:
    keep = ("arm", "term", "display", "events", "participants", "personYears", "ratePer100PersonYears",
            "posteriorMeanPer100PersonYears", "ciLow", "ciHigh", "probabilityExceeds", "signal")
    return {k: r[k] for k in keep if k in r}


def _persist(ctx: OperationContext, study_ref: str, data, cut: datetime, s: dict, rows: list[dict],
             forecasts: list[dict], signals: list[dict], control: str, inputs: list[str]) -> dict:
    store = ctx.store
    settings = {k: v for k, v in s.items() if k != "reviewer"}
    run = fs.digest(study_ref, settings, sorted(set(inputs)), cut)
    report_id = f"safety-{run[:32]}"
    issue_ids = {(r["arm"], r["term"]): "safety-" + fs.digest(study_ref, r["arm"], r["term"], control)[:24]
                 for r in signals}
    result = {"measureReport": {"reference": f"MeasureReport/{report_id}"},
              "detectedIssue": [{"reference": f"DetectedIssue/{i}"} for i in issue_ids.values()],
              "task": [{"reference": f"Task/review-{i}"} for i in issue_ids.values()]}
    try:
        store.read("MeasureReport", report_id)
        result["created"] = 0
        result["provenance"] = {"reference": f"Provenance/{report_id}"}
        return result  # this exact run is stored already: nothing new
    except NotFound:
        pass
    now = datetime.now(timezone.utc)
    starts = [p.start for p in data.participants if p.start]
    report = fs.build_report(report_id, study_ref, cut, min(starts) if starts else None, rows, forecasts,
                             data.codings, now)
    entries = [put_entry(report)]
    targets = [f"MeasureReport/{report_id}/_history/1"]
    for r in signals:
        iid = issue_ids[(r["arm"], r["term"])]
        issue = fs.build_issue(iid, study_ref, r, control, s["margin"], s["threshold"], cut,
                               f"MeasureReport/{report_id}")
        version = latest_version(store, "DetectedIssue", iid)
        entries.append(put_entry(issue, if_match=f'W/"{version}"' if version else None))
        targets.append(f"DetectedIssue/{iid}/_history/{version + 1}")
        task_id = f"review-{iid}"
        if latest_version(store, "Task", task_id) == 0:  # one review task per signal; the reviewer owns it after
            entries.append(put_entry(fs.build_task(task_id, iid, r, s["reviewer"], now)))
            targets.append(f"Task/{task_id}/_history/1")
    device = ensure_model_device(store, *METHOD_DEVICE,
                                 description="TrialTwin safety monitoring: Poisson-gamma exposure-adjusted incidence, "
                                             "posterior exceedance probability, twin-exposure Poisson regression")
    prov = build_provenance(targets, inputs, device, requesting_agent(ctx.headers), ACTIVITY, recorded=now)
    prov["id"] = report_id
    entries.append(put_entry(prov))
    if ctx.cancelled():
        raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                        error_id="cancelled")
    store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    result["created"] = len(entries)
    result["provenance"] = {"reference": f"Provenance/{report_id}"}
    return result

