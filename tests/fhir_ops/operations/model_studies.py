"""Studies made from a model definition for tests: a mapping file from the definition's FHIR mapping and
a NONMEM data set simulated from the definition's population model (known truth, seeded)."""
from __future__ import annotations

import csv
import io

import numpy as np

from inference import model_definition as md
from inference.population import simulate_observations


def mapping_for(model: md.ModelDefinition, study_id: str, *, with_model: bool = True) -> dict:
    """A NONMEM mapping whose compartments, codes and units are the definition's."""
    study = {"id": study_id, "title": f"{model.name} test study"}
    if with_model:
        study["model"] = model.canonical
    return {
        "study": study, "timeUnit": model.time_unit, "start": "2025-03-03T08:00:00Z",
        "doses": [{"cmt": d.get("nonmemCmt", 1), "medication": dict(d["medication"]), "unit": d["unit"],
                   "route": d["route"]} for d in model.dosing],
        "observations": [{"cmt": o.get("nonmemCmt", k + 2), "code": dict(o["observation"]["codes"][0]),
                          "unit": o["unit"]} for k, o in enumerate(model.outputs)],
        "covariates": [{"column": c.get("nonmemColumn", c["name"]), "code": dict(c["observation"]["codes"][0]),
                        "unit": c["observation"]["unit"]} for c in model.covariates if "observation" in c],
    }


def simulated_nonmem(model: md.ModelDefinition, n_subjects: int, doses, times: dict, *, seed: int,
                     population=None, covariates=None) -> tuple[str, np.ndarray]:
    """CSV text of ``n_subjects`` simulated from the population model (or ``population``).

    ``doses``: list of (time, amount, duration); ``times``: output name -> observation times.
    Returns the text and the true random effects.
    """
    population = model.population_model() if population is None else population
    cov = covariates or {}
    records = [md.SubjectRecord(str(i + 1), tuple(md.Dose(t, a, d, model.dosing[0]["route"]) for t, a, d in doses),
                                tuple((t, name, np.nan) for name, ts in times.items() for t in ts), cov)
               for i in range(n_subjects)]
    data = md.event_data(model, records)
    sim, eta = simulate_observations(population, model.structural, data, seed=seed)
    cmt_dose = model.dosing[0].get("nonmemCmt", 1)
    cmt_out = [o.get("nonmemCmt", k + 2) for k, o in enumerate(model.outputs)]
    cov_cols = [(c.get("nonmemColumn", c["name"]), c) for c in model.covariates if "observation" in c]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE"] + [c for c, _ in cov_cols])
    order = np.lexsort((data.design["evid"] == 0, data.time, data.subject))
    for r in order:
        sid = data.subject_ids[data.subject[r]]
        extra = [repr(float(cov.get(c["name"], c.get("default")))) for _, c in cov_cols]
        if data.design["evid"][r] == 1:
            amt, dur = data.design["amt"][r], data.design["duration"][r]
            w.writerow([sid, repr(float(data.time[r])), ".", repr(float(amt)), 1, 1, cmt_dose,
                        repr(float(amt / dur)) if dur > 0 else 0] + extra)
        else:
            w.writerow([sid, repr(float(data.time[r])), repr(float(sim.value[r])), 0, 0, 0,
                        cmt_out[int(data.design["output"][r])], 0] + extra)
    return out.getvalue(), eta


def example_design(name: str):
    """Doses and observation times of a small study for each shipped example."""
    if name == "theophylline":
        return [(0.0, 320.0, 0.0)], {"concentration": [0.5, 1, 2, 4, 7, 12, 24]}, {"WT": 70.0}
    if name == "tt201":
        doses = [(24.0 * d, 100.0, 0.0) for d in range(28)]
        return doses, {"concentration": [2.0, 26.0, 650.0], "fpg": [0.0, 336.0, 670.0],
                       "hba1c": [0.0, 336.0, 670.0]}, {"WT": 80.0, "EGFR": 85.0}
    doses = [(float(w), 500.0, 1.0 / 168.0) for w in range(0, 12, 3)]
    return doses, {"concentration": [0.005, 3.005], "sld": [0.0, 6.0, 12.0, 18.0]}, {}
