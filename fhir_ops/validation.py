"""Validation of incoming resources against FHIR R4 4.0.1 (fhir_ops.r4) on every write.

Element rules and required code bindings come from the official R4 definitions; the result is
raised as one InvalidRequest (400) or, when only codes miss their required value set, Unprocessable (422).
"""
from __future__ import annotations

import re

from fhir_ops import r4
from fhir_ops.errors import FhirError, InvalidRequest, Unprocessable
from fhir_ops.r4.validator import Issue, validate

ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def is_resource_type(resource_type: object) -> bool:
    """Tell whether ``resource_type`` names a concrete FHIR R4 resource type.

    Examples
    --------
    >>> is_resource_type("Patient"), is_resource_type("HumanName"), is_resource_type("Citation")
    (True, False, False)
    """
    return r4.is_resource_type(resource_type)


def all_resource_types() -> tuple[str, ...]:
    """Every concrete R4 resource type, sorted."""
    return r4.resource_types()


def problems(resource: object) -> list[Issue]:
    """Every problem of ``resource`` against R4 (empty when valid); see :func:`fhir_ops.r4.validator.validate`."""
    return validate(resource)


def issues_to_error(resource_type: str, found: list[Issue]) -> FhirError:
    """One FhirError carrying one OperationOutcome issue per problem, each naming its element."""
    first = found[0]
    summary = f"{resource_type} is invalid: {first.expression}: {first.message}"
    if len(found) > 1:
        summary += f" (and {len(found) - 1} more)"
    extra = [{"severity": "error", "code": i.code, "diagnostics": f"{i.expression}: {i.message}",
              "expression": [i.expression], "location": [i.expression]} for i in found[1:]]
    if all(i.binding for i in found):
        # well-formed, but a code is outside its required value set: understood, not processable
        return Unprocessable(summary, code="code-invalid", error_id="invalid-code",
                             expression=[first.expression], extra_issues=extra)
    return InvalidRequest(summary, code=first.code if first.code != "code-invalid" else "invalid",
                          error_id="invalid-resource", expression=[first.expression], extra_issues=extra)


def validate_resource(resource: dict) -> dict:
    """Check a resource against FHIR R4 and return it unchanged.

    Parameters
    ----------
    resource : dict
        A FHIR R4 resource as parsed JSON.

    Returns
    -------
    dict
        The same dict (storage keeps what the client sent).

    Raises
    ------
    InvalidRequest
        ``unknown-resource-type`` when ``resourceType`` is missing or not an R4 resource;
        ``invalid-resource`` (400) with one OperationOutcome issue per problem (unknown element,
        cardinality, primitive format, choice type, contained, extension), each with an
        ``expression`` such as ``Patient.birthDate``.
    Unprocessable
        ``invalid-code`` (422) when the only problems are codes outside their required value set.

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
    if not r4.is_resource_type(resource_type):
        raise InvalidRequest(
            f"unknown resource type {resource_type!r}: expected a FHIR R4 resource type such as 'Patient'",
            error_id="unknown-resource-type", expression=["resourceType"])
    rid = resource.get("id")
    if rid is not None and not (isinstance(rid, str) and ID_PATTERN.match(rid)):
        raise InvalidRequest(f"{resource_type}.id {rid!r} is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}})",
                             error_id="invalid-resource", expression=[f"{resource_type}.id"])
    found = validate(resource)
    if found:
        raise issues_to_error(resource_type, found)
    return resource
