"""The daily-regimen engine: model definitions whose PD is driven by the daily average concentration,
compiled into the fast vectorized callables the participant twin and the cohort simulation use.

A definition belongs to this family when ``pd.exposure`` is ``"daily-average"``; it then has a
1-compartment first-order oral PK model (``CL``, ``V``, ``KA``, optional ``TLAG``, ``F``), a direct
Emax model on a biomarker (``E0``, ``EMAX``, ``EC50``, optional baseline ``SLOPE``) and a linear
disease model whose drug effect is the Emax change scaled by ``EFFSCALE`` and reached with a
first-order onset of time constant ``TONSET`` (:class:`inference.disease.DiseaseProgression`).
Doses are binned to days for the biomarker and disease pathway (``DailyOneCompartmentOral``), the
concentration output is exact (superposition of single doses). Everything numeric comes from the
definition: typical values, variability, covariate effects, derived parameters, bounds of virtual
participants, residual errors, arms and the virtual population's covariate distribution.

Engine units: hours for PK (times, CL/V/KA, TLAG), days for the biomarker and disease rates; the
definition's ``timeUnit`` is converted here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
from scipy.signal import lfilter

from inference.cohort import CovariateModel
from inference.covariates import Covariates
from inference.disease import DiseaseProgression, progress
from inference.pd import emax as emax_response
# _phi is pk's single-dose response; it is reused here, not copied, so the two cannot drift apart
from inference.pk import DailyOneCompartmentOral, OneCompartment, TwoCompartment, _phi
from inference.population import ObservationData, PopulationModel

__all__ = ["DAILY_AVERAGE", "PARTICIPANT_ATTRIBUTES", "family_issues", "covariate_model_of", "with_derived", "DailyRegimen"]

DAILY_AVERAGE = "daily-average"
#: participant attributes a definition covariate may stand for (``inference.covariates.Covariates`` fields)
PARTICIPANT_ATTRIBUTES = ("weight_kg", "age_y", "egfr", "sex_female", "distance_km")
_LATENT = ("weight_kg", "age_y", "egfr", "distance_km")
#: latent transforms of the virtual population (:class:`inference.cohort.CovariateModel`): natural -> latent
_TO_LATENT = {"weight_kg": math.log, "age_y": float, "egfr": math.log, "distance_km": math.log1p}
_HOURS = {"h": 1.0, "d": 24.0, "wk": 168.0}
#: a dose whose slowest decay has run this many e-folds before the first output adds < 1e-7 of its peak
_NEGLIGIBLE_EFOLDS = 16.0
_PK_REQUIRED, _PK_OPTIONAL = {"CL", "V", "KA"}, {"TLAG", "F"}


def family_issues(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(path, message)`` for every way a ``daily-average`` definition leaves the engine's family.

    Called by :func:`inference.model_definition.check_definition` after the general rules passed.

    Examples
    --------
    >>> family_issues({"pd": {"exposure": "concentration"}})
    []
    """
    if doc.get("pd", {}).get("exposure") != DAILY_AVERAGE:
        return []
    issues = []
    pk, pd, disease = doc.get("pk"), doc["pd"], doc.get("disease")
    what = "the daily-average exposure is simulated by the daily-regimen engine, which needs "
    if (pk is None or pk["compartments"] != 1 or pk["elimination"] != "linear"
            or pk.get("absorption") != "first-order" or not _PK_REQUIRED <= set(pk["parameters"])
            or not set(pk["parameters"]) <= _PK_REQUIRED | _PK_OPTIONAL):
        issues.append(("$.pk", what + "a 1-compartment first-order oral PK model with roles CL, V, KA "
                               "(optional TLAG, F)"))
    if pd["model"] != "emax" or "E0" not in pd["parameters"]:
        issues.append(("$.pd.model", what + "a direct Emax model with a baseline E0"))
    if disease is not None and (disease["model"] != "linear" or disease.get("drugEffect") != "pd-offset"):
        issues.append(("$.disease", what + "a linear disease model with drugEffect 'pd-offset'"))
    if {d["route"] for d in doc["dosing"]} != {"oral"}:
        issues.append(("$.dosing", what + "oral doses"))
    fixed = {p["name"] for p in doc["parameters"] if "iiv" not in p}
    tonset = (disease or {}).get("parameters", {}).get("TONSET")
    if tonset is not None and tonset not in fixed:
        issues.append(("$.disease.parameters.TONSET", "TONSET must name a declared parameter without "
                                                      "inter-individual variability"))
    sources = [o["source"] for o in doc["outputs"]]
    for s in set(sources):
        if sources.count(s) > 1:
            issues.append(("$.outputs", f"the daily-regimen engine gives one output per source; {s!r} has "
                                        f"{sources.count(s)}"))
    return issues


def covariate_model_of(section: Mapping[str, Any]) -> CovariateModel:
    """The virtual population of a definition's ``virtualPopulation`` section.

    Examples
    --------
    >>> cm = covariate_model_of({"femaleFraction": 0.5, "siteProbabilities": [1.0],
    ...     "attributes": {k: {"male": 50.0, "female": 40.0, "sd": 0.1}
    ...                    for k in ("weight_kg", "age_y", "egfr", "distance_km")},
    ...     "correlation": np.eye(4).tolist()})
    >>> round(float(np.exp(cm.mean[1, 0])), 6), cm.p_female
    (40.0, 0.5)
    """
    attrs = section["attributes"]
    sd = np.array([attrs[k]["sd"] for k in _LATENT], dtype=float)
    corr = np.asarray(section["correlation"], dtype=float)
    cov = corr * np.outer(sd, sd)
    mean = np.array([[_TO_LATENT[k](attrs[k][sex]) for k in _LATENT] for sex in ("male", "female")])
    sites = np.asarray(section["siteProbabilities"], dtype=float)
    return CovariateModel(p_female=float(section["femaleFraction"]), mean=mean, cov=np.stack([cov, cov]),
                          site_probabilities=sites / sites.sum())


@dataclass(frozen=True, eq=False)
class DailyRegimen:
    """A daily-regimen definition compiled for the engine (build it with :meth:`from_definition`).

    Attributes
    ----------
    definition : inference.model_definition.ModelDefinition
        The validated definition it was compiled from.
    population : PopulationModel
        The definition's population prior (all parameters; random effects those with ``iiv``).
    parameters : tuple of (name, scale, unit)
        The calibrated (random-effect) parameters, in the order of a posterior's mean.
    outputs, output_units, output_sources : output names, their units and model sources
    arms : mapping of arm name to dose (definition's dose unit)
    covariate_model : CovariateModel or None
        Virtual participants' covariate distribution (None: the definition has none).
    horizon_limit_days : int
    """

    definition: Any
    population: PopulationModel
    parameters: tuple
    outputs: tuple
    output_units: Mapping[str, str]
    output_sources: Mapping[str, str]
    output_scale: tuple
    arms: Mapping[str, float]
    covariate_model: CovariateModel | None
    horizon_limit_days: int
    hours_per_unit: float

    @classmethod
    def from_definition(cls, definition) -> "DailyRegimen":
        """Compile a validated ``daily-average`` :class:`~inference.model_definition.ModelDefinition`."""
        doc = definition.document
        if doc.get("pd", {}).get("exposure") != DAILY_AVERAGE:
            raise ValueError(f"{definition.canonical} is not a daily-regimen definition (pd.exposure is not "
                             f"{DAILY_AVERAGE!r})")
        population = definition.population_model()
        scales = {p["name"]: (p["scale"], p.get("unit", "1")) for p in doc["parameters"]}
        params = tuple((name, *scales[name]) for name in population.random_effects)
        vp = doc.get("virtualPopulation")
        return cls(definition=definition, population=population, parameters=params,
                   outputs=definition.output_names, output_units=definition.output_units,
                   output_sources=MappingProxyType({o["name"]: o["source"] for o in doc["outputs"]}),
                   output_scale=definition.output_scale,
                   arms=MappingProxyType({a["name"]: float(a["dose"]) for a in doc.get("arms", ())}),
                   covariate_model=covariate_model_of(vp) if vp is not None else None,
                   horizon_limit_days=int(doc.get("horizonLimitDays", 365)),
                   hours_per_unit=_HOURS[doc["timeUnit"]])

    def __reduce__(self):
        return DailyRegimen.from_definition, (self.definition,)

    # ------------------------------------------------------------------------------- identity

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def version(self) -> str:
        return self.definition.version

    @property
    def canonical(self) -> str:
        return self.definition.canonical

    @property
    def title(self) -> str:
        return self.definition.document.get("title", self.definition.name)

    @property
    def dose_unit(self) -> str:
        return self.definition.dosing[0]["unit"]

    def display(self, output: str) -> str:
        """Human-readable name of an output (its ``display``, else its name)."""
        o = self.definition.outputs[self.definition.output_index(output)]
        return o.get("display", output)

    def output_of(self, source: str) -> str | None:
        """Name of the output taken from ``source`` (``"pk"``, ``"pd"``, ``"disease"``), None if none."""
        return next((name for name, s in self.output_sources.items() if s == source), None)

    def covariate_names(self) -> dict[str, str]:
        """Definition covariate name -> participant attribute, for covariates that declare one."""
        return {c["name"]: c["participantAttribute"] for c in self.definition.covariates if "participantAttribute" in c}

    # ------------------------------------------------------------------------------- parameters

    def _roles(self, section: str) -> Mapping[str, str]:
        return self.definition.document.get(section, {}).get("parameters", {})

    def named(self, phi: np.ndarray) -> dict[str, np.ndarray]:
        """Natural-scale values of every declared and derived parameter (definition units), by name."""
        phi = np.atleast_2d(phi)
        doc = self.definition.document
        out = {p["name"]: (np.exp(phi[:, j]) if p["scale"] == "log" else phi[:, j])
               for j, p in enumerate(doc["parameters"])}
        return with_derived(doc, out)

    def roles(self, values: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Engine values by structural role from natural values by name (PK per hour, disease per day)."""
        hpu = self.hours_per_unit
        pk, pd, dis = self._roles("pk"), self._roles("pd"), self._roles("disease")
        full = lambda x: np.broadcast_to(np.asarray(x, dtype=float), (n,)).copy()  # noqa: E731
        get = lambda roles, role, default: full(values[roles[role]]) if role in roles else full(default)  # noqa: E731
        r = {"cl": get(pk, "CL", 0) / hpu, "v": get(pk, "V", 0), "ka": get(pk, "KA", 0) / hpu,
             "tlag": get(pk, "TLAG", 0.0) * hpu, "f": get(pk, "F", 1.0),
             "emax": get(pd, "EMAX", 0), "ec50": get(pd, "EC50", 1), "e0": get(pd, "E0", 0.0),
             "e0_slope": get(pd, "SLOPE", 0.0) * 24.0 / hpu}
        sign = -1.0 if self.definition.document["pd"].get("direction", "increase") == "decrease" else 1.0
        r["sign"] = sign
        if dis:
            r.update({"base": get(dis, "BASE", 0.0), "slope": get(dis, "SLOPE", 0.0) * 24.0 / hpu,
                      "effscale": get(dis, "EFFSCALE", 1.0)})
            tonset = dis.get("TONSET")
            r["k_onset"] = 24.0 / (get(dis, "TONSET", 0) * hpu) if tonset else full(np.inf)
        return r

    def natural(self, phi: np.ndarray) -> dict[str, np.ndarray]:
        """Engine values by role for rows of log/linear-scale parameters ``phi`` (shape (n, p))."""
        phi = np.atleast_2d(phi)
        return self.roles(self.named(phi), phi.shape[0])

    def covariate_values(self, covariates: Covariates) -> dict[str, np.ndarray]:
        """The definition's covariates (by name) of participants, read from their attributes."""
        attrs = covariates.as_dict()
        return {name: np.asarray(attrs[attr], dtype=float) for name, attr in self.covariate_names().items()}

    def sample_parameters(self, covariates: Covariates, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """Parameters of virtual participants: typical values shifted by covariates, plus IIV, then bounds.

        Random effects are drawn as one ``(q, n)`` block of standard normals in the order the
        definition lists its variable parameters; ``rng=None`` gives typical individuals. Returns
        natural values by parameter name (declared and derived) and engine values by role.
        """
        model = self.population
        n = covariates.n
        phi = np.tile(np.asarray(model.theta, dtype=float), (n, 1))
        values = self.covariate_values(covariates)
        for effect in model.covariate_effects:
            phi[:, model.parameters.index(effect.parameter)] += effect.shift(values[effect.covariate])
        q = model.n_random_effects
        if rng is not None and q:
            eta = rng.standard_normal((q, n))
            omega = np.asarray(model.omega, dtype=float)
            if np.count_nonzero(omega - np.diag(np.diag(omega))) == 0:
                # diagonal: scale each row by its SD (no Cholesky rounding)
                shift = np.sqrt(np.diag(omega))[:, None] * eta
            else:
                shift = np.linalg.cholesky(omega) @ eta
            phi[:, model.random_index] += shift.T
        doc = self.definition.document
        named = {}
        for j, p in enumerate(doc["parameters"]):
            value = np.exp(phi[:, j]) if p["scale"] == "log" else phi[:, j]
            if "bounds" in p:
                low, high = p["bounds"]
                value = np.clip(value, -np.inf if low is None else low, np.inf if high is None else high)
            named[p["name"]] = value
        named = with_derived(doc, named)
        return {"named": named, **self.roles(named, n)}

    # ------------------------------------------------------------------------------- predictions

    def daily_activity(self, p: dict, dose_times_h, doses, n_days: int) -> np.ndarray:
        """Emax activity (0 to 1) of the daily average concentration, shape (n, n_days).

        Doses are binned to the nearest day boundary (the cohort model gives each day's doses at its
        start). The day-by-day propagation of ``DailyOneCompartmentOral`` is a linear time-invariant
        system with poles exp(-24 k) and exp(-24 ka): three of its steps give the impulse response, from
        which the whole history is one second-order ``lfilter`` per participant.
        """
        n = p["cl"].shape[0]
        day = np.clip(np.floor(np.asarray(dose_times_h) / 24.0 + 0.5).astype(np.int64), 0, None)
        amounts = np.broadcast_to(np.asarray(doses, dtype=float), (n, day.shape[0]))
        per_day = np.zeros((n, n_days))
        keep = day < n_days
        np.add.at(per_day.T, day[keep], amounts[:, keep].T)
        pk = DailyOneCompartmentOral(cl=p["cl"], v=p["v"], ka=p["ka"], tlag=p["tlag"], f=p["f"])
        state = pk.start(n)
        g = []
        for impulse in (1.0, 0.0, 0.0):
            state, avg = pk.step(state, np.full(n, impulse))
            g.append(avg.copy())
        cc, dd = np.exp(-24.0 * p["cl"] / p["v"]), np.exp(-24.0 * p["ka"])
        a1, a2 = -(cc + dd), cc * dd
        b = np.stack([g[0], g[1] + a1 * g[0], g[2] + a1 * g[1] + a2 * g[0]], axis=1)
        a = np.stack([np.ones(n), a1, a2], axis=1)
        cavg = np.empty((n, n_days))
        same = np.all(per_day == per_day[:1], axis=None)
        for i in range(n):
            cavg[i] = lfilter(b[i], a[i], per_day[0 if same else i])
        return emax_response(np.maximum(cavg, 0.0), 1.0, p["ec50"][:, None])

    def concentration(self, p: dict, dose_times_h, doses, times_h: np.ndarray, k: int) -> np.ndarray:
        """The PK output ``k`` (its unit), shape (n, T): superposition of the relevant single doses."""
        n = p["cl"].shape[0]
        dose_t = np.asarray(dose_times_h, dtype=float)
        amounts = np.broadcast_to(np.asarray(doses, dtype=float), (n, dose_t.size))
        # doses after the last output time contribute nothing, and one whose slowest decay has run for
        # 16 e-folds before the first output adds < 1e-7 of its peak: superpose the last weeks only
        slowest = float(np.min(np.minimum(p["cl"] / p["v"], p["ka"])))
        elapsed = times_h.min() - dose_t - float(np.max(p["tlag"]))
        relevant = (dose_t < times_h.max()) & (slowest * elapsed < _NEGLIGIBLE_EFOLDS)
        dose_t, amounts = dose_t[relevant], amounts[:, relevant]
        if dose_t.size == 0 or not np.any(amounts):  # nothing taken (placebo): no drug in any row
            return np.zeros((n, times_h.size))
        model = OneCompartment(cl=p["cl"], v=p["v"], ka=p["ka"], tlag=p["tlag"], f=p["f"])
        return self.output_scale[k] * oral_dose_contributions(model, dose_t, amounts, times_h).sum(axis=1)

    def predict_grid(self, phi: np.ndarray, dose_times_h, doses, times: Mapping[int, Any]) -> dict[int, np.ndarray]:
        """Predictions of output ``k`` at ``times[k]`` (hours) for each row of ``phi``: {k: (n, T_k)}.

        ``doses`` has shape (n_doses,) or (n, n_doses) (per-row amounts at shared dose times).
        """
        p = self.natural(phi)
        out: dict[int, np.ndarray] = {}
        sources = {k: self.output_sources[name] for k, name in enumerate(self.outputs)}
        for k in times:
            if sources[k] == "pk":
                out[k] = self.concentration(p, dose_times_h, doses, np.asarray(times[k], dtype=float), k)
        slow = [k for k in times if sources[k] != "pk"]
        if slow:
            days = {k: np.clip(np.floor(np.asarray(times[k], dtype=float) / 24.0).astype(np.int64), 0, None)
                    for k in slow}
            n_days = max(int(d.max()) for d in days.values()) + 1
            activity = self.daily_activity(p, dose_times_h, doses, n_days)
            for k in slow:
                out[k] = self.biomarker(p, activity, sources[k])[:, days[k]]
        return out

    def biomarker(self, p: dict, activity: np.ndarray, source: str) -> np.ndarray:
        """The PD (``"pd"``) or disease (``"disease"``) output from the daily Emax activity, shape (n, n_days)."""
        t = np.arange(activity.shape[1])[None, :]
        if source == "pd":
            return p["e0"][:, None] + p["e0_slope"][:, None] * t + p["sign"] * p["emax"][:, None] * activity
        out = np.empty(activity.shape)
        max_offset = -p["sign"] * p["effscale"] * p["emax"]
        # the onset rate is one number per DiseaseProgression: rows are grouped by it (one group
        # when TONSET is fixed, as in a fit; several when a caller varies it, e.g. sensitivity)
        for k_onset in np.unique(p["k_onset"]):
            rows = p["k_onset"] == k_onset
            disease = DiseaseProgression(baseline=p["base"][rows], slope=p["slope"][rows],
                                         max_offset=max_offset[rows], k_onset=float(k_onset))
            out[rows] = progress(disease, activity[rows])
        return out

    def structural(self, phi: np.ndarray, data: ObservationData) -> np.ndarray:
        """Predictions of the observation rows of ``data`` (``inference.population.Structural``).

        ``data.design["output"]`` is each row's output index; ``data.context`` holds the dosing
        history (``dose_times_h``, ``doses``) shared by every subject of ``data`` (the tiled draws of
        one participant).
        """
        phi = np.atleast_2d(np.asarray(phi, dtype=float))
        output = np.asarray(data.design["output"]).astype(np.int64)
        rows, times, inverse = {}, {}, {}
        for k in np.unique(output):
            rows[k] = output == k
            times[k], inverse[k] = np.unique(data.time[rows[k]], return_inverse=True)
        grid = self.predict_grid(phi, data.context["dose_times_h"], data.context["doses"], times)
        result = np.empty(data.n_rows)
        for k, values in grid.items():
            result[rows[k]] = values[data.subject[rows[k]], inverse[k]]
        return result

    def structural_events(self, phi: np.ndarray, data: ObservationData) -> np.ndarray:
        """Predictions of event rows (doses and observations, as :mod:`inference.model_definition` lays
        them out) in the definition's time unit; dose rows get 0. One subject at a time."""
        phi = np.atleast_2d(np.asarray(phi, dtype=float))
        design = data.design
        hpu = self.hours_per_unit
        result = np.zeros(data.n_rows)
        obs = design["evid"] == 0
        for s in range(data.n_subjects):
            mine = data.subject == s
            dose = mine & (design["evid"] == 1)
            here = np.flatnonzero(mine & obs)
            if here.size == 0:
                continue
            output = design["output"][here].astype(np.int64)
            times = {int(k): hpu * data.time[here[output == k]] for k in np.unique(output)}
            grid = self.predict_grid(phi[s:s + 1], hpu * data.time[dose], design["amt"][dose], times)
            for k, values in grid.items():
                result[here[output == k]] = values[0]
        return result


def with_derived(doc: Mapping[str, Any], named: dict) -> dict:
    """Add a definition's derived parameters (linear combinations, limited to [min, max]) to ``named``."""
    for d in doc.get("derived", ()):
        value = d.get("constant", 0.0) + sum(t["coefficient"] * named[t["parameter"]] for t in d["terms"])
        value = np.clip(value, d.get("min", -np.inf), d.get("max", np.inf))
        named[d["name"]] = value
    return named


def oral_dose_contributions(model, dose_times, amounts, times) -> np.ndarray:
    """Each oral dose's contribution to the central concentration, shape ``(n, n_doses, n_times)``.

    The doses are taken at times shared by all ``n`` participants (``amounts`` may differ per
    participant); summing over axis 1 gives :func:`inference.pk.concentration` of the same doses, value for
    value: every contribution is computed with the same arithmetic as there, but the response
    to a unit dose is evaluated once per participant and *distinct* time since a dose. With doses
    and outputs on a common grid (daily doses, daily outputs) the ``n_doses * n_times`` pairs
    have only about ``n_doses + n_times`` distinct gaps, which is what makes a posterior-predictive
    forecast of hundreds of draws over months of dosing cheap.

    Examples
    --------
    >>> from inference.dosing import DoseRecord
    >>> from inference.pk import concentration
    >>> m = OneCompartment(cl=[5.0, 3.0], v=[50.0, 40.0], ka=[1.0, 1.2], tlag=[0.5, 0.0])
    >>> dose_t, t = np.array([0.0, 24.0, 48.0]), np.array([1.0, 25.0, 30.0, 72.0])
    >>> parts = oral_dose_contributions(m, dose_t, [100.0, 50.0, 100.0], t)
    >>> parts.shape
    (2, 3, 4)
    >>> whole = concentration(m, DoseRecord(times=dose_t, amounts=[100.0, 50.0, 100.0]), t)
    >>> bool(np.allclose(parts.sum(axis=1), whole, rtol=1e-14, atol=0))
    True
    """
    if not isinstance(model, (OneCompartment, TwoCompartment)):
        raise ValueError(f"oral_dose_contributions needs a linear model, got {type(model).__name__}")
    n = model.n
    dose_times = np.asarray(dose_times, dtype=float)
    times = np.asarray(times, dtype=float)
    if dose_times.ndim != 1 or times.ndim != 1:
        raise ValueError("dose_times and times must be 1-D")
    if not (np.all(np.isfinite(dose_times)) and np.all(np.isfinite(times))):
        raise ValueError("dose_times and times must be finite")
    amounts = np.broadcast_to(np.asarray(amounts, dtype=float), (n, dose_times.size))
    if not np.all(np.isfinite(amounts)) or np.any(amounts < 0):
        raise ValueError("amounts must be finite and >= 0")
    since = times[None, :] - dose_times[:, None]
    gaps, where = np.unique(since, return_inverse=True)
    where = where.reshape(since.shape)
    ka, tlag, f = model.ka[:, None], model.tlag[:, None], model.f[:, None]
    tau = np.maximum(gaps[None, :] - tlag, 0.0)
    out = np.zeros((n, dose_times.size, times.size))
    for c, lam in model.disposition():
        unit = _phi(ka, lam[:, None], tau)[:, where]
        out += (f * amounts * ka * c[:, None])[:, :, None] * unit
    return out
