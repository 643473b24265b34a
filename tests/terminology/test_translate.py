"""ConceptMap/$translate over the shipped maps: R4 output for mapped, unmapped, several-target and reverse cases."""
from __future__ import annotations

import pytest

from fhir_ops.errors import InvalidRequest, NotFound
from terminology.catalog import LOINC, MDC, SNOMED
from terminology.conceptmap import MapSet, translate, translate_linear
from tests.terminology.r4check import output_problems

pytestmark = pytest.mark.unit

EDC_LAB = "https://trialtwin.org/fhir/CodeSystem/edc-lab"
EDC_AE = "https://trialtwin.org/fhir/CodeSystem/edc-ae"
DEF = "OperationDefinition-translate.json"


def matches(out):
    return [{p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in m["part"]}
            for m in out["parameter"] if m["name"] == "match"]


def value(out, name):
    return next((next(v for k, v in p.items() if k.startswith("value")) for p in out["parameter"] if p["name"] == name), None)


@pytest.fixture(scope="module")
def maps(concept_maps):
    return MapSet(concept_maps)


def test_mapped_code(maps):
    out = translate(maps, system=MDC, code="188736")
    assert output_problems(out, DEF) == []
    assert out["parameter"][0] == {"name": "result", "valueBoolean": True}
    assert value(out, "message") is None
    assert matches(out) == [{
        "equivalence": "equivalent",
        "concept": {"system": LOINC, "code": "29463-7", "version": "2.77", "display": "Body weight"},
        "source": "https://trialtwin.org/fhir/ConceptMap/mdc-to-loinc"}]


def test_unmapped_code(maps):
    out = translate(maps, system=EDC_LAB, code="LAB-UNKNOWN")
    assert output_problems(out, DEF) == []
    assert value(out, "result") is False
    assert "LAB-UNKNOWN" in value(out, "message")
    assert matches(out) == []


def test_code_with_several_targets(maps):
    out = translate(maps, system=EDC_LAB, code="LAB-HBA1C")
    assert output_problems(out, DEF) == []
    assert value(out, "result") is True
    got = [(m["concept"]["code"], m["equivalence"]) for m in matches(out)]
    assert got == [("4548-4", "equivalent"), ("17856-6", "narrower")]
    ae = translate(maps, coding={"system": EDC_AE, "code": "AE-GI-UPSET"})
    assert sorted(m["concept"]["code"] for m in matches(ae)) == ["422400008", "422587007"]


def test_reverse_translation_reads_equivalence_backwards(maps):
    out = translate(maps, system=LOINC, code="4548-4", reverse=True)
    assert output_problems(out, DEF) == []
    assert matches(out) == [{"equivalence": "equivalent",
                             "concept": {"system": EDC_LAB, "code": "LAB-HBA1C", "display": "HbA1c (central lab)"},
                             "source": "https://trialtwin.org/fhir/ConceptMap/edc-lab-to-loinc"}]
    # LAB-HBA1C -> 17856-6 is 'narrower'; read from the LOINC side the local code is wider
    back = translate(maps, system=LOINC, code="17856-6", reverse=True)
    assert [m["equivalence"] for m in matches(back)] == ["wider"]
    several = translate(maps, system=SNOMED, code="422587007", reverse=True)
    assert sorted(m["concept"]["code"] for m in matches(several)) == ["AE-GI-UPSET", "AE-NAUSEA"]
    # a local code is not a target: nothing comes back in reverse
    assert value(translate(maps, system=MDC, code="188736", reverse=True), "result") is False


def test_codeable_concept_tries_every_coding(maps):
    cc = {"coding": [{"system": "http://example.org/x", "code": "nope"}, {"system": MDC, "code": "150021"}]}
    out = translate(maps, codeable_concept=cc)
    assert [m["concept"]["code"] for m in matches(out)] == ["8480-6"]


def test_filters_targetsystem_source_target_url_version(maps):
    assert value(translate(maps, system=MDC, code="188736", target_system=SNOMED), "result") is False
    assert value(translate(maps, system=MDC, code="188736", target_system=LOINC), "result") is True
    assert value(translate(maps, system=MDC, code="188736",
                           source="https://trialtwin.org/fhir/ValueSet/device-vital-signs"), "result") is True
    assert value(translate(maps, system=MDC, code="188736",
                           target="https://trialtwin.org/fhir/ValueSet/lab-tests"), "result") is False
    url = "https://trialtwin.org/fhir/ConceptMap/edc-lab-to-loinc"
    assert value(translate(maps, system=MDC, code="188736", url=url), "result") is False
    with pytest.raises(NotFound):
        translate(maps, system=MDC, code="188736", url=url, concept_map_version="9.9")


def test_bad_input_is_refused(maps):
    with pytest.raises(InvalidRequest):
        translate(maps, code="188736")  # no system
    with pytest.raises(InvalidRequest):
        translate(maps)


def test_index_and_linear_scan_agree(concept_maps, maps):
    for cm in concept_maps:
        for group in cm["group"]:
            for element in group["element"]:
                fast = [m["concept"]["code"] for m in matches(translate(maps, system=group["source"], code=element["code"]))]
                slow = [t["code"] for t in translate_linear(cm, group["source"], element["code"])]
                assert fast == slow
