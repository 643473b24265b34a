"""CodeSystem/$lookup and $validate-code (CodeSystem and ValueSet) over the shipped subsets, in R4 shape."""
from __future__ import annotations

import pytest

from fhir_ops.errors import InvalidRequest, NotFound
from terminology.catalog import LOINC, MDC, SNOMED, UCUM
from terminology.codesystem import lookup, validate_code
from tests.terminology.r4check import output_problems

pytestmark = pytest.mark.unit
VS = "https://trialtwin.org/fhir/ValueSet/"


def params(out, name):
    return [p for p in out["parameter"] if p["name"] == name]


def test_lookup_snomed_concept():
    out = lookup(system=SNOMED, code="302866003")
    assert output_problems(out, "OperationDefinition-lookup.json") == []
    assert params(out, "display") == [{"name": "display", "valueString": "Hypoglycemia"}]
    assert params(out, "version")[0]["valueString"] == "http://snomed.info/sct/900000000000207008"
    designations = [{p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in d["part"]}
                    for d in params(out, "designation")]
    assert {"language": "en", "use": {"system": SNOMED, "code": "900000000000003001", "display": "Fully specified name"},
            "value": "Hypoglycemia (disorder)"} in designations
    assert lookup(system=SNOMED, code="302866003", display_language="en-GB")["parameter"][2]["valueString"] == "Hypoglycaemia"


def test_lookup_loinc_properties_and_filter():
    out = lookup(coding={"system": LOINC, "code": "1558-6"})
    assert output_problems(out, "OperationDefinition-lookup.json") == []
    props = {p["part"][0]["valueCode"]: p["part"][1] for p in params(out, "property")}
    assert props["canonical-unit"] == {"name": "value", "valueCode": "mg/dL"}
    assert props["molar-mass"] == {"name": "value", "valueDecimal": 180.156}
    only = lookup(system=LOINC, code="1558-6", property=["canonical-unit"])
    assert [p["part"][0]["valueCode"] for p in params(only, "property")] == ["canonical-unit"]


def test_lookup_ucum_and_errors():
    assert params(lookup(system=UCUM, code="mg/dL"), "display")[0]["valueString"] == "mg/dL"
    with pytest.raises(NotFound) as info:
        lookup(system=LOINC, code="9999-9")
    assert info.value.error_id == "unknown-code" and "subset" in info.value.message
    with pytest.raises(NotFound):
        lookup(system="http://example.org/none", code="x")
    with pytest.raises(InvalidRequest):
        lookup(code="4548-4")


@pytest.mark.parametrize("kwargs, result", [
    (dict(system=LOINC, code="4548-4"), True),
    (dict(url=MDC, code="188736", display="MDC_MASS_BODY_ACTUAL"), True),
    (dict(system=SNOMED, code="62315008", display="Diarrhoea"), True),  # en-GB designation
    (dict(system=LOINC, code="4548-4", display="HbA1c"), False),
    (dict(system=LOINC, code="0000-0"), False),
    (dict(system=UCUM, code="mL/min/{1.73_m2}"), True),
    (dict(system=UCUM, code="mg/dl/x"), False),
    (dict(codeable_concept={"coding": [{"system": "urn:x", "code": "1"}, {"system": SNOMED, "code": "25064002"}]}), True),
])
def test_codesystem_validate_code(kwargs, result):
    out = validate_code(**kwargs)
    assert output_problems(out, "OperationDefinition-validate-code.json") == []
    assert params(out, "result") == [{"name": "result", "valueBoolean": result}]
    assert bool(params(out, "message")) is (not result)


def test_valueset_validate_code():
    ok = validate_code(value_set=VS + "adverse-event-findings", system=SNOMED, code="404640003")
    assert params(ok, "result")[0]["valueBoolean"] is True
    assert params(ok, "display")[0]["valueString"] == "Dizziness"
    # a valid SNOMED concept that is not in the value set
    out = validate_code(value_set=VS + "adverse-event-findings", system=SNOMED, code="44054006")
    assert params(out, "result")[0]["valueBoolean"] is False
    assert "not in the value set" in params(out, "message")[0]["valueString"]
    assert output_problems(out, "OperationDefinition-validate-code.json") == []
    # whole-system include: every code of the local code system is in
    assert params(validate_code(value_set=VS + "edc-lab", coding={"system": "https://trialtwin.org/fhir/CodeSystem/edc-lab",
                                                                  "code": "LAB-EGFR"}), "result")[0]["valueBoolean"] is True
    assert params(validate_code(value_set=VS + "ucum-units", system=UCUM, code="[lb_av]"), "result")[0]["valueBoolean"] is True
    with pytest.raises(NotFound):
        validate_code(value_set=VS + "nope", system=SNOMED, code="404640003")
