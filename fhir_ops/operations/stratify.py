"""``ResearchStudy/{id}/$stratify`` and ``Group/{id}/$stratify``: responder strata from the participants' twins.

Each participant's twin (the stored twin state when it was calibrated on the data there are now,
otherwise a fresh calibration) under the study's daily-regimen model definition gives the features:
posterior means of the definition's calibrated parameters, by its names (log scale for log-normal
ones; default the parameters in the pd roles EMAX and EC50) and, on request, the simulated
steady-state response under a stated dose (CL, F, EMAX, EC50 read by structural role). Participants
whose data leave the posterior of those parameters at the prior (placebo: no drug to learn Emax or
EC50 from) are left out and named. A study whose model is not a daily-regimen definition is refused
(422 ``model-not-daily-regimen``).
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
from fhir_ops.mapping.twin import arm_dose, dose_factor
from fhir_ops.operations import twin_common
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.store.bundle import latest_version, put_entry
from inference import stratify as engine
from inference.regimen import DailyRegimen

ACTIVITY = "$stratify"
COVARIATES = ("age", "female", "weight", "egfr")
RESPONSE = "response"
#: a participant's data must narrow the posterior SD of at least one parameter behind the features below
#: this share of the prior SD, else the twin's features are the prior's (a placebo participant tells nothing
#: about Emax or EC50) and a mixture would take that spike of identical rows for a stratum
INFORMED_SD_RATIO = 0.99


def _settings(params: dict) -> dict:
    features = list(dict.fromkeys(params.get("feature") or ()))
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


class _Twin:
    """What stratification reads of the study's daily-regimen model: the calibrated parameters (names and
    scales, in the order of a posterior's mean), the Emax and EC50 parameters, and Emax's unit."""

    def __init__(self, model: DailyRegimen):
        self.model = model
        self.scale = {name: scale for name, scale, _ in model.parameters}
        self.index = {name: i for i, (name, _, _) in enumerate(model.parameters)}
        units = {p["name"]: p.get("unit", "1") for p in model.definition.document["parameters"]}
        emax = twin_common.role_parameter(model, "pd", "EMAX")
        self.defaults = tuple(n for n in (emax, twin_common.role_parameter(model, "pd", "EC50")) if n in self.index)
        self.response_unit = units.get(emax, "1")  # the response is in Emax's unit
        self.dose_factor = dose_factor(model)
        # the calibrated parameters the simulated response depends on (F is fixed or follows CL's data)
        self.response_parameters = tuple(n for n in (twin_common.role_parameter(model, "pk", "CL"), *self.defaults)
                                         if n in self.index)

    def features(self, requested: list[str]) -> list[str]:
        features = requested or list(self.defaults)
        for f in features:
            if f != RESPONSE and f not in self.scale:
                raise fs.bad_parameter("feature", f"Unknown feature {f!r}: use a twin parameter of "
                                       f"{self.model.canonical} ({', '.join(self.scale)}) or {RESPONSE!r}",
                                       "unknown-code")
        if not features:
            raise fs.bad_parameter("feature", f"{self.model.canonical} calibrates neither its Emax nor its EC50 "
                                   f"parameter per participant; name the features (twin parameters: "
                                   f"{', '.join(self.scale) or 'none'}, or {RESPONSE!r})", "missing-parameter")
        return features

    def values(self, posterior) -> dict[str, float]:
        """Clearance (per hour), bioavailability, Emax and EC50 at the posterior mode, by structural role."""
        p = self.model.natural(np.asarray(posterior.parameters, dtype=float)[None, :])
        return {k: float(p[k][0]) for k in ("cl", "f", "emax", "ec50")}

    def response(self, values: dict, dose_mg):
        """Steady-state Emax response under ``dose_mg`` once daily (vectorized over ``values``' arrays)."""
        return engine.steady_state_response(values["emax"], values["ec50"], values["cl"],
                                            np.asarray(dose_mg, dtype=float) * self.dose_factor,
                                            bioavailability=values["f"])

    def feature(self, posterior, name: str) -> float:
        return float(np.asarray(posterior.mean, dtype=float)[self.index[name]])

    def informed(self, posterior, features: list[str]) -> bool:
        """Whether the participant's data narrowed the posterior SD of a parameter behind ``features``
        (the response's: CL, EMAX, EC50) to below ``INFORMED_SD_RATIO`` of the prior SD."""
        names = {n for f in features for n in (self.response_parameters if f == RESPONSE else (f,))}
        post = np.diag(np.asarray(posterior.cov, dtype=float))
        prior = np.diag(np.asarray(posterior.prior_cov, dtype=float))
        return any(post[self.index[n]] < INFORMED_SD_RATIO ** 2 * prior[self.index[n]] for n in names)


def _study_model(store, ctx: OperationContext, container: dict, members) -> twin_common.StudyModel:
    """The twin model of the participants: the study's, or for a Group the one model of its members' studies."""
    if ctx.resource_type == "ResearchStudy":
        return twin_common.study_model_of(store, container)
    studies: dict[str, dict] = {}
    for m in members:
        study = twin_common.study_of_patient(store, m.patient_id)
        if study is not None:
            studies.setdefault(study["id"], study)
    if not studies:
        raise Unprocessable(f"Group/{ctx.resource_id}: none of its participants is enrolled in a ResearchStudy, so "
                            "no twin model applies", error_id="participants-without-study")
    models = [twin_common.study_model_of(store, st) for st in studies.values()]
    canonicals = sorted({sm.definition.canonical for sm in models})
    if len(canonicals) > 1:
        raise Unprocessable(f"Group/{ctx.resource_id}: its participants' studies use different twin models "
                            f"({', '.join(canonicals)}); stratify a Group of one model's participants",
                            error_id="models-differ")
    return models[0]


@operation("OperationDefinition-stratify.json", async_allowed=True,
           writes=Writes(("Group", "Provenance"), flag="persist", default=True))
def handle(ctx: OperationContext, params: dict) -> dict:
    """Stratify a study's (or a Group's) participants by their twins."""
    s = _settings(params)
    store = ctx.store
    source = f"{ctx.resource_type}/{ctx.resource_id}"
    members, container = fs.cohort_members(store, ctx.resource_type, ctx.resource_id)
    sm = _study_model(store, ctx, container, members)
    tw = _Twin(twin_common.daily_regimen(sm, ACTIVITY))
    s["features"] = tw.features(s["features"])
    inputs = [twin_common.versioned_reference(container)]
    issues: list[dict] = []
    ids, rows, covs, natural = [], [], [], []
    skipped, uninformed = [], []
    models: dict[str, twin_common.StudyModel | None] = {}
    with engine.single_threaded_blas():  # each calibration's small matrices, as the engine's mixture fits
        twins = _twins(ctx, store, members, sm, models)
    for m, pt in zip(members, twins):
        if pt is None:
            skipped.append(m.patient_id)
            continue
        twin_inputs = [pt.stored.ref] if pt.reused and pt.stored else list(pt.inputs)
        if not tw.informed(pt.posterior, s["features"]):
            uninformed.append(m.patient_id)
            inputs += list(m.inputs) + twin_inputs  # read, and deciding: new data may bring them in
            continue
        values = tw.values(pt.posterior)
        row = []
        for f in s["features"]:
            if f == RESPONSE:
                r = tw.response(values, s["scenarioDose"])
                row.append(float(np.log(max(float(r), 1e-9))))
            else:
                row.append(tw.feature(pt.posterior, f))
        cov = pt.record.covariates
        ids.append(m.patient_id)
        rows.append(row)
        covs.append([float(cov.get(c, np.nan)) for c in s["covariates"]])
        natural.append(values)
        inputs += list(m.inputs) + twin_inputs
    if skipped:
        issues.append(outcome("warning", "incomplete", f"{len(skipped)} participant(s) have no data a twin can be "
                              f"calibrated on and were left out: {', '.join(skipped[:10])}"
                              + (" ..." if len(skipped) > 10 else ""), error_id="participants-without-twin"))
    if uninformed:
        issues.append(outcome("information", "informational", f"{len(uninformed)} participant(s) whose data do not "
                              f"inform {', '.join(s['features'])} (posterior SD within "
                              f"{100 * (1 - INFORMED_SD_RATIO):.0f} % of the prior's, e.g. no drug exposure) were left "
                              f"out: {', '.join(uninformed[:10])}" + (" ..." if len(uninformed) > 10 else ""),
                              error_id="participants-uninformative"))
    n = len(ids)
    if n < 10:
        raise Unprocessable(f"{source} has {n} participant(s) whose twin is informed by their data on "
                            f"{', '.join(s['features'])}; stratification needs at least 10",
                            error_id="too-few-participants")
    x = np.asarray(rows)
    c = np.asarray(covs)
    usable = [j for j in range(c.shape[1]) if np.all(np.isfinite(c[:, j]))]
    missing = [s["covariates"][j] for j in range(c.shape[1]) if j not in usable]
    if missing:
        issues.append(outcome("information", "incomplete", f"Covariates not recorded for every participant, not used "
                              f"in the rules: {', '.join(missing)}", error_id="covariates-incomplete"))
    ctx.progress(0.75, "choosing the number of strata")
    names = [f"log {f}" if (f == RESPONSE or tw.scale[f] == "log") else f for f in s["features"]]
    result = engine.stratify(x, names, c[:, usable], [s["covariates"][j] for j in usable],
                             max_strata=s["maxStrata"], bootstrap=s["bootstrap"], seed=s["seed"])
    if result.unstable_k is not None:
        issues.append(outcome("information", "informational", f"BIC preferred {result.unstable_k} strata, but a "
                              f"bootstrap resample reproduces them poorly (mean adjusted Rand index "
                              f"{result.unstable_stability:.2f} < {engine.MIN_STABILITY}): reported as one stratum",
                              error_id="strata-unstable"))

    # every arm of the cohort, also one whose participants were all left out (placebo: response 0)
    arm_doses = {a: arm_dose(a) for a in sorted({m.arm for m in members if m.arm})}
    unknown = [a for a, d in arm_doses.items() if d is None]
    if unknown:
        issues.append(outcome("information", "not-supported", f"Arms whose dose the name does not state get no "
                              f"simulated response: {', '.join(unknown)}", error_id="arm-dose-unknown"))
    values = {k: np.array([v[k] for v in natural]) for k in ("cl", "f", "emax", "ec50")}
    strata_out = []
    groups = []
    key = fs.stratification_key(source, s)
    for j in range(result.k):
        mask = result.labels == j
        responses = []
        for arm, dose in arm_doses.items():
            if dose is None:
                continue
            r = tw.response({k: v[mask] for k, v in values.items()}, dose)
            lo, med, hi = np.quantile(r, [0.1, 0.5, 0.9])
            responses.append({"arm": arm, "doseMg": float(dose), "median": float(med), "low": float(lo),
                              "high": float(hi), "unit": tw.response_unit})
        rule = result.rules[j]
        member_ids = [pid for pid, keep in zip(ids, mask) if keep]
        means = {name: float(result.means[j, q]) for q, name in enumerate(names)}
        groups.append(fs.build_stratum(key=key, index=j, k=result.k, source=source, member_ids=member_ids,
                                       rule=rule.text, precision=rule.precision, recall=rule.recall,
                                       stability=result.stability if np.isfinite(result.stability) else 1.0,
                                       means=means, responses=responses, response_unit=tw.response_unit))
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
        refs = _persist(ctx, key, inputs, groups, tw.model)
        for row, ref in zip(out["stratum"], refs["groups"]):
            row["group"] = {"reference": ref}
        out["provenance"] = {"reference": refs["provenance"]}
        out["created"] = refs["written"]
    if issues:
        out["issues"] = {"resourceType": "OperationOutcome", "issue": issues}
    return {k_: v for k_, v in out.items() if v is not None}


def _twins(ctx: OperationContext, store, members, sm: twin_common.StudyModel, models: dict) -> list:
    """Each member's twin (None for one whose data no twin can be calibrated on), one at a time: on the
    embedded store a search per participant reads a cohort faster than OR-searches over many (measured in
    docs/stratification.md)."""
    out = []
    for i, m in enumerate(members):
        if ctx.cancelled():
            raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                            error_id="cancelled")
        ctx.progress(0.7 * i / len(members), f"twin of participant {i + 1} of {len(members)}")
        try:
            if ctx.resource_type == "ResearchStudy":
                msm = sm
            else:  # a Group's member is twinned under their own study's model (the same model, checked above)
                study = twin_common.study_of_patient(store, m.patient_id)
                if study is None:
                    raise NotFound(f"Patient/{m.patient_id} is in no study")
                if study["id"] not in models:
                    models[study["id"]] = twin_common.study_model_of(store, study)
                msm = models[study["id"]]
            pt = twin_common.participant_twin(store, m.patient_id, msm)
        except NotFound:
            out.append(None)
            continue
        except FhirError as exc:
            if exc.status in (400, 422):
                out.append(None)
                continue
            raise
        out.append(pt)
    return out


def _persist(ctx: OperationContext, key: str, inputs: list[str], groups: list[dict], model: DailyRegimen) -> dict:
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
        version = latest_version(store, "Group", g["id"]) if old is None else int(old["meta"]["versionId"])
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
    device = twin_common.model_device(store, model)
    prov = build_provenance(targets, inputs, device, requesting_agent(ctx.headers), ACTIVITY)
    prov["id"] = prov_id
    if ctx.cancelled():
        raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                        error_id="cancelled")
    store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries + [put_entry(prov)]})
    return {"groups": refs, "provenance": f"Provenance/{prov_id}", "written": len(entries) + 1}

