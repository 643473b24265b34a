"""The former validator (``fhir.resources`` R4B pydantic models), kept only as a reference.

The server validates with fhir_ops.r4.validator; this module is what the validation-agreement test and
bench/validation_bench.py compare it with (verdicts where R4 and R4B agree; speed in the same run).
"""
from __future__ import annotations

import re
from functools import lru_cache

from fhir_ops.errors import InvalidRequest

ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_MAX_ISSUES = 50


@lru_cache(maxsize=None)
def resource_model(resource_type: str):
    """Return the R4B model class of a resource type, or None when it is not a resource type.

    Cached because class lookup imports a module on first use and this is on the ingest path.
    """
    if not isinstance(resource_type, str) or not resource_type.isidentifier() or not resource_type[:1].isupper():
        return None
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    try:
        cls = get_fhir_model_class(resource_type)
    except (ValueError, ImportError, AttributeError):
        return None
    # get_fhir_model_class also knows datatypes (HumanName, Quantity ...): those are not resources.
    return cls if isinstance(cls, type) and issubclass(cls, Resource) else None


def is_resource_type(resource_type: str) -> bool:
    """Tell whether ``resource_type`` names a FHIR resource the R4B models know.

    Examples
    --------
    >>> is_resource_type("Patient"), is_resource_type("HumanName"), is_resource_type("Foo")
    (True, False, False)
    """
    return resource_model(resource_type) is not None


@lru_cache(maxsize=1)
def all_resource_types() -> tuple[str, ...]:
    """Every resource type of the R4B models, sorted (loads every model: slow once, then cached)."""
    from fhir.resources.R4B import fhirtypes

    names = sorted(n[:-4] for n in dir(fhirtypes) if n.endswith("Type") and n[:1].isupper())
    return tuple(n for n in names if is_resource_type(n))


def _expression(resource_type: str, loc: tuple) -> str:
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("resource_type", "__root__"):
            continue
        else:
            path += f".{part}"
    return path


def _message(err: dict) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown element"
    return " ".join(str(err.get("msg", "invalid value")).split())


def validate_resource(resource: dict) -> dict:
    """Check a resource against its R4B model and return it unchanged.

    Parameters
    ----------
    resource : dict
        A FHIR R4 resource as parsed JSON.

    Returns
    -------
    dict
        The same dict (not a re-serialized copy: storage keeps what the client sent).

    Raises
    ------
    InvalidRequest
        ``unknown-resource-type`` when ``resourceType`` is missing or not a resource;
        ``invalid-resource`` with one OperationOutcome issue per problem (unknown element,
        invalid date, wrong type, missing required element), each with a FHIRPath-like
        ``expression`` such as ``Patient.birthDate``.

    Examples
    --------
    >>> validate_resource({"resourceType": "Patient", "birthDate": "1970-01-01"})["birthDate"]
    '1970-01-01'
    >>> try:
    ...     validate_resource({"resourceType": "Patient", "birthDate": "1970-13-01"})
    ... except InvalidRequest as e:
    ...     print(e.error_id, e.expression)
    invalid-resource ['Patient.birthDate']
    """
    if not isinstance(resource, dict):
        raise InvalidRequest("a resource must be a JSON object", error_id="invalid-resource")
    resource_type = resource.get("resourceType")
    model = resource_model(resource_type) if isinstance(resource_type, str) else None
    if model is None:
        raise InvalidRequest(
            f"unknown resource type {resource_type!r}: expected a FHIR R4 resource type such as 'Patient'",
            error_id="unknown-resource-type", expression=["resourceType"])
    rid = resource.get("id")
    if rid is not None and not (isinstance(rid, str) and ID_PATTERN.match(rid)):
        raise InvalidRequest(f"{resource_type}.id {rid!r} is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}})",
                             error_id="invalid-resource", expression=[f"{resource_type}.id"])
    _validate_against(model, resource_type, resource)
    return resource


def _full_validation(model, resource_type: str, resource: dict):
    """Validate with the R4B model; turn every pydantic error into an OperationOutcome issue."""
    from pydantic import ValidationError

    try:
        return model.model_validate(resource)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)[:_MAX_ISSUES]
        issues = [(_expression(resource_type, tuple(e.get("loc", ()))), _message(e)) for e in errors]
        first_expr, first_msg = issues[0]
        summary = f"{resource_type} is invalid: {first_expr}: {first_msg}"
        if len(issues) > 1:
            summary += f" (and {len(issues) - 1} more)"
        extra = [{
            "severity": "error", "code": "structure" if "unknown element" in m else "value",
            "diagnostics": f"{x}: {m}", "expression": [x],
        } for x, m in issues[1:]]
        raise InvalidRequest(summary, error_id="invalid-resource", expression=[first_expr],
                             extra_issues=extra) from None
    except (ValueError, TypeError) as exc:  # a few R4B validators raise plain errors
        raise InvalidRequest(f"{resource_type} is invalid: {exc}", error_id="invalid-resource",
                             expression=[resource_type]) from None


# -- the fast path -----------------------------------------------------------------------------------
# Full model validation costs ~120 us per Observation, most of it in fhir_core's per-element Python hooks
# (required elements, choice types, null complex elements, unknown elements). Those checks depend only on
# the *shape* of the JSON (keys, nesting, list lengths, JSON value kinds), not on primitive values. So a
# shape that passed full validation once is remembered with the primitive type of each leaf; later
# resources of the same shape only have their leaf values checked with the same primitive validators
# (pydantic TypeAdapters built from the model's own field annotations). Any leaf failure falls back to
# full validation, which produces the error report. tests/fhir_ops/r4/test_agreement.py checks that both
# paths accept and reject the same resources.
_MAX_SHAPES = 4096
_shapes: dict = {}
_NOT_CACHEABLE = ()


def _shape(node):
    t = type(node)
    if t is dict:
        return tuple((k, _shape(v)) for k, v in node.items())
    if t is list:
        return ("[",) + tuple(_shape(x) for x in node)
    return t


@lru_cache(maxsize=None)
def _fields_by_json_name(model) -> dict:
    return {(f.alias or name): f for name, f in model.model_fields.items()}


@lru_cache(maxsize=None)
def _adapter(annotation):
    from pydantic import TypeAdapter

    return TypeAdapter(annotation)


def _unwrap(annotation):
    """Strip Optional[...] and List[...] from a field annotation."""
    import types
    import typing

    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return None
            annotation = args[0]
        elif origin in (list, typing.List):
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation


def _leaf_plan(model, node: dict, path: tuple, out: list) -> bool:
    """Collect (path, primitive validator) for every leaf under ``node``; False if the shape must not be cached."""
    fields = _fields_by_json_name(model)
    for key, value in node.items():
        if key == "resourceType" and not path:
            continue
        field = fields.get(key)
        if field is None:
            return False
        inner = _unwrap(field.annotation)
        if inner is None:
            return False
        get_klass = getattr(inner, "get_model_klass", None)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            sub = path + ((key,) if i is None else (key, i))
            if get_klass is not None:
                klass = get_klass()
                # contained / Bundle.entry.resource: the concrete type depends on the value, not the shape
                if klass.__name__ in ("Resource", "DomainResource") or not isinstance(item, dict):
                    return False
                if not _leaf_plan(klass, item, sub, out):
                    return False
            else:
                out.append((sub, _adapter(inner)))
    return True


def _validate_against(model, resource_type: str, resource: dict) -> None:
    from pydantic import ValidationError

    shape = _shape(resource)
    plan = _shapes.get(shape)
    if plan is None:
        _full_validation(model, resource_type, resource)
        leaves: list = []
        plan = tuple(leaves) if _leaf_plan(model, resource, (), leaves) else _NOT_CACHEABLE
        if len(_shapes) >= _MAX_SHAPES:
            _shapes.clear()
        _shapes[shape] = plan
        return
    if plan is _NOT_CACHEABLE:
        _full_validation(model, resource_type, resource)
        return
    try:
        for path, adapter in plan:
            value = resource
            for step in path:
                value = value[step]
            adapter.validate_python(value)
    except (ValidationError, ValueError, TypeError):
        _full_validation(model, resource_type, resource)  # raises with the full report


def validate_resource_full(resource: dict) -> dict:
    """Like :func:`validate_resource` but always through the full R4B model (no shape cache)."""
    resource_type = resource.get("resourceType") if isinstance(resource, dict) else None
    model = resource_model(resource_type) if isinstance(resource_type, str) else None
    if model is None:
        return validate_resource(resource)
    _full_validation(model, resource_type, resource)
    return resource
