"""``$validate``: check a resource against the base R4 definitions without storing it.

Type level validates the resource given in the body; instance level the stored one (or the one
given, in the context of updating or deleting that instance).
"""
from __future__ import annotations

from fhir_ops.errors import FhirError, InvalidRequest, outcome
from fhir_ops.operations.registry import OperationContext, operation

_MODES = ("create", "update", "delete", "profile")


@operation("OperationDefinition-validate.json", async_allowed=True)
def handle(ctx: OperationContext, params: dict) -> dict:
    """Validate and answer an OperationOutcome (always HTTP 200 once validation ran)."""
    mode = params.get("mode")
    if mode is not None and mode not in _MODES:
        raise InvalidRequest(f"Parameter 'mode' must be one of {', '.join(_MODES)}; got {mode!r}",
                             error_id="wrong-type")
    resource = params.get("resource")
    if mode == "delete":
        return {"return": _delete_check(ctx)}
    if resource is None:
        if ctx.level == "type":
            raise InvalidRequest(f"{ctx.resource_type}/$validate needs the resource to validate: POST it as "
                                 "the 'resource' parameter of a Parameters body, or as the bare body",
                                 error_id="missing-parameter")
        resource = ctx.store.read(ctx.resource_type, ctx.resource_id)

    issues: list[dict] = []
    if resource.get("resourceType") != ctx.resource_type:
        issues.append(outcome("error", "invalid",
                              f"The resource is a {resource.get('resourceType')}, but $validate was called on "
                              f"{ctx.resource_type}", error_id="wrong-resource-type",
                              expression=["resourceType"]))
    if ctx.level == "instance" and mode == "update" and resource.get("id") != ctx.resource_id:
        issues.append(outcome("error", "invalid",
                              f"In mode update the resource id must be {ctx.resource_id!r}; got "
                              f"{resource.get('id')!r}", error_id="id-mismatch",
                              expression=[f"{ctx.resource_type}.id"]))
    if not issues:
        issues.extend(_structural_issues(resource))
    if params.get("profile") or mode == "profile":
        wanted = [params["profile"]] if params.get("profile") else resource.get("meta", {}).get("profile", [])
        issues.extend(_profile_issues(resource, wanted))
    if not any(i["severity"] in ("error", "fatal") for i in issues):
        issues.insert(0, outcome("information", "informational", "valid", error_id="valid"))
    return {"return": {"resourceType": "OperationOutcome", "issue": issues}}


def _profile_issues(resource: dict, urls: list[str]) -> list[dict]:
    """TrialTwin's own profiles are checked structurally (fhir_ops.conformance: cardinality, fixed
    and pattern values, types, reference targets, extension slices); any other profile is reported
    as not checked, never as passed. Full validation of every profile is HAPI's (integration tier)."""
    from fhir_ops import conformance

    out: list[dict] = []
    if not urls:
        return [outcome("warning", "not-supported", "No profile given and the resource names none in "
                        "meta.profile; checked against the base FHIR R4 specification only",
                        error_id="profile-not-checked")]
    for url in urls:
        profile = conformance.profile_by_url(url)
        if profile is None:
            out.append(outcome("warning", "not-supported", f"Profile {url} is not one of this server's; the "
                               "resource was checked against the base FHIR R4 specification only",
                               error_id="profile-not-checked"))
            continue
        problems = conformance.check(resource, profile)
        out.extend(outcome("error", "structure", f"{url}: {p}", error_id="profile-violation",
                           expression=[p.split(":", 1)[0]]) for p in problems)
        if not problems:
            out.append(outcome("information", "informational", f"Conforms structurally to {url}",
                               error_id="profile-checked"))
    return out


def _structural_issues(resource: dict) -> list[dict]:
    from fhir_ops.validation import validate_resource

    try:
        validate_resource(resource)
    except FhirError as exc:
        return exc.to_outcome()["issue"]
    return []


def _delete_check(ctx: OperationContext) -> dict:
    if ctx.level != "instance":
        raise InvalidRequest("Mode delete applies to an instance: call [type]/[id]/$validate",
                             error_id="wrong-type")
    ctx.store.read(ctx.resource_type, ctx.resource_id)  # NotFound / Gone reach the client as such
    # Without referential-integrity rules, deleting an existing resource is always allowed.
    return {"resourceType": "OperationOutcome",
            "issue": [outcome("information", "informational", "valid", error_id="valid")]}
