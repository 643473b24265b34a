"""The shipped terminology files: valid R4, well-formed codes, and every local code of the demo study mapped."""
from __future__ import annotations

import pytest
from fhir.resources.R4B import get_fhir_model_class

from terminology.catalog import DATA_DIR, LOINC, MDC, SNOMED, default_catalog, load_file, shipped
from terminology.checkdigits import loinc_ok, sctid_ok
from terminology.conceptmap import MapSet, translate

pytestmark = pytest.mark.unit
EDC_LAB = "https://trialtwin.org/fhir/CodeSystem/edc-lab"

# docs/ARCHITECTURE.md "The demo study": local code -> the LOINC code the table names
DEMO_STUDY = {(EDC_LAB, "LAB-HBA1C"): "4548-4", (EDC_LAB, "LAB-FPG"): "1558-6", (EDC_LAB, "LAB-EGFR"): "62238-1",
              (MDC, "188736"): "29463-7", (MDC, "147842"): "8867-4", (MDC, "150021"): "8480-6"}


@pytest.mark.parametrize("path", sorted(DATA_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_file_is_valid_r4(path):
    resource = load_file(path)
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    assert path.name == f"{resource['resourceType']}-{resource['id']}.json"


def test_codes_have_valid_check_digits():
    catalog = default_catalog()
    assert all(loinc_ok(c) for c in catalog.code_systems[LOINC].concepts)
    assert all(sctid_ok(c) for c in catalog.code_systems[SNOMED].concepts)
    # SNOMED CT identifiers from the issue, Verhoeff-checked
    for code in ("422587007", "25064002", "302866003", "62315008", "404640003"):
        assert sctid_ok(code)
    assert not loinc_ok("4548-5") and not sctid_ok("25064003")


@pytest.mark.parametrize("source, loinc", DEMO_STUDY.items(), ids=lambda x: str(x))
def test_every_demo_study_local_code_maps_to_its_loinc_code(source, loinc):
    out = translate(MapSet(shipped("ConceptMap")), system=source[0], code=source[1])
    first = next(p for p in out["parameter"] if p["name"] == "match")["part"]
    assert out["parameter"][0]["valueBoolean"] is True
    assert first[0] == {"name": "equivalence", "valueCode": "equivalent"}
    assert first[1]["valueCoding"]["code"] == loinc


def test_every_local_code_is_mapped_and_every_target_is_in_the_subsets():
    catalog = default_catalog()
    mapped = {(m["group"][0]["source"], e["code"]) for m in shipped("ConceptMap") for e in m["group"][0]["element"]}
    for system in (EDC_LAB, "https://trialtwin.org/fhir/CodeSystem/edc-ae"):
        for code in catalog.code_systems[system].concepts:
            assert (system, code) in mapped, f"{system}|{code} has no mapping"
    for cm in shipped("ConceptMap"):
        for group in cm["group"]:
            for element in group["element"]:
                for target in element["target"]:
                    concept = catalog.concept(group["target"], target["code"])
                    assert concept is not None and concept["display"] == target["display"]


def test_demo_study_canonical_units():
    catalog = default_catalog()
    expected = {"4548-4": "%", "1558-6": "mg/dL", "29463-7": "kg", "8867-4": "/min", "8480-6": "mm[Hg]",
                "62238-1": "mL/min/{1.73_m2}"}
    for code, unit in expected.items():
        assert catalog.property_value(LOINC, code, "canonical-unit") == unit
    assert catalog.property_value("https://trialtwin.org/fhir/CodeSystem/assay", "TTX101-PK", "canonical-unit") == "ng/mL"


def test_the_demo_generator_codes_validate_and_map():
    """Cross-check with fhir_ops.demo (h-ops): every coding it writes is valid here, displays included,
    and every local coding it adds translates to the LOINC code it sits beside."""
    from fhir_ops import demo
    from terminology.codesystem import validate_code

    maps = MapSet(shipped("ConceptMap"))
    for loinc, display, local, _ in demo.MEASURES.values():
        assert validate_code(system=LOINC, code=loinc, display=display)["parameter"][0]["valueBoolean"] is True, loinc
        system, code, _ = local
        out = translate(maps, system=system, code=code)
        assert next(p for p in out["parameter"] if p["name"] == "match")["part"][1]["valueCoding"]["code"] == loinc
    for code, display in demo.AE_TERMS:
        assert validate_code(system=SNOMED, code=code, display=display)["parameter"][0]["valueBoolean"] is True
    assert validate_code(system=SNOMED, code="44054006", display="Diabetes mellitus type 2")["parameter"][0]["valueBoolean"]
    for unit in demo.UNITS:
        assert validate_code(system="http://unitsofmeasure.org", code=unit)["parameter"][0]["valueBoolean"], unit
