"""NONMEM-format data sets in and out: rows (ID, TIME, DV, AMT, EVID, MDV, CMT, RATE, ADDL, II and
covariate columns) to Patients, ResearchSubjects, MedicationAdministrations and Observations, and back.

A small mapping file says what the compartments and columns mean in FHIR terms::

    {"study": {"id": "theoph", "title": "...", "model": "https://...|1.0.0", "armColumn": "ARM"},
     "timeUnit": "h", "start": "2025-01-06T08:00:00Z",
     "doses": [{"cmt": 1, "medication": {"system": "...", "code": "..."}, "unit": "mg", "route": "oral"}],
     "observations": [{"cmt": 2, "code": {"system": "...", "code": "..."}, "unit": "mg/L"}],
     "covariates": [{"column": "WT", "code": {"system": "http://loinc.org", "code": "29463-7"}, "unit": "kg"}]}

The whole file is checked before anything is built (every bad row reported with its line number),
and each subject becomes one transaction, so nothing is half loaded.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from profiles import CANONICAL_BASE
from terminology.catalog import UCUM

ID_SYSTEM = f"{CANONICAL_BASE}/sid/nonmem-id"
_HOURS = {"h": 1.0, "d": 24.0, "wk": 168.0, "min": 1.0 / 60.0}
STANDARD_COLUMNS = ("ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "ADDL", "II")


class NonmemError(ValueError):
    """The data set or its mapping is wrong; ``problems`` are line-numbered messages."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        super().__init__("; ".join(shown) + (f"; and {more} more" if more > 0 else ""))


@dataclass
class SubjectRows:
    """One subject's events after checking: doses (time, amount, duration, mapping entry) and
    observations (time, value, mapping entry), times in hours from the study start."""

    id: str
    first_line: int
    doses: list = field(default_factory=list)
    observations: list = field(default_factory=list)
    covariates: dict = field(default_factory=dict)
    arm: str | None = None


def check_mapping(mapping: Any) -> list[str]:
    """Problems of a mapping file (empty when usable)."""
    problems = []
    if not isinstance(mapping, dict):
        return ["the mapping is not a JSON object"]
    study = mapping.get("study")
    if not isinstance(study, dict) or not isinstance(study.get("id"), str) \
            or not re.fullmatch(r"[A-Za-z0-9.-]{1,40}", study.get("id", "")):
        problems.append("mapping: study.id must be a FHIR id of at most 40 characters")
    if mapping.get("timeUnit", "h") not in _HOURS:
        problems.append(f"mapping: timeUnit must be one of {', '.join(_HOURS)}")
    try:
        _start(mapping)
    except ValueError as exc:
        problems.append(f"mapping: {exc}")
    for kind, key in (("doses", "medication"), ("observations", "code")):
        entries = mapping.get(kind)
        if not isinstance(entries, list) or (kind == "doses" and not entries):
            problems.append(f"mapping: {kind} must be a list" + (" with at least one entry" if kind == "doses" else ""))
            continue
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get(key), dict) or not {"system", "code"} <= set(e[key]) \
                    or not isinstance(e.get("unit"), str):
                problems.append(f"mapping: {kind}[{i}] needs {key} (system, code) and unit")
            elif len(entries) > 1 and not isinstance(e.get("cmt"), int):
                problems.append(f"mapping: {kind}[{i}] needs its cmt (several {kind} entries)")
            if kind == "doses" and isinstance(e, dict) and e.get("route", "oral") not in ("oral", "iv"):
                problems.append(f"mapping: doses[{i}].route must be oral or iv")
    for i, c in enumerate(mapping.get("covariates") or []):
        if not isinstance(c, dict) or not isinstance(c.get("column"), str) or not isinstance(c.get("code"), dict):
            problems.append(f"mapping: covariates[{i}] needs column and code")
    return problems


def _start(mapping: dict) -> datetime:
    text = mapping.get("start", "2025-01-06T08:00:00Z")
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"start {text!r} is not an ISO dateTime") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _number(raw: str | None) -> float | None:
    """A NONMEM field: '.' or empty is missing."""
    if raw is None:
        return None
    text = raw.strip()
    if text in ("", "."):
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


def _pick(entries: list[dict], cmt: float | None, what: str) -> dict:
    if cmt is None:
        if len(entries) == 1:
            return entries[0]
        raise ValueError(f"CMT is missing and the mapping has {len(entries)} {what} entries")
    for e in entries:
        if e.get("cmt") == int(cmt) or (len(entries) == 1 and "cmt" not in e):
            return e
    raise ValueError(f"CMT {int(cmt)} is not a {what} compartment of the mapping "
                     f"({', '.join(str(e.get('cmt')) for e in entries) or 'none'})")


def parse(text: str, mapping: dict) -> list[SubjectRows]:
    """Check a whole NONMEM data set and return its subjects; any problem raises :class:`NonmemError`.

    Lines starting with ``#`` or ``C`` followed by a space (NONMEM's IGNORE=#/C) are skipped.
    """
    problems = check_mapping(mapping)
    if problems:
        raise NonmemError(problems)
    lines = text.splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, start=1)
                if line.strip() and not line.startswith("#") and not line.startswith("C ")]
    if not numbered:
        raise NonmemError(["the file has no header and no rows"])
    header_line, header = numbered[0]
    columns = [c.strip().upper() for c in next(csv.reader([header]))]
    for required in ("ID", "TIME"):
        if required not in columns:
            problems.append(f"line {header_line}: the header has no {required} column")
    if "DV" not in columns and "AMT" not in columns:
        problems.append(f"line {header_line}: the header has neither DV nor AMT")
    cov_columns = [c["column"].upper() for c in mapping.get("covariates") or []]
    for c in cov_columns:
        if c not in columns:
            problems.append(f"line {header_line}: covariate column {c} of the mapping is missing")
    arm_column = (mapping["study"].get("armColumn") or "").upper() or None
    if arm_column and arm_column not in columns:
        problems.append(f"line {header_line}: arm column {arm_column} is missing")
    if problems:
        raise NonmemError(problems)
    unit = _HOURS[mapping.get("timeUnit", "h")]
    subjects: list[SubjectRows] = []
    seen: dict[str, int] = {}
    last_time = None
    for n, line in numbered[1:]:
        values = next(csv.reader([line]))
        if len(values) != len(columns):
            problems.append(f"line {n}: {len(values)} fields, the header has {len(columns)}")
            continue
        row = dict(zip(columns, values))
        sid = row["ID"].strip()
        if sid in ("", "."):
            problems.append(f"line {n}: missing ID")
            continue
        try:
            sid = _id_text(sid)
            time = _number(row["TIME"])
            amt = _number(row.get("AMT"))
            dv = _number(row.get("DV"))
            evid = _number(row.get("EVID"))
            mdv = _number(row.get("MDV"))
            cmt = _number(row.get("CMT"))
            rate = _number(row.get("RATE"))
            addl = _number(row.get("ADDL"))
            ii = _number(row.get("II"))
        except ValueError as exc:
            problems.append(f"line {n}: not a number: {exc}")
            continue
        if time is None or time < 0:
            problems.append(f"line {n}: TIME must be a number >= 0")
            continue
        if not subjects or subjects[-1].id != sid:
            if sid in seen:
                problems.append(f"line {n}: ID {sid} appears again after other subjects (first block at line "
                                f"{seen[sid]}); sort the file by ID")
                continue
            seen[sid] = n
            subjects.append(SubjectRows(sid, n))
            last_time = None
        subject = subjects[-1]
        if last_time is not None and time < last_time:
            problems.append(f"line {n}: TIME {time:g} goes back in time for ID {sid} (previous {last_time:g})")
        last_time = time
        if evid is None:
            evid = 1.0 if (amt or 0) > 0 else 0.0
        if evid not in (0, 1, 2):
            problems.append(f"line {n}: EVID {evid:g} (reset events) is not supported; use 0, 1 or 2")
            continue
        for c in cov_columns:
            try:
                value = _number(row.get(c))
            except ValueError:
                value = None
            if value is None:
                problems.append(f"line {n}: covariate {c} is missing or not a number")
            elif c not in subject.covariates:
                subject.covariates[c] = value
        if arm_column and row.get(arm_column, "").strip() not in ("", "."):
            subject.arm = row[arm_column].strip()
        hours = time * unit
        if evid == 1:
            if amt is None or amt <= 0:
                problems.append(f"line {n}: EVID=1 (dose) but AMT is {'missing' if amt is None else f'{amt:g}'}")
                continue
            if mdv is not None and mdv != 1:
                problems.append(f"line {n}: EVID=1 (dose) with MDV={mdv:g}; a dose row has MDV=1")
                continue
            try:
                entry = _pick(mapping["doses"], cmt, "dose")
            except ValueError as exc:
                problems.append(f"line {n}: {exc}")
                continue
            duration = 0.0
            if rate is not None and rate != 0:
                if rate < 0:
                    problems.append(f"line {n}: RATE {rate:g} (modelled rate or duration) is not supported")
                    continue
                if entry.get("route", "oral") == "oral":
                    problems.append(f"line {n}: RATE on an oral dose (CMT {cmt:g}); infusions go to an iv compartment"
                                    if cmt is not None else f"line {n}: RATE on an oral dose")
                    continue
                duration = amt / rate * unit
            n_more = int(addl or 0)
            if addl is not None and (addl < 0 or addl != int(addl)):
                problems.append(f"line {n}: ADDL must be a whole number >= 0")
                continue
            if n_more and not (ii and ii > 0):
                problems.append(f"line {n}: ADDL={n_more} needs II > 0")
                continue
            for k in range(n_more + 1):
                subject.doses.append((hours + k * (ii or 0) * unit, amt, duration, entry, n))
        elif evid == 0:
            if amt is not None and amt != 0:
                problems.append(f"line {n}: EVID=0 (observation) but AMT={amt:g}; a dose row has EVID=1")
                continue
            if mdv == 1:
                continue  # a missing observation
            if dv is None:
                problems.append(f"line {n}: observation row (EVID=0, MDV=0) without a DV")
                continue
            try:
                entry = _pick(mapping["observations"], cmt, "observation")
            except ValueError as exc:
                problems.append(f"line {n}: {exc}")
                continue
            subject.observations.append((hours, dv, entry, n))
    if problems:
        raise NonmemError(problems)
    if not subjects:
        raise NonmemError([f"line {header_line}: the file has a header but no rows"])
    return subjects


def _id_text(raw: str) -> str:
    value = float(raw) if re.fullmatch(r"[0-9.eE+-]+", raw) else None
    text = str(int(value)) if value is not None and value == int(value) else raw
    if not re.fullmatch(r"[A-Za-z0-9.-]{1,20}", text):
        raise ValueError(f"ID {raw!r} (letters, digits, '.', '-', at most 20)")
    return text


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds" if t.microsecond else "seconds") \
        .replace("+00:00", "Z")


def _quantity(value: float, unit: str) -> dict:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def study_resource(mapping: dict, arms: Iterable[str]) -> dict:
    """The ResearchStudy of the data set (with its twin-model extension when the mapping names one)."""
    from fhir_ops.mapping.model_definition import with_study_model

    study = mapping["study"]
    resource = {"resourceType": "ResearchStudy", "id": study["id"], "status": "active",
                "title": study.get("title", study["id"])}
    arm_list = sorted(set(arms))
    if arm_list:
        resource["arm"] = [{"name": a} for a in arm_list]
    if study.get("model"):
        resource = with_study_model(resource, study["model"])
    return resource


def subject_bundle(subject: SubjectRows, mapping: dict) -> dict:
    """One subject's Patient, ResearchSubject, MedicationAdministrations and Observations as a transaction."""
    study_id = mapping["study"]["id"]
    start = _start(mapping)
    pid = f"{study_id}-{subject.id}"[:64]
    ref = f"Patient/{pid}"
    resources = [
        {"resourceType": "Patient", "id": pid, "identifier": [{"system": f"{ID_SYSTEM}/{study_id}", "value": subject.id}]},
        {"resourceType": "ResearchSubject", "id": pid, "status": "on-study",
         "study": {"reference": f"ResearchStudy/{study_id}"}, "individual": {"reference": ref},
         **({"assignedArm": subject.arm} if subject.arm else {})},
    ]
    at = lambda hours: start + timedelta(hours=hours)  # noqa: E731
    for k, (hours, amt, duration, entry, _line) in enumerate(sorted(subject.doses, key=lambda d: d[0])):
        ma = {"resourceType": "MedicationAdministration", "id": f"{pid}-dose-{k + 1}", "status": "completed",
              "medicationCodeableConcept": {"coding": [dict(entry["medication"])]},
              "subject": {"reference": ref},
              "dosage": {"dose": _quantity(amt, entry["unit"])}}
        if duration > 0:
            ma["effectivePeriod"] = {"start": _iso(at(hours)), "end": _iso(at(hours + duration))}
        else:
            ma["effectiveDateTime"] = _iso(at(hours))
        resources.append(ma)
    for k, (hours, dv, entry, _line) in enumerate(subject.observations):
        resources.append({"resourceType": "Observation", "id": f"{pid}-obs-{k + 1}", "status": "final",
                          "code": {"coding": [dict(entry["code"])]}, "subject": {"reference": ref},
                          "effectiveDateTime": _iso(at(hours)), "valueQuantity": _quantity(dv, entry["unit"])})
    first = min([d[0] for d in subject.doses] + [o[0] for o in subject.observations])
    for c in mapping.get("covariates") or []:
        value = subject.covariates.get(c["column"].upper())
        if value is None:
            continue
        resources.append({"resourceType": "Observation", "id": f"{pid}-cov-{c['column'].lower()}", "status": "final",
                          "code": {"coding": [dict(c["code"])]}, "subject": {"reference": ref},
                          "effectiveDateTime": _iso(at(first)), "valueQuantity": _quantity(value, c.get("unit", "1"))})
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                      for r in resources]}


# ------------------------------------------------------------------------------------------ export

def export(store, mapping: dict) -> str:
    """The study of ``mapping`` as a NONMEM data set (CSV text): one row per dose and observation.

    Doses come out one per row (ADDL expanded), times in the mapping's unit from its start.
    """
    from fhir_ops.errors import NotFound
    from fhir_ops.mapping.model_definition import study_participants

    problems = check_mapping(mapping)
    if problems:
        raise NonmemError(problems)
    study_id = mapping["study"]["id"]
    store.read("ResearchStudy", study_id)  # NotFound when absent
    start = _start(mapping)
    unit = _HOURS[mapping.get("timeUnit", "h")]
    covs = mapping.get("covariates") or []
    arm_column = mapping["study"].get("armColumn")
    columns = ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE"] + [c["column"].upper() for c in covs] \
        + ([arm_column.upper()] if arm_column else [])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)

    def hours_of(text: str) -> float:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
        return (t - start).total_seconds() / 3600.0

    def coded(concept, entry_code):
        return any(c.get("system") == entry_code["system"] and c.get("code") == entry_code["code"]
                   for c in (concept or {}).get("coding", []))

    def fmt(x: float) -> str:
        return f"{round(x, 6):g}" if abs(x) < 1e15 else repr(x)

    rows_all = []
    for research_subject, pid in study_participants(store, study_id):
        try:
            patient = store.read("Patient", pid)
        except NotFound:
            continue
        sid = next((i.get("value") for i in patient.get("identifier", [])
                    if i.get("system") == f"{ID_SYSTEM}/{study_id}"), pid)
        rows = []
        cov_values = {}
        for ma in store.search_all("MedicationAdministration", [("subject", f"Patient/{pid}")]):
            entry = next((e for e in mapping["doses"] if coded(ma.get("medicationCodeableConcept"), e["medication"])), None)
            if entry is None or ma.get("status") not in (None, "completed"):
                continue
            from fhir_ops.mapping.model_definition import ucum_factor

            dose = ma["dosage"]["dose"]
            amt = float(dose["value"]) * ucum_factor(dose.get("code") or dose.get("unit"), entry["unit"])
            if "effectivePeriod" in ma:
                t0, t1 = hours_of(ma["effectivePeriod"]["start"]), hours_of(ma["effectivePeriod"]["end"])
                rate = amt / ((t1 - t0) / unit) if t1 > t0 else 0.0
            else:
                t0, rate = hours_of(ma["effectiveDateTime"]), 0.0
            rows.append((t0 / unit, 0, [fmt(t0 / unit), ".", fmt(amt), "1", "1", str(entry.get("cmt", 1)),
                                        fmt(rate)]))
        for obs in store.search_all("Observation", [("subject", f"Patient/{pid}")]):
            q = obs.get("valueQuantity")
            if q is None or obs.get("status") not in ("final", "amended", "corrected"):
                continue
            from fhir_ops.mapping.model_definition import ucum_factor

            entry = next((e for e in mapping["observations"] if coded(obs.get("code"), e["code"])), None)
            if entry is not None:
                value = float(q["value"]) * ucum_factor(q.get("code") or q.get("unit"), entry["unit"])
                t = hours_of(obs["effectiveDateTime"]) / unit
                rows.append((t, 1, [fmt(t), fmt(value), "0", "0", "0", str(entry.get("cmt", 2)), "0"]))
                continue
            cov = next((c for c in covs if coded(obs.get("code"), c["code"])), None)
            if cov is not None:
                cov_values[cov["column"].upper()] = float(q["value"]) * ucum_factor(q.get("code") or q.get("unit"),
                                                                                    cov.get("unit", "1"))
        extra = [fmt(cov_values[c["column"].upper()]) if c["column"].upper() in cov_values else "." for c in covs]
        if arm_column:
            extra.append(research_subject.get("assignedArm", "."))
        for t, order, cells in sorted(rows, key=lambda r: (r[0], r[1])):
            rows_all.append((sid, [sid] + cells + extra))
    # subjects in ID order (numeric IDs numerically), each subject's rows in time order (stable sort)
    for _sid, cells in sorted(rows_all, key=lambda r: _id_key(r[0])):
        writer.writerow(cells)
    return out.getvalue()


def _id_key(sid: str):
    return (0, int(sid)) if sid.isdigit() else (1, sid)


def subject_records(subjects: list[SubjectRows], mapping: dict, model) -> list:
    """The parsed subjects as a compiled model's :class:`inference.model_definition.SubjectRecord`
    (in-process, without a FHIR store): doses and observations matched to the definition by code,
    converted to its units; covariates by the definition's ``nonmemColumn`` (default: its name)."""
    from fhir_ops.mapping.model_definition import ucum_factor
    from inference import model_definition as md

    per_hour = 1.0 / {"h": 1.0, "d": 24.0, "wk": 168.0}[model.time_unit]

    def match(code: dict, entries, key):
        for e in entries:
            codes = [e[key]] if key == "medication" else e["observation"]["codes"]
            if any(c["system"] == code["system"] and c["code"] == code["code"] for c in codes):
                return e
        return None

    records = []
    for s in subjects:
        doses = []
        for hours, amt, duration, entry, line in s.doses:
            target = match(entry["medication"], model.dosing, "medication")
            if target is None:
                raise NonmemError([f"line {line}: the model doses no {entry['medication']['code']}"])
            doses.append(md.Dose(hours * per_hour, amt * ucum_factor(entry["unit"], target["unit"]),
                                 duration * per_hour, target["route"]))
        observations = []
        for hours, dv, entry, line in s.observations:
            target = match(entry["code"], model.outputs, "observation")
            if target is None:
                continue  # an observation the model does not use
            observations.append((hours * per_hour, target["name"], dv * ucum_factor(entry["unit"], target["unit"])))
        covariates = {}
        for c in model.covariates:
            column = c.get("nonmemColumn", c["name"]).upper()
            if column in s.covariates:
                covariates[c["name"]] = s.covariates[column]
        records.append(md.SubjectRecord(s.id, tuple(doses), tuple(observations), covariates))
    return records
