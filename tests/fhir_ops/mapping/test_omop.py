"""OMOP CDM v5.4 import: a generated data set in the CDM CSV layout, loaded by the CLI into a real store."""
from __future__ import annotations

import random

import pytest

from fhir_ops.cli import main
from fhir_ops.mapping import omop
from fhir_ops.store.sqlite import SQLiteStore

pytestmark = pytest.mark.api
UNMAPPED_CONDITION, UNMAPPED_DRUG, UNMAPPED_MEASUREMENT, UNMAPPED_UNIT = "4329847", "19078461", "3012888", "8876"
SMOKING, NEVER_SMOKED, CAUSE = "4275495", "45765920", "4306655"  # none in the shipped vocabulary


def generate(n: int, seed: int = 3) -> dict[str, list[dict]]:
    """A small OMOP data set: persons with a period, visits, T2D, metformin and lab results."""
    rng = random.Random(seed)
    t = {k: [] for k in omop.TABLES}
    ids = {k: 0 for k in omop.TABLES}

    def nid(table):
        ids[table] += 1
        return str(ids[table])

    for p in range(1, n + 1):
        pid = str(p)
        t["person"].append({"person_id": pid, "gender_concept_id": rng.choice(["8507", "8532"]),
                            "year_of_birth": str(rng.randint(1940, 1990)), "month_of_birth": str(rng.randint(1, 12)),
                            "day_of_birth": str(rng.randint(1, 28)), "birth_datetime": "",
                            "race_concept_id": "0", "ethnicity_concept_id": "0"})
        t["observation_period"].append({"observation_period_id": nid("observation_period"), "person_id": pid,
                                        "observation_period_start_date": "2024-01-01",
                                        "observation_period_end_date": "2026-06-30",
                                        "period_type_concept_id": "32817"})
        visits = []
        for k in range(3):
            vid = nid("visit_occurrence")
            visits.append(vid)
            day = f"2025-{k * 3 + 2:02d}-{rng.randint(1, 28):02d}"
            t["visit_occurrence"].append({"visit_occurrence_id": vid, "person_id": pid,
                                          "visit_concept_id": rng.choice(["9202", "9202", "9201", "9203"]),
                                          "visit_start_date": day, "visit_start_datetime": f"{day} 09:00:00",
                                          "visit_end_date": day, "visit_end_datetime": f"{day} 10:00:00",
                                          "visit_type_concept_id": "32817"})
        cond = "201826" if p % 5 else UNMAPPED_CONDITION
        t["condition_occurrence"].append({"condition_occurrence_id": nid("condition_occurrence"), "person_id": pid,
                                          "condition_concept_id": cond, "condition_start_date": "2024-03-01",
                                          "condition_start_datetime": "", "condition_end_date": "",
                                          "condition_end_datetime": "", "visit_occurrence_id": visits[0],
                                          "condition_source_value": "E11.9" if cond == "201826" else "I21"})
        for drug in ("1503297", UNMAPPED_DRUG if p % 4 == 0 else "1503297"):
            t["drug_exposure"].append({"drug_exposure_id": nid("drug_exposure"), "person_id": pid,
                                       "drug_concept_id": drug, "drug_exposure_start_date": "2025-01-10",
                                       "drug_exposure_start_datetime": "", "drug_exposure_end_date": "2025-04-10",
                                       "drug_exposure_end_datetime": "", "quantity": "90",
                                       "visit_occurrence_id": visits[0], "drug_source_value": "metformin 500 mg"})
        for vid in visits:
            for concept, unit, value in (("3004410", "8554", rng.uniform(6, 9)), ("3037110", "8840", rng.uniform(90, 180)),
                                         ("3025315", "9529", rng.uniform(60, 110)),
                                         (UNMAPPED_MEASUREMENT, UNMAPPED_UNIT, rng.uniform(70, 90))):
                t["measurement"].append({"measurement_id": nid("measurement"), "person_id": pid,
                                         "measurement_concept_id": concept, "measurement_date": "2025-05-01",
                                         "measurement_datetime": "2025-05-01 08:30:00",
                                         "value_as_number": f"{value:.2f}", "value_as_concept_id": "",
                                         "unit_concept_id": unit, "visit_occurrence_id": vid,
                                         "measurement_source_value": concept, "unit_source_value": "mmHg"})
        # the observation table: a coded answer, a number with its unit, a free-text note
        t["observation"].append({"observation_id": nid("observation"), "person_id": pid,
                                 "observation_concept_id": SMOKING, "observation_date": "2025-02-01",
                                 "observation_datetime": "", "value_as_number": "", "value_as_string": "",
                                 "value_as_concept_id": NEVER_SMOKED, "unit_concept_id": "",
                                 "visit_occurrence_id": visits[0], "observation_source_value": "smoking"})
        t["observation"].append({"observation_id": nid("observation"), "person_id": pid,
                                 "observation_concept_id": "3025315", "observation_date": "2025-02-01",
                                 "observation_datetime": "2025-02-01 08:00:00",
                                 "value_as_number": f"{rng.uniform(60, 110):.1f}", "value_as_string": "",
                                 "value_as_concept_id": "", "unit_concept_id": "9529", "visit_occurrence_id": "",
                                 "observation_source_value": "self-reported weight"})
        if p % 3 == 0:
            t["observation"].append({"observation_id": nid("observation"), "person_id": pid,
                                     "observation_concept_id": "0", "observation_date": "2025-03-01",
                                     "observation_datetime": "", "value_as_number": "",
                                     "value_as_string": "walks 30 min daily", "value_as_concept_id": "",
                                     "unit_concept_id": "", "visit_occurrence_id": "",
                                     "observation_source_value": "activity"})
        if p % 6 == 0:  # a few died; every other death with a cause
            t["death"].append({"person_id": pid, "death_date": "2026-01-15", "death_datetime": "",
                               "death_type_concept_id": "32817", "cause_concept_id": CAUSE if p % 12 == 0 else "",
                               "cause_source_value": "I21" if p % 12 == 0 else ""})
    return t


def stored_per_table(store) -> dict[str, int]:
    """Resources in the store per OMOP table they came from (the id prefix says which)."""
    out = {}
    for table, (rtype, _, prefix) in omop.TABLES.items():
        if table == "death":
            out[table] = sum(1 for p in store.search_all("Patient", []) if "deceasedDateTime" in p)
        else:
            out[table] = sum(1 for r in store.search_all(rtype, []) if r["id"].startswith(prefix))
    return out


def load(tmp_path, directory, capsys):
    code = main(["load", "--format", "omop", str(directory), "--data-dir", str(tmp_path / "data")])
    return code, capsys.readouterr()


def write(tmp_path, tables: dict, layout: str):
    """The tables as CDM CSV files in a directory, or as a SQLite database (integers and numbers typed)."""
    if layout == "csv":
        omop.write_tables(str(tmp_path / "cdm"), tables)
        return tmp_path / "cdm"
    omop.write_database(str(tmp_path / "cdm.sqlite"), tables)
    return tmp_path / "cdm.sqlite"


@pytest.mark.parametrize("layout", ["csv", "sqlite"])
def test_a_generated_omop_data_set_round_trips_with_equal_counts_per_table(tmp_path, capsys, layout):
    tables = generate(25)
    source = write(tmp_path, tables, layout)
    code, out = load(tmp_path, source, capsys)
    assert code == 0, out.err
    store = SQLiteStore(str(tmp_path / "data" / "trialtwin.sqlite"))
    try:
        assert set(tables) == {"person", "observation_period", "visit_occurrence", "condition_occurrence",
                               "drug_exposure", "measurement", "observation", "death"}
        assert stored_per_table(store) == {table: len(rows) for table, rows in tables.items()}
        assert all(tables.values())
        for table, rows in tables.items():
            kind = "Patient.deceased" if table == "death" else omop.TABLES[table][0]
            assert f"{table}: {len(rows)} rows -> {len(rows)} {kind}" in out.out
        # the only extra resources are the causes of death
        n_obs = len(tables["measurement"]) + len(tables["observation"])
        assert store.search("Observation", [("_summary", "count")]).total == n_obs + 2
        cause = store.read("Observation", "omop-death-12")
        assert cause["valueCodeableConcept"] == {"coding": [{"system": omop.OMOP_SYSTEM, "code": CAUSE}], "text": "I21"}
        assert store.read("Patient", "omop-person-6")["deceasedDateTime"] == "2026-01-15"
        assert "deceasedDateTime" not in store.read("Patient", "omop-person-5")
        weight = store.read("Observation", "omop-observation-2")
        assert weight["code"]["coding"][0] == {"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}
        assert weight["valueQuantity"]["code"] == "kg" and "category" not in weight
        smoking = store.read("Observation", "omop-observation-1")
        assert smoking["valueCodeableConcept"]["coding"] == [{"system": omop.OMOP_SYSTEM, "code": NEVER_SMOKED}]
        assert smoking["encounter"]["reference"].startswith("Encounter/omop-visit-")
        assert store.read("Observation", "omop-observation-7")["valueString"] == "walks 30 min daily"
        # codes mapped as far as the vocabulary reaches
        a1c = store.search("Observation", [("code", "http://loinc.org|4548-4"), ("_count", "1")]).matches[0]
        assert a1c["valueQuantity"]["code"] == "%" and a1c["subject"]["reference"].startswith("Patient/omop-person-")
        assert store.search("Condition", [("code", "http://snomed.info/sct|44054006"), ("_summary", "count")]).total == 20
        rx = [m for m in store.search_all("MedicationStatement", [])
              if {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "6809", "display": "metformin"}
              in m["medicationCodeableConcept"]["coding"]]
        assert len(rx) == 44  # 50 exposures, 6 of an unmapped drug
        # ... and the rest kept as OMOP codings and reported
        other = store.search("Condition", [("code", f"{omop.OMOP_SYSTEM}|{UNMAPPED_CONDITION}")]).matches
        assert len(other) == 5 and other[0]["code"]["coding"] == [{"system": omop.OMOP_SYSTEM, "code": UNMAPPED_CONDITION}]
        for line in (f"condition_occurrence.condition_concept_id = {UNMAPPED_CONDITION}: 5 row(s)",
                     f"drug_exposure.drug_concept_id = {UNMAPPED_DRUG}: 6 row(s)",
                     f"measurement.measurement_concept_id = {UNMAPPED_MEASUREMENT}: 75 row(s)",
                     f"measurement.unit_concept_id = {UNMAPPED_UNIT}: 75 row(s)",
                     f"observation.observation_concept_id = {SMOKING}: 25 row(s)",
                     f"observation.value_as_concept_id = {NEVER_SMOKED}: 25 row(s)",
                     "observation.observation_concept_id = 0: 8 row(s)",
                     f"death.cause_concept_id = {CAUSE}: 2 row(s)"):
            assert line in out.err
        visit = store.read("Encounter", "omop-visit-1")
        assert visit["class"]["system"].endswith("v3-ActCode") and visit["period"]["start"].endswith("T09:00:00Z")
    finally:
        store.close()
    # loading again writes the same resources, not new ones
    code, _ = load(tmp_path, source, capsys)
    store = SQLiteStore(str(tmp_path / "data" / "trialtwin.sqlite"))
    try:
        assert code == 0 and stored_per_table(store) == {table: len(rows) for table, rows in tables.items()}
    finally:
        store.close()


def assert_nothing_loaded(tmp_path) -> None:
    store = SQLiteStore(str(tmp_path / "data" / "trialtwin.sqlite"))
    try:
        assert store.search("Patient", [("_summary", "count")]).total == 0
    finally:
        store.close()


def test_rows_of_an_unknown_person_load_nothing(tmp_path, capsys):
    tables = generate(3)
    tables["measurement"][0]["person_id"] = "99"
    omop.write_tables(str(tmp_path / "cdm"), tables)
    code, out = load(tmp_path, tmp_path / "cdm", capsys)
    assert code == 1 and "person_id 99 that the person table lacks" in out.err
    assert_nothing_loaded(tmp_path)


def test_a_directory_without_person_table_is_refused(tmp_path, capsys):
    (tmp_path / "cdm").mkdir()
    code, out = load(tmp_path, tmp_path / "cdm", capsys)
    assert code == 1 and "no person.csv" in out.err


def test_two_deaths_of_one_person_load_nothing(tmp_path, capsys):
    tables = generate(6)
    tables["death"].append(dict(tables["death"][0], death_date="2026-02-01"))
    omop.write_tables(str(tmp_path / "cdm"), tables)
    code, out = load(tmp_path, tmp_path / "cdm", capsys)
    assert code == 1 and "person_id 6 died more than once" in out.err
    assert_nothing_loaded(tmp_path)


def test_a_database_is_read_as_the_csv_layout_is(tmp_path):
    tables = generate(4)
    omop.write_database(str(tmp_path / "cdm.sqlite"), tables)
    import sqlite3

    con = sqlite3.connect(tmp_path / "cdm.sqlite")
    assert con.execute("SELECT typeof(person_id), typeof(year_of_birth) FROM person").fetchone() == ("integer", "integer")
    con.close()
    omop.write_tables(str(tmp_path / "cdm"), tables)

    def as_values(read: dict) -> dict:  # a typed column keeps 7.6, not the CSV's 7.60
        def value(v: str):
            try:
                return float(v)
            except ValueError:
                return v
        return {table: [{k: value(v) for k, v in row.items()} for row in rows] for table, rows in read.items()}

    from_database = omop.read_tables(str(tmp_path / "cdm.sqlite"))
    assert as_values(from_database) == as_values(omop.read_tables(str(tmp_path / "cdm")))
    assert from_database["person"][0]["person_id"] == "1"  # integers as the CSV writes them


def test_a_database_without_person_or_with_numeric_dates_loads_nothing(tmp_path, capsys):
    tables = generate(3)
    omop.write_database(str(tmp_path / "no-person.sqlite"), {k: v for k, v in tables.items() if k != "person"})
    code, out = load(tmp_path, tmp_path / "no-person.sqlite", capsys)
    assert code == 1 and "no person table" in out.err
    tables["measurement"][0]["measurement_date"] = "20260101"  # typed as a number in the database
    omop.write_database(str(tmp_path / "numeric-date.sqlite"), tables)
    code, out = load(tmp_path, tmp_path / "numeric-date.sqlite", capsys)
    assert code == 1 and "measurement.measurement_date: a date must be ISO text" in out.err
    (tmp_path / "notes.txt").write_text("not a database")
    code, out = load(tmp_path, tmp_path / "notes.txt", capsys)
    assert code == 1 and "neither a directory of OMOP CDM CSV tables nor a SQLite database" in out.err
    assert_nothing_loaded(tmp_path)
