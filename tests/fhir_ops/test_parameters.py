"""Unit tests of the generic parameter layer: every type, cardinality, and each kind of bad input."""
from __future__ import annotations

import datetime as dt

import pytest

from fhir_ops.errors import FhirError, InvalidRequest
from fhir_ops.parameters import build_output, parse_body, parse_query

pytestmark = pytest.mark.unit

PRIMITIVES = {
    # type: (good JSON value, Python value, bad JSON value, good query text, bad query text)
    "string": ("hello world", "hello world", 5, "hello", None),
    "code": ("mg", "mg", "two  spaces", "mg", " lead"),
    "id": ("abc-1.2", "abc-1.2", "a b", "abc", "has space"),
    "uri": ("http://x.org/a", "http://x.org/a", "has space", "urn:x", "a b"),
    "canonical": ("http://x.org/A|1", "http://x.org/A|1", 7, "http://x.org/A", "a b"),
    "boolean": (True, True, "true", "false", "yes"),
    "integer": (-3, -3, 2.5, "-12", "1.0"),
    "positiveInt": (4, 4, 0, "7", "0"),
    "unsignedInt": (0, 0, -1, "0", "-1"),
    "decimal": (1.25, 1.25, "1.25", "-0.5", "1,5"),
    "date": ("2024-02", "2024-02", "2024-13-01", "2024-02-29", "24-02-29"),
    "dateTime": ("2024-02-29T10:00:00+01:00", "2024-02-29T10:00:00+01:00", "2024-02-29T10:00",
                 "2024-02-29", "2024-02-29T25:00:00Z"),
    "instant": ("2024-02-29T10:00:00.123Z", "2024-02-29T10:00:00.123Z", "2024-02-29",
                "2024-02-29T10:00:00Z", "2024-02-29T10:00:00"),
}

COMPLEX = {
    "Reference": ({"reference": "Patient/1"}, {"reference": 5}),
    "Quantity": ({"value": 50, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"},
                 {"value": "fifty"}),
    "Coding": ({"system": "http://loinc.org", "code": "4548-4"}, {"code": ["4548-4"]}),
    "CodeableConcept": ({"coding": [{"system": "http://loinc.org", "code": "4548-4"}], "text": "HbA1c"},
                        {"coding": {"code": "x"}}),
    "Period": ({"start": "2024-01-01", "end": "2024-06-30"}, {"start": "January"}),
    "Identifier": ({"system": "https://trialtwin.org/id", "value": "TT-201"}, {"value": {"a": 1}}),
}


def definition(*params: dict) -> dict:
    return {"resourceType": "OperationDefinition", "code": "t", "system": True, "parameter": list(params)}


def p(name: str, type_: str | None = None, min_: int = 0, max_: str = "1", use: str = "in", part=None) -> dict:
    spec = {"name": name, "use": use, "min": min_, "max": max_}
    if type_:
        spec["type"] = type_
    if part:
        spec["part"] = part
    return spec


def body(*entries: dict) -> dict:
    return {"resourceType": "Parameters", "parameter": list(entries)}


def value_key(type_: str) -> str:
    return "value" + type_[0].upper() + type_[1:]


@pytest.mark.parametrize("type_", sorted(PRIMITIVES))
def test_primitive_in_body_parses_to_python(type_):
    good, expected, _, _, _ = PRIMITIVES[type_]
    parsed = parse_body(definition(p("x", type_)), body({"name": "x", value_key(type_): good}))
    assert parsed == {"x": expected}
    assert type(parsed["x"]) is type(expected)


@pytest.mark.parametrize("type_", sorted(PRIMITIVES))
def test_primitive_in_body_with_bad_value_is_wrong_type(type_):
    _, _, bad, _, _ = PRIMITIVES[type_]
    with pytest.raises(InvalidRequest) as err:
        parse_body(definition(p("a", "string"), p("x", type_)),
                   body({"name": "a", "valueString": "ok"}, {"name": "x", value_key(type_): bad}))
    assert err.value.status == 400 and err.value.error_id == "wrong-type"
    assert "'x'" in err.value.message and type_ in err.value.message
    assert err.value.expression == [f"Parameters.parameter[1].{value_key(type_)}"]


@pytest.mark.parametrize("type_", sorted(PRIMITIVES))
def test_primitive_in_query(type_):
    _, _, _, text, bad_text = PRIMITIVES[type_]
    parsed = parse_query(definition(p("x", type_)), [("x", text)])
    assert "x" in parsed
    if type_ in ("integer", "positiveInt", "unsignedInt"):
        assert parsed["x"] == int(text)
    elif type_ == "decimal":
        assert parsed["x"] == float(text)
    elif type_ == "boolean":
        assert parsed["x"] is (text == "true")
    else:
        assert parsed["x"] == text
    if bad_text is not None:
        with pytest.raises(InvalidRequest) as err:
            parse_query(definition(p("x", type_)), [("x", bad_text)])
        assert err.value.error_id == "wrong-type" and type_ in err.value.message


def test_value_of_the_wrong_kind_names_the_expected_element():
    with pytest.raises(InvalidRequest) as err:
        parse_body(definition(p("count", "integer")), body({"name": "count", "valueString": "3"}))
    assert err.value.error_id == "wrong-type"
    assert "integer" in err.value.message and "valueInteger" in err.value.message
    assert err.value.expression == ["Parameters.parameter[0].valueString"]


def test_integer_outside_32_bits_is_refused():
    with pytest.raises(InvalidRequest, match="32-bit"):
        parse_query(definition(p("n", "integer")), [("n", str(2 ** 31))])


@pytest.mark.parametrize("type_", sorted(COMPLEX))
def test_complex_types_in_body(type_):
    good, bad = COMPLEX[type_]
    spec = definition(p("c", type_))
    assert parse_body(spec, body({"name": "c", value_key(type_): good})) == {"c": good}
    with pytest.raises(InvalidRequest) as err:
        parse_body(spec, body({"name": "c", value_key(type_): bad}))
    assert err.value.error_id == "wrong-type" and type_ in err.value.message
    assert err.value.expression == [f"Parameters.parameter[0].{value_key(type_)}"]


@pytest.mark.parametrize("type_", ["Quantity", "Reference", "Patient", "Resource"])
def test_non_primitive_parameter_in_get_is_refused(type_):
    with pytest.raises(InvalidRequest) as err:
        parse_query(definition(p("c", type_)), [("c", "anything")])
    assert err.value.error_id == "wrong-type" and "GET" in err.value.message


def test_resource_parameter_typed_and_any():
    patient = {"resourceType": "Patient", "id": "p1"}
    spec = definition(p("patient", "Patient"), p("anything", "Resource"))
    parsed = parse_body(spec, body({"name": "patient", "resource": patient},
                                   {"name": "anything", "resource": {"resourceType": "Group"}}))
    assert parsed == {"patient": patient, "anything": {"resourceType": "Group"}}
    with pytest.raises(InvalidRequest) as err:
        parse_body(spec, body({"name": "patient", "resource": {"resourceType": "Observation"}}))
    assert err.value.error_id == "wrong-type" and "Patient" in err.value.message
    with pytest.raises(InvalidRequest, match="type Patient"):
        parse_body(spec, body({"name": "patient", "valueString": "p1"}))


def test_bare_resource_body_fills_the_single_resource_parameter():
    spec = definition(p("resource", "Resource"), p("mode", "code"))
    obs = {"resourceType": "Observation", "status": "final"}
    assert parse_body(spec, obs) == {"resource": obs}
    two = definition(p("a", "Resource"), p("b", "Resource"))
    with pytest.raises(InvalidRequest, match="Parameters"):
        parse_body(two, obs)


def test_nested_parts_parse_into_dicts_and_lists():
    spec = definition(p("dose", min_=1, max_="*", part=[
        p("amount", "Quantity", min_=1), p("day", "integer", max_="*")]))
    parsed = parse_body(spec, body(
        {"name": "dose", "part": [{"name": "amount", "valueQuantity": {"value": 50, "unit": "mg"}},
                                  {"name": "day", "valueInteger": 1}, {"name": "day", "valueInteger": 2}]},
        {"name": "dose", "part": [{"name": "amount", "valueQuantity": {"value": 100, "unit": "mg"}}]}))
    assert parsed == {"dose": [{"amount": {"value": 50, "unit": "mg"}, "day": [1, 2]},
                               {"amount": {"value": 100, "unit": "mg"}}]}
    with pytest.raises(InvalidRequest) as err:
        parse_body(spec, body({"name": "dose", "part": [{"name": "day", "valueInteger": 3}]}))
    assert err.value.error_id == "missing-parameter" and "'amount'" in err.value.message
    with pytest.raises(InvalidRequest) as err:
        parse_body(spec, body({"name": "dose", "part": [{"name": "amount", "valueQuantity": {"value": 1}},
                                                       {"name": "day", "valueString": "x"}]}))
    assert err.value.expression == ["Parameters.parameter[0].part[1].valueString"]
    with pytest.raises(InvalidRequest) as err:  # R4 JSON: an empty object is not a Quantity
        parse_body(spec, body({"name": "dose", "part": [{"name": "amount", "valueQuantity": {}}]}))
    assert err.value.expression == ["Parameters.parameter[0].part[0].valueQuantity"]


def test_cardinality_missing_and_too_many():
    spec = definition(p("a", "string", min_=1), p("b", "integer", max_="2"), p("c", "code", max_="*"))
    with pytest.raises(InvalidRequest) as err:
        parse_query(spec, [("b", "1")])
    assert err.value.error_id == "missing-parameter" and "'a'" in err.value.message
    with pytest.raises(InvalidRequest) as err:
        parse_query(spec, [("a", "x"), ("b", "1"), ("b", "2"), ("b", "3")])
    assert err.value.error_id == "too-many-values" and "'b'" in err.value.message
    with pytest.raises(InvalidRequest) as err:
        parse_body(spec, body({"name": "a", "valueString": "x"}, {"name": "a", "valueString": "y"}))
    assert err.value.error_id == "too-many-values"
    parsed = parse_query(spec, [("a", "x"), ("c", "u"), ("c", "v"), ("b", "7")])
    assert parsed == {"a": "x", "b": [7], "c": ["u", "v"]}


def test_unknown_parameter_is_named():
    spec = definition(p("a", "string"))
    with pytest.raises(InvalidRequest) as err:
        parse_query(spec, [("zzz", "1")])
    assert err.value.error_id == "unknown-parameter" and "'zzz'" in err.value.message
    with pytest.raises(InvalidRequest) as err:
        parse_body(spec, body({"name": "a", "valueString": "x"}, {"name": "zzz", "valueString": "y"}))
    assert err.value.error_id == "unknown-parameter"
    assert err.value.expression == ["Parameters.parameter[1].name"]
    assert parse_query(spec, [("_format", "json"), ("a", "x")]) == {"a": "x"}


def test_malformed_bodies_are_400():
    spec = definition(p("a", "string"))
    for bad in ([1, 2], {"parameter": []}, {"resourceType": "Parameters", "parameter": {}},
                {"resourceType": "Parameters", "parameter": [{"valueString": "no name"}]},
                {"resourceType": "Parameters", "parameter": [{"name": "a", "valueString": "x",
                                                              "valueCode": "y"}]}):
        with pytest.raises(InvalidRequest):
            parse_body(spec, bad)
    assert parse_body(spec, None) == {}


def test_build_output_typed_by_definition():
    spec = definition(
        p("count", "integer", use="out", min_=1), p("ok", "boolean", use="out"),
        p("mean", "decimal", use="out"), p("when", "dateTime", use="out"),
        p("day", "date", use="out"),
        p("codes", "Coding", use="out", max_="*"), p("bundle", "Bundle", use="out"),
        p("row", use="out", max_="*", part=[p("label", "string", use="out"), p("n", "integer", use="out")]))
    built = build_output(spec, {
        "count": 3, "ok": False, "mean": 1.5,
        "when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), "day": dt.date(2024, 1, 2),
        "codes": [{"code": "a"}, {"code": "b"}], "bundle": {"resourceType": "Bundle", "type": "collection"},
        "row": [{"label": "x", "n": 1}]})
    assert built == {"resourceType": "Parameters", "parameter": [
        {"name": "count", "valueInteger": 3}, {"name": "ok", "valueBoolean": False},
        {"name": "mean", "valueDecimal": 1.5}, {"name": "when", "valueDateTime": "2024-01-02T03:04:05+00:00"},
        {"name": "day", "valueDate": "2024-01-02"},
        {"name": "codes", "valueCoding": {"code": "a"}}, {"name": "codes", "valueCoding": {"code": "b"}},
        {"name": "bundle", "resource": {"resourceType": "Bundle", "type": "collection"}},
        {"name": "row", "part": [{"name": "label", "valueString": "x"}, {"name": "n", "valueInteger": 1}]}]}
    # what comes out parses back in with the same definition read as inputs
    as_inputs = {**spec, "parameter": [{**q, "use": "in"} for q in spec["parameter"]]}
    assert parse_body(as_inputs, built)["row"] == [{"label": "x", "n": 1}]


def test_single_return_resource_is_bare():
    spec = definition(p("return", "OperationOutcome", use="out", min_=1))
    oo = {"resourceType": "OperationOutcome", "issue": []}
    assert build_output(spec, {"return": oo}) is oo
    with pytest.raises(FhirError) as err:
        build_output(spec, {"return": {"resourceType": "Patient"}})
    assert err.value.status == 500


@pytest.mark.parametrize("outputs", [{"count": "3"}, {"count": True}, {}, {"count": 1, "extra": 2}])
def test_bad_handler_output_is_a_server_error(outputs):
    spec = definition(p("count", "integer", use="out", min_=1))
    with pytest.raises(FhirError) as err:
        build_output(spec, outputs)
    assert err.value.status == 500 and err.value.error_id == "bad-operation-output"
