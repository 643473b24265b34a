"""What ``$simulate`` and ``$calibrate`` share: the study's twin model (its definition and prior), the
model Device, the participant's twin (stored or freshly calibrated), range checks that name the
parameter, and the one-transaction write with Provenance.

Every twin is the twin of a study's model definition. A definition of the daily-regimen family
(``pd.exposure: daily-average``) runs on the fast engine with stored, versioned twin states; any other
definition on the generic event engine (``inference.model_definition``). A participant whose study
references no definition has no twin: a 422 OperationOutcome says how to give it one.
"""
from __future__ import annotations

import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any
from datetime import datetime, timezone

from fhir_ops.errors import Gone, InvalidRequest, NotFound, Unprocessable
from fhir_ops.mapping import twin as twin_fhir
from fhir_ops.mapping.model_device import ensure_model_device
from fhir_ops.mapping.participant import ParticipantRecord, load_participant, versioned
from fhir_ops.mapping.provenance import build_provenance, requesting_agent
from fhir_ops.store.bundle import put_entry
from inference import twin
from inference.calibration import Posterior
from inference.population import PopulationModel
from inference.regimen import DailyRegimen

# one conditional create per store, not one per call: the warm $simulate path stays a few reads
_DEVICES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_DEVICE_LOCK = threading.Lock()


def model_device(store, model: DailyRegimen) -> dict:
    """The stored Device of a twin model (created once per store and model; cached per store object)."""
    devices = _DEVICES.get(store)
    device = devices.get(model.canonical) if devices is not None else None
    if device is None:
        with _DEVICE_LOCK:
            devices = _DEVICES.setdefault(store, {})
            device = devices.get(model.canonical)
            if device is None:
                device = ensure_model_device(store, model.name, model.version,
                                             description=twin_fhir.model_description(model))
                devices[model.canonical] = device
    return device


def number(params: dict, name: str, default, low, high, why: str = "") -> float:
    """A numeric parameter with its default, refused (400, naming it) outside ``[low, high]``."""
    value = params.get(name, default)
    if value is None:
        return None
    if not low <= value <= high:
        raise InvalidRequest(f"Parameter '{name}' must lie between {low} and {high}{why}; got {value}",
                             error_id="parameter-out-of-range", expression=[f"Parameters.parameter.where(name='{name}')"])
    return value


def horizon(params: dict, limit_days: int, model_name: str) -> int:
    """``horizonDays`` (default 28), refused beyond the model's validated limit."""
    value = params.get("horizonDays", 28)
    if value > limit_days:
        raise InvalidRequest(
            f"Parameter 'horizonDays' is {value} days, beyond the limit of the twin model {model_name} "
            f"({limit_days} days: it is not validated for longer forecasts)",
            error_id="horizon-beyond-model-limit", expression=["Parameters.parameter.where(name='horizonDays')"])
    return int(number(params, "horizonDays", 28, 1, limit_days))


@dataclass
class StudyModel:
    """A study's twin model: the study, its definition Library, the compiled definition, and the prior
    of its twins (the study's population estimate, referenced by ``estimate``, else the definition's)."""

    study: dict
    library: dict
    definition: Any
    prior: PopulationModel
    estimate: str | None

    @property
    def regimen(self) -> DailyRegimen | None:
        return self.definition.regimen

    @property
    def inputs(self) -> list[str]:
        """Versioned references of the model and its prior (inputs of every twin of the study)."""
        return [versioned_reference(self.library)] + ([self.estimate] if self.estimate else [])


def study_model_of(store, study: dict) -> StudyModel:
    """The twin model a ResearchStudy references; 422 ``study-without-model`` when it references none."""
    from fhir_ops.mapping import model_definition as fm

    library, definition = fm.study_model(store, study)
    prior, estimate = population_prior(store, study, definition)
    return StudyModel(study, library, definition, prior, estimate)


def daily_regimen(sm: StudyModel, operation: str) -> DailyRegimen:
    """The study's daily-regimen model, for operations that read twin parameters by structural role
    (CL, F, EMAX, EC50); 422 ``model-not-daily-regimen`` for any other definition."""
    if sm.regimen is None:
        raise Unprocessable(f"{operation}: the model of ResearchStudy/{sm.study.get('id')}, {sm.definition.canonical}, "
                            "is not a daily-regimen definition (pd.exposure 'daily-average' with a 1-compartment oral "
                            "PK model and a direct Emax model); this operation reads the twins' clearance, "
                            "bioavailability, Emax and EC50 from such a model only",
                            error_id="model-not-daily-regimen")
    return sm.regimen


def role_parameter(model: DailyRegimen, section: str, role: str) -> str | None:
    """Name of the definition parameter that plays ``role`` in ``section`` (``pk``, ``pd``), None if none."""
    value = model.definition.document.get(section, {}).get("parameters", {}).get(role)
    return value if isinstance(value, str) else None


def participant_model(store, patient_id: str) -> StudyModel:
    """The twin model of a participant's study (404 for an unknown Patient; 422 when there is none)."""
    store.read("Patient", patient_id)
    study = study_of_patient(store, patient_id)
    if study is None:
        raise Unprocessable(f"Patient/{patient_id} is not a participant of any ResearchStudy (no ResearchSubject), "
                            "so no twin model applies; enrol them in a study that references a model definition",
                            error_id="participant-without-study")
    return study_model_of(store, study)


@dataclass
class ParticipantTwin:
    """A participant's data and twin: the posterior, whether it came from the stored state, inputs read."""

    model: DailyRegimen
    study_model: StudyModel
    record: ParticipantRecord
    data: twin.ParticipantData
    inputs: list[str]
    device: dict
    existing: dict | None
    latest_version: int
    stored: twin_fhir.StoredTwin | None
    posterior: Posterior
    reused: bool

    @property
    def new_observations(self) -> int:
        """Outcome observations (exact versions) not among those the stored state was calibrated on."""
        known = set(self.stored.inputs) if self.stored else set()
        return sum(ref not in known for ref in twin_fhir.output_sources(self.record, self.model))


def read_state(store, patient_id: str) -> tuple[dict | None, int]:
    """The participant's stored twin-state Basic (or None) and its latest version number (0 if never
    written; a deleted state keeps counting, so the next write is the version after the deletion)."""
    state_id = twin_fhir.twin_state_id(patient_id)
    try:
        current = store.read("Basic", state_id)
        return current, int(current["meta"]["versionId"])
    except NotFound:
        return None, 0
    except Gone:
        latest = store.history("Basic", state_id, count=1)
        return None, int(latest[0]["meta"]["versionId"]) if latest else 0


def participant_twin(store, patient_id: str, sm: StudyModel, *, force: bool = False) -> ParticipantTwin:
    """Load the participant and give their twin under the study's daily-regimen model: the stored
    posterior when it was calibrated on exactly the data, model and prior there are now, otherwise a
    fresh calibration (not yet stored)."""
    model = sm.regimen
    record = load_participant(store, patient_id, twin_fhir.output_codes(model))
    data = twin_fhir.participant_data(record, model)
    inputs = sm.inputs + twin_fhir.calibration_inputs(record, model)
    device = model_device(store, model)
    existing, latest_version = read_state(store, patient_id)
    stored = twin_fhir.read_twin_state(existing) if existing else None
    reuse = (not force and stored is not None and stored.model == versioned(device)
             and set(stored.inputs) == set(inputs))
    if reuse:
        posterior = twin_fhir.posterior_of(stored, data, model, sm.prior)
    else:
        try:
            posterior = twin.calibrate_participant(model, data, sm.prior)
        except ValueError as exc:  # e.g. no observed value after all
            raise InvalidRequest(f"Patient/{patient_id} cannot be calibrated: {exc}",
                                 error_id="participant-without-data", code="processing", status=422) from None
    return ParticipantTwin(model=model, study_model=sm, record=record, data=data, inputs=inputs, device=device,
                           existing=existing, latest_version=latest_version, stored=stored, posterior=posterior,
                           reused=reuse)


_PARTICIPANT_LOCKS: "weakref.WeakValueDictionary[str, threading.Lock]" = weakref.WeakValueDictionary()
_LOCKS_LOCK = threading.Lock()


class _Lock:
    """A lock object that can be weakly referenced (``threading.Lock`` cannot)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def participant_lock(patient_id: str) -> _Lock:
    """One lock per participant and process: read, calibrate and write of a twin state happen as one step.

    If-Match already refuses a write over a version that changed meanwhile; this lock keeps two
    first calibrations of the same participant from both creating version 1 (the second would
    overwrite the first while its Provenance named the wrong version).
    """
    with _LOCKS_LOCK:
        lock = _PARTICIPANT_LOCKS.get(patient_id)
        if lock is None:
            lock = _Lock()
            _PARTICIPANT_LOCKS[patient_id] = lock
        return lock


def state_entry(pt: ParticipantTwin, now: datetime) -> tuple[dict, str]:
    """The transaction entry writing a new twin-state version, and that version's reference."""
    state = twin_fhir.build_twin_state(pt.record, pt.posterior, pt.device, pt.inputs, now, pt.model, pt.existing)
    if pt.existing:
        current = pt.existing["meta"]["versionId"]
        return put_entry(state, if_match=f'W/"{current}"'), f"Basic/{state['id']}/_history/{int(current) + 1}"
    # first write, or the first after the state was deleted (the participant lock keeps this race-free)
    return put_entry(state), f"Basic/{state['id']}/_history/{pt.latest_version + 1}"


def commit(store, entries: list[dict], targets: list[str], inputs: list[str], device: dict, headers: dict,
           activity: str, agent_default=None, now: datetime | None = None,
           extra_entities: list[dict] | None = None) -> str:
    """Write ``entries`` and their Provenance in one transaction; return the Provenance reference.

    ``extra_entities`` are added to ``Provenance.entity`` as they are (e.g. the Consent versions that
    took participants out of the computation, with the reason in ``what.display``).
    """
    provenance = build_provenance(targets, inputs, device, requesting_agent(headers, agent_default), activity,
                                  recorded=now)
    provenance["entity"] += list(extra_entities or [])
    provenance["id"] = str(uuid.uuid4())
    store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries + [put_entry(provenance)]})
    return f"Provenance/{provenance['id']}/_history/1"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ------------------------------------------------------------------ twins of a model definition

@dataclass
class DefinedTwin:
    """A participant's twin under their study's model definition (the generic path).

    ``estimate`` is the versioned reference of the population estimate used as the prior (None:
    the definition's own typical values and variability).
    """

    patient_id: str
    study: dict
    model: Any
    estimate: str | None
    population: Any
    record: Any
    origin: datetime
    inputs: list
    posterior: Any


def study_of_patient(store, patient_id: str) -> dict | None:
    """The ResearchStudy the participant is enrolled in (the first ResearchSubject's), if any."""
    from fhir_ops.errors import NotFound

    for subject in store.search_all("ResearchSubject", [("individual", f"Patient/{patient_id}")]):
        ref = (subject.get("study") or {}).get("reference", "")
        if ref.startswith("ResearchStudy/"):
            try:
                return store.read("ResearchStudy", ref.partition("/")[2])
            except NotFound:
                continue
    return None


def population_prior(store, study: dict, model) -> tuple[Any, str | None]:
    """The prior of a study's twins: its current population estimate when it has one, else the definition's."""
    import base64
    import json

    from fhir_ops.mapping import model_definition as fm
    from inference import fit_report

    ref = fm.study_estimate_reference(study)
    if not ref:
        return model.population_model(), None
    kind, rid, _, version = (ref.split("/") + [None, None])[:4]
    library = store.vread(kind, rid, version) if version else store.read(kind, rid)
    doc = next(json.loads(base64.b64decode(c["data"])) for c in library["content"]
               if c.get("contentType") == "application/json")
    if doc.get("model") != model.canonical:
        raise Unprocessable(f"ResearchStudy/{study.get('id')}: its population estimate {ref} was fitted with "
                            f"{doc.get('model')}, not the study's model {model.canonical}; refit with $fit-population",
                            error_id="estimate-model-mismatch")
    try:
        return fit_report.apply_estimate(model.population_model(), doc), ref
    except ValueError as exc:
        raise Unprocessable(f"{ref}: {exc}", error_id="estimate-model-mismatch") from None


def defined_twin(store, patient_id: str, sm: StudyModel) -> DefinedTwin:
    """The participant's twin under their study's (generic, event-based) model definition, calibrated now."""
    from fhir_ops.mapping import model_definition as fm
    from inference import model_definition as md

    model = sm.definition
    record, origin, inputs = fm.subject_record(store, patient_id, model)
    try:
        posterior = md.calibrate_subject(model, sm.prior, record)
    except ValueError as exc:
        raise Unprocessable(f"Patient/{patient_id} cannot be calibrated with {model.canonical}: {exc}",
                            error_id="participant-without-data") from None
    inputs = [versioned_reference(sm.library), versioned_reference(sm.study)] + inputs + \
        ([sm.estimate] if sm.estimate else [])
    return DefinedTwin(patient_id, sm.study, model, sm.estimate, sm.prior, record, origin, inputs, posterior)


def versioned_reference(resource: dict) -> str:
    version = (resource.get("meta") or {}).get("versionId")
    ref = f"{resource['resourceType']}/{resource['id']}"
    return f"{ref}/_history/{version}" if version else ref
