"""``ResearchStudy/{id}/$promote-model``: make a registered model version the active one by hand (a shadow
candidate after review, or a rollback to an earlier or the committed version), recorded on its Device and
in a Provenance; the automatic path is ``$train-model``'s promotion rule.
"""
from __future__ import annotations

from fhir_ops.errors import InvalidRequest, NotFound, Unprocessable
from fhir_ops.mapping.model_device import ensure_model_device, find_model_device, with_lifecycle_status
from fhir_ops.operations import twin_common as common
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.store.bundle import put_entry
from inference import model_loop

ACTIVITY = "$promote-model"


def _target(params: dict) -> tuple[str, str]:
    spec = (params.get("model") or "").strip()
    name, _, version = spec.partition("@")
    if not name or not version:
        raise InvalidRequest(f"Parameter 'model' must be name@version; got {spec!r}", error_id="invalid-model",
                             expression=["Parameters.parameter:model"])
    if name not in model_loop.FAMILIES:
        raise InvalidRequest(f"{name!r} is not a model family the learning loop manages (known: "
                             f"{', '.join(sorted(model_loop.FAMILIES))})", error_id="unknown-model-family",
                             expression=["Parameters.parameter:model"])
    return name, version


@operation("OperationDefinition-promote-model.json", writes=Writes(("Device", "Provenance")))
def handle(ctx: OperationContext, params: dict) -> dict:
    from flask import current_app

    name, version = _target(params)
    store = ctx.store
    study = store.read("ResearchStudy", ctx.resource_id)
    service = model_loop.loop_service(current_app.config["DATA_DIR"])
    registry = service.registry
    try:
        entry = registry.get(name, version)
    except KeyError:
        known = ", ".join(f"{e.name}@{e.version}" for e in registry.entries() if e.name == name) or "none"
        raise NotFound(f"No registered model {name}@{version} on this server (registered: {known})",
                       error_id="unknown-model", expression=["Parameters.parameter:model"]) from None
    with registry.update_lock:
        return _promote(ctx, params, store, study, service, registry, entry, name, version)


def _promote(ctx, params, store, study, service, registry, entry, name: str, version: str) -> dict:
    trained_on = (entry.metadata.get("training") or {}).get("study")
    own = {e.version for e in registry.own_entries() if e.name == name}
    if version in own and trained_on != f"ResearchStudy/{ctx.resource_id}":
        raise Unprocessable(f"{name}@{version} was trained on {trained_on}, not on ResearchStudy/{ctx.resource_id}",
                            error_id="model-of-another-study", expression=["Parameters.parameter:model"])
    previous = registry.get(name).version
    reason = (params.get("reason") or "").strip() or "no reason given"
    if previous == version:
        return {"model": f"{name}@{version}", "previous": f"{name}@{previous}", "promoted": False,
                "information": {"resourceType": "OperationOutcome", "issue": [{
                    "severity": "information", "code": "informational",
                    "diagnostics": f"{name}@{version} is already the active version; nothing changed"}]}}
    device = ensure_model_device(store, name, version, entry.metadata["sha256"],
                                 description=entry.metadata["output"]["meaning"])
    entries = [put_entry(with_lifecycle_status(device, "active"), f'W/"{device["meta"]["versionId"]}"')]
    targets = [f"Device/{device['id']}/_history/{int(device['meta']['versionId']) + 1}"]
    inputs = [f"ResearchStudy/{study['id']}/_history/{study['meta']['versionId']}",
              f"Device/{device['id']}/_history/{device['meta']['versionId']}"]
    old = find_model_device(store, name, previous)
    if old is not None:
        entries.append(put_entry(with_lifecycle_status(old, "retired"), f'W/"{old["meta"]["versionId"]}"'))
        targets.append(f"Device/{old['id']}/_history/{int(old['meta']['versionId']) + 1}")
        inputs.append(f"Device/{old['id']}/_history/{old['meta']['versionId']}")
    note = [{"role": "quotation", "what": {"display": f"promoted by hand, replacing {name}@{previous}: {reason}"}}]
    provenance = common.commit(store, entries, targets, inputs, device, ctx.headers, ACTIVITY, _agent_default(),
                               common.utcnow(), extra_entities=note)
    registry.record(name, version, "active", {"decision": f"promoted by hand ($promote-model): {reason}"})
    service.reload()
    return {"model": f"{name}@{version}", "previous": f"{name}@{previous}", "promoted": True,
            "device": {"reference": targets[0]}, "provenance": {"reference": provenance}}


def _agent_default():
    try:
        from flask import current_app

        return current_app.config.get("REQUESTING_AGENT")
    except RuntimeError:
        return None
