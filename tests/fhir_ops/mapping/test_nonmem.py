"""NONMEM-format data sets: the whole file checked with line-numbered errors, events as FHIR resources."""
from __future__ import annotations

import json
from importlib import resources

import pytest

from fhir_ops.mapping import nonmem

pytestmark = pytest.mark.unit

HEADER = "ID,TIME,DV,AMT,EVID,MDV,CMT,RATE,ADDL,II,WT"


def theoph_text() -> str:
    return resources.files("inference").joinpath("data/theoph_nonmem.csv").read_text("utf-8")


def theoph_mapping() -> dict:
    return json.loads(resources.files("inference").joinpath("data/theoph_nonmem.map.json").read_text("utf-8"))


def iv_mapping() -> dict:
    m = theoph_mapping()
    m["doses"] = [{"cmt": 1, "medication": {"system": "urn:x", "code": "d"}, "unit": "mg", "route": "iv"}]
    m["observations"] = [{"cmt": 1, "code": {"system": "urn:x", "code": "c"}, "unit": "mg/L"}]
    return m


def problems(text, mapping=None):
    with pytest.raises(nonmem.NonmemError) as err:
        nonmem.parse(text, mapping or theoph_mapping())
    return err.value.problems


def test_theoph_parses_into_12_subjects_and_132_observations():
    subjects = nonmem.parse(theoph_text(), theoph_mapping())
    assert [s.id for s in subjects] == [str(i) for i in range(1, 13)]
    assert sum(len(s.observations) for s in subjects) == 132
    assert all(len(s.doses) == 1 and s.doses[0][0] == 0.0 for s in subjects)
    assert subjects[0].covariates == {"WT": 79.6}


@pytest.mark.parametrize("row, message", [
    (",0,.,100,1,1,1,0,0,0,70", "line 3: missing ID"),
    ("2,0,.,0,1,1,1,0,0,0,70", "line 3: EVID=1 (dose) but AMT is 0"),
    ("2,0,.,.,1,1,1,0,0,0,70", "line 3: EVID=1 (dose) but AMT is missing"),
    ("2,1,5.0,100,0,0,2,0,0,0,70", "line 3: EVID=0 (observation) but AMT=100"),
    ("2,1,5.0,0,0,0,7,0,0,0,70", "line 3: CMT 7 is not a observation compartment"),
    ("2,0,.,100,1,1,1,50,0,0,70", "line 3: RATE on an oral dose"),
    ("2,0,.,100,1,1,1,0,3,0,70", "line 3: ADDL=3 needs II > 0"),
    ("2,0,.,100,4,1,1,0,0,0,70", "line 3: EVID 4 (reset events) is not supported"),
    ("2,1,abc,0,0,0,2,0,0,0,70", "line 3: not a number"),
    ("2,1,.,0,0,0,2,0,0,0,70", "line 3: observation row (EVID=0, MDV=0) without a DV"),
    ("2,1,4.0,0,0,0,2,0,0,0,.", "line 3: covariate WT is missing"),
])
def test_bad_rows_are_named_by_line(row, message):
    text = f"{HEADER}\n1,0,.,100,1,1,1,0,0,0,70\n{row}\n"
    found = problems(text)
    assert any(p.startswith(message) for p in found), found


def test_every_bad_row_is_reported_not_only_the_first():
    text = f"{HEADER}\n1,0,.,0,1,1,1,0,0,0,70\n1,1,3.0,5,0,0,2,0,0,0,70\n,2,3.0,0,0,0,2,0,0,0,70\n"
    assert [p.split(":")[0] for p in problems(text)] == ["line 2", "line 3", "line 4"]


def test_time_order_and_id_blocks():
    text = f"{HEADER}\n1,0,.,100,1,1,1,0,0,0,70\n1,2,3.0,0,0,0,2,0,0,0,70\n1,1,3.0,0,0,0,2,0,0,0,70\n" \
           f"2,0,.,100,1,1,1,0,0,0,70\n1,3,3.0,0,0,0,2,0,0,0,70\n"
    found = problems(text)
    assert any(p.startswith("line 4: TIME 1 goes back") for p in found)
    assert any(p.startswith("line 6: ID 1 appears again") for p in found)


def test_header_and_mapping_problems():
    assert problems("TIME,DV\n0,1\n")[0] == "line 1: the header has no ID column"
    bad = theoph_mapping()
    bad["doses"][0]["route"] = "nasal"
    assert problems(theoph_text(), bad) == ["mapping: doses[0].route must be oral or iv"]


def test_addl_expands_and_rate_gives_infusions():
    text = "ID,TIME,DV,AMT,EVID,MDV,CMT,RATE,ADDL,II,WT\n1,0,.,100,1,1,1,50,2,12,70\n1,30,2.5,0,0,0,1,0,0,0,70\n"
    (s,) = nonmem.parse(text, iv_mapping())
    assert [(t, amt, dur) for t, amt, dur, _, _ in s.doses] == [(0.0, 100.0, 2.0), (12.0, 100.0, 2.0),
                                                               (24.0, 100.0, 2.0)]
    bundle = nonmem.subject_bundle(s, iv_mapping())
    mas = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "MedicationAdministration"]
    assert mas[1]["effectivePeriod"] == {"start": "2025-01-06T20:00:00Z", "end": "2025-01-06T22:00:00Z"}
    assert bundle["type"] == "transaction"
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("Patient") == 1 and kinds.count("ResearchSubject") == 1 and kinds.count("Observation") == 2


def test_mdv_rows_are_skipped_and_evid_is_derived_from_amt():
    text = "ID,TIME,DV,AMT,MDV\n1,0,.,100,1\n1,1,.,0,1\n1,2,4.5,0,0\n"
    (s,) = nonmem.parse(text, {**theoph_mapping(), "covariates": []})
    assert len(s.doses) == 1 and [o[:2] for o in s.observations] == [(2.0, 4.5)]
