"""Twin models as data: a declarative, versioned model definition, its validation and its compilation
into the vectorized structural callable and population model the estimation core uses.

A definition is a JSON document (format version 1, JSON Schema ``inference/definitions/
model-definition.schema.json``; reference: ``docs/models.md``). It is checked in two passes: the JSON
Schema (shape, types, enumerations) and semantic rules the schema cannot state (which parameters a
PK structure needs, references between sections, unit compatibility). Every problem is reported as a
:class:`DefinitionIssue` whose ``path`` points into the document (``$.pk.compartments``).

Data for a compiled model are event rows in one :class:`inference.population.ObservationData`: dose
rows (``design["evid"] == 1``, value ``nan``, ``amt``, ``duration``, ``route`` 0 oral / 1 IV) and
observation rows (``evid == 0``, ``design["output"]`` the output index), as in a NONMEM data set.
Dose rows are part of the data, not of a side context, so the estimation core's stacking of
subjects (finite differences as extra subjects) carries each subject's doses along.

Units are the document's: times in ``timeUnit``, PK amounts in ``pk.amountUnit`` and volumes in
``pk.volumeUnit``. Unit conversion is injected (``unit_factor``): ``inference`` stays free of the
terminology layer, and the mapping layer passes its UCUM converter.
"""
from __future__ import annotations

import copy
import json
import weakref
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from inference.dosing import DoseRecord
from inference.pd import IndirectResponse, sigmoid_emax, simulate_idr
from inference.pk import MichaelisMenten, OneCompartment, ThreeCompartment, TwoCompartment, concentration
from inference.population import CovariateEffect, ObservationData, PopulationModel, ResidualError
from inference.regimen import DAILY_AVERAGE, DailyRegimen, family_issues, with_derived

__all__ = [
    "FORMAT_VERSION", "DefinitionIssue", "DefinitionError", "ModelDefinition", "Dose", "SubjectRecord",
    "schema", "check_definition", "load_definition", "shipped_definition", "shipped_names", "event_data",
    "SubjectForecast", "calibrate_subject", "forecast_subject", "control_prediction", "simulate_arms",
    "MarkerNoise", "marker_noise",
]

FORMAT_VERSION = "1"
UnitFactor = Callable[[str, str], float]

# which structural roles each PK structure accepts: one of the alternatives of required roles,
# plus optional roles; "KE" stands for CL/V so that models parameterized as nlme's SSfol fit as is
_PK_ROLES = {
    (1, "linear"): ([{"CL", "V"}, {"CL", "KE"}, {"KE", "V"}], set()),
    (2, "linear"): ([{"CL", "V", "Q", "V2"}], set()),
    (3, "linear"): ([{"CL", "V", "Q", "V2", "Q3", "V3"}], set()),
    (1, "michaelis-menten"): ([{"VMAX", "KM", "V"}], set()),
}
_ABSORPTION_ROLES = ({"KA"}, {"TLAG", "F"})
_PD_ROLES = {
    "emax": ({"EMAX", "EC50"}, {"E0", "SLOPE"}),
    "sigmoid-emax": ({"EMAX", "EC50", "HILL"}, {"E0"}),
    "effect-compartment": ({"KE0", "EMAX", "EC50"}, {"E0", "HILL"}),
    "indirect-response": ({"KIN", "KOUT", "EMAX", "EC50"}, {"HILL"}),
}
_DISEASE_ROLES = {
    "linear": ({"BASE", "SLOPE"}, {"EFFSCALE", "TONSET"}),
    "exponential": ({"BASE", "SLOPE"}, {"EFFSCALE"}),
    "tumour-growth-inhibition": ({"BASE", "KL", "KD", "LAMBDA"}, set()),
}
#: roles only the daily-regimen engine (``pd.exposure: daily-average``) implements
_DAILY_ONLY_ROLES = {"pd": "SLOPE", "disease": "TONSET"}
#: points of the integration grid of models that need one (effect compartment, IDR, tumour growth)
_GRID_POINTS = 240
#: participants per chunk of a cohort simulation (event rows are built per chunk)
COHORT_BLOCK = 1000
#: length of each time unit in days
DAYS_PER_UNIT = {"h": 1.0 / 24.0, "d": 1.0, "wk": 7.0}


@dataclass(frozen=True)
class DefinitionIssue:
    """One problem of a definition: where (a JSONPath into the document) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DefinitionError(ValueError):
    """A definition that does not validate; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[DefinitionIssue]):
        self.issues = tuple(issues)
        super().__init__("; ".join(str(i) for i in self.issues))


def schema() -> dict:
    """The JSON Schema of the definition format (a fresh copy).

    Examples
    --------
    >>> schema()["properties"]["formatVersion"]
    {'const': '1'}
    """
    text = resources.files("inference").joinpath("definitions/model-definition.schema.json").read_text("utf-8")
    return json.loads(text)


def shipped_names() -> tuple[str, ...]:
    """Names of the example definitions shipped with the engine.

    Examples
    --------
    >>> "theophylline" in shipped_names()
    True
    """
    folder = resources.files("inference").joinpath("definitions")
    return tuple(sorted(p.name[:-5] for p in folder.iterdir()
                        if p.name.endswith(".json") and not p.name.endswith(".schema.json")))


def shipped_definition(name: str) -> dict:
    """The raw JSON of a shipped example definition, by name (see :func:`shipped_names`)."""
    if name not in shipped_names():
        raise ValueError(f"no shipped definition {name!r}; there are {', '.join(shipped_names())}")
    return json.loads(resources.files("inference").joinpath(f"definitions/{name}.json").read_text("utf-8"))


_MASS = {"g": 1.0, "mg": 1e-3, "ug": 1e-6, "ng": 1e-9, "pg": 1e-12}
_VOLUME = {"L": 1.0, "dL": 0.1, "mL": 1e-3}


def mass_concentration_units(a: str, b: str) -> float:
    """A small unit converter for examples and engine-only use: identical codes, or mass per volume
    with SI prefixes (``mg/L`` -> ``ng/mL`` is 1000). The FHIR layer passes its UCUM converter instead.

    Examples
    --------
    >>> mass_concentration_units("mg/L", "ng/mL"), mass_concentration_units("%", "%")
    (1000.0, 1.0)
    """
    if a == b:
        return 1.0
    try:
        (ma, va), (mb, vb) = (u.split("/") for u in (a, b))
        return float(round(_MASS[ma] / _VOLUME[va] / (_MASS[mb] / _VOLUME[vb]), 12))
    except (KeyError, ValueError):
        raise ValueError(f"unit {a!r} does not convert to {b!r} (mass per volume only)") from None


def example_regimen():
    """The shipped example of the daily-regimen family, compiled (for examples and tests of the engine).

    Examples
    --------
    >>> example_regimen().outputs
    ('concentration', 'fpg', 'hba1c')
    """
    for name in shipped_names():
        raw = shipped_definition(name)
        if raw.get("pd", {}).get("exposure") == DAILY_AVERAGE:
            return load_definition(raw, mass_concentration_units).regimen
    raise LookupError("no shipped daily-regimen definition")


def same_unit(a: str, b: str) -> float:
    """The default unit check when no converter is given: identical codes only."""
    if a != b:
        raise ValueError(f"unit {a!r} differs from {b!r} and no unit converter was given")
    return 1.0


def _json_path(parts) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def check_definition(raw: Any, unit_factor: UnitFactor | None = None) -> list[DefinitionIssue]:
    """Every problem of a definition document: JSON Schema first, then the semantic rules.

    Parameters
    ----------
    raw : dict
        The parsed JSON document.
    unit_factor : callable, optional
        ``unit_factor(from_unit, to_unit) -> float`` (raises ``ValueError`` for incommensurable
        units); without it, units that must agree must be spelled identically.

    Returns
    -------
    list of DefinitionIssue
        Empty when the definition is valid.

    Examples
    --------
    >>> d = shipped_definition("theophylline")
    >>> check_definition(d)
    []
    >>> d["pk"]["compartments"] = 7
    >>> [str(i) for i in check_definition(d)]
    ['$.pk.compartments: 7-compartment models are not supported (use 1, 2 or 3 with linear elimination, 1 with michaelis-menten)']
    """
    import jsonschema

    units = unit_factor or same_unit
    validator = jsonschema.Draft202012Validator(schema())
    issues = [DefinitionIssue(_json_path(e.absolute_path), e.message)
              for e in sorted(validator.iter_errors(raw), key=lambda e: list(map(str, e.absolute_path)))]
    if issues:
        return issues
    add = lambda path, message: issues.append(DefinitionIssue(path, message))  # noqa: E731
    declared = [p["name"] for p in raw["parameters"]]
    for i, name in enumerate(declared):
        if declared.index(name) != i:
            add(f"$.parameters[{i}].name", f"parameter {name!r} is declared twice")
        p = raw["parameters"][i]
        if p["scale"] == "log" and not p["typical"] > 0:
            add(f"$.parameters[{i}].typical", f"a log-scale parameter needs a positive typical value, got {p['typical']}")
        low, high = p.get("bounds", (None, None))
        if low is not None and high is not None and not low < high:
            add(f"$.parameters[{i}].bounds", f"bounds need low < high, got [{low}, {high}]")
    in_terms: set[str] = set()
    for i, d in enumerate(raw.get("derived", [])):
        if d["name"] in declared or d["name"] in [e["name"] for e in raw["derived"][:i]]:
            add(f"$.derived[{i}].name", f"{d['name']!r} is already a parameter")
        for j, t in enumerate(d["terms"]):
            if t["parameter"] not in declared:
                add(f"$.derived[{i}].terms[{j}].parameter", f"unknown parameter {t['parameter']!r} (a derived "
                    f"parameter combines declared parameters: {', '.join(declared)})")
            in_terms.add(t["parameter"])
        if "min" in d and "max" in d and not d["min"] < d["max"]:
            add(f"$.derived[{i}]", f"needs min < max, got {d['min']} and {d['max']}")
    names = declared + [d["name"] for d in raw.get("derived", [])]
    if not any("iiv" in p for p in raw["parameters"]):
        add("$.parameters", "at least one parameter needs inter-individual variability ('iiv') for a population model")
    used: set[str] = set()

    def roles(section: str, given: Mapping[str, str], alternatives, optional: set[str]) -> None:
        for role, parameter in given.items():
            if parameter not in names:
                add(f"$.{section}.parameters.{role}", f"unknown parameter {parameter!r} (declared: {', '.join(names)})")
            used.add(parameter)
        keys = set(given)
        if not any(req <= keys and keys <= req | optional for req in alternatives):
            want = " or ".join("{" + ", ".join(sorted(r)) + "}" for r in alternatives)
            extra = f" (optional: {', '.join(sorted(optional))})" if optional else ""
            add(f"$.{section}.parameters", f"needs exactly the roles {want}{extra}; got {', '.join(sorted(keys)) or 'none'}")

    pk = raw.get("pk")
    routes = {d["route"] for d in raw["dosing"]}
    if pk is not None:
        key = (pk["compartments"], pk["elimination"])
        if key not in _PK_ROLES:
            add("$.pk.compartments", f"{pk['compartments']}-compartment models are not supported "
                "(use 1, 2 or 3 with linear elimination, 1 with michaelis-menten)")
        else:
            required, optional = _PK_ROLES[key]
            absorption = pk.get("absorption", "none")
            if absorption == "first-order":
                required = [r | _ABSORPTION_ROLES[0] for r in required]
                optional = optional | _ABSORPTION_ROLES[1]
            roles("pk", pk["parameters"], required, optional)
            if "oral" in routes and absorption != "first-order":
                add("$.pk.absorption", "oral doses need first-order absorption")
            if pk["elimination"] == "michaelis-menten" and len(routes) > 1:
                add("$.dosing", "a Michaelis-Menten model takes doses by one route only")
        if not raw["dosing"]:
            add("$.dosing", "a PK model needs at least one dosing entry")
        for i, d in enumerate(raw["dosing"]):
            try:
                units(d["unit"], pk["amountUnit"])
            except ValueError as exc:
                add(f"$.dosing[{i}].unit", f"dose unit {d['unit']!r} does not convert to the PK amount unit "
                    f"{pk['amountUnit']!r}: {exc}")
    pd = raw.get("pd")
    if pd is not None:
        if pk is None:
            add("$.pd", "a PD model needs a PK model to drive it")
        req, opt = _PD_ROLES[pd["model"]]
        roles("pd", pd["parameters"], [req], opt)
        if pd["model"] == "indirect-response" and "kind" not in pd:
            add("$.pd.kind", "an indirect-response model needs its kind (1-4, Dayneka et al. 1993)")
    disease = raw.get("disease")
    if disease is not None:
        req, opt = _DISEASE_ROLES[disease["model"]]
        roles("disease", disease["parameters"], [req], opt)
        if disease["model"] == "tumour-growth-inhibition" and pk is None:
            add("$.disease", "the tumour-growth-inhibition model is driven by drug exposure: it needs a PK model")
        if disease.get("drugEffect") == "pd-offset" and pd is None:
            add("$.disease.drugEffect", "'pd-offset' needs a PD model")
    daily = (pd or {}).get("exposure") == DAILY_AVERAGE
    for section, role in _DAILY_ONLY_ROLES.items():
        if role in ((raw.get(section) or {}).get("parameters") or {}) and not daily:
            add(f"$.{section}.parameters.{role}", f"the role {role} is implemented by the daily-regimen engine only "
                "(pd.exposure 'daily-average')")
    if not issues:
        for path, message in family_issues(raw):
            add(path, message)
    used |= in_terms
    for i, p in enumerate(raw["parameters"] if not issues else []):
        if p["name"] not in used and not any(e["parameter"] == p["name"] for e in raw.get("covariateEffects", [])):
            add(f"$.parameters[{i}]", f"parameter {p['name']!r} is used by no structural role")
    covariates = {c["name"]: c for c in raw.get("covariates", [])}
    attributes = [c["participantAttribute"] for c in raw.get("covariates", []) if "participantAttribute" in c]
    for i, c in enumerate(raw.get("covariates", [])):
        if "participantAttribute" in c and attributes.count(c["participantAttribute"]) > 1:
            add(f"$.covariates[{i}].participantAttribute", f"{c['participantAttribute']!r} is named by more than "
                "one covariate")
    arm_names = [a["name"] for a in raw.get("arms", [])]
    for i, name in enumerate(arm_names):
        if arm_names.index(name) != i:
            add(f"$.arms[{i}].name", f"arm {name!r} is declared twice")
    vp = raw.get("virtualPopulation")
    if vp is not None:
        corr = np.asarray(vp["correlation"], dtype=float)
        if not (np.allclose(corr, corr.T) and np.allclose(np.diag(corr), 1.0)
                and np.linalg.eigvalsh(corr).min() > 0):
            add("$.virtualPopulation.correlation", "must be a symmetric positive definite correlation matrix "
                "(ones on the diagonal)")
        if not sum(vp["siteProbabilities"]) > 0:
            add("$.virtualPopulation.siteProbabilities", "needs at least one positive probability")
        for i, e in enumerate(raw.get("covariateEffects", [])):
            if e["covariate"] in covariates and "participantAttribute" not in covariates[e["covariate"]]:
                add(f"$.covariateEffects[{i}].covariate", f"virtual participants need covariate {e['covariate']!r} to "
                    "name its participantAttribute")
    for i, c in enumerate(raw.get("covariates", [])):
        if c["type"] == "categorical" and not c.get("categories"):
            add(f"$.covariates[{i}].categories", "a categorical covariate lists its categories")
        if c["type"] == "continuous" and "observation" in c and "unit" in c:
            try:
                units(c["observation"]["unit"], c["unit"])
            except ValueError as exc:
                add(f"$.covariates[{i}].observation.unit", str(exc))
    for i, e in enumerate(raw.get("covariateEffects", [])):
        here = f"$.covariateEffects[{i}]"
        if e["parameter"] not in names:
            add(f"{here}.parameter", f"unknown parameter {e['parameter']!r}")
        cov = covariates.get(e["covariate"])
        if cov is None:
            add(f"{here}.covariate", f"unknown covariate {e['covariate']!r} (declare it in $.covariates)")
            continue
        if e["form"] == "categorical":
            if cov["type"] != "categorical" or e.get("category") not in (cov.get("categories") or []):
                add(f"{here}.category", f"a categorical effect names one category of the categorical covariate "
                    f"{e['covariate']!r}")
        elif cov["type"] != "continuous":
            add(f"{here}.form", f"a {e['form']} effect needs a continuous covariate")
        elif e["form"] == "power" and not e.get("reference", 0) > 0:
            add(f"{here}.reference", "a power effect needs a positive reference value")
    out_names = [o["name"] for o in raw["outputs"]]
    sources = {"pk": pk, "pd": pd, "disease": disease}
    for i, o in enumerate(raw["outputs"]):
        here = f"$.outputs[{i}]"
        if out_names.index(o["name"]) != i:
            add(f"{here}.name", f"output {o['name']!r} is declared twice")
        if sources[o["source"]] is None:
            add(f"{here}.source", f"the definition has no {o['source']!r} model to take this output from")
        err = o["error"]
        needs_a, needs_b = err["kind"] in ("additive", "combined"), err["kind"] in ("proportional", "combined")
        if needs_a != (err.get("additive", 0) > 0) or needs_b != (err.get("proportional", 0) > 0):
            add(f"{here}.error", f"a {err['kind']} error needs additive {'> 0' if needs_a else 'absent'} and "
                f"proportional {'> 0' if needs_b else 'absent'}")
        try:
            units(o["observation"]["unit"], o["unit"])
        except ValueError as exc:
            add(f"{here}.observation.unit", f"observations in {o['observation']['unit']!r} do not convert to the "
                f"output unit {o['unit']!r}: {exc}")
        if o["source"] == "pk" and pk is not None:
            try:
                units(f"{pk['amountUnit']}/{pk['volumeUnit']}", o["unit"])
            except ValueError as exc:
                add(f"{here}.unit", f"a PK output is a concentration in {pk['amountUnit']}/{pk['volumeUnit']}; "
                    f"{o['unit']!r} does not convert: {exc}")
    for i, c in enumerate(raw.get("variability", {}).get("correlations", [])):
        iiv = {p["name"] for p in raw["parameters"] if "iiv" in p}
        for name in c["between"]:
            if name not in iiv:
                add(f"$.variability.correlations[{i}].between", f"{name!r} has no inter-individual variability")
        if raw.get("variability", {}).get("structure", "diagonal") != "full":
            add(f"$.variability.correlations[{i}]", "correlations need variability.structure 'full'")
    seen_cmt = {}
    for where, items in (("outputs", raw["outputs"]), ("dosing", raw["dosing"])):
        for i, item in enumerate(items):
            cmt = item.get("nonmemCmt")
            if cmt is not None and (where, cmt) in seen_cmt:
                add(f"$.{where}[{i}].nonmemCmt", f"CMT {cmt} is already used by $.{where}[{seen_cmt[(where, cmt)]}]")
            seen_cmt[(where, cmt)] = i
    cohort = raw.get("cohort", {})
    if cohort.get("duration", 0) > 0 and raw["dosing"][0]["route"] != "iv":
        add("$.cohort.duration", f"an infusion duration needs an IV dose; $.dosing[0].route is {raw['dosing'][0]['route']!r}")
    if "interval" in cohort and cohort.get("duration", 0) > cohort["interval"]:
        add("$.cohort.duration", f"an infusion of {cohort['duration']} {raw['timeUnit']} does not end before the next "
            f"dose ({cohort['interval']} {raw['timeUnit']} later)")
    if not issues:
        try:
            _population_model(raw)
        except ValueError as exc:
            add("$.variability", str(exc))
    return issues


@dataclass(frozen=True)
class Dose:
    """One dose of a subject: ``time`` (definition's time unit), ``amount`` (PK amount unit),
    ``duration`` (0: bolus or oral; > 0: zero-order infusion), ``route`` (``"oral"`` or ``"iv"``)."""

    time: float
    amount: float
    duration: float = 0.0
    route: str = "oral"


@dataclass(frozen=True)
class SubjectRecord:
    """What a compiled model needs of one subject: doses, observations and covariates.

    ``observations`` are ``(time, output name, value)`` with value ``nan`` for a time to predict.
    """

    id: str
    doses: tuple[Dose, ...] = ()
    observations: tuple[tuple[float, str, float], ...] = ()
    covariates: Mapping[str, Any] = field(default_factory=dict)


def _population_model(raw: Mapping) -> PopulationModel:
    params = raw["parameters"]
    names = tuple(p["name"] for p in params)
    theta = [np.log(p["typical"]) if p["scale"] == "log" else float(p["typical"]) for p in params]
    random = tuple(p["name"] for p in params if "iiv" in p)
    sd = np.array([p["iiv"] for p in params if "iiv" in p], dtype=float)
    variability = raw.get("variability", {})
    structure = variability.get("structure", "diagonal")
    corr = np.eye(len(random))
    for c in variability.get("correlations", []):
        a, b = (random.index(n) for n in c["between"])
        corr[a, b] = corr[b, a] = c["value"]
    omega = corr * np.outer(sd, sd)
    errors = tuple(ResidualError(o["error"]["kind"], additive=o["error"].get("additive", 0.0),
                                 proportional=o["error"].get("proportional", 0.0)) for o in raw["outputs"])
    effects = []
    for e in raw.get("covariateEffects", []):
        estimate = e.get("estimate", True)
        if e["form"] == "categorical":
            effects.append(CovariateEffect(e["parameter"], _indicator(e["covariate"], e["category"]), "exponential",
                                           0.0, e["coefficient"], estimate))
        else:
            reference = e.get("reference", 0.0 if e["form"] == "exponential" else 1.0)
            effects.append(CovariateEffect(e["parameter"], e["covariate"], e["form"], reference, e["coefficient"],
                                           estimate))
    return PopulationModel(names, theta, random, omega, errors, tuple(effects),
                           "full" if structure == "full" else "diagonal")


def _indicator(covariate: str, category: str) -> str:
    return f"{covariate}={category}"


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True, eq=False)
class ModelDefinition:
    """A validated, compiled twin model definition (build it with :func:`load_definition`).

    Attributes
    ----------
    document : mapping
        The definition as given (read-only); :meth:`to_json` returns it as a plain dict.
    output_names : tuple of str
        Outputs in the order of ``design["output"]`` indices.
    output_units : mapping of str to str
    output_scale : tuple of float
        Factor from the PK concentration unit (amount/volume) to each PK output's unit.

    Examples
    --------
    >>> m = load_definition(shipped_definition("theophylline"))
    >>> m.canonical, m.output_names
    ('https://trialtwin.org/fhir/Library/theophylline-1cmt-oral|1.1.0', ('concentration',))
    >>> m.population_model().parameters
    ('KE', 'KA', 'CL')
    """

    document: Mapping[str, Any]
    output_names: tuple[str, ...]
    output_units: Mapping[str, str]
    output_scale: tuple[float, ...]

    @property
    def url(self) -> str:
        return self.document["url"]

    @property
    def version(self) -> str:
        return self.document["version"]

    @property
    def name(self) -> str:
        return self.document["name"]

    @property
    def canonical(self) -> str:
        """``url|version``, the way FHIR pins a canonical reference."""
        return f"{self.url}|{self.version}"

    @property
    def time_unit(self) -> str:
        return self.document["timeUnit"]

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p["name"] for p in self.document["parameters"])

    @property
    def covariates(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(self.document.get("covariates", ()))

    @property
    def outputs(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(self.document["outputs"])

    @property
    def dosing(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(self.document["dosing"])

    def __reduce__(self):
        # the frozen document (mapping proxies) does not pickle; rebuild it from plain JSON, so a
        # compiled model travels to worker processes (concurrent.futures, dask)
        return _rebuild, (self.to_json(), self.output_names, dict(self.output_units), self.output_scale)

    def to_json(self) -> dict:
        """The definition as a plain JSON-ready dict."""
        def thaw(v):
            if isinstance(v, Mapping):
                return {k: thaw(x) for k, x in v.items()}
            if isinstance(v, tuple):
                return [thaw(x) for x in v]
            return v
        return thaw(self.document)

    def population_model(self) -> PopulationModel:
        """The population prior the definition states (typical values, IIV, covariates, residual error)."""
        return _population_model(self.document)

    def output_index(self, name: str) -> int:
        """Index of an output in ``design["output"]``."""
        if name not in self.output_names:
            raise ValueError(f"unknown output {name!r}; the model has {', '.join(self.output_names)}")
        return self.output_names.index(name)

    # ----------------------------------------------------------------------------- structural model

    def _natural(self, phi: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for j, p in enumerate(self.document["parameters"]):
            out[p["name"]] = np.exp(phi[:, j]) if p["scale"] == "log" else phi[:, j]
        return with_derived(self.document, out)

    @property
    def regimen(self):
        """The compiled :class:`inference.regimen.DailyRegimen` of a daily-average definition, else None."""
        if self.document.get("pd", {}).get("exposure") != DAILY_AVERAGE:
            return None
        cached = _REGIMENS.get(self)
        if cached is None:
            cached = _REGIMENS[self] = DailyRegimen.from_definition(self)
        return cached

    def _pk_model(self, nat: Mapping[str, np.ndarray]):
        pk = self.document["pk"]
        r = {role: nat[name] for role, name in pk["parameters"].items()}
        extra = {k.lower(): r[k] for k in ("KA", "TLAG", "F") if k in r}
        if pk["elimination"] == "michaelis-menten":
            return MichaelisMenten(vmax=r["VMAX"], km=r["KM"], v=r["V"], **extra)
        if "KE" in r:
            if "CL" in r:
                r["V"] = r["CL"] / r["KE"]
            else:
                r["CL"] = r["KE"] * r["V"]
        if pk["compartments"] == 1:
            return OneCompartment(cl=r["CL"], v=r["V"], **extra)
        if pk["compartments"] == 3:
            return ThreeCompartment(cl=r["CL"], v=r["V"], q=r["Q"], v2=r["V2"], q3=r["Q3"], v3=r["V3"], **extra)
        return TwoCompartment(cl=r["CL"], v=r["V"], q=r["Q"], v2=r["V2"], **extra)

    def _concentration(self, nat, data: ObservationData, grid: np.ndarray) -> np.ndarray:
        """Central concentration (amount/volume units) of every subject on ``grid``, shape (n, G)."""
        pk = self._pk_model(nat)
        out = np.zeros((data.n_subjects, grid.size))
        for record in _layout(data, self)["doses"]:
            out += concentration(pk, record, grid)
        return np.maximum(out, 0.0)

    def _grid(self, data: ObservationData, obs_times: np.ndarray, dense: bool) -> np.ndarray:
        times = [obs_times]
        if dense:
            design = data.design
            dose = design["evid"] == 1
            t_dose = data.time[dose]
            times += [t_dose, (t_dose + design["duration"][dose])]
            lo = min(0.0, float(np.min(np.concatenate(times))))
            hi = float(np.max(np.concatenate(times)))
            times.append(np.linspace(lo, hi, _GRID_POINTS))
        return np.unique(np.concatenate(times))

    def _effect_site(self, nat, conc: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """Effect-compartment concentration, exact for a concentration linear between grid points."""
        ke0 = nat[self.document["pd"]["parameters"]["KE0"]][:, None]
        ce = np.zeros_like(conc)
        for k in range(1, grid.size):
            x = ke0[:, 0] * (grid[k] - grid[k - 1])
            decay = np.exp(-x)
            # (1 - (1 - e^-x) / x): weight of the slope of the input over the step
            ramp = np.where(x < 1e-8, 0.5 * x, 1.0 - (-np.expm1(-x)) / np.where(x < 1e-8, 1.0, x))
            ce[:, k] = ce[:, k - 1] * decay + conc[:, k - 1] * (-np.expm1(-x)) + (conc[:, k] - conc[:, k - 1]) * ramp
        return ce

    def _pd(self, nat, conc: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """PD response on the grid and its drug-free value (for a disease 'pd-offset')."""
        pd = self.document["pd"]
        r = {role: nat[name] for role, name in pd["parameters"].items()}
        sign = -1.0 if pd.get("direction", "increase") == "decrease" else 1.0
        n = conc.shape[0]
        if pd["model"] == "indirect-response":
            model = IndirectResponse(kind=pd["kind"], kin=r["KIN"], kout=r["KOUT"], effect_max=r["EMAX"],
                                     c50=r["EC50"], hill=r.get("HILL", 1.0))

            def conc_at(t):
                k = int(np.clip(np.searchsorted(grid, t, side="right") - 1, 0, grid.size - 2))
                w = (t - grid[k]) / (grid[k + 1] - grid[k])
                return conc[:, k] + (conc[:, k + 1] - conc[:, k]) * min(max(w, 0.0), 1.0)

            if grid.size == 1:
                return np.broadcast_to(r["KIN"] / r["KOUT"], (n,))[:, None], (r["KIN"] / r["KOUT"])[:, None]
            return simulate_idr(model, conc_at, grid), np.broadcast_to((r["KIN"] / r["KOUT"])[:, None], (n, 1))
        drive = self._effect_site(nat, conc, grid) if pd["model"] == "effect-compartment" else conc
        e0 = r.get("E0", np.zeros(n))
        response = sigmoid_emax(drive, sign * r["EMAX"][:, None], r["EC50"][:, None],
                                r.get("HILL", np.ones(n))[:, None], e0[:, None])
        return response, e0[:, None]

    def _disease(self, nat, grid: np.ndarray, conc, pd_out) -> np.ndarray:
        disease = self.document["disease"]
        r = {role: nat[name] for role, name in disease["parameters"].items()}
        t = grid[None, :]
        if disease["model"] == "tumour-growth-inhibition":
            # Claret et al. (2009): dy/dt = KL y - KD exp(-LAMBDA t) C(t) y, i.e.
            # log y = log BASE + KL t - KD * integral of exp(-LAMBDA s) C(s) ds (trapezoid on the grid)
            g = np.exp(-r["LAMBDA"][:, None] * np.maximum(t, 0.0)) * conc
            area = np.concatenate([np.zeros((g.shape[0], 1)),
                                   np.cumsum(0.5 * (g[:, 1:] + g[:, :-1]) * np.diff(grid)[None, :], axis=1)], axis=1)
            return r["BASE"][:, None] * np.exp(r["KL"][:, None] * t - r["KD"][:, None] * area)
        natural = (r["BASE"][:, None] + r["SLOPE"][:, None] * t if disease["model"] == "linear"
                   else r["BASE"][:, None] * np.exp(r["SLOPE"][:, None] * t))
        if disease.get("drugEffect") == "pd-offset":
            response, free = pd_out
            # EFFSCALE converts the PD change into the biomarker's units (1 when absent)
            natural = natural + r.get("EFFSCALE", np.ones(1))[:, None] * (response - free)
        return natural

    def structural(self, phi: np.ndarray, data: ObservationData) -> np.ndarray:
        """Predictions of every row of ``data`` (``inference.population.Structural``); dose rows get 0.

        Examples
        --------
        >>> m = load_definition(shipped_definition("theophylline"))
        >>> rec = SubjectRecord("1", doses=(Dose(0.0, 4.0 * 79.6),), observations=((1.0, "concentration", np.nan),),
        ...                     covariates={"WT": 79.6})
        >>> data = event_data(m, [rec])
        >>> phi = np.array([[-2.45, 0.47, -3.23 + np.log(79.6)]])
        >>> np.round(m.structural(phi, data), 3).tolist()   # dose row, then C(1 h) as nlme's SSfol
        [0.0, 6.599]
        """
        phi = np.atleast_2d(np.asarray(phi, dtype=float))
        if self.regimen is not None:
            return self.regimen.structural_events(phi, data)
        nat = self._natural(phi)
        layout = _layout(data, self)
        obs, grid, wanted = layout["obs"], layout["grid"], layout["wanted"]
        result = np.zeros(data.n_rows)
        if not np.any(obs):
            return result
        doc = self.document
        conc = pd_out = None
        if "pk" in doc:
            conc = self._concentration(nat, data, grid)
        if "pd" in doc and ("pd" in wanted or (doc.get("disease", {}).get("drugEffect") == "pd-offset"
                                              and "disease" in wanted)):
            pd_out = self._pd(nat, conc, grid)
        values = {}
        if "pk" in wanted:
            values["pk"] = conc
        if "pd" in wanted:
            values["pd"] = pd_out[0]
        if "disease" in wanted:
            values["disease"] = self._disease(nat, grid, conc, pd_out)
        for k, rows, subject, at in layout["rows"]:
            result[rows] = self.output_scale[k] * values[self.outputs[k]["source"]][subject, at]
        return result


def _rebuild(doc: dict, names, units: dict, scale) -> "ModelDefinition":
    return ModelDefinition(document=_freeze(doc), output_names=tuple(names), output_units=MappingProxyType(units),
                           output_scale=tuple(scale))


_LAYOUTS: "weakref.WeakKeyDictionary[ObservationData, dict]" = weakref.WeakKeyDictionary()
_REGIMENS: "weakref.WeakKeyDictionary[ModelDefinition, Any]" = weakref.WeakKeyDictionary()


def _layout(data: ObservationData, model: "ModelDefinition") -> dict:
    """What ``structural`` derives from the data alone (dose records, grid, row indices), once per data set.

    A population fit calls the structural model thousands of times on the same (tiled) data; only
    the parameters change between calls.
    """
    cached = _LAYOUTS.get(data)
    if cached is not None and cached["model"] is model:
        return cached
    n = data.n_subjects
    design = data.design
    obs = design["evid"] == 0
    output = design["output"].astype(np.int64)
    doc = model.document
    dense = bool(doc.get("pd", {}).get("model") in ("effect-compartment", "indirect-response")
                 or doc.get("disease", {}).get("model") == "tumour-growth-inhibition")
    grid = model._grid(data, data.time[obs], dense) if np.any(obs) else np.zeros(1)
    doses = []
    dose = design["evid"] == 1
    for code, route in ((0, "oral"), (1, "iv")):
        rows = dose & (design["route"] == code)
        if not np.any(rows):
            continue
        subj = data.subject[rows]
        order = np.lexsort((data.time[rows], subj))
        subj = subj[order]
        counts = np.bincount(subj, minlength=n)
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(subj.size) - start[subj]
        width = int(counts.max())
        times, amounts, durations = np.zeros((n, width)), np.zeros((n, width)), np.zeros((n, width))
        times[subj, slot] = data.time[rows][order]
        amounts[subj, slot] = design["amt"][rows][order]
        durations[subj, slot] = design["duration"][rows][order]
        doses.append(DoseRecord(times=times, amounts=amounts, durations=durations if route == "iv" else 0.0,
                                route=route))
    present = np.unique(output[obs])
    layout = {"model": model, "obs": obs, "grid": grid,
              "wanted": {model.outputs[k]["source"] for k in present}, "doses": doses,
              "rows": [(int(k), idx, data.subject[idx], np.searchsorted(grid, data.time[idx]))
                       for k in present for idx in [np.flatnonzero(obs & (output == k))]]}
    _LAYOUTS[data] = layout
    return layout


def load_definition(raw: Any, unit_factor: UnitFactor | None = None) -> ModelDefinition:
    """Validate a definition document and compile it.

    Raises
    ------
    DefinitionError
        Listing every problem with its path in the document.

    Examples
    --------
    >>> load_definition({"formatVersion": "1"})
    Traceback (most recent call last):
    ...
    inference.model_definition.DefinitionError: $: 'url' is a required property; ...
    """
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DefinitionError([DefinitionIssue("$", f"not JSON: {exc}")]) from None
    issues = check_definition(raw, unit_factor)
    if issues:
        raise DefinitionError(issues)
    units = unit_factor or same_unit
    doc = copy.deepcopy(raw)
    scale = []
    for o in doc["outputs"]:
        if o["source"] == "pk":
            scale.append(float(units(f"{doc['pk']['amountUnit']}/{doc['pk']['volumeUnit']}", o["unit"])))
        else:
            scale.append(1.0)
    return ModelDefinition(document=_freeze(doc), output_names=tuple(o["name"] for o in doc["outputs"]),
                           output_units=MappingProxyType({o["name"]: o["unit"] for o in doc["outputs"]}),
                           output_scale=tuple(scale))


def event_data(model: ModelDefinition, subjects: Sequence[SubjectRecord]) -> ObservationData:
    """Event rows (doses, then observations, per subject) of ``subjects`` for ``model``.

    Covariates come from each record (declared ``default`` when absent); a categorical covariate
    becomes one 0/1 indicator per category named ``"COV=category"``.

    Raises
    ------
    ValueError
        A subject without rows, an unknown output, a missing covariate without default.

    Examples
    --------
    >>> m = load_definition(shipped_definition("theophylline"))
    >>> d = event_data(m, [SubjectRecord("1", (Dose(0.0, 320.0),), ((0.5, "concentration", 2.8),), {"WT": 80.0})])
    >>> d.design["evid"].tolist(), d.value.tolist()[1], float(d.covariates["WT"][0])
    ([1.0, 0.0], 2.8, 80.0)
    """
    if not subjects:
        raise ValueError("no subjects")
    subject, time, value = [], [], []
    design = {"evid": [], "amt": [], "duration": [], "route": [], "output": []}
    covariates: dict[str, list[float]] = {}
    declared = model.covariates
    for i, rec in enumerate(subjects):
        if not rec.doses and not rec.observations:
            raise ValueError(f"subject {rec.id!r} has neither doses nor observations")
        for d in rec.doses:
            if d.route not in ("oral", "iv") or not d.amount >= 0 or not d.duration >= 0:
                raise ValueError(f"subject {rec.id!r}: invalid dose {d}")
            subject.append(i)
            time.append(float(d.time))
            value.append(np.nan)
            for k, v in (("evid", 1), ("amt", d.amount), ("duration", d.duration),
                         ("route", 0 if d.route == "oral" else 1), ("output", 0)):
                design[k].append(float(v))
        for t, name, v in rec.observations:
            subject.append(i)
            time.append(float(t))
            value.append(float(v))
            for k, x in (("evid", 0), ("amt", 0.0), ("duration", 0.0), ("route", 0), ("output", model.output_index(name))):
                design[k].append(float(x))
        for c in declared:
            given = rec.covariates.get(c["name"], c.get("default"))
            if given is None:
                raise ValueError(f"subject {rec.id!r} lacks covariate {c['name']!r} and the definition gives no default")
            if c["type"] == "categorical":
                if str(given) not in c["categories"]:
                    raise ValueError(f"subject {rec.id!r}: covariate {c['name']!r} is {given!r}, not one of "
                                     f"{', '.join(c['categories'])}")
                for cat in c["categories"]:
                    covariates.setdefault(_indicator(c["name"], cat), []).append(1.0 if str(given) == cat else 0.0)
            else:
                covariates.setdefault(c["name"], []).append(float(given))
    return ObservationData(subject=np.array(subject, dtype=np.int64), time=np.array(time), value=np.array(value),
                           subject_ids=tuple(r.id for r in subjects), covariates=covariates,
                           design={k: np.array(v) for k, v in design.items()})


@dataclass(frozen=True, eq=False)
class SubjectForecast:
    """A participant's posterior-predictive forecast under a model definition.

    ``times[name]`` (definition time unit, from the record's origin), ``median``, ``low`` and
    ``high`` per output name; ``level`` the interval's coverage.
    """

    times: Mapping[str, np.ndarray]
    median: Mapping[str, np.ndarray]
    low: Mapping[str, np.ndarray]
    high: Mapping[str, np.ndarray]
    level: float
    samples: int
    seed: int


def calibrate_subject(model: ModelDefinition, population: PopulationModel, record: SubjectRecord):
    """Posterior (Laplace) of one participant's parameters from their observations, with ``population``
    (the study's fitted estimate, or the definition's prior) as the prior.

    Examples
    --------
    >>> m = load_definition(shipped_definition("theophylline"))
    >>> rec = SubjectRecord("1", (Dose(0.0, 320.0),), ((1.0, "concentration", 6.0), (8.0, "concentration", 5.0)),
    ...                     {"WT": 80.0})
    >>> post = calibrate_subject(m, m.population_model(), rec)
    >>> post.names, bool(post.converged)
    (('KA', 'CL'), True)
    """
    from inference import calibration

    if not any(np.isfinite(v) for _, _, v in record.observations):
        raise ValueError(f"participant {record.id!r} has no observation of {', '.join(model.output_names)}")
    return calibration.calibrate(population, model.structural, event_data(model, [record]))


def forecast_subject(model: ModelDefinition, posterior, record: SubjectRecord, future_doses: Sequence[Dose],
                     times: Mapping[str, Sequence[float]], *, samples: int = 500, seed: int = 0,
                     level: float = 0.9) -> SubjectForecast:
    """Forecast outputs at ``times`` (per output name) after the record's doses plus ``future_doses``.

    Parameters are drawn from ``posterior`` and residual error is added (prediction intervals of a
    new observation), seeded and vectorized (``inference.calibration.forecast``).
    """
    from inference import calibration

    rows = tuple((float(t), name, np.nan) for name, ts in times.items() for t in ts)
    if not rows:
        raise ValueError("no forecast times")
    future = SubjectRecord(record.id, tuple(record.doses) + tuple(future_doses), rows, record.covariates)
    data = event_data(model, [future])
    fc = calibration.forecast(posterior, model.structural, data, level=level, n_samples=samples, seed=seed)
    obs = data.design["evid"] == 0
    output = data.design["output"].astype(np.int64)
    out_t, med, lo, hi = {}, {}, {}, {}
    for name in times:
        sel = obs & (output == model.output_index(name))
        order = np.argsort(data.time[sel], kind="stable")
        out_t[name] = data.time[sel][order]
        values = [np.asarray(a)[sel][order] for a in (fc.median, fc.lower, fc.upper)]
        if model.outputs[model.output_index(name)]["source"] == "pk":
            values = [np.maximum(v, 0.0) for v in values]  # an assay reports no negative concentration
        med[name], lo[name], hi[name] = values
    return SubjectForecast(times=out_t, median=med, low=lo, high=hi, level=float(level), samples=int(samples),
                           seed=int(seed))


def control_prediction(model: ModelDefinition, population: PopulationModel, record: SubjectRecord, output: str,
                       time: float) -> float:
    """Posterior mean of the noise-free ``output`` at ``time`` without treatment: a twin's prognostic score.

    The participant's parameters are calibrated on ``record`` (give it the baseline records only: the
    score must not see the outcome), then the structural prediction at ``time`` with no doses after
    time 0 (doses at or before 0 are kept) is averaged over the Laplace posterior by the spherical-radial
    cubature rule (Arasaratnam & Haykin 2009): ``2q`` points ``mode ± sqrt(q) L e_i`` with equal weights,
    exact for polynomials of degree 3 in the ``q`` random effects, deterministic, and ``2q`` model runs
    instead of thousands of draws. This is the predicted control outcome that PROCOVA adjusts for
    (Schuler et al. 2021).

    Examples
    --------
    >>> m = load_definition(shipped_definition("tumour-growth"))
    >>> rec = SubjectRecord("1", (), ((0.0, "sld", 80.0),), {})
    >>> score = control_prediction(m, m.population_model(), rec, "sld", 12.0)
    >>> bool(80.0 < score < 80.0 * np.exp(0.05 * 12))   # grows from about its baseline at KL ~ 0.02/wk
    True
    """
    pre = tuple(d for d in record.doses if d.time <= 0.0)
    posterior = calibrate_subject(model, population, SubjectRecord(record.id, pre, record.observations,
                                                                   record.covariates))
    future = event_data(model, [SubjectRecord(record.id, pre, ((float(time), output, np.nan),), record.covariates)])
    future = future.replace(covariates={**posterior.data.covariates, **future.covariates})
    q = posterior.mean.size
    root = np.linalg.cholesky(posterior.cov + 1e-12 * np.eye(q))
    offsets = np.sqrt(q) * np.concatenate([root.T, -root.T])  # rows: the 2q cubature points' offsets
    phi = np.tile(posterior.parameters, (2 * q, 1))
    phi[:, posterior.model.random_index] = posterior.mean + offsets
    rows = np.flatnonzero(future.design["evid"] == 0) if "evid" in future.design else np.arange(future.n_rows)
    f = predict_rows(model, phi, future)
    return float(f[:, rows[-1]].mean())


def predict_rows(model: ModelDefinition, phi: np.ndarray, data: ObservationData) -> np.ndarray:
    """Noise-free predictions of ``data``'s rows for each parameter vector in ``phi`` (rows: draws)."""
    from inference.population import predict

    return predict(model.structural, phi, data.tile(phi.shape[0])).reshape(phi.shape[0], data.n_rows)


def simulate_arms(model: ModelDefinition, population: PopulationModel, arm_doses: Sequence[Sequence[Dose]],
                  member_arm, covariates: Sequence[Mapping[str, Any]], times: Sequence[float], *, seed: int = 0,
                  level: float = 0.9, arm_names: Sequence[str] | None = None,
                  on_chunk: Callable[[int, int], bool] | None = None):
    """Cohort simulation of an event-engine definition: every participant from randomization (time 0)
    under their arm's doses, with per-arm quantiles across participants.

    Each participant's parameters are drawn from ``population`` (its variability and covariate
    effects, the covariates of ``covariates[i]`` or their declared defaults); the outputs are the
    model's predictions at ``times`` (the definition's time unit) without residual error, i.e. the
    spread between participants, as the daily-regimen cohort (``inference.twin.simulate_population``).
    Chunk ``c`` (at most ``COHORT_BLOCK`` participants of one arm) draws from its own seed stream.

    Returns
    -------
    inference.twin.PopulationResult
        ``days`` are ``times`` in days.

    Raises
    ------
    ValueError
        A participant lacks a covariate the definition gives no default for, or bad arguments.

    Examples
    --------
    >>> m = load_definition(shipped_definition("theophylline"))
    >>> res = simulate_arms(m, m.population_model(), [[Dose(0.0, 320.0)]], np.zeros(400, int), [{"WT": 70.0}] * 400,
    ...                     [0.0, 2.0, 24.0], seed=1)
    >>> res.participants, [round(float(d), 3) for d in res.days]
    ((400,), [0.0, 0.083, 1.0])
    >>> med = res.median[0]["concentration"]
    >>> float(med[0]), bool(med[1] > 5.0 > med[2])
    (0.0, True)
    """
    from inference.population import individual_parameters, sample_random_effects
    from inference.twin import PopulationResult

    if not 0.5 <= level <= 0.99:
        raise ValueError(f"level must lie in [0.5, 0.99], got {level}")
    member_arm = np.asarray(member_arm, dtype=np.int64)
    n = member_arm.size
    if n == 0 or member_arm.min() < 0 or member_arm.max() >= len(arm_doses):
        raise ValueError("member_arm must index arm_doses and hold at least one participant")
    if len(covariates) != n:
        raise ValueError(f"{len(covariates)} covariate sets for {n} participants")
    times = np.asarray(times, dtype=float)
    if times.ndim != 1 or times.size == 0 or np.any(times < 0):
        raise ValueError("times must be a non-empty list of times >= 0")
    names = tuple(arm_names) if arm_names is not None else tuple(f"arm{i}" for i in range(len(arm_doses)))
    outputs = model.output_names
    observations = tuple((float(t), o, np.nan) for o in outputs for t in times)
    per_arm = {o: [[] for _ in arm_doses] for o in outputs}
    member_end = {o: np.full(n, np.nan) for o in outputs}
    chunks = [(a, idx[i:i + COHORT_BLOCK]) for a in range(len(arm_doses))
              for idx in [np.flatnonzero(member_arm == a)] for i in range(0, idx.size, COHORT_BLOCK)]
    chunk_seeds = np.random.SeedSequence([seed, 2]).generate_state(max(len(chunks), 1))
    completed = True
    for c, (a, idx) in enumerate(chunks):
        doses = tuple(arm_doses[a])
        records = [SubjectRecord(str(i), doses, observations, covariates[i]) for i in idx]
        data = event_data(model, records)
        eta = sample_random_effects(population, idx.size, np.random.default_rng(int(chunk_seeds[c])))
        f = model.structural(individual_parameters(population, eta, data), data)
        # event_data lays out each subject's observation rows in the order given: outputs x times
        values = f[data.design["evid"] == 0].reshape(idx.size, len(outputs), times.size)
        for k, o in enumerate(outputs):
            v = values[:, k, :]
            if model.outputs[k]["source"] == "pk":
                v = np.maximum(v, 0.0)
            per_arm[o][a].append(v)
            member_end[o][idx] = v[:, -1]
        if on_chunk is not None and on_chunk(c + 1, len(chunks)) is False:
            completed = False
            break
    tail = (1.0 - level) / 2.0
    medians, lows, highs, sizes = [], [], [], []
    for a in range(len(arm_doses)):
        med, lo, hi = {}, {}, {}
        for o in outputs:
            if per_arm[o][a]:
                lo[o], med[o], hi[o] = np.quantile(np.concatenate(per_arm[o][a]), [tail, 0.5, 1.0 - tail], axis=0)
            else:
                lo[o] = med[o] = hi[o] = np.full(times.size, np.nan)
        sizes.append(int(sum(part.shape[0] for part in per_arm[outputs[0]][a])))
        medians.append(med)
        lows.append(lo)
        highs.append(hi)
    return PopulationResult(arms=names, participants=tuple(sizes), days=times * DAYS_PER_UNIT[model.time_unit],
                            median=tuple(medians), low=tuple(lows), high=tuple(highs), member_arm=member_arm,
                            member_end=member_end, level=float(level), completed=completed)


@dataclass(frozen=True)
class MarkerNoise:
    """How a typical participant's disease marker scatters and drifts: ``output`` (its name),
    ``unit``, ``assay_sd`` (residual error SD at the typical baseline, output unit) and
    ``drift_per_day`` (absolute drift of the untreated marker per day, output unit)."""

    output: str
    unit: str
    assay_sd: float
    drift_per_day: float


def marker_noise(model: ModelDefinition, population: PopulationModel | None = None) -> MarkerNoise | None:
    """The disease marker's residual error and natural drift for a typical participant, read from the
    definition's first ``disease`` output, its residual error model and the disease model's typical
    parameters (``population``: a fitted estimate; default the definition's own). None without one.

    Drift: ``|SLOPE|`` (linear), ``|SLOPE| BASE`` (exponential) or ``KL BASE`` (tumour growth
    inhibition, untreated) at time 0; the residual SD is that of the error model at ``BASE``.

    Examples
    --------
    >>> m = load_definition(shipped_definition("tumour-growth"))
    >>> n = marker_noise(m)
    >>> n.output, round(n.assay_sd, 4), round(n.drift_per_day, 4)   # sqrt(2^2 + (0.05 * 70)^2); 0.02 * 70 / 7
    ('sld', 4.0311, 0.2)
    >>> marker_noise(load_definition(shipped_definition("theophylline"))) is None
    True
    """
    k = next((i for i, o in enumerate(model.outputs) if o["source"] == "disease"), None)
    if k is None:
        return None
    population = model.population_model() if population is None else population
    by_name = dict(zip(population.parameters, np.asarray(population.theta, dtype=float)))
    phi = np.array([[by_name.get(p["name"], np.log(p["typical"]) if p["scale"] == "log" else p["typical"])
                     for p in model.document["parameters"]]])
    nat = {name: float(np.asarray(v).ravel()[0]) for name, v in model._natural(phi).items()}
    disease = model.document["disease"]
    r = {role: nat[name] for role, name in disease["parameters"].items() if isinstance(name, str) and name in nat}
    base = r.get("BASE", 0.0)
    if disease["model"] == "linear":
        drift = abs(r["SLOPE"])
    elif disease["model"] == "exponential":
        drift = abs(r["SLOPE"] * base)
    else:  # tumour-growth-inhibition: growth of the untreated tumour at baseline
        drift = abs(r["KL"] * base)
    error = population.errors[k] if len(population.errors) > k else population.errors[0]
    sd = float(np.hypot(error.additive, error.proportional * base))
    return MarkerNoise(model.output_names[k], model.output_units[model.output_names[k]], sd,
                       drift / DAYS_PER_UNIT[model.time_unit])
