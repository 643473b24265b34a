"""``$fit-population`` on a ResearchStudy or Group: fit the study's twin model definition to its
participants' data (FOCEI) and store the estimate, its diagnostics and plots as a versioned Library
with a Provenance; for a study the estimate becomes the prior of its twins.
"""
from __future__ import annotations

import base64
import json

import numpy as np

from fhir_ops.errors import NotFound, Unprocessable
from fhir_ops.mapping import consent as consent_map
from fhir_ops.mapping import model_definition as fm
from fhir_ops.mapping.model_device import ensure_model_device
from fhir_ops.operations import twin_common as common
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.store.bundle import put_entry
from inference import fit_report
from inference import model_definition as md
from inference.estimation import FitCancelled, fit_population

ACTIVITY = "$fit-population"
#: participants in one fit (FOCEI cost grows with subjects x observations)
MAX_SUBJECTS = 2000


@operation("OperationDefinition-fit-population.json", async_allowed=True,
           writes=Writes(("Library", "Provenance", "ResearchStudy", "Device")))
def handle(ctx: OperationContext, params: dict) -> dict:
    store = ctx.store
    warnings: list[str] = []
    vpc_replicates = int(common.number(params, "vpcReplicates", 200, 0, 1000))
    max_iter = int(common.number(params, "maxIterations", 500, 1, 2000))
    seed = int(common.number(params, "seed", 0, 0, 2 ** 31 - 1))
    if ctx.resource_type == "ResearchStudy":
        study = store.read("ResearchStudy", ctx.resource_id)
        participants = [pid for _, pid in fm.study_participants(store, ctx.resource_id)]
        owner = f"ResearchStudy/{ctx.resource_id}"
    else:
        group = store.read("Group", ctx.resource_id)
        participants, study = _group_participants(store, group, warnings)
        owner = f"Group/{ctx.resource_id}"
    if params.get("model"):
        try:
            library = fm.find_library(store, params["model"])
        except NotFound as exc:
            raise Unprocessable(exc.message, error_id="model-definition-not-found") from None
        model = fm.definition_of_library(library)
    else:
        library, model = fm.study_model(store, study)
    # a population fit is secondary use of the participants' data: a recorded withdrawal takes them out
    withdrawn = consent_map.withdrawals(store, consent_map.SECONDARY_USE)
    left_out = [withdrawn[p] for p in participants if p in withdrawn]
    participants = [p for p in participants if p not in withdrawn]
    warnings += [w.reason() for w in left_out]
    if not participants:
        raise Unprocessable(f"{owner} has no participants to fit"
                            + (f" ({len(left_out)} withdrew consent to secondary use)" if left_out else ""),
                            error_id="no-members")
    if len(participants) > MAX_SUBJECTS:
        raise Unprocessable(f"{owner} has {len(participants)} participants; at most {MAX_SUBJECTS} are fitted in one "
                            "call", error_id="too-many-participants")
    records, inputs = [], [_versioned(library), _versioned(study)]
    for i, pid in enumerate(participants):
        if ctx.cancelled():
            return _cancelled()
        try:
            record, _origin, read = fm.subject_record(store, pid, model)
        except Unprocessable as exc:
            if exc.error_id == "observation-unit":
                # a measurement in a unit the model cannot read is a data error, not a participant without
                # data: fitting without it would silently bias the estimate
                raise Unprocessable(f"{owner} cannot be fitted: {exc.message}; correct or remove that "
                                    "Observation", error_id="observation-unit") from None
            warnings.append(f"Patient/{pid} skipped: {exc.message}")
            continue
        if not any(np.isfinite(v) for _, _, v in record.observations):
            warnings.append(f"Patient/{pid} skipped: no observation of the model's outputs")
            continue
        records.append(record)
        inputs += read
        ctx.progress(0.1 * (i + 1) / len(participants), f"read {i + 1}/{len(participants)} participants")
    if len(records) < 2:
        raise Unprocessable(f"{owner} has {len(records)} participant(s) with data the model "
                            f"{model.canonical} maps; a population fit needs at least 2"
                            + (f" ({'; '.join(warnings[:3])})" if warnings else ""), error_id="too-few-subjects")
    try:
        data = md.event_data(model, records)
    except ValueError as exc:
        raise Unprocessable(f"the data of {owner} do not fit the model {model.canonical}: {exc}",
                            error_id="data-model-mismatch") from None
    start = model.population_model()

    def on_iteration(iteration: int, objective: float) -> bool:
        # the optimizer's iteration count is unknown in advance: progress creeps towards 90 %
        ctx.progress(0.1 + 0.8 * iteration / (iteration + 15), f"FOCEI iteration {iteration}, -2LL {objective:.4f}")
        return not ctx.cancelled()

    try:
        fit = fit_population(start, model.structural, data, max_iter=max_iter,
                             standard_errors=params.get("standardErrors", True), callback=on_iteration)
    except FitCancelled:
        return _cancelled()
    except ValueError as exc:
        raise Unprocessable(f"the fit of {model.canonical} to {owner} failed: {exc}", error_id="fit-failed") from None
    ctx.progress(0.92, "diagnostics and plots")
    diagnostics = fit_report.fit_diagnostics(fit, model.structural, data)
    doc = fit_report.estimate_document(fit, diagnostics,
                                       parameter_scales=[p["scale"] for p in model.document["parameters"]],
                                       output_names=model.output_names)
    doc.update({"model": model.canonical, "fittedTo": owner, "timeUnit": model.time_unit,
                "outputUnits": dict(model.output_units)})
    units = [model.output_units[o] for o in model.output_names]
    attachments = [
        {"contentType": "application/json", "title": "population estimate",
         "data": _b64(json.dumps(doc, sort_keys=True).encode("utf-8"))},
        {"contentType": "image/png", "title": "goodness of fit: observed vs PRED and IPRED, CWRES vs time",
         "data": _b64(fit_report.gof_png(data, diagnostics, model.output_names, units, model.time_unit))},
    ]
    if vpc_replicates:
        vpc = fit_report.visual_predictive_check(fit, model.structural, data, replicates=vpc_replicates, seed=seed)
        attachments.append({"contentType": "image/png", "title": "visual predictive check",
                            "data": _b64(fit_report.vpc_png(vpc, data, model.output_names, units, model.time_unit))})
    if ctx.cancelled():
        return _cancelled()
    now = common.utcnow()
    estimate_id = f"{ctx.resource_type.lower()}-{ctx.resource_id}-population-estimate"[:64]
    try:
        previous = store.read("Library", estimate_id)
    except NotFound:
        previous = None
    version = int((previous or {}).get("meta", {}).get("versionId", 0)) + 1
    library_out = {
        "resourceType": "Library", "id": estimate_id, "meta": {"profile": [fm.ESTIMATE_PROFILE]},
        "url": f"{ctx.base_url.rstrip('/')}/Library/{estimate_id}", "version": str(version),
        "name": f"PopulationEstimate_{ctx.resource_id}".replace("-", "_"),
        "title": f"Population estimate of {model.canonical} fitted to {owner}",
        "status": "active", "date": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "type": {"coding": [{"system": fm.LIBRARY_TYPE, "code": "asset-collection"}]},
        "relatedArtifact": [{"type": "depends-on", "resource": model.canonical, "display": "model definition"}],
        "content": attachments,
    }
    if_match = f'W/"{version - 1}"' if previous else None
    entries = [put_entry(library_out, if_match)]
    targets = [f"Library/{estimate_id}/_history/{version}"]
    estimate_ref = targets[0]
    if ctx.resource_type == "ResearchStudy":
        updated = fm.with_study_estimate(study, estimate_ref)
        study_version = int(study.get("meta", {}).get("versionId", 1))
        updated.pop("meta", None)
        entries.append(put_entry(updated, f'W/"{study_version}"'))
        targets.append(f"ResearchStudy/{ctx.resource_id}/_history/{study_version + 1}")
    device = ensure_model_device(store, model.name, model.version,
                                 description=f"Twin model definition {model.canonical}")
    provenance = common.commit(store, entries, targets, inputs, device, ctx.headers, ACTIVITY,
                               _agent_default(), now,
                               extra_entities=[{"role": "source", "what": {"reference": w.consent_ref,
                                                                           "display": w.reason()}}
                                               for w in left_out])
    ctx.progress(1.0, "stored")
    out = {"estimate": {"reference": estimate_ref}, "provenance": {"reference": provenance},
           "model": model.canonical, "objective": round(float(fit.objective), 6), "converged": bool(fit.converged),
           "parameter": _parameters(doc)}
    if diagnostics.condition_number is not None and np.isfinite(diagnostics.condition_number):
        out["conditionNumber"] = round(float(diagnostics.condition_number), 6)
    warnings += list(diagnostics.warnings)
    if warnings:
        out["information"] = {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "informational", "diagnostics": w} for w in warnings]}
    return out


def _parameters(doc: dict) -> list[dict]:
    rows = []
    for f in doc["fixedEffects"]:
        row = {"name": f["name"], "estimate": round(f["estimate"], 8)}
        if "se" in f and np.isfinite(f["se"]):
            row.update({"se": round(f["se"], 8), "low": round(f["ci95"][0], 8), "high": round(f["ci95"][1], 8)})
        rows.append(row)
    for name, sd in doc["omega"]["sd"].items():
        row = {"name": f"omega_sd({name})", "estimate": round(sd, 8)}
        se = doc["omega"]["sdSE"].get(name)
        if se is not None and np.isfinite(se):
            row["se"] = round(se, 8)
        rows.append(row)
    for s in doc["sigma"]:
        for part in ("additive", "proportional"):
            if part in s:
                row = {"name": f"sigma_{part}({s['output']})", "estimate": round(s[part], 8)}
                if f"{part}SE" in s and np.isfinite(s[f"{part}SE"]):
                    row["se"] = round(s[f"{part}SE"], 8)
                rows.append(row)
    return rows


def _group_participants(store, group: dict, warnings: list[str]) -> tuple[list[str], dict]:
    """Patient ids of a Group's active members and the one ResearchStudy they are enrolled in."""
    patients = []
    for m in group.get("member", []):
        if m.get("inactive"):
            continue
        kind, _, rid = (m.get("entity") or {}).get("reference", "").partition("/")
        if kind == "Patient" and rid:
            patients.append(rid)
        elif kind == "ResearchSubject" and rid:
            subject = store.read("ResearchSubject", rid)
            patients.append((subject.get("individual") or {}).get("reference", "").partition("/")[2])
        else:
            warnings.append(f"member {kind}/{rid} skipped: only Patient and ResearchSubject members are fitted")
    studies = set()
    for pid in patients:
        for s in store.search_all("ResearchSubject", [("individual", f"Patient/{pid}")]):
            ref = (s.get("study") or {}).get("reference", "")
            if ref:
                studies.add(ref.partition("/")[2])
    if len(studies) != 1:
        raise Unprocessable(f"Group/{group.get('id')}: its members are enrolled in {len(studies)} studies "
                            f"({', '.join(sorted(studies)) or 'none'}); a Group is fitted with the model of exactly "
                            "one ResearchStudy", error_id="group-study-ambiguous")
    return [p for p in patients if p], store.read("ResearchStudy", studies.pop())


def _versioned(resource: dict) -> str:
    version = (resource.get("meta") or {}).get("versionId")
    ref = f"{resource['resourceType']}/{resource['id']}"
    return f"{ref}/_history/{version}" if version else ref


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _cancelled() -> dict:
    raise Unprocessable("the fit was cancelled before an estimate was stored; nothing was written",
                        error_id="cancelled")


def _agent_default():
    try:
        from flask import current_app

        return current_app.config.get("REQUESTING_AGENT")
    except RuntimeError:
        return None
