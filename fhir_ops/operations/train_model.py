"""``ResearchStudy/{id}/$train-model``: retrain a learned model on the study's own data (time-based split),
register the version in the server's registry, evaluate it in shadow beside the active version on the
later period, and promote it when the promotion rule holds; the version is recorded as a model Device
with its metrics and data window, and a Provenance pins the training data.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from fhir_ops.errors import Forbidden, InvalidRequest, Unprocessable
from fhir_ops.mapping import training_data
from fhir_ops.mapping.model_device import (LIFECYCLE_PROPERTY, ensure_model_device, find_model_device,
                                           with_lifecycle_status)
from fhir_ops.operations import twin_common as common
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.store.bundle import put_entry
from inference import model_loop

ACTIVITY = "$train-model"
#: Provenance.entity identifier system of the digest of every resource version the rows were built from
TRAINING_DATA_SHA256 = "https://trialtwin.org/fhir/sid/training-data-sha256"
#: a learned model's metrics and lifecycle on its Device (Device.property, by text: no new codes needed)
_METRICS = (("auc", "held-out AUC"), ("brier", "held-out Brier score"),
            ("calibration_slope", "held-out calibration slope"),
            ("calibration_intercept", "held-out calibration intercept"))


def _settings(params: dict) -> dict:
    from flask import current_app

    name = params.get("model") or "dropout"
    if name not in model_loop.FAMILIES:
        raise InvalidRequest(f"Parameter 'model' names no trainable model family: {name!r} (known: "
                             f"{', '.join(sorted(model_loop.FAMILIES))})", error_id="unknown-model-family",
                             expression=["Parameters.parameter:model"])
    holdout = float(common.number(params, "holdoutFraction", 0.3, 0.05, 0.8))
    seed = int(common.number(params, "seed", 0, 0, 2 ** 31 - 1))
    shuffle = bool(params.get("shuffleLabels", False))
    if shuffle and not current_app.config.get("DEVELOPMENT_MODE"):
        raise Forbidden("Parameter 'shuffleLabels' trains a deliberately useless model to check the promotion rule; "
                        "it is refused unless the server runs in development mode (DEVELOPMENT_MODE)",
                        error_id="development-only", expression=["Parameters.parameter:shuffleLabels"])
    return {"family": name, "holdout": holdout, "seed": seed, "shuffle": shuffle,
            "auto_promote": params.get("autoPromote", True), "data_dir": current_app.config["DATA_DIR"]}


def precheck(ctx: OperationContext, params: dict) -> None:
    _settings(params)
    ctx.store.read("ResearchStudy", ctx.resource_id)  # 404 / 410 at kick-off, not as a failed job


@operation("OperationDefinition-train-model.json", async_allowed=True, precheck=precheck,
           writes=Writes(("Device", "Provenance")))
def handle(ctx: OperationContext, params: dict) -> dict:
    settings = _settings(params)
    store = ctx.store
    study = store.read("ResearchStudy", ctx.resource_id)
    fam = model_loop.family(settings["family"])
    data = training_data.gather_training_data(store, ctx.resource_id, fam.name, seed=settings["seed"],
                                              progress=ctx.progress, cancelled=ctx.cancelled)
    rows = data.rows
    if len(rows.y) < 40 or rows.y.min() == rows.y.max():
        raise Unprocessable(f"ResearchStudy/{ctx.resource_id} has {len(rows.y)} labelled rows with {int(rows.y.sum())} "
                            "events from " f"{len(data.participants)} participants; training needs at least 40 rows "
                            "with both outcomes" + (f" ({len(data.left_out)} participants left out: consent to "
                                                    "secondary use withdrawn)" if data.left_out else ""),
                            error_id="too-little-data")
    service = model_loop.loop_service(settings["data_dir"])
    registry = service.registry
    digest = hashlib.sha256("\n".join(sorted(data.inputs)).encode()).hexdigest()
    window = {"start": _instant(data.window[0]), "end": _instant(data.window[1])}
    description = {"study": f"ResearchStudy/{ctx.resource_id}", "data_window": window,
                   "n_participants": len(data.participants), "n_rows": int(len(rows.y)),
                   "left_out": [w.reason() for w in data.left_out], "inputs": len(data.inputs),
                   "inputs_sha256": digest, "seed": settings["seed"],
                   "description": "the study's own participants: one row per held visit, 1-14 days before it "
                                  "(seeded), label = recorded no-show"}
    # from choosing the version number to switching the registry, one change at a time (registry.update_lock)
    with registry.update_lock:
        return _train_and_record(ctx, settings, fam, study, data, service, registry, digest, window, description)


def _train_and_record(ctx, settings, fam, study, data, service, registry, digest, window, description) -> dict:
    store, rows = ctx.store, data.rows
    try:
        cand = model_loop.train_candidate(
            registry, fam, rows, holdout_fraction=settings["holdout"], training=description,
            shuffle_labels_seed=settings["seed"] if settings["shuffle"] else None,
            auto_promote=settings["auto_promote"], progress=lambda f, m: ctx.progress(0.5 + 0.4 * f, m))
    except ValueError as exc:
        raise Unprocessable(f"ResearchStudy/{ctx.resource_id}: {exc}", error_id="too-little-data") from None
    entry = cand.entry
    (registry.directory / f"{entry.name}-{entry.version}.inputs.txt").write_text("\n".join(sorted(data.inputs)) + "\n")
    if ctx.cancelled():  # the version stays in shadow: trained and registered, never served
        raise Unprocessable("the job was cancelled; the trained version stays in shadow and nothing was stored in FHIR",
                            error_id="cancelled")

    now = common.utcnow()
    device = ensure_model_device(store, entry.name, entry.version, entry.metadata["sha256"],
                                 description=f"{fam.meaning} (trained on ResearchStudy/{ctx.resource_id})")
    status = cand.extra["status"]
    device_out = _with_properties(device, status, cand, window)
    entries = [put_entry(device_out, f'W/"{device["meta"]["versionId"]}"')]
    targets = [f"Device/{device['id']}/_history/{int(device['meta']['versionId']) + 1}"]
    # the Device of the version it replaces says so too
    if status == "active" and cand.active_version != entry.version:
        old = find_model_device(store, entry.name, cand.active_version)
        if old is not None:
            entries.append(put_entry(with_lifecycle_status(old, "retired"), f'W/"{old["meta"]["versionId"]}"'))
            targets.append(f"Device/{old['id']}/_history/{int(old['meta']['versionId']) + 1}")
    inputs = [_versioned(study)] + _participant_inputs(data)
    extra = [{"role": "source", "what": {"identifier": {"system": TRAINING_DATA_SHA256, "value": digest},
                                         "display": f"{len(data.inputs)} resource versions the {len(rows.y)} rows were "
                                                    f"built from, {window['start']} to {window['end']} (sha256 of "
                                                    "their sorted versioned references)"}}]
    extra += [{"role": "source", "what": {"reference": w.consent_ref, "display": w.reason()}} for w in data.left_out]
    provenance = common.commit(store, entries, targets, inputs, device, ctx.headers, ACTIVITY, _agent_default(), now,
                               extra_entities=extra)
    # the registry follows FHIR: a version is served only once its Device and Provenance are stored
    registry.record(entry.name, entry.version, status, {"decision": cand.reason})
    service.reload()
    ctx.progress(1.0, f"{entry.name}@{entry.version} {status}")
    info = [{"severity": "information", "code": "informational", "diagnostics": w.reason()} for w in data.left_out]
    info += [{"severity": "warning", "code": "informational", "diagnostics": s} for s in data.skipped]
    out = {"model": f"{entry.name}@{entry.version}", "status": status, "promoted": status == "active",
           "decision": cand.reason, "rule": model_loop.PromotionRule().describe(),
           "activeVersion": f"{entry.name}@{registry.get(entry.name).version}",
           "comparedWith": f"{entry.name}@{cand.active_version}",
           "device": {"reference": targets[0]}, "provenance": {"reference": provenance},
           "dataWindow": window, "trainingRows": cand.training_rows, "heldOutRows": cand.held_out_rows,
           "heldOutEvents": cand.held_out_events, "participants": len(data.participants),
           "leftOut": len(data.left_out),
           "metric": [{"name": key, **({"candidate": round(cand.metrics[key], 6)} if key in cand.metrics else {}),
                       **({"active": round(cand.active_metrics[key], 6)}
                          if cand.active_metrics and key in cand.active_metrics else {})}
                      for key, _ in _METRICS]}
    if info:
        out["information"] = {"resourceType": "OperationOutcome", "issue": info}
    return out


def _participant_inputs(data) -> list[str]:
    # Patient and ResearchSubject versions of each participant trained on; the event resources
    # (doses, visits, AEs) are pinned by the digest entity (tens of thousands of versions)
    return [ref for ref in data.inputs if ref.startswith(("Patient/", "ResearchSubject/"))]


def _property(text: str, **value) -> dict:
    return {"type": {"text": text}, **value}


def _with_properties(device: dict, status: str, cand, window: dict) -> dict:
    out = {k: v for k, v in device.items() if k != "meta"}
    out["meta"] = {"profile": device.get("meta", {}).get("profile", [])}
    props = [_property(LIFECYCLE_PROPERTY, valueCode=[{"text": status}]),
             _property("data window start", valueCode=[{"text": window["start"]}]),
             _property("data window end", valueCode=[{"text": window["end"]}]),
             _property("held-out events", valueQuantity=[{"value": cand.held_out_events, "unit": "1"}])]
    props += [_property(text, valueQuantity=[{"value": round(cand.metrics[key], 6), "unit": "1"}])
              for key, text in _METRICS if key in cand.metrics]
    out["property"] = props
    out["note"] = list(device.get("note", [])) + [{"text": cand.reason}]
    return out


def _versioned(resource: dict) -> str:
    version = (resource.get("meta") or {}).get("versionId")
    ref = f"{resource['resourceType']}/{resource['id']}"
    return f"{ref}/_history/{version}" if version else ref


def _instant(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _agent_default():
    try:
        from flask import current_app

        return current_app.config.get("REQUESTING_AGENT")
    except RuntimeError:
        return None


__all__ = ["handle", "precheck", "ACTIVITY", "TRAINING_DATA_SHA256"]
