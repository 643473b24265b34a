"""OMOP CDM v5.4 tables (a directory of CSV files, or a SQLite database) to FHIR R4: person,
observation_period, visit_occurrence, condition_occurrence, drug_exposure, measurement, observation and
death.

Every row becomes one resource with an id derived from its table and primary key, so a load run
twice writes the same resources. Concept ids become OMOP codings (``https://fhir-terminology.ohdsi.org``)
plus, where the shipped ConceptMap ``omop-to-standard`` has them, LOINC / SNOMED CT / RxNorm / UCUM codes;
the concept ids it does not reach are counted in an ``UnmappedConcepts`` report. A death row is the
person's ``Patient.deceasedDateTime`` (FHIR has no death resource; its cause, when given, is an
Observation ``omop-death-<person_id>``). The map lives in
``terminology/data/omop/`` (not among the maps ingest harmonization applies: its RxNorm, ActCode and
UCUM targets are outside the shipped code-system subsets).
"""
from __future__ import annotations

import csv
import os
import sqlite3
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from terminology.catalog import UCUM, shipped_omop_maps

OMOP_SYSTEM = "https://fhir-terminology.ohdsi.org"
#: table -> (resource type, primary key column, id prefix)
TABLES = {
    "person": ("Patient", "person_id", "omop-person-"),
    "observation_period": ("EpisodeOfCare", "observation_period_id", "omop-period-"),
    "visit_occurrence": ("Encounter", "visit_occurrence_id", "omop-visit-"),
    "condition_occurrence": ("Condition", "condition_occurrence_id", "omop-condition-"),
    "drug_exposure": ("MedicationStatement", "drug_exposure_id", "omop-drug-"),
    "measurement": ("Observation", "measurement_id", "omop-measurement-"),
    "observation": ("Observation", "observation_id", "omop-observation-"),
    # the death table's key is person_id: one row per person, held by that person's Patient
    "death": ("Patient", "person_id", "omop-person-"),
}
_GENDER = {"8507": "male", "8532": "female", "8551": "unknown", "8570": "other"}
_VISIT_CLASS = {"9201": ("IMP", "inpatient encounter"), "9202": ("AMB", "ambulatory"),
                "9203": ("EMER", "emergency"), "262": ("EMER", "emergency")}
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


class OmopError(ValueError):
    """A data set that cannot be read; ``problems`` names file, line and column."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class UnmappedConcepts:
    """Concept ids with no standard code in the shipped vocabulary: (table, column, concept id) -> rows."""

    counts: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        return [f"{t}.{c} = {cid}: {n} row(s) kept as OMOP coding only"
                for (t, c, cid), n in self.counts.most_common()]


class Vocabulary:
    """OMOP concept id -> standard codings, from the ConceptMaps whose source system is OMOP's."""

    def __init__(self, maps: list[dict] | None = None) -> None:
        self.codings: dict[str, list[dict]] = defaultdict(list)
        self.display: dict[str, str] = {}
        if maps is None:
            maps = shipped_omop_maps()
        for cm in maps:
            for group in cm.get("group") or []:
                if group.get("source") != OMOP_SYSTEM:
                    continue
                for element in group.get("element") or []:
                    if element.get("display"):
                        self.display[element["code"]] = element["display"]
                    for target in element.get("target") or []:
                        if target.get("equivalence") in ("equal", "equivalent"):
                            self.codings[element["code"]].append(
                                {"system": group["target"], "code": target["code"],
                                 **({"display": target["display"]} if target.get("display") else {})})

    def concept(self, concept_id: str, table: str, column: str, report: UnmappedConcepts,
                source_value: str | None = None) -> dict:
        """A CodeableConcept: the standard coding(s) first, then the OMOP concept itself."""
        omop = {"system": OMOP_SYSTEM, "code": concept_id,
                **({"display": self.display[concept_id]} if concept_id in self.display else {})}
        standard = self.codings.get(concept_id, [])
        if not standard:
            report.counts[(table, column, concept_id)] += 1
        cc = {"coding": [*standard, omop]}
        if source_value:
            cc["text"] = source_value
        return cc

    def ucum(self, concept_id: str) -> str | None:
        return next((c["code"] for c in self.codings.get(concept_id, []) if c["system"] == UCUM), None)


def read_tables(directory: str) -> dict[str, list[dict]]:
    """The CDM tables present in ``directory`` (``person.csv`` ..., any case) or in the SQLite database
    at that path (tables ``person`` ..., any case); person is required. Values come back as text, as
    the CSV layout gives them."""
    if os.path.isfile(directory) and _is_sqlite(directory):
        return _read_database(directory)
    if not os.path.isdir(directory):
        raise OmopError([f"{directory}: neither a directory of OMOP CDM CSV tables nor a SQLite database"])
    names = {f.lower(): f for f in os.listdir(directory)}
    if "person.csv" not in names:
        raise OmopError([f"{directory}: no person.csv (the person table is required)"])
    tables = {}
    for table, (_, key, _) in TABLES.items():
        name = names.get(f"{table}.csv")
        if name is None:
            continue
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            header = {h.lower() for h in reader.fieldnames or []}
            if key not in header or "person_id" not in header:
                raise OmopError([f"{name}: header lacks {key}" + ("" if table == "person" else " or person_id")])
            tables[table] = [{k.lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    return tables


def _is_sqlite(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(16) == b"SQLite format 3\x00"


def _read_database(path: str) -> dict[str, list[dict]]:
    """The CDM tables of a SQLite database, read-only. SQLite has no date type: dates must be ISO text
    (the CDM's DATE and DATETIME columns as SQLite conventionally keeps them); a number in a date
    column is refused rather than guessed at."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = {r[0].lower(): r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "person" not in names:
            raise OmopError([f"{path}: no person table (the person table is required)"])
        tables = {}
        for table, (_, key, _) in TABLES.items():
            name = names.get(table)
            if name is None:
                continue
            quoted = '"' + name.replace('"', '""') + '"'
            cursor = con.execute(f"SELECT * FROM {quoted}")
            columns = [d[0].lower() for d in cursor.description]
            if key not in columns or "person_id" not in columns:
                raise OmopError([f"{path}: table {name} lacks {key}" + ("" if table == "person" else " or person_id")])
            dates = [c.endswith(("_date", "_datetime")) for c in columns]
            tables[table] = [{c: _text(v, f"{name}.{c}", d) for c, v, d in zip(columns, row, dates)}
                             for row in cursor]
        return tables
    except sqlite3.Error as exc:
        raise OmopError([f"{path}: cannot read the database ({exc})"]) from None
    finally:
        con.close()


def _text(value, where: str, is_date: bool) -> str:
    """A database value as the CSV layout would hold it: text, integers without a decimal point."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if is_date:
        raise OmopError([f"{where}: a date must be ISO text (YYYY-MM-DD or YYYY-MM-DD HH:MM:SS), found {value!r}"])
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip()
    return str(value)


def write_database(path: str, tables: dict[str, list[dict]]) -> None:
    """Write tables into a SQLite database in the CDM layout (one table each, columns as given)."""
    con = sqlite3.connect(path)
    try:
        with con:
            for table, rows in tables.items():
                if not rows:
                    continue
                columns = list(rows[0])
                con.execute(f"CREATE TABLE {table} ({', '.join(columns)})")
                con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})",
                                [[_typed(row[c]) for c in columns] for row in rows])
    finally:
        con.close()


def _typed(value: str):
    """Ids and concept ids as integers, numbers as numbers, dates and text as text (as a CDM database types them)."""
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            continue
    return value if value != "" else None


def write_tables(directory: str, tables: dict[str, list[dict]]) -> None:
    """Write tables in the CDM CSV layout (one file per table, header row)."""
    os.makedirs(directory, exist_ok=True)
    for table, rows in tables.items():
        if not rows:
            continue
        with open(os.path.join(directory, f"{table}.csv"), "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _date(row: dict, stem: str) -> str | None:
    """``<stem>_datetime`` (ISO, read as UTC when it has no zone) or ``<stem>_date``."""
    value = row.get(f"{stem}_datetime") or ""
    if value:
        value = value.replace(" ", "T")
        return value if value.endswith("Z") or "+" in value[10:] else value + ("Z" if "T" in value else "")
    return row.get(f"{stem}_date") or None


def _ref(table: str, key: str) -> dict:
    rtype, _, prefix = TABLES[table]
    return {"reference": f"{rtype}/{prefix}{key}"}


def _patient(row: dict, vocab: Vocabulary, report: UnmappedConcepts) -> dict:
    out = {"resourceType": "Patient", "id": f"omop-person-{row['person_id']}",
           "identifier": [{"system": f"{OMOP_SYSTEM}/person_id", "value": row["person_id"]}]}
    gender = _GENDER.get(row.get("gender_concept_id", ""))
    if gender:
        out["gender"] = gender
    elif row.get("gender_concept_id") not in (None, "", "0"):
        report.counts[("person", "gender_concept_id", row["gender_concept_id"])] += 1
    if row.get("birth_datetime"):
        out["birthDate"] = row["birth_datetime"][:10]
    elif row.get("year_of_birth"):
        y, m, d = row["year_of_birth"], row.get("month_of_birth"), row.get("day_of_birth")
        out["birthDate"] = y + (f"-{int(m):02d}" + (f"-{int(d):02d}" if d else "") if m else "")
    return out


def to_resource(table: str, row: dict, vocab: Vocabulary, report: UnmappedConcepts) -> dict:
    """One CDM row as one FHIR resource."""
    rtype, key, prefix = TABLES[table]
    if table == "person":
        return _patient(row, vocab, report)
    base = {"resourceType": rtype, "id": f"{prefix}{row[key]}",
            "identifier": [{"system": f"{OMOP_SYSTEM}/{key}", "value": row[key]}]}
    subject = _ref("person", row["person_id"])
    visit = row.get("visit_occurrence_id")
    if table == "observation_period":
        return {**base, "status": "finished", "patient": subject,
                "period": {k: v for k, v in (("start", _date(row, "observation_period_start")),
                                             ("end", _date(row, "observation_period_end"))) if v}}
    if table == "visit_occurrence":
        code, display = _VISIT_CLASS.get(row.get("visit_concept_id", ""), ("AMB", "ambulatory"))
        return {**base, "status": "finished", "class": {"system": _ACT_CODE, "code": code, "display": display},
                "type": [vocab.concept(row.get("visit_concept_id", "0"), table, "visit_concept_id", report)],
                "subject": subject,
                "period": {k: v for k, v in (("start", _date(row, "visit_start")),
                                             ("end", _date(row, "visit_end"))) if v}}
    if table == "condition_occurrence":
        out = {**base, "subject": subject,
               "code": vocab.concept(row["condition_concept_id"], table, "condition_concept_id", report,
                                     row.get("condition_source_value")),
               "onsetDateTime": _date(row, "condition_start")}
        if row.get("condition_end_date") or row.get("condition_end_datetime"):
            out["abatementDateTime"] = _date(row, "condition_end")
        if visit:
            out["encounter"] = _ref("visit_occurrence", visit)
        return out
    if table == "drug_exposure":
        out = {**base, "status": "completed", "subject": subject,
               "medicationCodeableConcept": vocab.concept(row["drug_concept_id"], table, "drug_concept_id", report,
                                                          row.get("drug_source_value")),
               "effectivePeriod": {k: v for k, v in (("start", _date(row, "drug_exposure_start")),
                                                     ("end", _date(row, "drug_exposure_end"))) if v}}
        if row.get("quantity"):
            out["dosage"] = [{"text": f"quantity dispensed: {row['quantity']}"}]  # OMOP quantity has no unit
        if visit:
            out["context"] = _ref("visit_occurrence", visit)
        return out
    if table == "death":
        raise ValueError("a death row is part of its person's Patient (person_bundles), not a resource")
    # measurement and observation: both FHIR Observations; the observation table is what is not a lab value
    stem = table
    out = {**base, "status": "final", "subject": subject,
           "code": vocab.concept(row[f"{stem}_concept_id"], table, f"{stem}_concept_id", report,
                                 row.get(f"{stem}_source_value")),
           "effectiveDateTime": _date(row, f"{stem}")}
    if table == "measurement":
        out["category"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                        "code": "laboratory"}]}]
    if row.get("value_as_number"):
        qty = {"value": float(row["value_as_number"])}
        unit = vocab.ucum(row.get("unit_concept_id", ""))
        if unit:
            qty.update(unit=unit, system=UCUM, code=unit)
        elif row.get("unit_concept_id") not in (None, "", "0"):
            report.counts[(table, "unit_concept_id", row["unit_concept_id"])] += 1
            if row.get("unit_source_value"):
                qty["unit"] = row["unit_source_value"]
        out["valueQuantity"] = qty
    elif row.get("value_as_concept_id") not in (None, "", "0"):
        out["valueCodeableConcept"] = vocab.concept(row["value_as_concept_id"], table, "value_as_concept_id", report)
    elif row.get("value_as_string"):
        out["valueString"] = row["value_as_string"]
    if visit:
        out["encounter"] = _ref("visit_occurrence", visit)
    return out


def _death(patient: dict, row: dict, vocab: Vocabulary, report: UnmappedConcepts) -> list[dict]:
    """Record ``row`` of the death table on ``patient``; the cause of death, if any, as an Observation."""
    when = _date(row, "death")
    patient["deceasedDateTime" if when else "deceasedBoolean"] = when or True
    cause = row.get("cause_concept_id")
    if cause in (None, "", "0"):
        return []
    return [{"resourceType": "Observation", "id": f"omop-death-{row['person_id']}",
             "identifier": [{"system": f"{OMOP_SYSTEM}/death", "value": row["person_id"]}],
             "status": "final", "code": {"text": "cause of death"},
             "subject": _ref("person", row["person_id"]),
             **({"effectiveDateTime": when} if when else {}),
             "valueCodeableConcept": vocab.concept(cause, "death", "cause_concept_id", report,
                                                   row.get("cause_source_value"))}]


def person_bundles(tables: dict[str, list[dict]], vocab: Vocabulary, report: UnmappedConcepts):
    """One transaction Bundle per person (their Patient and every row of theirs), in person order."""
    by_person: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for table, rows in tables.items():
        for row in rows:
            by_person[row.get("person_id", "")].append((table, row))
    orphans = set(by_person) - {p["person_id"] for p in tables["person"]}
    if orphans:  # checked before anything is stored
        raise OmopError([f"rows refer to person_id {', '.join(sorted(orphans)[:5])} that the person table lacks"])
    deaths = Counter(row["person_id"] for row in tables.get("death", []))
    if any(n > 1 for n in deaths.values()):
        twice = sorted(p for p, n in deaths.items() if n > 1)
        raise OmopError([f"death.csv: person_id {', '.join(twice[:5])} died more than once (one row per person)"])
    for person in tables["person"]:
        pid = person["person_id"]
        resources, per_table = [], Counter()
        patient = to_resource("person", person, vocab, report)
        for table, row in by_person[pid]:
            if table == "person":
                resources.append(patient)
            elif table == "death":
                resources.extend(_death(patient, row, vocab, report))
            else:
                resources.append(to_resource(table, row, vocab, report))
            per_table[table] += 1
        entries = [{"resource": res, "request": {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}}
                   for res in resources]
        yield pid, {"resourceType": "Bundle", "type": "transaction", "entry": entries}, per_table


__all__ = ["OMOP_SYSTEM", "OmopError", "TABLES", "UnmappedConcepts", "Vocabulary", "person_bundles", "read_tables",
           "to_resource", "write_tables"]
