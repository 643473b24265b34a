"""The generic parameter layer: an OperationDefinition parses operation input and builds output.

Input comes from a GET query string (primitive parameters only) or a POST ``Parameters`` body
(or a bare resource for operations with one resource input); output is a ``Parameters`` resource.
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any, Iterable, Mapping

from fhir_ops import r4
from fhir_ops.errors import FhirError, InvalidRequest
from fhir_ops.r4.validator import validate_datatype

# R4 primitive types and the regular expressions of the specification (datatypes.html).
_DATE = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_PRIMITIVE_PATTERNS: dict[str, str] = {
    "boolean": r"true|false",
    "integer": r"[0]|[-+]?[1-9][0-9]*",
    "positiveInt": r"\+?[1-9][0-9]*",
    "unsignedInt": r"[0]|([1-9][0-9]*)",
    "decimal": r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?",
    "date": _DATE,
    "dateTime": _DATE + r"(T" + _TIME + _ZONE + r")?",
    "instant": r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T"
               + _TIME + _ZONE,
    "time": _TIME,
    "string": r"[ \r\n\t\S]+",
    "markdown": r"[ \r\n\t\S]+",
    "code": r"[^\s]+(\s[^\s]+)*",
    "id": r"[A-Za-z0-9\-\.]{1,64}",
    "uri": r"\S*",
    "url": r"\S*",
    "canonical": r"\S*",
    "oid": r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+",
    "uuid": r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "base64Binary": r"(\s*([0-9a-zA-Z\+/=]){4}\s*)+",
}
PRIMITIVE_TYPES = frozenset(_PRIMITIVE_PATTERNS)
_COMPILED = {name: re.compile(rf"^(?:{pattern})$") for name, pattern in _PRIMITIVE_PATTERNS.items()}
_INTEGER_TYPES = {"integer", "positiveInt", "unsignedInt"}
_INT32 = (-(2 ** 31), 2 ** 31 - 1)
#: types that stand for "any resource" in an OperationDefinition
ANY_RESOURCE = frozenset({"Resource", "DomainResource", "Any"})
#: query parameters of the FHIR HTTP layer, not operation inputs
HTTP_LAYER_PARAMS = frozenset({"_format", "_pretty", "_summary", "_elements"})


@dataclass(frozen=True)
class ParameterSpec:
    """One ``OperationDefinition.parameter`` reduced to what parsing and building need."""

    name: str
    use: str
    min: int
    max: int | None  # None = "*"
    type: str | None
    parts: tuple["ParameterSpec", ...] = ()

    @property
    def repeats(self) -> bool:
        return self.max != 1

    @property
    def is_resource(self) -> bool:
        return self.type is not None and is_resource_type(self.type)

    @property
    def is_primitive(self) -> bool:
        return self.type in PRIMITIVE_TYPES

    @property
    def value_key(self) -> str:
        """The ``Parameters.parameter`` element this parameter travels in."""
        if self.parts:
            return "part"
        if self.is_resource:
            return "resource"
        return "value" + self.type[0].upper() + self.type[1:]


def parameter_specs(definition: Mapping, use: str) -> tuple[ParameterSpec, ...]:
    """The ``in`` or ``out`` parameters of an OperationDefinition, in declaration order.

    Parameters
    ----------
    definition : Mapping
        An R4 OperationDefinition (dict).
    use : {"in", "out"}
        Which direction to return.

    Returns
    -------
    tuple of ParameterSpec
    """
    return tuple(_spec(p) for p in definition.get("parameter", []) if p.get("use") == use)


def _spec(raw: Mapping) -> ParameterSpec:
    maximum = raw.get("max", "1")
    return ParameterSpec(
        name=raw["name"],
        use=raw.get("use", "in"),
        min=int(raw.get("min", 0)),
        max=None if maximum == "*" else int(maximum),
        type=raw.get("type"),
        parts=tuple(_spec(p) for p in raw.get("part", [])),
    )


@lru_cache(maxsize=None)
def is_resource_type(type_name: str) -> bool:
    """True for ``Resource``-like wildcards and R4 resource type names (``Patient``)."""
    if type_name in ANY_RESOURCE:
        return True
    return r4.is_resource_type(type_name)


# --------------------------------------------------------------------------------------- input

def parse_query(definition: Mapping, args: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Parse the query string of a GET operation call into Python values.

    Parameters
    ----------
    definition : Mapping
        The operation's OperationDefinition.
    args : iterable of (str, str)
        Query parameters in order (``request.args.items(multi=True)``).

    Returns
    -------
    dict
        Parameter name → value (a list where the parameter may repeat). Parameters that were not
        given are absent.

    Raises
    ------
    InvalidRequest
        ``unknown-parameter``, ``wrong-type`` (including any non-primitive parameter, which cannot
        be expressed in a query string), ``missing-parameter`` or ``too-many-values``.
    """
    specs = {s.name: s for s in parameter_specs(definition, "in")}
    collected: dict[str, list[Any]] = {}
    for name, raw in args:
        if name in HTTP_LAYER_PARAMS:
            continue
        spec = specs.get(name)
        if spec is None:
            raise _unknown(name, specs)
        if not spec.is_primitive:
            raise InvalidRequest(
                f"Parameter '{name}' is of type {spec.type or 'part'}, which cannot be given in a GET "
                "query string; POST a Parameters resource instead",
                error_id="wrong-type")
        # a repeating parameter is repeated in the query (?x=1&x=2), as in FHIR search
        collected.setdefault(name, []).append(_primitive_from_text(spec, raw))
    return _finish(specs.values(), collected, path="")


def parse_body(definition: Mapping, body: Any, resource_type: str | None = None) -> dict[str, Any]:
    """Parse a POST body (``Parameters`` or a bare resource) into Python values.

    Parameters
    ----------
    definition : Mapping
        The operation's OperationDefinition.
    body : Any
        The decoded JSON body, or None when the request had no body.
    resource_type : str, optional
        Unused by parsing itself; accepted so callers can pass the request's context.

    Returns
    -------
    dict
        Parameter name → value; see :func:`parse_query`. A bare resource body becomes the value of
        the operation's single resource-typed ``in`` parameter.

    Raises
    ------
    InvalidRequest
        A body that is neither a Parameters resource nor an acceptable bare resource, or any of the
        errors of :func:`parse_query` (with a FHIRPath ``expression``).
    """
    specs = {s.name: s for s in parameter_specs(definition, "in")}
    if body is None:
        return _finish(specs.values(), {}, path="")
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise InvalidRequest("The request body must be a FHIR resource (a JSON object with resourceType)",
                             error_id="invalid-body")
    if body["resourceType"] != "Parameters":
        resource_specs = [s for s in specs.values() if s.is_resource]
        if len(resource_specs) != 1:
            raise InvalidRequest(
                f"The body is a {body['resourceType']}, but this operation takes a Parameters resource",
                error_id="invalid-body")
        spec = resource_specs[0]
        _check_resource_type(spec, body, "")
        return _finish(specs.values(), {spec.name: [body]}, path="")
    params = body.get("parameter", [])
    if not isinstance(params, list):
        raise InvalidRequest("Parameters.parameter must be an array", error_id="invalid-body",
                             expression=["Parameters.parameter"])
    return _parse_entries(specs, params, "Parameters.parameter")


def _parse_entries(specs: Mapping[str, ParameterSpec], entries: list, path: str) -> dict[str, Any]:
    collected: dict[str, list[Any]] = {}
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidRequest(f"{where} must be an object with a name", error_id="invalid-body",
                                 expression=[where])
        spec = specs.get(entry["name"])
        if spec is None:
            raise _unknown(entry["name"], specs, expression=f"{where}.name")
        collected.setdefault(spec.name, []).append(_value_from_entry(spec, entry, where))
    return _finish(specs.values(), collected, path=path)


def _value_from_entry(spec: ParameterSpec, entry: dict, where: str) -> Any:
    carriers = [k for k in entry if k.startswith("value") or k in ("resource", "part")]
    expected = spec.value_key
    if carriers != [expected]:
        found = ", ".join(carriers) or "no value"
        raise InvalidRequest(
            f"Parameter '{spec.name}' must be of type {_type_label(spec)} ({expected}); found {found}",
            error_id="wrong-type", expression=[f"{where}.{carriers[0] if carriers else expected}"])
    value = entry[expected]
    element = f"{where}.{expected}"
    if spec.parts:
        if not isinstance(value, list):
            raise _wrong_type(spec, element)
        return _parse_entries({p.name: p for p in spec.parts}, value, f"{where}.part")
    if spec.is_resource:
        if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
            raise _wrong_type(spec, element)
        _check_resource_type(spec, value, element)
        return value
    if spec.is_primitive:
        return _primitive_from_json(spec, value, element)
    return _complex(spec, value, element)


def _primitive_from_text(spec: ParameterSpec, text: str) -> Any:
    if not _COMPILED[spec.type].match(text):
        raise _wrong_type(spec, None, got=text)
    return _convert(spec, text, None)


def _primitive_from_json(spec: ParameterSpec, value: Any, element: str) -> Any:
    # JSON carries booleans and numbers natively; a quoted "5" is not a valueInteger.
    if spec.type == "boolean":
        if not isinstance(value, bool):
            raise _wrong_type(spec, element, got=value)
        return value
    if spec.type in _INTEGER_TYPES or spec.type == "decimal":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(spec, element, got=value)
        if spec.type in _INTEGER_TYPES and (isinstance(value, float) and not value.is_integer()):
            raise _wrong_type(spec, element, got=value)
        text = str(int(value)) if spec.type in _INTEGER_TYPES else repr(value)
        if spec.type == "decimal":
            return float(value)
    else:
        if not isinstance(value, str):
            raise _wrong_type(spec, element, got=value)
        text = value
    if not _COMPILED[spec.type].match(text):
        raise _wrong_type(spec, element, got=value)
    return _convert(spec, text, element)


def _convert(spec: ParameterSpec, text: str, element: str | None) -> Any:
    if spec.type == "boolean":
        return text == "true"
    if spec.type in _INTEGER_TYPES:
        number = int(text)
        if not _INT32[0] <= number <= _INT32[1]:
            raise _wrong_type(spec, element, got=text, why="outside the 32-bit range of FHIR integers")
        return number
    if spec.type == "decimal":
        return float(text)
    return text


def _complex(spec: ParameterSpec, value: Any, element: str) -> dict:
    if not isinstance(value, dict):
        raise _wrong_type(spec, element, got=value)
    found = validate_datatype(spec.type, value, element)
    if found is None:
        raise FhirError(f"OperationDefinition declares unknown type {spec.type!r} for '{spec.name}'",
                        status=500, code="exception", error_id="bad-operation-definition")
    if found:
        detail = "; ".join(f"{i.expression}: {i.message}" for i in found[:2])
        raise _wrong_type(spec, element, why=f"not a valid {spec.type}: {detail}")
    return value


def _check_resource_type(spec: ParameterSpec, resource: dict, element: str) -> None:
    if spec.type in ANY_RESOURCE:
        return
    if resource.get("resourceType") != spec.type:
        raise InvalidRequest(
            f"Parameter '{spec.name}' must be a {spec.type} resource, got {resource.get('resourceType')}",
            error_id="wrong-type", expression=[element] if element else None)


def _finish(specs: Iterable[ParameterSpec], collected: dict[str, list[Any]], path: str) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for spec in specs:
        values = collected.get(spec.name, [])
        if len(values) < spec.min:
            raise InvalidRequest(
                f"Missing required parameter '{spec.name}' ({_type_label(spec)}, at least {spec.min})",
                error_id="missing-parameter", expression=[path] if path else None)
        if spec.max is not None and len(values) > spec.max:
            raise InvalidRequest(
                f"Parameter '{spec.name}' may appear at most {spec.max} time(s); got {len(values)}",
                error_id="too-many-values", expression=[path] if path else None)
        if values:
            parsed[spec.name] = values if spec.repeats else values[0]
    return parsed


def _unknown(name: str, specs: Mapping[str, ParameterSpec], expression: str | None = None) -> InvalidRequest:
    known = ", ".join(sorted(specs)) or "none"
    return InvalidRequest(f"Unknown parameter '{name}' (this operation accepts: {known})",
                          error_id="unknown-parameter", expression=[expression] if expression else None)


def _type_label(spec: ParameterSpec) -> str:
    return "part" if spec.parts else spec.type


def _wrong_type(spec: ParameterSpec, element: str | None, *, got: Any = None, why: str | None = None) -> InvalidRequest:
    reason = why or (f"got {got!r}" if got is not None else "wrong structure")
    return InvalidRequest(f"Parameter '{spec.name}' must be of type {_type_label(spec)}: {reason}",
                          error_id="wrong-type", expression=[element] if element else None)


# -------------------------------------------------------------------------------------- output

def build_output(definition: Mapping, outputs: Mapping[str, Any]) -> dict:
    """Build the operation's response body from Python values, typed by the definition.

    Parameters
    ----------
    definition : Mapping
        The operation's OperationDefinition.
    outputs : Mapping
        ``out`` parameter name → value (a list for repeating parameters; a dict of part name →
        value for parameters with parts; a resource dict for resource-typed parameters).

    Returns
    -------
    dict
        A ``Parameters`` resource, or the bare resource when the definition has a single
        resource-typed ``out`` parameter named ``return`` (FHIR R4, operations.html#response).

    Raises
    ------
    FhirError
        500 ``bad-operation-output`` when the handler produced an undeclared parameter, a value of
        the wrong type, or left out a required one: a server defect, never the client's fault.
    """
    specs = parameter_specs(definition, "out")
    if len(specs) == 1 and specs[0].name == "return" and specs[0].is_resource and not specs[0].repeats:
        value = outputs.get("return")
        if set(outputs) - {"return"} or not isinstance(value, dict):
            raise _bad_output("expected exactly one 'return' resource")
        _check_out_resource(specs[0], value)
        return value
    return {"resourceType": "Parameters", "parameter": _build_entries(specs, outputs)}


def _build_entries(specs: tuple[ParameterSpec, ...], outputs: Mapping[str, Any]) -> list[dict]:
    by_name = {s.name: s for s in specs}
    undeclared = sorted(set(outputs) - set(by_name))
    if undeclared:
        raise _bad_output(f"undeclared output parameter(s) {', '.join(undeclared)}")
    entries: list[dict] = []
    for spec in specs:
        value = outputs.get(spec.name)
        values = [] if value is None else (list(value) if spec.repeats and isinstance(value, (list, tuple)) else [value])
        if len(values) < spec.min or (spec.max is not None and len(values) > spec.max):
            raise _bad_output(f"'{spec.name}' has {len(values)} value(s), declared {spec.min}..{spec.max or '*'}")
        for item in values:
            entries.append({"name": spec.name, spec.value_key: _out_value(spec, item)})
    return entries


def _out_value(spec: ParameterSpec, value: Any) -> Any:
    if spec.parts:
        if not isinstance(value, Mapping):
            raise _bad_output(f"'{spec.name}' has parts and needs a dict of part values")
        return _build_entries(spec.parts, value)
    if spec.is_resource:
        _check_out_resource(spec, value)
        return value
    if spec.is_primitive:
        return _primitive_to_json(spec, value)
    if not isinstance(value, Mapping):
        raise _bad_output(f"'{spec.name}' must be a {spec.type} (dict)")
    return dict(value)


def _primitive_to_json(spec: ParameterSpec, value: Any) -> Any:
    if spec.type == "boolean":
        if not isinstance(value, bool):
            raise _bad_output(f"'{spec.name}' must be a bool")
        return value
    if spec.type in _INTEGER_TYPES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad_output(f"'{spec.name}' must be an int")
        return value
    if spec.type == "decimal":
        if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
            raise _bad_output(f"'{spec.name}' must be a number")
        return float(value)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise _bad_output(f"'{spec.name}' datetime must carry a time zone")
        return value.isoformat()
    if isinstance(value, _dt.date):
        return value.isoformat()
    if not isinstance(value, str) or not _COMPILED[spec.type].match(value):
        raise _bad_output(f"'{spec.name}' must be a valid {spec.type}, got {value!r}")
    return value


def _check_out_resource(spec: ParameterSpec, value: Any) -> None:
    if not isinstance(value, Mapping) or "resourceType" not in value:
        raise _bad_output(f"'{spec.name}' must be a resource")
    if spec.type not in ANY_RESOURCE and value["resourceType"] != spec.type:
        raise _bad_output(f"'{spec.name}' must be a {spec.type}, got {value['resourceType']}")


def _bad_output(message: str) -> FhirError:
    return FhirError(f"The operation produced an invalid result: {message}", status=500,
                     code="exception", error_id="bad-operation-output")
