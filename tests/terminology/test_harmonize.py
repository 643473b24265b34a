"""Harmonization on ingest: standard codings added (originals kept), canonical units, unmapped codes reported."""
from __future__ import annotations

import copy
from fractions import Fraction

import pytest
from fhir.resources.R4B import get_fhir_model_class

from terminology.catalog import LOINC, MDC, SNOMED, UCUM
from terminology.harmonize import ORIGINAL_QUANTITY, Harmonizer, UnmappedReport, harmonize_resource

pytestmark = pytest.mark.unit
EDC_LAB = "https://trialtwin.org/fhir/CodeSystem/edc-lab"
EDC_AE = "https://trialtwin.org/fhir/CodeSystem/edc-ae"


def obs(system, code, value=None, unit=None, ucum=True):
    o = {"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": system, "code": code}]}}
    if value is not None:
        o["valueQuantity"] = {"value": value, "unit": unit}
        if ucum:
            o["valueQuantity"].update(system=UCUM, code=unit)
    return o


def test_local_lab_code_gets_loinc_and_mmol_becomes_mg_dl():
    incoming = obs(EDC_LAB, "LAB-FPG", 5.5, "mmol/L")
    kept = copy.deepcopy(incoming)
    out, warnings = harmonize_resource(incoming)
    assert incoming == kept  # the input is not modified
    assert warnings == []
    assert out["code"]["coding"] == [{"system": EDC_LAB, "code": "LAB-FPG"},
                                     {"system": LOINC, "code": "1558-6",
                                      "display": "Fasting glucose [Mass/volume] in Serum or Plasma"}]
    q = out["valueQuantity"]
    assert (q["value"], q["unit"], q["system"], q["code"]) == (99.0858, "mg/dL", UCUM, "mg/dL")  # 5.5 * 18.0156
    assert q["extension"] == [{"url": ORIGINAL_QUANTITY, "valueQuantity": kept["valueQuantity"]}]
    get_fhir_model_class("Observation").model_validate(out)


def test_device_weight_in_pounds_becomes_kg():
    out, warnings = harmonize_resource(obs(MDC, "188736", 176, "[lb_av]"))
    assert warnings == []
    assert out["code"]["coding"][1]["code"] == "29463-7"
    assert out["valueQuantity"]["value"] == 79.83225712  # 176 * 0.45359237
    assert out["valueQuantity"]["code"] == "kg"


def test_already_canonical_values_are_untouched():
    incoming = obs(LOINC, "4548-4", 7.1, "%")
    out, warnings = harmonize_resource(incoming)
    assert out == incoming and warnings == []


def test_blood_pressure_components():
    bp = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": MDC, "code": "150020"}]},
          "component": [{"code": {"coding": [{"system": MDC, "code": "150021"}]},
                         "valueQuantity": {"value": 16, "unit": "kPa", "system": UCUM, "code": "kPa"}},
                        {"code": {"coding": [{"system": MDC, "code": "150022"}]},
                         "valueQuantity": {"value": 80, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}}]}
    report = UnmappedReport()
    out, warnings = harmonize_resource(bp, report=report)
    # the compound code only maps 'wider' (a LOINC panel): reported, not added
    assert [w["expression"] for w in warnings] == [["Observation.code.coding[0]"]]
    assert report.to_dict()["unmapped"][0]["code"] == "150020"
    sys_ = out["component"][0]
    assert sys_["code"]["coding"][1]["code"] == "8480-6"
    assert sys_["valueQuantity"]["value"] == float(Fraction(16000) / Fraction("133.322"))  # kPa -> mm[Hg]
    assert out["component"][1]["valueQuantity"]["value"] == 80


def test_adverse_event_and_condition():
    ae = {"resourceType": "AdverseEvent", "actuality": "actual", "subject": {"reference": "Patient/p1"},
          "event": {"coding": [{"system": EDC_AE, "code": "AE-HYPOGLY", "display": "Hypoglycaemia"}]}}
    out, warnings = harmonize_resource(ae)
    assert warnings == []
    assert out["event"]["coding"][1] == {"system": SNOMED, "code": "302866003", "display": "Hypoglycemia"}
    cond = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": SNOMED, "code": "44054006"}]}}
    assert harmonize_resource(cond) == (cond, [])


def test_unmapped_codes_are_warned_and_reported():
    report = UnmappedReport()
    h = Harmonizer.shipped()
    for _ in range(3):
        h.harmonize(obs(EDC_LAB, "LAB-NEW", 1, "mg/dL"), report)
    out, warnings = h.harmonize({"resourceType": "Condition", "code": {"coding": [{"system": "urn:x", "code": "c1"}]}}, report)
    assert warnings[0]["severity"] == "warning" and warnings[0]["details"]["coding"][0]["code"] == "unmapped-code"
    assert report.to_dict() == {"unmapped": [
        {"system": EDC_LAB, "code": "LAB-NEW", "display": None, "count": 3, "resourceTypes": ["Observation"]},
        {"system": "urn:x", "code": "c1", "display": None, "count": 1, "resourceTypes": ["Condition"]}]}


def test_incompatible_or_unknown_units_are_kept_with_a_warning():
    out, warnings = harmonize_resource(obs(EDC_LAB, "LAB-FPG", 5.5, "mmol/mol"))
    assert out["valueQuantity"]["value"] == 5.5 and warnings[0]["details"]["coding"][0]["code"] == "unit-not-convertible"
    out, warnings = harmonize_resource(obs(MDC, "188736", 80, "pounds", ucum=False))
    assert out["valueQuantity"]["value"] == 80 and "pounds" in warnings[0]["diagnostics"]


def test_non_ucum_quantity_with_ucum_like_unit_is_converted():
    out, _ = harmonize_resource(obs(MDC, "188736", 100, "[lb_av]", ucum=False))
    assert out["valueQuantity"]["value"] == 45.359237 and out["valueQuantity"]["system"] == UCUM
