"""``Patient/{id}/$calibrate``: update a participant's twin from their data; a new twin-state version
(with Provenance) when data arrived since the last calibration, otherwise the stored state unchanged.
"""
from __future__ import annotations

import numpy as np

from fhir_ops.mapping import twin as twin_fhir
from fhir_ops.operations import twin_common as common
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.operations.simulate import _agent_default

ACTIVITY = "$calibrate"


@operation("OperationDefinition-calibrate.json", writes=Writes(("Basic", "Provenance")))
def handle(ctx: OperationContext, params: dict) -> dict:
    sm = common.participant_model(ctx.store, ctx.resource_id)
    if sm.regimen is None:
        return _calibrate_defined(common.defined_twin(ctx.store, ctx.resource_id, sm))
    with common.participant_lock(ctx.resource_id):
        return _calibrate(ctx, params, sm)


def _calibrate_defined(pt: common.DefinedTwin, level: float = 0.9) -> dict:
    """The posterior of a participant under their study's model definition (not stored yet)."""
    from scipy.stats import norm

    post = pt.posterior
    z = float(norm.ppf(0.5 + level / 2))
    scales = {p["name"]: p["scale"] for p in pt.model.document["parameters"]}
    rows = []
    for k, name in enumerate(post.names):
        mean, sd = float(post.mean[k]), float(post.sd[k])
        lo, hi = mean - z * sd, mean + z * sd
        if scales[name] == "log":  # report natural-scale values: the median and interval of a log-normal
            mean, lo, hi = np.exp(mean), np.exp(lo), np.exp(hi)
        rows.append({"name": name, "mean": round(float(mean), 8), "low": round(float(lo), 8),
                     "high": round(float(hi), 8)})
    n_obs = sum(1 for _, _, v in pt.record.observations if np.isfinite(v))
    out = {"changed": True, "observationsUsed": n_obs, "newObservations": n_obs, "parameter": rows,
           "modelVersion": pt.model.canonical}
    if pt.estimate:
        out["populationEstimate"] = {"reference": pt.estimate}
    return out


def _calibrate(ctx: OperationContext, params: dict, sm: common.StudyModel) -> dict:
    store = ctx.store
    pt = common.participant_twin(store, ctx.resource_id, sm, force=bool(params.get("force", False)))
    out = {
        "changed": not pt.reused,
        "observationsUsed": pt.data.n_observations,
        "newObservations": pt.new_observations,
        "parameter": twin_fhir.parameter_parameters(pt.posterior, pt.model),
        "modelVersion": twin_fhir.model_version(pt.model),
    }
    if sm.estimate:
        out["populationEstimate"] = {"reference": sm.estimate}
    if pt.reused:
        out["twinState"] = {"reference": pt.stored.ref}
        return out
    now = common.utcnow()
    entry, state_ref = common.state_entry(pt, now)
    out["provenance"] = {"reference": common.commit(store, [entry], [state_ref], pt.inputs, pt.device,
                                                    ctx.headers, ACTIVITY, _agent_default(), now)}
    out["twinState"] = {"reference": state_ref}
    return out
