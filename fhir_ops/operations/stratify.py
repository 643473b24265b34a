"""``ResearchStudy/{id}/$stratify`` and ``Group/{id}/$stratify``: responder strata from the participants' twins.

Each participant's twin (the stored twin state when it was calibrated on the data there are now,
otherwise a fresh calibration) gives the features: posterior means of twin parameters (log scale
for log-normal ones) and, on request, the simulated steady-state response under a stated dose.
:mod:`inference.stratify` chooses the number of strata (k = 1 competes), measures stability by
bootstrap and explains each stratum by a rule on baseline covariates. The strata are stored as
``Group`` resources (profile ``stratum``) with one Provenance; a re-run with the same inputs and
settings writes nothing, and a re-run after new data updates the same Groups.
"""
from __future__ import annotations

import numpy as np

from fhir_ops.errors import FhirError, NotFound, Unprocessable, outcome
from fhir_ops.mapping import strata as fs
from fhir_ops.mapping.provenance import build_provenance, requesting_agent
from fhir_ops.mapping.twin import arm_dose
from fhir_ops.operations import twin_common
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.store.bundle import put_entry
from inference import stratify as engine
from inference import twin
from inference.cohort import TT201Population

ACTIVITY = "$stratify"
PARAMETER_SCALE = {name: scale for name, scale, _ in twin.PARAMETERS}
DEFAULT_FEATURES = ("Emax", "EC50")
COVARIATES = ("age", "female", "weight", "egfr")
RESPONSE = "response"
BIOAVAILABILITY = TT201Population().f  # the built-in twin's oral bioavailability
RESPONSE_UNIT = {name: unit for name, _, unit in twin.PARAMETERS}["Emax"]  # the response is in Emax's unit


def _settings(params: dict) -> dict:
    features = list(dict.fromkeys(params.get("feature") or DEFAULT_FEATURES))
    for f in features:
        if f != RESPONSE and f not in PARAMETER_SCALE:
            raise fs.bad_parameter("feature", f"Unknown feature {f!r}: use a twin parameter "
                                   f"({', '.join(PARAMETER_SCALE)}) or {RESPONSE!r}", "unknown-code")
    dose = params.get("scenarioDose")
    if dose is not None and not 0 < dose <= 1000:
        raise fs.bad_parameter("scenarioDose", f"'scenarioDose' must lie in (0, 1000] mg; got {dose}",
                               "parameter-out-of-range")
    if RESPONSE in features and dose is None:
        raise fs.bad_parameter("scenarioDose", "The feature 'response' needs 'scenarioDose' (mg once daily): the "
                               "scenario the response is simulated under", "missing-parameter")
    max_strata = params.get("maxStrata", 4)
    if not 1 <= max_strata <= 8:
        raise fs.bad_parameter("maxStrata", f"'maxStrata' must lie in 1..8; got {max_strata}", "parameter-out-of-range")
    bootstrap = params.get("bootstrap", 20)
    if not 0 <= bootstrap <= 200:
        raise fs.bad_parameter("bootstrap", f"'bootstrap' must lie in 0..200; got {bootstrap}", "parameter-out-of-range")
    covariates = list(dict.fromkeys(params.get("covariate") or COVARIATES))
    for c in covariates:
        if c not in COVARIATES:
            raise fs.bad_parameter("covariate", f"Unknown covariate {c!r}: use {', '.join(COVARIATES)}", "unknown-code")
    return {"features": features, "scenarioDose": dose, "maxStrata": max_strata, "bootstrap": bootstrap,
            "seed": params.get("seed", 0), "covariates": covariates}


def _natural(mean: np.ndarray, name: str) -> float:
    i = [n for n, _, _ in twin.PARAMETERS].index(name)
    return float(np.exp(mean[i])) if PARAMETER_SCALE[name] == "log" else float(mean[i])


@operation("OperationDefinition-stratify.json", async_allowed=True,
           writes=Writes(("Group", "Provenance"), flag="persist", default=True))
def handle(ctx: OperationContext, params: dict) -> dict:
    """Stratify a study's (or a Group's) participants by their twins."""
    s = _settings(params)
    store = ctx.store
    source = f"{ctx.resource_type}/{ctx.resource_id}"
    members, container = fs.cohort_members(store, ctx.resource_type, ctx.resource_id)
    inputs = [twin_common.versioned_reference(container)]
    issues: list[dict] = []
    ids, arms, rows, covs, natural = [], [], [], [], []
    skipped = []
    for i, m in enumerate(members):
        if ctx.cancelled():
            raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                            error_id="cancelled")
        ctx.progress(0.7 * i / len(members), f"twin of participant {i + 1} of {len(members)}")
        try:
            pt = twin_common.participant_twin(store, m.patient_id)
        except NotFound:
            skipped.append(m.patient_id)
            continue
        except FhirError as exc:
            if exc.status in (400, 422):
                skipped.append(m.patient_id)
                continue
            raise
        mean = np.asarray(pt.posterior.mean, dtype=float)
        values = {n: _natural(mean, n) for n in ("CL", "Emax", "EC50")}
        row = []
        for f in s["features"]:
            if f == RESPONSE:
                r = engine.steady_state_response(values["Emax"], values["EC50"], values["CL"], s["scenarioDose"],
                                                 bioavailability=BIOAVAILABILITY)
                row.append(float(np.log(max(float(r), 1e-9))))
            else:
                row.append(float(mean[[n for n, _, _ in twin.PARAMETERS].index(f)]))
        cov = pt.record.covariates
        ids.append(m.patient_id)
        arms.append(m.arm)
        rows.append(row)
        covs.append([float(cov.get(c, np.nan)) for c in s["covariates"]])
        natural.append(values)
        inputs += list(m.inputs) + (([pt.stored.ref] if pt.reused and pt.stored else pt.inputs))
    if skipped:
        issues.append(outcome("warning", "incomplete", f"{len(skipped)} participant(s) have no data a twin can be "
                              f"calibrated on and were left out: {', '.join(skipped[:10])}"
                              + (" ..." if len(skipped) > 10 else ""), error_id="participants-without-twin"))
    n = len(ids)
    if n < 10:
        raise Unprocessable(f"{source} has {n} participant(s) with a twin; stratification needs at least 10",
                            error_id="too-few-participants")
    x = np.asarray(rows)
    c = np.asarray(covs)
    usable = [j for j in range(c.shape[1]) if np.all(np.isfinite(c[:, j]))]
    missing = [s["covariates"][j] for j in range(c.shape[1]) if j not in usable]
    if missing:
        issues.append(outcome("information", "incomplete", f"Covariates not recorded for every participant, not used "
                              f"in the rules: {', '.join(missing)}", error_id="covariates-incomplete"))
    ctx.progress(0.75, "choosing the number of strata")
    names = [f"log {f}" if (f == RESPONSE or PARAMETER_SCALE[f] == "log") else f for f in s["features"]]
    result = engine.stratify(x, names, c[:, usable], [s["covariates"][j] for j in usable],
                             max_strata=s["maxStrata"], bootstrap=s["bootstrap"], seed=s["seed"])

    arm_doses = {a: arm_dose(a) for a in sorted({a for a in arms if a})}
    unknown = [a for a, d in arm_doses.items() if d is None]
    if unknown:
        issues.append(outcome("information", "not-supported", f"Arms whose dose the name does not state get no "
                              f"simulated response: {', '.join(unknown)}", error_id="arm-dose-unknown"))
    cl = np.array([v["CL"] for v in natural])
    emax = np.array([v["Emax"] for v in natural])
    ec50 = np.array([v["EC50"] for v in natural])
    strata_out = []
    groups = []
    key = fs.stratification_key(source, s)
    for j in range(result.k):
        mask = result.labels == j
        responses = []
        for arm, dose in arm_doses.items():
            if dose is None:
                continue
            r = engine.steady_state_response(emax[mask], ec50[mask], cl[mask], dose, bioavailability=BIOAVAILABILITY)
            lo, med, hi = np.quantile(r, [0.1, 0.5, 0.9])
            responses.append({"arm": arm, "doseMg": float(dose), "median": float(med), "low": float(lo),
                              "high": float(hi), "unit": RESPONSE_UNIT})
        rule = result.rules[j]
        member_ids = [pid for pid, keep in zip(ids, mask) if keep]
        means = {name: float(result.means[j, q]) for q, name in enumerate(names)}
        groups.append(fs.build_stratum(key=key, index=j, k=result.k, source=source, member_ids=member_ids,
                                       rule=rule.text, precision=rule.precision, recall=rule.recall,
                                       stability=result.stability if np.isfinite(result.stability) else 1.0,
                                       means=means, responses=responses, response_unit=RESPONSE_UNIT))
        strata_out.append({"index": j + 1, "size": int(mask.sum()), "rule": rule.text,
                           "rulePrecision": rule.precision, "ruleRecall": rule.recall,
                           "mean": [{"feature": k_, "value": v} for k_, v in means.items()],
                           "response": responses})
    out: dict = {"strata": result.k, "participants": n,
                 "stability": result.stability if np.isfinite(result.stability) else None,
                 "ruleAccuracy": result.rule_accuracy, "ruleCrossValidatedAccuracy": result.rule_cv_accuracy,
                 "bic": [{"strata": k_, "value": v} for k_, v in result.bic.items() if v is not None],
                 "stratum": strata_out}
    if params.get("persist", True):
        ctx.progress(0.9, "storing the strata")
        refs = _persist(ctx, key, inputs, groups)
        for row, ref in zip(out["stratum"], refs["groups"]):
            row["group"] = {"reference": ref}
        out["provenance"] = {"reference": refs["provenance"]}
        out["created"] = refs["written"]
    if issues:
        out["issues"] = {"resourceType": "OperationOutcome", "issue": issues}
    return {k_: v for k_, v in out.items() if v is not None}


def _persist(ctx: OperationContext, key: str, inputs: list[str], groups: list[dict]) -> dict:
    """Write changed strata, retire strata of an earlier run that no longer exist, and one Provenance —
    unless this exact run (same settings, same input versions) is already stored."""
    store = ctx.store
    prov_id = fs.run_id(key, inputs)
    refs = [f"Group/{g['id']}" for g in groups]
    try:
        store.read("Provenance", prov_id)
        return {"groups": refs, "provenance": f"Provenance/{prov_id}", "written": 0}
    except NotFound:
        pass
    existing = {g["id"]: g for g in store.search_all("Group", [("identifier", f"{fs.STRATIFICATION_SID}|{key}")])}
    entries, targets = [], []
    for g in groups:
        old = existing.pop(g["id"], None)
        version = _version(store, "Group", g["id"]) if old is None else int(old["meta"]["versionId"])
        if fs.same_content(old, g):
            targets.append(f"Group/{g['id']}/_history/{version}")
            continue
        entries.append(put_entry(g, if_match=f'W/"{version}"' if old is not None else None))
        targets.append(f"Group/{g['id']}/_history/{version + 1}")
    for gid, old in existing.items():  # strata of an earlier run with more strata
        if old.get("active", True):
            retired = {**old, "active": False}
            entries.append(put_entry(retired, if_match=f'W/"{old["meta"]["versionId"]}"'))
            targets.append(f"Group/{gid}/_history/{int(old['meta']['versionId']) + 1}")
    device = twin_common.model_device(store)
    prov = build_provenance(targets, inputs, device, requesting_agent(ctx.headers), ACTIVITY)
    prov["id"] = prov_id
    if ctx.cancelled():
        raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                        error_id="cancelled")
    store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries + [put_entry(prov)]})
    return {"groups": refs, "provenance": f"Provenance/{prov_id}", "written": len(entries) + 1}


def _version(store, resource_type: str, resource_id: str) -> int:
    """Latest version number (0 if never written; a deleted resource keeps counting)."""
    from fhir_ops.errors import Gone

    try:
        return int(store.read(resource_type, resource_id)["meta"]["versionId"])
    except NotFound:
        return 0
    except Gone:
        latest = store.history(resource_type, resource_id, count=1)
        return int(latest[0]["meta"]["versionId"]) if latest else 0
