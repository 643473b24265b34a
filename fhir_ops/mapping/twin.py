"""Twin state, forecasts and cohort results <-> FHIR: the twin-state Basic, simulated-forecast
Observations and the output parameters of ``$simulate`` / ``$calibrate``. All FHIR shapes of twins live here.

The engine (``inference.twin``) sees plain arrays: hours since the participant's first dose and
values in the model's units; this module decides codes, units, references and profiles. Which
observations are which output, covariate and dose comes from the study's model definition
(a compiled :class:`inference.regimen.DailyRegimen`), matched by code against the participant mapping.
"""
from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from fhir_ops.errors import Unprocessable
from fhir_ops.mapping.model_definition import ucum_factor
from fhir_ops.mapping.participant import MEASUREMENTS, SIMULATED_TAG, ParticipantRecord, versioned
from inference import twin
from inference.calibration import Posterior
from inference.population import PopulationModel
from inference.regimen import DailyRegimen
from terminology.catalog import CANONICAL, TRIALTWIN_CS, UCUM

TWIN_OUTPUT_CS = f"{CANONICAL}/CodeSystem/twin-output"
TWIN_STATE_PROFILE = f"{CANONICAL}/StructureDefinition/twin-state"
SIMULATED_FORECAST_PROFILE = f"{CANONICAL}/StructureDefinition/simulated-forecast"
EXT_MODEL = f"{CANONICAL}/StructureDefinition/twin-model"
EXT_PARAMETER = f"{CANONICAL}/StructureDefinition/twin-parameter"
EXT_COVARIANCE = f"{CANONICAL}/StructureDefinition/twin-covariance"
EXT_CALIBRATED_ON = f"{CANONICAL}/StructureDefinition/twin-calibrated-on"
EXT_DATA_WINDOW = f"{CANONICAL}/StructureDefinition/twin-data-window"
EXT_DIAGNOSTIC = f"{CANONICAL}/StructureDefinition/twin-diagnostic"
EXT_INTERVAL_LEVEL = f"{CANONICAL}/StructureDefinition/interval-level"
#: R4 Observation.derivedFrom cannot point at a Basic, so the forecast names its twin state here
EXT_TWIN_STATE_REFERENCE = f"{CANONICAL}/StructureDefinition/twin-state-reference"
#: engine participant attribute -> the participant mapping's covariate key
_ATTRIBUTE_KEYS = {"weight_kg": "weight", "egfr": "egfr", "age_y": "age", "sex_female": "female",
                   "distance_km": "travel_km"}


def model_version(model: DailyRegimen) -> str:
    """The canonical ``url|version`` of the twin model's definition, as ``$simulate`` and ``$calibrate``
    report it (``modelVersion``), whichever engine runs it."""
    return model.canonical


def model_label(model: DailyRegimen) -> str:
    """``name version`` of the twin model, for human-readable displays (the model Device's name)."""
    return f"{model.name} {model.version}"


def model_description(model: DailyRegimen) -> str:
    """What the model Device says about the twin model: the definition's title and canonical URL."""
    return f"{model.title} ({model.canonical}); MAP + Laplace calibration"


def _series_name(model: DailyRegimen, output: str) -> str:
    """The participant mapping's series of a model output: the measurement whose code the definition lists,
    else the output's own series (``output:<name>``, read with :func:`output_codes`)."""
    codes = {(c["system"], c["code"]) for c in model.definition.outputs[model.outputs.index(output)]["observation"]["codes"]}
    known = next((name for name, (system, code, _) in MEASUREMENTS.items() if (system, code) in codes), None)
    return known or f"output:{output}"


def output_codes(model: DailyRegimen) -> list[tuple[str, str, str, str]]:
    """The codes of the model's outputs that the participant mapping does not know, as its ``extra_codes``
    (series ``output:<name>``, in the output's observation unit): any study's assay is read."""
    extra = []
    for o in model.definition.outputs:
        series = _series_name(model, o["name"])
        if series.startswith("output:"):
            extra += [(series, c["system"], c["code"], o["observation"]["unit"]) for c in o["observation"]["codes"]]
    return extra


def _covariate_key(model: DailyRegimen, covariate: dict) -> str | None:
    """The participant mapping's covariate key of a definition covariate (by attribute, else by code)."""
    attribute = covariate.get("participantAttribute")
    if attribute:
        return _ATTRIBUTE_KEYS[attribute]
    codes = {(c["system"], c["code"]) for c in (covariate.get("observation") or {}).get("codes", [])}
    return next((name for name, (system, code, _) in MEASUREMENTS.items() if (system, code) in codes), None)


def participant_covariates(record: ParticipantRecord, model: DailyRegimen) -> dict[str, float]:
    """The definition's continuous covariates of a participant (its declared default for a missing one)."""
    out = {}
    for c in model.definition.covariates:
        if c["type"] != "continuous":
            continue
        key = _covariate_key(model, c)
        value = record.covariates.get(key) if key else None
        if value is None:
            value = c.get("default")
        if value is None:
            raise Unprocessable(f"Patient/{record.patient_id} has no {c['name']} on record and {model.canonical} "
                                "gives no default", error_id="participant-without-data")
        out[c["name"]] = float(value)
    return out


def fhir_instant(when: datetime) -> str:
    """A UTC dateTime with seconds, ``Z`` suffix."""
    return when.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def reference(resource: dict) -> str:
    """Versioned reference ``Type/id/_history/n`` of a stored resource."""
    return versioned(resource)


# ------------------------------------------------------------------------- participant -> engine

def dose_factor(model: DailyRegimen) -> float:
    """From the participant mapping's dose amounts (mg) to the model's dose unit."""
    return ucum_factor("mg", model.dose_unit)


def participant_data(record: ParticipantRecord, model: DailyRegimen) -> twin.ParticipantData:
    """The participant's dosing and outcome observations as ``inference.twin.ParticipantData``.

    Raises
    ------
    Unprocessable
        422 ``participant-without-data`` when there is no value of any of the model's outputs.
    """
    outputs, times, values = [], [], []
    for k, name in enumerate(model.outputs):
        series = record.series.get(_series_name(model, name))
        if series is None:
            continue
        factor = ucum_factor(series.unit, model.output_units[name])
        outputs += [k] * len(series.values)
        times += list(series.times_h)
        values += [factor * v for v in series.values]
    if not values:
        names = ", ".join(f"{model.display(o)} ({o})" for o in model.outputs)
        raise Unprocessable(
            f"Patient/{record.patient_id} has no observations of the outputs of {model_version(model)}: {names}; "
            "there is nothing to calibrate a twin on", error_id="participant-without-data")
    return twin.ParticipantData(
        dose_times_h=record.dose_times_h, doses=dose_factor(model) * record.dose_amounts_mg, obs_output=outputs,
        obs_times_h=times, obs_values=values, covariates=participant_covariates(record, model),
        subject_id=record.patient_id)


def output_sources(record: ParticipantRecord, model: DailyRegimen) -> list[str]:
    """Versioned references of the observations of the model's outputs."""
    return [ref for name in model.outputs for ref in record.series_sources.get(_series_name(model, name), ())]


def calibration_inputs(record: ParticipantRecord, model: DailyRegimen) -> list[str]:
    """Versioned references of exactly what the twin is calibrated on.

    The Patient and ResearchSubject (covariates, arm), the MedicationAdministrations (dosing
    history) and the Observations of the outcomes and of the covariates the model reads; other
    data (home heart rate, visits) do not change the twin and so do not force a re-calibration.
    """
    refs = [r for r in record.sources if r.startswith(("Patient/", "ResearchSubject/"))]
    refs += [ref for _, _, ref in record.dose_records]
    refs += output_sources(record, model)
    keys = {_covariate_key(model, c) for c in model.definition.covariates}
    refs += [ref for key, ref in record.covariate_sources.items() if key in keys]
    return list(dict.fromkeys(refs))


def forecast_start(record: ParticipantRecord) -> tuple[float, datetime]:
    """Start of a forecast: the first dosing-day boundary after the participant's last data.

    Returns hours since the first dose and the corresponding instant.
    """
    last = record.last_data_time or record.origin
    last_h = max(record.hours(last), 0.0)
    start_h = 24.0 * (np.floor(last_h / 24.0) + 1.0)
    return float(start_h), record.origin + timedelta(hours=float(start_h))


def current_dose(record: ParticipantRecord, model: DailyRegimen) -> float:
    """The participant's current dose per administration in the model's dose unit (the last one taken;
    0 for none or placebo)."""
    if record.dose_amounts_mg.size == 0:
        return 0.0
    return float(record.dose_amounts_mg[-1]) * dose_factor(model)


# ------------------------------------------------------------------------------------ twin state

def twin_state_id(patient_id: str) -> str:
    """Id of a participant's twin-state Basic (one per participant, versioned by re-calibration)."""
    candidate = f"twin-{patient_id}"
    if len(candidate) <= 64:
        return candidate
    return "twin-" + hashlib.sha256(patient_id.encode()).hexdigest()[:40]


def _ext(holder: dict, url: str) -> list[dict]:
    return [e for e in holder.get("extension", []) if e.get("url") == url]


def _sub(ext: dict, url: str):
    for e in ext.get("extension", []):
        if e.get("url") == url:
            return next((v for k, v in e.items() if k.startswith("value")), None)
    return None


@dataclass(frozen=True)
class StoredTwin:
    """What a stored twin-state resource says, read back into plain values."""

    resource: dict
    model: str
    names: tuple[str, ...]
    mean: np.ndarray
    cov: np.ndarray
    inputs: tuple[str, ...]
    converged: bool

    @property
    def ref(self) -> str:
        return versioned(self.resource)


def read_twin_state(resource: dict) -> StoredTwin:
    """Parse a twin-state Basic (profile ``twin-state``) into a :class:`StoredTwin`."""
    params = _ext(resource, EXT_PARAMETER)
    names = tuple(_sub(p, "name") for p in params)
    mean = np.array([float(_sub(p, "mean")) for p in params])
    cov_ext = _ext(resource, EXT_COVARIANCE)
    if cov_ext:
        dim = int(_sub(cov_ext[0], "dimension"))
        values = [float(e["valueDecimal"]) for e in cov_ext[0]["extension"] if e.get("url") == "value"]
        cov = np.array(values).reshape(dim, dim)
    else:
        cov = np.diag([float(_sub(p, "sd") or 0.0) ** 2 for p in params])
    model = _ext(resource, EXT_MODEL)[0]["valueReference"]["reference"]
    inputs = tuple(e["valueReference"]["reference"] for e in _ext(resource, EXT_CALIBRATED_ON))
    converged = True
    for d in _ext(resource, EXT_DIAGNOSTIC):
        if _sub(d, "name") == "converged":
            converged = bool(_sub(d, "value"))
    return StoredTwin(resource=resource, model=model, names=names, mean=mean, cov=cov, inputs=inputs,
                      converged=converged)


def posterior_of(stored: StoredTwin, data: twin.ParticipantData, model: DailyRegimen,
                 prior: PopulationModel | None = None) -> Posterior:
    """The stored posterior, rebuilt around the participant's data for forecasting."""
    if stored.names != tuple(name for name, _, _ in model.parameters):
        raise Unprocessable(f"{stored.ref} holds parameters {stored.names}, not those of {model_version(model)}",
                            error_id="twin-state-mismatch")
    return twin.posterior_from_state(model, data, stored.mean, stored.cov, prior=prior, converged=stored.converged)


def _decimal(value: float) -> float:
    # 12 significant digits: the covariance round-trips closely enough to stay positive definite
    return float(f"{float(value):.12g}")


def build_twin_state(record: ParticipantRecord, posterior: Posterior, device: dict, inputs: list[str],
                     now: datetime, model: DailyRegimen, existing: dict | None = None) -> dict:
    """A twin-state Basic for ``posterior`` (a new resource, or the next version of ``existing``).

    Parameters
    ----------
    record : ParticipantRecord
    posterior : inference.calibration.Posterior
        MAP and Laplace covariance of the parameters (log scale for log-normal ones).
    device : dict
        The stored model Device.
    inputs : list of str
        Versioned references calibrated on (:func:`calibration_inputs`).
    now : datetime
    model : DailyRegimen
    existing : dict, optional
        The current stored version; its id and ``meta.versionId`` are kept for the update.
    """
    diag = twin.diagnostics(model, posterior)
    params = []
    for (name, scale, unit), mean, sd in zip(model.parameters, posterior.mean, posterior.sd):
        params.append({"url": EXT_PARAMETER, "extension": [
            {"url": "name", "valueCode": name}, {"url": "mean", "valueDecimal": _decimal(mean)},
            {"url": "sd", "valueDecimal": _decimal(sd)}, {"url": "scale", "valueCode": scale},
            {"url": "unit", "valueString": unit}]})
    q = posterior.cov.shape[0]
    covariance = {"url": EXT_COVARIANCE, "extension": [{"url": "dimension", "valuePositiveInt": q}] + [
        {"url": "value", "valueDecimal": _decimal(v)} for v in posterior.cov.ravel()]}
    times = [record.origin + timedelta(hours=float(t)) for t in posterior.data.time]
    window = {"start": fhir_instant(min(times + [record.origin])),
              "end": fhir_instant(max(times + [record.last_data_time or record.origin]))}
    diagnostics = [
        {"url": EXT_DIAGNOSTIC, "extension": [{"url": "name", "valueCode": "minus2LL"},
                                              {"url": "value", "valueDecimal": _decimal(diag["minus2LL"])}]},
        {"url": EXT_DIAGNOSTIC, "extension": [{"url": "name", "valueCode": "n-observations"},
                                              {"url": "value", "valueInteger": int(diag["nObservations"])}]},
        {"url": EXT_DIAGNOSTIC, "extension": [{"url": "name", "valueCode": "converged"},
                                              {"url": "value", "valueBoolean": bool(diag["converged"])}]},
        {"url": EXT_DIAGNOSTIC, "extension": [{"url": "name", "valueCode": "method"},
                                              {"url": "value", "valueString": posterior.method}]},
    ]
    resource = {
        "resourceType": "Basic",
        "id": existing["id"] if existing else twin_state_id(record.patient_id),
        "meta": {"profile": [TWIN_STATE_PROFILE]},
        "extension": [{"url": EXT_MODEL, "valueReference": {"reference": versioned(device),
                                                             "display": model_label(model)}}]
        + params + [covariance]
        + [{"url": EXT_CALIBRATED_ON, "valueReference": {"reference": ref}} for ref in inputs]
        + [{"url": EXT_DATA_WINDOW, "valuePeriod": window}] + diagnostics,
        "code": {"coding": [{"system": TRIALTWIN_CS, "code": "twin-state", "display": "Digital twin state"}],
                 "text": "Digital twin state"},
        "subject": {"reference": f"Patient/{record.patient_id}"},
        "created": now.astimezone(timezone.utc).date().isoformat(),
    }
    return resource


# ----------------------------------------------------------------------------------- forecasts

def forecast_times(horizon_days: int, step_hours: int) -> np.ndarray:
    """Output times (hours since the forecast start): every ``step_hours`` through the horizon."""
    return np.arange(0.0, 24.0 * horizon_days + 1e-9, float(step_hours))


def _quantity(value: float, unit: str) -> dict:
    return {"value": round(float(value), 4), "unit": unit, "system": UCUM, "code": unit}


def _output_code(name: str, model: DailyRegimen) -> dict:
    display = model.display(name)
    first = model.definition.outputs[model.outputs.index(name)]["observation"]["codes"][0]
    return {"coding": [{"system": first["system"], "code": first["code"], "display": display},
                       {"system": TWIN_OUTPUT_CS, "code": name}],
            "text": f"{display} (twin forecast)"}


def forecast_rows(fc: twin.TwinForecast, start: datetime, model: DailyRegimen):
    """(output, time, day, median, low, high, unit) for every output and time of a forecast."""
    for name in fc.median:
        unit = model.output_units[name]
        for i, t in enumerate(fc.times_h):
            yield (name, start + timedelta(hours=float(t)), float(t) / 24.0, float(fc.median[name][i]),
                   float(fc.low[name][i]), float(fc.high[name][i]), unit)


def forecast_parameters(fc: twin.TwinForecast, start: datetime, model: DailyRegimen) -> list[dict]:
    """The ``forecast`` output parameter of ``$simulate`` (one entry per output and time)."""
    return [{"output": name, "time": fhir_instant(when), "day": round(day, 6), "median": round(med, 6),
             "low": round(low, 6), "high": round(high, 6), "unit": unit, "display": model.display(name)}
            for name, when, day, med, low, high, unit in forecast_rows(fc, start, model)]


def observed_parameters(record: ParticipantRecord, outputs, model: DailyRegimen) -> list[dict]:
    """The ``observed`` output parameter: the outcome observations the twin was calibrated on."""
    rows = []
    for name in outputs:
        series = record.series.get(_series_name(model, name))
        if series is None:
            continue
        factor = ucum_factor(series.unit, model.output_units[name])
        for t, v in zip(series.times_h, series.values):
            rows.append({"output": name, "time": fhir_instant(record.origin + timedelta(hours=float(t))),
                         "value": round(float(factor * v), 6)})
    return rows


def summary_parameters(fc: twin.TwinForecast, model: DailyRegimen) -> list[dict]:
    """Scalar summaries of a forecast: start and end medians and their change, mean of the PK output."""
    rows = []
    pk_output = model.output_of("pk")
    for name, median in fc.median.items():
        unit = model.output_units[name]
        rows.append({"name": f"{name}-end-median", "value": round(float(median[-1]), 6), "unit": unit})
        rows.append({"name": f"{name}-change-median", "value": round(float(median[-1] - median[0]), 6),
                     "unit": unit})
        rows.append({"name": f"{name}-end-interval-width", "value": round(float(fc.high[name][-1] - fc.low[name][-1]), 6),
                     "unit": unit})
        if name == pk_output:
            rows.append({"name": f"{name}-mean-median", "value": round(float(np.mean(median)), 6),
                         "unit": unit})
    rows.append({"name": "interval-level", "value": fc.level})
    rows.append({"name": "samples", "value": fc.samples})
    return rows


def forecast_observations(record: ParticipantRecord, fc: twin.TwinForecast, start: datetime, device: dict,
                          state_ref: str, now: datetime, model: DailyRegimen) -> list[dict]:
    """One simulated-forecast Observation per output and time (ids assigned here, version 1)."""
    issued = fhir_instant(now)
    out = []
    for name, when, _, median, low, high, unit in forecast_rows(fc, start, model):
        out.append({
            "resourceType": "Observation",
            "id": str(uuid.uuid4()),
            "meta": {"profile": [SIMULATED_FORECAST_PROFILE], "tag": [dict(SIMULATED_TAG)]},
            "extension": [{"url": EXT_TWIN_STATE_REFERENCE, "valueReference": {"reference": state_ref}}],
            "status": "preliminary",
            "category": [{"coding": [{"system": TRIALTWIN_CS, "code": "simulated-forecast",
                                      "display": "Simulated forecast"}]}],
            "code": _output_code(name, model),
            "subject": {"reference": f"Patient/{record.patient_id}"},
            "effectiveDateTime": fhir_instant(when),
            "issued": issued,
            "valueQuantity": _quantity(median, unit),
            "method": {"coding": [{"system": TRIALTWIN_CS, "code": "twin-simulation", "display": "Twin simulation"}],
                       "text": f"posterior-predictive median of {fc.samples} samples, seed {fc.seed}"},
            "device": {"reference": versioned(device), "display": model_label(model)},
            "component": [{
                "extension": [{"url": EXT_INTERVAL_LEVEL, "valueDecimal": fc.level}],
                "code": {"coding": [{"system": TRIALTWIN_CS, "code": "prediction-interval",
                                     "display": "Prediction interval"}],
                         "text": f"{round(100 * fc.level)}% prediction interval"},
                "valueRange": {"low": _quantity(low, unit), "high": _quantity(high, unit)},
            }],
        })
    return out


def parameter_parameters(posterior: Posterior, model: DailyRegimen, level: float = 0.9) -> list[dict]:
    """The ``parameter`` output of ``$calibrate``: natural-scale posterior mean and interval per parameter."""
    low, high = posterior.interval(level)
    variance = np.diag(posterior.cov)
    rows = []
    for (name, scale, _), m, var, lo, hi in zip(model.parameters, posterior.mean, variance, low, high):
        if scale == "log":
            # the mean of a log-normal posterior, and the interval transformed back
            rows.append({"name": name, "mean": float(np.exp(m + var / 2)), "low": float(np.exp(lo)),
                         "high": float(np.exp(hi))})
        else:
            rows.append({"name": name, "mean": float(m), "low": float(lo), "high": float(hi)})
    return rows


# --------------------------------------------------------------------------------- cohorts

_DOSE_IN_NAME = re.compile(r"(\d+(?:\.\d+)?)\s*mg\b", re.IGNORECASE)


def arm_dose(arm: str) -> float | None:
    """Once-daily dose (mg) an arm's name or description states (``"50 mg"`` -> 50, ``"placebo"`` -> 0),
    None if it states none. The fallback for arms the model definition does not list.

    Examples
    --------
    >>> arm_dose("100 mg"), arm_dose("Placebo"), arm_dose("standard of care")
    (100.0, 0.0, None)
    """
    if "placebo" in arm.lower():
        return 0.0
    match = _DOSE_IN_NAME.search(arm)
    return float(match.group(1)) if match else None


ARM_CHARACTERISTIC = "study-arm"
STUDY_CHARACTERISTIC = "research-study"


def group_study(group: dict) -> str | None:
    """The ResearchStudy reference a Group names: a characteristic coded ``research-study`` (or with text
    ``study``) whose value is a Reference."""
    for ch in group.get("characteristic", []):
        code = ch.get("code", {})
        coded = any(c.get("code") == STUDY_CHARACTERISTIC for c in code.get("coding", []))
        if coded or (code.get("text") or "").strip().lower() in ("study", "research study", STUDY_CHARACTERISTIC):
            ref = (ch.get("valueReference") or {}).get("reference")
            if ref:
                return ref
    return None


def group_arm(group: dict) -> str | None:
    """The arm a Group is restricted to: a characteristic coded ``study-arm`` (or with text ``arm``)."""
    for ch in group.get("characteristic", []):
        code = ch.get("code", {})
        coded = any(c.get("code") == ARM_CHARACTERISTIC for c in code.get("coding", []))
        if coded or (code.get("text") or "").strip().lower() in ("arm", "study arm", ARM_CHARACTERISTIC):
            value = ch.get("valueCodeableConcept", {})
            text = value.get("text") or next((c.get("code") for c in value.get("coding", [])), None)
            if text:
                return text
    return None


def arm_summary_parameters(result: twin.PopulationResult, model: DailyRegimen) -> list[dict]:
    """The ``armSummary`` output: per arm, output and summary day, quantiles across participants."""
    rows = []
    for a, arm in enumerate(result.arms):
        if result.participants[a] == 0:
            continue
        for name in model.outputs:
            for i, day in enumerate(result.days):
                rows.append({"arm": arm, "participants": result.participants[a], "output": name,
                             "day": float(day), "median": round(float(result.median[a][name][i]), 6),
                             "low": round(float(result.low[a][name][i]), 6),
                             "high": round(float(result.high[a][name][i]), 6),
                             "unit": model.output_units[name], "display": model.display(name)})
    return rows


def member_parameters(result: twin.PopulationResult, subjects: list[str | None], model: DailyRegimen) -> list[dict]:
    """The ``member`` output: each member's end-of-horizon value per output."""
    rows = []
    for i, arm_index in enumerate(result.member_arm):
        if np.isnan(result.member_end[model.outputs[0]][i]):
            continue  # not simulated (the run was stopped)
        for name in model.outputs:
            row = {"index": i, "arm": result.arms[arm_index], "output": name,
                   "value": round(float(result.member_end[name][i]), 6)}
            if subjects[i]:
                row["subject"] = {"reference": subjects[i]}
            rows.append(row)
    return rows


def member_covariates(records: list[ParticipantRecord], model: DailyRegimen):
    """``inference.covariates.Covariates`` of actual members.

    A member's missing attribute takes the definition covariate's value for it (its default), else
    the median of the other members, else the median of the definition's virtual population; with
    none of these the simulation is refused (422).
    """
    from inference.covariates import Covariates

    sites = sorted({r.site for r in records if r.site})
    n_sites = model.covariate_model.site_probabilities.size if model.covariate_model is not None else len(sites)
    index = {s: min(i, max(n_sites - 1, 0)) for i, s in enumerate(sites)}
    defaults = {c["participantAttribute"]: c.get("default") for c in model.definition.covariates
                if "participantAttribute" in c}
    vp = model.definition.document.get("virtualPopulation", {}).get("attributes", {})
    columns = {}
    for attribute, key in _ATTRIBUTE_KEYS.items():
        known = [float(r.covariates[key]) for r in records if r.covariates.get(key) is not None]
        fallback = defaults.get(attribute)
        if fallback is None and known:
            fallback = float(np.median(known))
        if fallback is None and attribute in vp:
            fallback = vp[attribute]["male"]
        if fallback is None:
            fallback = 0.0 if attribute == "sex_female" else None
        if fallback is None:
            raise Unprocessable(f"no member has a value of {key} and {model.canonical} gives none: the cohort "
                                "simulation needs it", error_id="participant-without-data")
        columns[attribute] = [float(r.covariates[key]) if r.covariates.get(key) is not None else float(fallback)
                              for r in records]
    columns["sex_female"] = [int(v) for v in columns["sex_female"]]
    return Covariates(**columns, site=[index.get(r.site, 0) for r in records])


__all__ = ["participant_data", "calibration_inputs", "forecast_start", "current_dose", "twin_state_id",
           "read_twin_state", "posterior_of", "build_twin_state", "forecast_times", "forecast_parameters",
           "observed_parameters", "summary_parameters", "forecast_observations", "parameter_parameters",
           "arm_dose", "group_arm", "group_study", "arm_summary_parameters", "member_parameters", "member_covariates",
           "model_version", "model_label", "model_description", "output_codes", "participant_covariates", "output_sources", "dose_factor",
           "StoredTwin", "TWIN_STATE_PROFILE", "SIMULATED_FORECAST_PROFILE"]
