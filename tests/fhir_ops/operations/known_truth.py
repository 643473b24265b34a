"""Known-truth models of acceptance 2: a 2-compartment IV bolus model and a 1-compartment zero-order
infusion model, as definitions, with the designs their data sets are simulated on."""
from __future__ import annotations


def _definition(name, parameters, pk, error, route="iv"):
    return {
        "formatVersion": "1", "url": f"https://example.org/fhir/Library/{name}", "version": "1.0.0", "name": name,
        "timeUnit": "h", "parameters": parameters, "pk": pk,
        "outputs": [{"name": "concentration", "source": "pk", "unit": "mg/L", "error": error, "nonmemCmt": 1,
                     "observation": {"codes": [{"system": "https://example.org/assay", "code": f"{name}-PK"}],
                                     "unit": "mg/L"}}],
        "dosing": [{"medication": {"system": "https://example.org/drug", "code": name}, "route": route, "unit": "mg",
                    "nonmemCmt": 1}],
    }


TWO_CMT_IV = _definition(
    "two-cmt-iv",
    [{"name": "CL", "typical": 5.0, "scale": "log", "iiv": 0.3}, {"name": "V", "typical": 30.0, "scale": "log", "iiv": 0.2},
     {"name": "Q", "typical": 10.0, "scale": "log"}, {"name": "V2", "typical": 60.0, "scale": "log"}],
    {"compartments": 2, "absorption": "none", "elimination": "linear",
     "parameters": {"CL": "CL", "V": "V", "Q": "Q", "V2": "V2"}, "amountUnit": "mg", "volumeUnit": "L"},
    {"kind": "proportional", "proportional": 0.1})
TWO_CMT_IV_DESIGN = ([(0.0, 100.0, 0.0)], {"concentration": [0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0, 36.0]})

INFUSION = _definition(
    "one-cmt-infusion",
    [{"name": "CL", "typical": 3.0, "scale": "log", "iiv": 0.3}, {"name": "V", "typical": 40.0, "scale": "log", "iiv": 0.25}],
    {"compartments": 1, "absorption": "none", "elimination": "linear",
     "parameters": {"CL": "CL", "V": "V"}, "amountUnit": "mg", "volumeUnit": "L"},
    {"kind": "combined", "additive": 0.05, "proportional": 0.1})
INFUSION_DESIGN = ([(0.0, 200.0, 2.0), (24.0, 200.0, 2.0)],
                   {"concentration": [1.0, 2.0, 3.0, 6.0, 12.0, 23.5, 26.0, 30.0, 36.0, 48.0]})

# the start of every fit: off the truth, as an analyst's first guess would be
START = {"two-cmt-iv": {"CL": 4.0, "V": 25.0, "Q": 8.0, "V2": 80.0}, "one-cmt-infusion": {"CL": 2.0, "V": 55.0}}

MODELS = {"two-cmt-iv": (TWO_CMT_IV, TWO_CMT_IV_DESIGN), "one-cmt-infusion": (INFUSION, INFUSION_DESIGN)}
SUBJECTS = 16


def start_definition(name: str) -> dict:
    """The definition an analyst would fit: the truth's structure with other starting values."""
    import copy

    raw = copy.deepcopy(MODELS[name][0])
    for p in raw["parameters"]:
        p["typical"] = START[name][p["name"]]
    return raw


def replicate_csv(name: str, seed: int) -> tuple[str, dict]:
    """NONMEM text of one seeded replicate simulated from the truth, and its mapping."""
    from fhir_ops.mapping import model_definition as fm
    from inference import model_definition as md
    from tests.fhir_ops.operations.model_studies import mapping_for, simulated_nonmem

    raw, (doses, times) = MODELS[name]
    truth = md.load_definition(raw, fm.ucum_factor)
    text, _ = simulated_nonmem(truth, SUBJECTS, doses, times, seed=seed)
    return text, mapping_for(truth, f"kt-{name}-{seed}")


def fit_replicate(name: str, seed: int) -> dict:
    """In-process fit of one replicate: {parameter: (estimate, se, (low, high))} on the log scale, the
    interval being the 95 % confidence interval the fit reports (``PopulationFit.confidence_interval``)."""
    from fhir_ops.mapping import model_definition as fm
    from fhir_ops.mapping import nonmem
    from inference import model_definition as md
    from inference.estimation import fit_population

    text, mapping = replicate_csv(name, seed)
    start = md.load_definition(start_definition(name), fm.ucum_factor)
    data = md.event_data(start, nonmem.subject_records(nonmem.parse(text, mapping), mapping, start))
    fit = fit_population(start.population_model(), start.structural, data)
    return {p: (float(fit.model.theta[k]), fit.standard_errors.get(p, float("nan")),
                tuple(fit.confidence_interval(p)) if p in fit.standard_errors else (float("nan"),) * 2)
            for k, p in enumerate(start.parameter_names)} | {"_converged": fit.converged}
