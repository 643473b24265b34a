"""Structural validation of incoming FHIR R4 resources against the ``fhir.resources`` R4B models.

Used on every write (create, update, transaction entries), so it only parses and never re-serializes.
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
    from pydantic import ValidationError

    try:
        model.model_validate(resource)
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
    return resource
