"""Twin model definitions and population estimates as FHIR ``Library`` resources, and a study's data
read through its definition (doses, outputs and covariates by code, in the definition's units).

Why ``Library``: R4 has no resource for a pharmacometric model; ``Library`` is the conformance
resource built to carry a versioned, canonical, computable artifact as an attachment (``type``
``model-definition`` is in its code system), it is read by ``url`` and ``version`` like every
canonical resource, and HAPI and cloud FHIR servers store and search it without extensions.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from typing import Any

from fhir_ops.errors import InvalidRequest, NotFound, Unprocessable
from inference import model_definition as md
from profiles import CANONICAL_BASE

DEFINITION_PROFILE = f"{CANONICAL_BASE}/StructureDefinition/twin-model-definition"
ESTIMATE_PROFILE = f"{CANONICAL_BASE}/StructureDefinition/population-estimate"
STUDY_MODEL_EXTENSION = f"{CANONICAL_BASE}/StructureDefinition/study-twin-model"
ESTIMATE_USED_EXTENSION = f"{CANONICAL_BASE}/StructureDefinition/population-estimate-used"
LIBRARY_TYPE = "http://terminology.hl7.org/CodeSystem/library-type"
JSON_TYPE = "application/json"
HOURS_PER_UNIT = {"h": 1.0, "d": 24.0, "wk": 168.0}  # hours in one unit of a definition's timeUnit
_HOURS = HOURS_PER_UNIT


def ucum_factor(from_unit: str, to_unit: str) -> float:
    """Multiplicative factor between two UCUM units (``ValueError`` when not commensurable)."""
    from terminology.ucum import UcumError, conversion

    try:
        pre, factor, post = conversion(from_unit, to_unit)
    except UcumError as exc:
        raise ValueError(str(exc)) from None
    if pre or post:
        raise ValueError(f"{from_unit!r} -> {to_unit!r} is not a ratio conversion")
    return float(factor)


def definition_issues_error(error: md.DefinitionError, where: str = "the model definition") -> Unprocessable:
    """One 422 whose OperationOutcome has one issue per problem, each naming its path."""
    first, *rest = error.issues
    prefix = "" if where == "the model definition" else f"{where}: "
    return Unprocessable(f"{prefix}{first.path}: {first.message}", error_id="invalid-model-definition",
                         code="invalid", expression=[first.path],
                         extra_issues=[{"severity": "error", "code": "invalid", "diagnostics": f"{i.path}: {i.message}",
                                        "expression": [i.path]} for i in rest])


def compile_definition(raw: Any, where: str = "the model definition") -> md.ModelDefinition:
    """Validate and compile a definition document; problems become a 422 OperationOutcome."""
    try:
        return md.load_definition(raw, ucum_factor)
    except md.DefinitionError as exc:
        raise definition_issues_error(exc, where) from None


def library_id(model: md.ModelDefinition) -> str:
    """The resource id of a definition's Library: last URL segment and version (a version is immutable)."""
    tail = model.url.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9.-]", "-", f"{tail}-{model.version}")[:64]


def definition_library(model: md.ModelDefinition, status: str = "active") -> dict:
    """The twin-model-definition Library of a compiled definition."""
    doc = model.to_json()
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")
    library = {
        "resourceType": "Library", "id": library_id(model), "meta": {"profile": [DEFINITION_PROFILE]},
        "url": model.url, "version": model.version, "name": re.sub(r"[^A-Za-z0-9_]", "_", model.name),
        "status": status,
        "type": {"coding": [{"system": LIBRARY_TYPE, "code": "model-definition"}]},
        "content": [{"contentType": JSON_TYPE, "data": base64.b64encode(data).decode("ascii"),
                     "title": f"TrialTwin model definition format {md.FORMAT_VERSION}"}],
    }
    if doc.get("title"):
        library["title"] = doc["title"]
    if doc.get("description"):
        library["description"] = doc["description"]
    return library


def is_definition_library(resource: dict) -> bool:
    """Whether a resource claims to be a twin model definition (profile or Library.type)."""
    if resource.get("resourceType") != "Library":
        return False
    if DEFINITION_PROFILE in (resource.get("meta") or {}).get("profile", []):
        return True
    return any(c.get("code") == "model-definition" and c.get("system") == LIBRARY_TYPE
               for c in (resource.get("type") or {}).get("coding", []))


def _json_attachment(library: dict, what: str) -> Any:
    for i, att in enumerate(library.get("content") or []):
        if att.get("contentType", "").split(";")[0].strip() == JSON_TYPE:
            try:
                return json.loads(base64.b64decode(att.get("data", ""), validate=True))
            except (ValueError, json.JSONDecodeError) as exc:
                raise Unprocessable(f"{what}: content[{i}].data is not base64-encoded JSON ({exc})",
                                    error_id="invalid-model-definition", expression=[f"Library.content[{i}].data"])
    raise Unprocessable(f"{what} has no application/json content", error_id="invalid-model-definition",
                        expression=["Library.content"])


#: compiled definitions by their content (a JSON schema check and compile cost milliseconds, and every twin
#: operation reads its study's definition); the compiled model is immutable, so sharing it is safe
_COMPILED: "OrderedDict[tuple, md.ModelDefinition]" = OrderedDict()
_COMPILED_MAX = 32
_COMPILED_LOCK = threading.Lock()


def _compiled(library: dict, what: str) -> md.ModelDefinition:
    datas = tuple(att.get("data", "") for att in library.get("content") or []
                  if att.get("contentType", "").split(";")[0].strip() == JSON_TYPE)
    key = (hashlib.sha256("\n".join(datas).encode("utf-8")).hexdigest(),) if datas else None
    with _COMPILED_LOCK:
        model = _COMPILED.get(key) if key else None
        if model is not None:
            _COMPILED.move_to_end(key)
            return model
    model = compile_definition(_json_attachment(library, what), f"the model definition in {what}")
    if key:
        with _COMPILED_LOCK:
            _COMPILED[key] = model
            while len(_COMPILED) > _COMPILED_MAX:
                _COMPILED.popitem(last=False)
    return model


def definition_of_library(library: dict) -> md.ModelDefinition:
    """Compile the definition a Library carries; its url and version must be the document's."""
    what = f"Library/{library.get('id', '?')}"
    model = _compiled(library, what)
    if library.get("url") != model.url or library.get("version") != model.version:
        raise Unprocessable(f"{what}: url|version {library.get('url')}|{library.get('version')} differ from the "
                            f"definition's {model.canonical}", error_id="invalid-model-definition",
                            expression=["Library.url", "Library.version"])
    return model


def check_library(resource: dict) -> None:
    """Refuse (422) a twin-model-definition Library whose content does not validate; others pass."""
    if is_definition_library(resource):
        definition_of_library(resource)


def split_canonical(canonical: str) -> tuple[str, str | None]:
    url, _, version = canonical.partition("|")
    return url, (version or None)


def find_library(store, canonical: str) -> dict:
    """The Library of a canonical URL (``url|version``; without a version the highest one)."""
    url, version = split_canonical(canonical)
    params = [("url", url)] + ([("version", version)] if version else [])
    found = store.search_all("Library", params)
    if not found:
        raise NotFound(f"no Library with canonical {canonical!r} is stored", error_id="model-definition-not-found")

    def key(lib):
        return tuple(int(p) if p.isdigit() else 0 for p in str(lib.get("version", "0")).split("."))

    return max(found, key=key)


def study_model_canonical(study: dict) -> str | None:
    for ext in study.get("extension") or []:
        if ext.get("url") == STUDY_MODEL_EXTENSION:
            return ext.get("valueCanonical")
    return None


def study_model(store, study: dict) -> tuple[dict, md.ModelDefinition]:
    """The Library and compiled definition a ResearchStudy references; 422 when it has none."""
    canonical = study_model_canonical(study)
    if not canonical:
        raise Unprocessable(f"ResearchStudy/{study.get('id')} references no twin model definition (extension "
                            f"{STUDY_MODEL_EXTENSION}); publish one with 'trialtwin model publish FILE --study "
                            f"{study.get('id')}'", error_id="study-without-model")
    try:
        library = find_library(store, canonical)
    except NotFound as exc:
        raise Unprocessable(f"ResearchStudy/{study.get('id')} references {canonical}, but {exc.message}",
                            error_id="study-model-missing") from None
    return library, definition_of_library(library)


def with_study_model(study: dict, canonical: str) -> dict:
    """A copy of ``study`` whose twin-model extension is ``canonical``."""
    out = dict(study)
    others = [e for e in study.get("extension") or [] if e.get("url") != STUDY_MODEL_EXTENSION]
    out["extension"] = others + [{"url": STUDY_MODEL_EXTENSION, "valueCanonical": canonical}]
    return out


def study_estimate_reference(study: dict) -> str | None:
    for ext in study.get("extension") or []:
        if ext.get("url") == ESTIMATE_USED_EXTENSION:
            return (ext.get("valueReference") or {}).get("reference")
    return None


def with_study_estimate(study: dict, reference: str) -> dict:
    out = dict(study)
    others = [e for e in study.get("extension") or [] if e.get("url") != ESTIMATE_USED_EXTENSION]
    out["extension"] = others + [{"url": ESTIMATE_USED_EXTENSION, "valueReference": {"reference": reference}}]
    return out


# ----------------------------------------------------------------------------- study data by definition

def _parse_time(value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        raise Unprocessable(f"unreadable dateTime {value!r}", error_id="invalid-date") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _codes(mapping: dict) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in mapping["codes"]}


def _coded(concept: dict | None, wanted: set[tuple[str, str]]) -> bool:
    return any((c.get("system"), c.get("code")) in wanted for c in (concept or {}).get("coding", []))


def _dose_of(ma: dict, model: md.ModelDefinition) -> tuple[datetime, md.Dose] | None:
    concept = ma.get("medicationCodeableConcept")
    for entry in model.dosing:
        med = entry["medication"]
        if not _coded(concept, {(med["system"], med["code"])}):
            continue
        if ma.get("status") not in (None, "completed", "in-progress"):
            return None
        dose = (ma.get("dosage") or {}).get("dose") or {}
        if "value" not in dose:
            raise Unprocessable(f"MedicationAdministration/{ma.get('id')} has no dosage.dose value",
                                error_id="dose-without-amount")
        try:
            amount = float(dose["value"]) * ucum_factor(dose.get("code") or dose.get("unit") or "", entry["unit"])
        except ValueError as exc:
            raise Unprocessable(f"MedicationAdministration/{ma.get('id')}: dose unit does not convert to "
                                f"{entry['unit']}: {exc}", error_id="dose-unit") from None
        if ma.get("effectivePeriod"):
            start = _parse_time(ma["effectivePeriod"]["start"])
            end = _parse_time(ma["effectivePeriod"].get("end", ma["effectivePeriod"]["start"]))
        else:
            start = end = _parse_time(ma.get("effectiveDateTime", ""))
        hours = (end - start).total_seconds() / 3600.0
        return start, md.Dose(0.0, amount, hours, entry["route"])  # time filled in once the origin is known
    return None


def subject_record(store, patient_id: str, model: md.ModelDefinition, *, origin: datetime | None = None,
                   until: datetime | None = None) -> tuple[md.SubjectRecord, datetime, list[str]]:
    """One participant's doses, observations and covariates read through ``model``'s mapping.

    Times are in the definition's time unit from ``origin`` (default: the first dose, else the
    first observation). With ``until``, only what happened up to then is read (the search itself is
    narrowed, so a long record costs nothing beyond it). Returns the record, the origin and the
    versioned references read (for Provenance).
    """
    subject = f"Patient/{patient_id}"
    read: list[str] = []
    doses = []
    cut = [] if until is None else [until.isoformat()]
    for ma in store.search_all("MedicationAdministration", [("subject", subject)]
                               + [("effective-time", f"le{c}") for c in cut]):
        got = _dose_of(ma, model)
        if got is not None:
            doses.append(got)
            read.append(_versioned(ma))
    observations, covariates = [], {}
    outputs = [(o["name"], _codes(o["observation"]), o["observation"]["unit"], o["unit"]) for o in model.outputs]
    cov_maps = [(c, _codes(c["observation"])) for c in model.covariates if "observation" in c]
    for obs in store.search_all("Observation", [("subject", subject)] + [("date", f"le{c}") for c in cut]):
        if obs.get("status") not in ("final", "amended", "corrected", "preliminary"):
            continue
        if any(t.get("code") == "simulated" for t in (obs.get("meta") or {}).get("tag", [])):
            continue
        when = obs.get("effectiveDateTime") or (obs.get("effectivePeriod") or {}).get("start")
        q = obs.get("valueQuantity")
        for name, codes, _unit, out_unit in outputs:
            if _coded(obs.get("code"), codes) and q is not None and when:
                observations.append((_parse_time(when), name, _value_in(q, out_unit, obs)))
                read.append(_versioned(obs))
        for cov, codes in cov_maps:
            if _coded(obs.get("code"), codes) and when:
                if cov["type"] == "categorical":
                    value = ((obs.get("valueCodeableConcept") or {}).get("coding") or [{}])[0].get("code")
                    if value is None:
                        value = obs.get("valueString")
                else:
                    if q is None:
                        continue
                    value = _value_in(q, cov.get("unit") or cov["observation"]["unit"], obs)
                covariates.setdefault(cov["name"], []).append((_parse_time(when), value))
                read.append(_versioned(obs))
    if origin is None:
        firsts = [t for t, _ in doses] or [t for t, _, _ in observations]
        if not firsts:
            raise Unprocessable(f"{subject} has no doses or observations that the model maps",
                                error_id="participant-without-data")
        origin = min(firsts)
    scale = 3600.0 * _HOURS[model.time_unit]
    rel = lambda t: (t - origin).total_seconds() / scale  # noqa: E731
    dose_list = tuple(md.Dose(rel(t), d.amount, d.duration / _HOURS[model.time_unit], d.route)
                      for t, d in sorted(doses, key=lambda x: x[0]))
    obs_list = tuple((rel(t), name, v) for t, name, v in sorted(observations, key=lambda x: x[0]))
    # baseline covariate: the value nearest before (else after) the origin
    baseline = {}
    for name, values in covariates.items():
        before = [x for x in values if x[0] <= origin]
        baseline[name] = (max(before, key=lambda x: x[0]) if before else min(values, key=lambda x: x[0]))[1]
    record = md.SubjectRecord(patient_id, dose_list, obs_list, baseline)
    return record, origin, read


def _value_in(q: dict, unit: str, obs: dict) -> float:
    code = q.get("code") or q.get("unit") or ""
    try:
        return float(q["value"]) * ucum_factor(code, unit)
    except (KeyError, ValueError, TypeError) as exc:
        raise Unprocessable(f"Observation/{obs.get('id')}: value {q.get('value')} {code!r} does not convert to "
                            f"{unit!r}: {exc}", error_id="observation-unit") from None


def _versioned(resource: dict) -> str:
    version = (resource.get("meta") or {}).get("versionId")
    ref = f"{resource['resourceType']}/{resource['id']}"
    return f"{ref}/_history/{version}" if version else ref


def study_participants(store, study_id: str) -> list[tuple[dict, str]]:
    """(ResearchSubject, patient id) of a study's participants, in id order."""
    subjects = store.search_all("ResearchSubject", [("study", f"ResearchStudy/{study_id}")])
    out = []
    for s in sorted(subjects, key=lambda s: s.get("id", "")):
        pid = (s.get("individual") or {}).get("reference", "").partition("/")[2]
        if pid:
            out.append((s, pid))
    return out


def hours_to_datetime(origin: datetime, time: float, time_unit: str) -> str:
    """ISO dateTime ``time`` (definition units) after ``origin``."""
    t = origin + timedelta(hours=time * _HOURS[time_unit])
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def reject_non_definition(raw: Any) -> None:
    if not isinstance(raw, dict):
        raise InvalidRequest("a model definition is a JSON object", error_id="invalid-model-definition")
