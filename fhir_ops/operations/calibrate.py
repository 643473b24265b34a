"""``Patient/{id}/$calibrate``: update a participant's twin from their data; a new twin-state version
(with Provenance) when data arrived since the last calibration, otherwise the stored state unchanged.
"""
from __future__ import annotations

from fhir_ops.mapping import twin as twin_fhir
from fhir_ops.operations import twin_common as common
from fhir_ops.operations.registry import OperationContext, operation
from fhir_ops.operations.simulate import _agent_default

ACTIVITY = "$calibrate"


@operation("OperationDefinition-calibrate.json")
def handle(ctx: OperationContext, params: dict) -> dict:
    with common.participant_lock(ctx.resource_id):
        return _calibrate(ctx, params)


def _calibrate(ctx: OperationContext, params: dict) -> dict:
    store = ctx.store
    pt = common.participant_twin(store, ctx.resource_id, force=bool(params.get("force", False)))
    out = {
        "changed": not pt.reused,
        "observationsUsed": pt.data.n_observations,
        "newObservations": pt.new_observations,
        "parameter": twin_fhir.parameter_parameters(pt.posterior),
        "modelVersion": twin_fhir.model_version(),
    }
    if pt.reused:
        out["twinState"] = {"reference": pt.stored.ref}
        return out
    now = common.utcnow()
    entry, state_ref = common.state_entry(pt, now)
    out["provenance"] = {"reference": common.commit(store, [entry], [state_ref], pt.inputs, pt.device,
                                                    ctx.headers, ACTIVITY, _agent_default(), now)}
    out["twinState"] = {"reference": state_ref}
    return out
