"""SMART resource-server enforcement for the FHIR app: every /fhir request is checked here, in one place.

``init_app(app)`` installs a ``before_request`` hook (token, scopes, Patient compartment) and an
``after_request`` filter for Bundles; ``AUTH_MODE`` "smart" (default) or "open" chooses whether it runs.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from functools import lru_cache

from flask import Flask, Response, current_app, g, has_request_context, request

from fhir_ops.errors import FhirError, Forbidden, Gone, NotFound
from smart_app.scopes import interaction_code

AUTH_MODES = ("smart", "open")

#: Paths under the FHIR prefix that anyone may read: discovery, and reads of conformance resources, which
#: hold no participant data (a validator resolving meta.profile has no token). Searches still need one.
PUBLIC_PATHS = re.compile(r"^/(metadata|\.well-known/smart-configuration|"
                          r"(StructureDefinition|OperationDefinition|SearchParameter|CodeSystem|ValueSet|ConceptMap)"
                          r"/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?)$")

#: Per operation: the boolean input that switches writing on (None: it always writes), that input's
#: default, and the participant-data types written, on each of which the caller needs ``c`` and ``u``.
#: The target of the call needs ``r`` in every case; an unknown state-changing operation needs ``u`` on
#: its target. The model Device an operation may register is the server's own record, not the caller's.
#: Cohort targets: an operation on them reads many participants, so a patient-scoped token never may.
COHORT_TYPES = ("Group", "ResearchStudy")

#: Compartment additions beyond FHIR R4's CompartmentDefinition/patient. Task is not in the R4
#: compartment, but an outreach Task (Task.for = the participant) is that participant's business and
#: must be visible to their clinician's patient-scoped token.
EXTRA_COMPARTMENT = {"Task": ("for",)}


# --- configuration ---------------------------------------------------------------------------------

def init_app(app: Flask) -> None:
    """Install enforcement on a FHIR app according to ``AUTH_MODE``.

    Parameters
    ----------
    app : flask.Flask
        The FHIR app. Config read: ``AUTH_MODE`` ("smart" or "open"), and in smart mode
        ``SMART_ISSUER`` (required), ``FHIR_BASE_URL`` (the token audience; default ``BASE_URL``),
        ``SMART_KEYS_FILE`` | ``SMART_JWKS_URI`` | ``SMART_INTROSPECTION_ENDPOINT`` (+ ``_CLIENT_ID`` /
        ``_CLIENT_SECRET``), as in :func:`smart_app.resource_server.validator_from_config`.

    Raises
    ------
    ValueError
        Unknown mode, or smart mode without an issuer or audience: a server that cannot check tokens
        must not start (there is no silent fallback to open).
    """
    if configure(app) == "smart":
        app.before_request(_enforce)
        app.after_request(_filter_bundle)


def configure(app: Flask) -> str:
    """Check an app's auth configuration and return its mode (``smart`` or ``open``).

    Shared by every app of the process that holds or computes on participant data (the FHIR
    server and the inference service), so they are secure by default in the same way.
    """
    mode = str(app.config.get("AUTH_MODE") or "smart").lower()
    if mode not in AUTH_MODES:
        raise ValueError(f"AUTH_MODE must be one of {', '.join(AUTH_MODES)}, got {mode!r}")
    app.config["AUTH_MODE"] = mode
    if mode == "open":
        return mode
    if not app.config.get("SMART_ISSUER"):
        raise ValueError("AUTH_MODE=smart needs SMART_ISSUER (the authorization server's URL, e.g. "
                         "https://host/auth); set AUTH_MODE=open only for a local, loopback-only server")
    app.config["FHIR_BASE_URL"] = (app.config.get("FHIR_BASE_URL") or app.config.get("BASE_URL") or "").rstrip("/")
    if not app.config["FHIR_BASE_URL"]:
        raise ValueError("AUTH_MODE=smart needs FHIR_BASE_URL (or BASE_URL): the audience tokens must carry")
    if not any(app.config.get(k) for k in ("SMART_KEYS_FILE", "SMART_JWKS_URI", "SMART_INTROSPECTION_ENDPOINT")):
        app.config["SMART_JWKS_URI"] = app.config["SMART_ISSUER"].rstrip("/") + "/.well-known/jwks.json"
    return mode


def require_token(interaction: str, resource_type: str):
    """Authenticate the request's Bearer token and require ``interaction`` on ``resource_type``.

    For apps outside the FHIR REST surface (the inference service): 401 without a valid token,
    403 when its scopes do not allow the interaction. Returns the AccessContext.
    """
    access = _authenticate()
    g.trialtwin_access = access
    access.require(interaction, resource_type)
    return access


def _validator():
    # Built on first use: in the combined server the auth app creates its key file after this app.
    validator = current_app.extensions.get("trialtwin.validator")
    if validator is None:
        from smart_app.resource_server import validator_from_config

        try:
            validator = validator_from_config(current_app.config)
        except (OSError, ValueError) as exc:
            raise FhirError(f"the authorization server's keys are not available: {exc}", status=503,
                            code="transient", error_id="jwks-unavailable") from None
        current_app.extensions["trialtwin.validator"] = validator
    return validator


def current_access():
    """The :class:`smart_app.resource_server.AccessContext` of this request (None in open mode)."""
    return g.get("trialtwin_access")


# --- compartment -----------------------------------------------------------------------------------

def in_compartment_type(resource_type: str) -> bool:
    """Whether resources of this type can belong to a Patient compartment (R4 plus ``EXTRA_COMPARTMENT``)."""
    from smart_app.resource_server import in_patient_compartment

    return in_patient_compartment(resource_type) or resource_type in EXTRA_COMPARTMENT


def in_compartment(resource: dict, patient: str) -> bool:
    """Whether ``resource`` is in the compartment of ``Patient/<patient>`` (R4 plus outreach Tasks).

    Examples
    --------
    >>> in_compartment({"resourceType": "Task", "for": {"reference": "Patient/p1"}}, "p1")
    True
    >>> in_compartment({"resourceType": "Observation", "subject": {"reference": "Patient/p2"}}, "p1")
    False
    """
    from smart_app.resource_server import _points_to_patient, _values, patient_compartment_allows

    if patient_compartment_allows(resource, patient):
        return True
    for path in EXTRA_COMPARTMENT.get(resource.get("resourceType"), ()):
        if any(_points_to_patient(ref, patient) for ref in _values(resource, path.split("."))):
            return True
    return False


@lru_cache(maxsize=None)
def _compartment_steps(resource_type) -> tuple[tuple[str, ...], ...]:
    """The compartment paths of a type (R4 plus ``EXTRA_COMPARTMENT``), split into their steps."""
    from smart_app.resource_server import compartment_paths

    return tuple(tuple(p.split(".")) for p in (*compartment_paths(resource_type),
                                               *EXTRA_COMPARTMENT.get(resource_type, ())))


def compartment_patients(resource: dict) -> set[str]:
    """The ids of every Patient whose compartment holds ``resource`` (R4 plus ``EXTRA_COMPARTMENT``).

    Examples
    --------
    >>> sorted(compartment_patients({"resourceType": "Appointment", "participant": [
    ...     {"actor": {"reference": "Patient/p1"}}, {"actor": {"reference": "Location/l1"}}]}))
    ['p1']
    >>> compartment_patients({"resourceType": "Patient", "id": "p2"})
    {'p2'}
    """
    from smart_app.resource_server import _values

    rtype = resource.get("resourceType")
    out: set[str] = set()
    if rtype == "Patient" and isinstance(resource.get("id"), str):
        out.add(resource["id"])
    # (a resourceType that is no string takes the unremembered way, failing as it always did)
    for path in _compartment_steps(rtype) if isinstance(rtype, str) else _compartment_steps.__wrapped__(rtype):
        if path[0] not in resource:  # runs for every resource written (its audit record): skip absent elements
            continue
        for ref in _values(resource, path):
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                parts = ref["reference"].split("/")
                if "_history" in parts:
                    parts = parts[: parts.index("_history")]
                if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
                    out.add(parts[-1])
    return out


# --- the audit trail ---------------------------------------------------------------------------------

#: AuditEvents are readable only with a user/ or system/ scope that names AuditEvent itself (the "audit
#: scope", e.g. ``system/AuditEvent.rs``): a wildcard ``*`` scope, and any patient/ scope, never reads them.
AUDIT_TYPE = "AuditEvent"
#: operations on the audit trail itself: they need the audit scope and nothing else
AUDIT_OPERATIONS = ("$verify-audit",)


def has_audit_scope(access, interaction: str = "read") -> bool:
    """Whether the token holds the audit scope for ``interaction`` (read or search) on AuditEvent."""
    return any(s.context in ("user", "system") and s.resource_type == AUDIT_TYPE and s.allows(interaction, AUDIT_TYPE)
               for s in access.scopes.resources)


def require_audit_scope(access, interaction: str = "read") -> None:
    """Raise 403 unless the token holds the audit scope (see :func:`has_audit_scope`)."""
    if not has_audit_scope(access, interaction):
        code = interaction_code(interaction)
        raise Forbidden(f"the audit trail is readable only with an audit scope (user/AuditEvent.{code} or "
                        f"system/AuditEvent.{code}); wildcard and patient scopes do not grant it",
                        error_id="audit-scope-required")


# --- site-level access ---------------------------------------------------------------------------------

#: PractitionerRole.code (any system) of the roles that see the whole study; every other role sees the
#: participants of its own site(s) only. Overridable with the app config ``STUDY_WIDE_ROLES``.
STUDY_WIDE_ROLES = ("monitor", "sponsor")


class SiteScope:
    """What a practitioner limited to some sites may see: the sites' organizations and their participants.

    A participant belongs to a site through ``Patient.managingOrganization`` (the demo's and the loader's
    convention); a PractitionerRole names its site by ``organization`` or by ``location`` (whose
    ``managingOrganization`` is the site).
    """

    def __init__(self, organizations: frozenset[str], patients: frozenset[str]):
        self.organizations, self.patients = organizations, patients

    def allows_patient(self, patient: str) -> bool:
        return patient in self.patients

    def allows(self, resource: dict) -> bool:
        """Whether ``resource`` may be seen (or written) by this practitioner.

        A Patient: one of the sites' participants, or a new one managed by one of the sites. Anything in
        a patient compartment: every patient it belongs to is one of the sites' participants. Anything
        else (study, sites, practitioners, code systems) is not participant data.
        """
        rtype = resource.get("resourceType")
        if rtype == "Patient":
            if resource.get("id") in self.patients:
                return True
            org = ((resource.get("managingOrganization") or {}).get("reference") or "").split("/")
            return len(org) >= 2 and org[-2] == "Organization" and org[-1] in self.organizations
        if rtype == "Group":
            return True  # visible, with its members cut to the sites' participants (_redact)
        if not in_compartment_type(rtype):
            return True
        return compartment_patients(resource) <= self.patients

    def search_restriction(self, resource_type: str) -> tuple[str, str] | None:
        """The search parameter pair that limits a search of ``resource_type`` to the sites' participants."""
        param = _compartment_search_param(resource_type)
        if param is None:
            return None
        # no participant at all: a value that matches nothing, so the search answers empty, not everything
        ids = sorted(self.patients) or ["-no-participant-"]
        return (param, ",".join(ids if param == "_id" else (f"Patient/{p}" for p in ids)))


def site_scope(access) -> SiteScope | None:
    """The sites a token's user is limited to; None when it sees the whole study.

    Limited: a user whose ``fhirUser`` is a Practitioner or PractitionerRole, unless one of its active
    PractitionerRoles has a study-wide role code (``STUDY_WIDE_ROLES``). Such a user without any active
    role at a site sees no participant at all (deny by default). Backend services (no user) act for the
    sponsor's systems and patient users are bounded by their compartment; neither has a site limit.
    Computed once per request.
    """
    if access is None:
        return None
    if not has_request_context():  # e.g. an export job's thread: no request to cache on
        return _resolve_sites(access.user)
    cached = g.get("trialtwin_site_scope", False)
    if cached is not False:
        return cached
    g.trialtwin_site_scope = scope = _resolve_sites(access.user)
    return scope


def _resolve_sites(user: str | None) -> SiteScope | None:
    from fhir_ops.app import get_store

    if not user or user.split("/")[0] not in ("Practitioner", "PractitionerRole"):
        return None
    store = get_store()
    kind, _, uid = user.partition("/")
    if kind == "PractitionerRole":
        role = _read_existing("PractitionerRole", uid)
        roles = [role] if role else []
    else:
        roles = store.search_all("PractitionerRole", [("practitioner", user)])
    roles = [r for r in roles if r.get("active", True) is not False]
    wide = set(current_app.config.get("STUDY_WIDE_ROLES") or STUDY_WIDE_ROLES)
    if any(c.get("code") in wide for r in roles for cc in r.get("code") or [] for c in cc.get("coding") or []):
        return None
    orgs: set[str] = set()
    for r in roles:
        org = ((r.get("organization") or {}).get("reference") or "").split("/")
        if len(org) == 2 and org[0] == "Organization":
            orgs.add(org[1])
        for loc in r.get("location") or []:
            parts = ((loc or {}).get("reference") or "").split("/")
            location = _read_existing("Location", parts[1]) if len(parts) == 2 and parts[0] == "Location" else None
            managing = (((location or {}).get("managingOrganization") or {}).get("reference") or "").split("/")
            if len(managing) == 2 and managing[0] == "Organization":
                orgs.add(managing[1])
    patients: frozenset[str] = frozenset()
    if orgs:
        found = store.search_all("Patient", [("organization", ",".join(f"Organization/{o}" for o in sorted(orgs)))])
        patients = frozenset(p["id"] for p in found)
    return SiteScope(frozenset(orgs), patients)


def _require_site(access, resource_type: str, resource_id: str, *, missing_ok: bool = False) -> None:
    """403 unless the stored resource is one the token's sites may see (one answer whether it is another
    site's or does not exist, so ids at other sites are not revealed)."""
    sites = site_scope(access)
    if sites is None or not in_compartment_type(resource_type) or resource_type == "Group":
        return
    existing = _read_existing(resource_type, resource_id)
    if existing is None and missing_ok:
        return
    if existing is None or not sites.allows(existing):
        raise _forbidden(f"{resource_type}/{resource_id} is not data of a participant at this user's site(s)",
                         "outside-site")


def _require_site_body(access, resource: dict | None) -> None:
    sites = site_scope(access)
    if sites is not None and isinstance(resource, dict) and not sites.allows(resource):
        raise _forbidden(f"the {resource.get('resourceType')} does not belong to a participant at this user's "
                         "site(s)", "outside-site")


def _compartment_search_param(resource_type: str) -> str | None:
    """The search parameter that restricts a search to one patient (None: results are filtered instead)."""
    from fhir_ops.search.registry import search_parameters_for
    from smart_app.resource_server import compartment_paths

    if resource_type == "Patient":
        return "_id"
    names = {p.name for p in search_parameters_for(resource_type) if p.type == "reference"}
    if "patient" in names:
        return "patient"
    for path in (*compartment_paths(resource_type), *EXTRA_COMPARTMENT.get(resource_type, ())):
        # the parameter is named after the last step (Task.for) or the first (Group.member.entity: member)
        for name in (path.split(".")[-1], path.split(".")[0]):
            if name in names:
                return name
    return None


# --- the hook ----------------------------------------------------------------------------------------

def _forbidden(message: str, error_id: str = "outside-compartment") -> Forbidden:
    return Forbidden(message, error_id=error_id)


def _authenticate():
    access = _validator().authenticate(request.headers.get("Authorization"))
    # Granular scopes (patient/Observation.rs?category=...) are not enforced yet: fail closed, they grant nothing.
    scopes = access.scopes
    if any(s.query for s in scopes.resources):
        scopes = type(scopes)(tuple(s for s in scopes.resources if not s.query), scopes.names, scopes.unknown)
        access = replace(access, scopes=scopes)
    return access


def _enforce():
    prefix = (current_app.config.get("FHIR_PREFIX") or "").rstrip("/")
    path = request.path[len(prefix):] if prefix and request.path.startswith(prefix) else request.path
    if request.method in ("GET", "HEAD") and PUBLIC_PATHS.match(path):
        return None
    outside_base = bool(prefix) and not (request.path == prefix or request.path.startswith(prefix + "/"))
    if outside_base and request.method in ("GET", "HEAD") and (
            request.endpoint == "landing" or request.url_rule is None):
        # Outside the FHIR base (``/``, ``/favicon.ico``) is no data: the landing page or a 404
        # OperationOutcome, never a token challenge a browser cannot answer.
        return None
    if request.method == "OPTIONS":
        return None
    access = _authenticate()
    g.trialtwin_access = access
    endpoint = request.endpoint or ""
    args = request.view_args or {}
    check = _CHECKS.get(endpoint.rsplit(".", 1)[-1])
    if check is None:
        # An unknown route is answered 404 by the app; anything else unlisted is refused, not let through.
        if request.url_rule is None:
            return None
        raise _forbidden(f"{request.method} {path} is not covered by an access rule", "no-access-rule")
    check(access, **args)
    return None


def _read_existing(resource_type: str, resource_id: str) -> dict | None:
    from fhir_ops.app import get_store

    try:
        return get_store().read(resource_type, resource_id)
    except (NotFound, Gone):
        return None
    except FhirError:
        return None


def _require_in_compartment(access, resource_type: str, resource_id: str, patient: str) -> None:
    # One answer (403) whether the resource is another patient's or does not exist at all, so a
    # patient-scoped token learns nothing about other patients' ids.
    if resource_type == "Patient" and resource_id == patient:
        return
    existing = _read_existing(resource_type, resource_id) if in_compartment_type(resource_type) else None
    if existing is None or not in_compartment(existing, patient):
        raise _forbidden(f"{resource_type}/{resource_id} is not in the compartment of Patient/{patient}, the only "
                         "patient this access token may see")


def _check_type_allowed_for_patient(resource_type: str, patient: str) -> None:
    if not in_compartment_type(resource_type):
        raise _forbidden(f"{resource_type} is not in a Patient compartment; a token limited to Patient/{patient} "
                         f"needs a user/ or system/ scope for it")


def _body() -> dict | None:
    from fhir_ops import limits

    try:
        body = limits.loads(request.get_data(cache=True) or b"null")
    except FhirError:
        return None  # the handler answers 400 for a malformed or too deeply nested body
    return body if isinstance(body, dict) else None


def _check_read(access, resource_type, resource_id):
    if resource_type == AUDIT_TYPE:
        require_audit_scope(access, "read")
    patient = access.require("read", resource_type)
    if patient:
        _require_in_compartment(access, resource_type, resource_id, patient)
    _require_site(access, resource_type, resource_id)


def _check_vread(access, resource_type, resource_id, version_id):
    # The current version being the patient's says nothing about an older one (a resource can be
    # moved between compartments by an update): the version asked for must be the patient's too.
    if resource_type == AUDIT_TYPE:
        require_audit_scope(access, "read")
    patient = access.require("read", resource_type)
    _require_site(access, resource_type, resource_id)
    if not patient:
        sites = site_scope(access)
        if sites is None or not in_compartment_type(resource_type):
            return
        # a version from before a move between sites must be the user's sites' too
        from fhir_ops.app import get_store

        try:
            version = get_store().vread(resource_type, resource_id, version_id)
        except (NotFound, Gone):
            return
        if not sites.allows(version):
            raise _forbidden(f"version {version_id} of {resource_type}/{resource_id} is not data of a participant "
                             "at this user's site(s)", "outside-site")
        return
    _require_in_compartment(access, resource_type, resource_id, patient)
    if resource_type == "Patient" and resource_id == patient:
        return
    from fhir_ops.app import get_store

    try:
        version = get_store().vread(resource_type, resource_id, version_id)
    except (NotFound, Gone):
        return  # the handler answers 404/410 about a resource that is the patient's
    if not in_compartment(version, patient):
        raise _forbidden(f"version {version_id} of {resource_type}/{resource_id} is not in the compartment of "
                         f"Patient/{patient}")


def _check_instance_history(access, resource_type, resource_id):
    _check_read(access, resource_type, resource_id)


def _check_type_history(access, resource_type):
    if resource_type == AUDIT_TYPE:
        require_audit_scope(access, "read")
    patient = access.require("read", resource_type)
    _refuse_site_limited(access, f"type-level history of {resource_type}")
    if patient:
        raise _forbidden(f"type-level history of {resource_type} spans every patient; it needs a user/ or system/ "
                         "scope", "history-needs-broad-scope")


def _check_system_history(access):
    from fhir_ops.validation import all_resource_types

    # Every version of every type: only for a token that may read every type broadly.
    hidden = [t for t in all_resource_types() if access.compartment_patient("read", t) is not None
              or not access.can("read", t)]
    if hidden:
        raise _forbidden("system-level history spans every resource type and patient; it needs user/*.r or "
                         "system/*.r", "history-needs-broad-scope")
    _refuse_site_limited(access, "system-level history")


def _refuse_site_limited(access, what: str) -> None:
    if site_scope(access) is not None:
        raise _forbidden(f"{what} spans every site; a user limited to their site(s) needs a study-wide role "
                         "(monitor, sponsor)", "needs-study-role")


def _request_param_names() -> list[str]:
    names = list(request.args)
    if request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded":
        names += list(request.form)  # POST _search carries its parameters in the body
    return names


def _chained_targets(resource_type: str, names: list[str]) -> list[str]:
    """The resource types chained search parameters among ``names`` (``subject:Patient.gender``) search."""
    from fhir_ops.search.registry import search_parameter

    targets: list[str] = []
    for name in names:
        if "." not in name:
            continue
        ref_name, _, type_modifier = name.partition(".")[0].partition(":")
        pdef = search_parameter(resource_type, ref_name)
        if type_modifier:
            targets.append(type_modifier)
        elif pdef is not None:
            targets += list(pdef.targets)
    return targets


def _check_search(access, resource_type):
    if resource_type == AUDIT_TYPE:
        require_audit_scope(access, "search")
    patient = access.require("search", resource_type)
    sites = site_scope(access)
    if sites is not None and in_compartment_type(resource_type):
        restriction = sites.search_restriction(resource_type)
        if restriction is None:
            # filtered after the search (visible), so the store's count may include other sites: none given
            if any(k in ("_summary", "_total") and v not in ("false", "none") for k, v in request.args.items(multi=True)):
                raise _forbidden(f"{resource_type} cannot be counted within a user's sites", "count-needs-study-role")
            g.trialtwin_strip_total = True
        else:
            from werkzeug.datastructures import ImmutableMultiDict

            # AND-ed with the client's own parameters: the answer (and its count) shrinks to the sites
            request.args = ImmutableMultiDict([*request.args.items(multi=True), restriction])
    chained = _chained_targets(resource_type, _request_param_names())
    if chained and patient:
        # A chain evaluates conditions on resources the compartment filter never sees (the performer,
        # another Patient): each answer would leak a bit about them.
        raise _forbidden("chained search parameters search beyond the patient's compartment; they need a user/ or "
                         "system/ scope", "chain-needs-broad-scope")
    for target in chained:
        access.require("search", target)
    if not patient:
        return
    _check_type_allowed_for_patient(resource_type, patient)
    param = _compartment_search_param(resource_type)
    if param is None:
        # the after_request filter drops what lies outside the compartment, but the store's count
        # would still include it: no count at all for such a search
        if any(k in ("_summary", "_total") and v not in ("false", "none") for k, v in request.args.items(multi=True)):
            raise _forbidden(f"{resource_type} cannot be counted within one patient's compartment; a count needs "
                             "a user/ or system/ scope", "count-needs-broad-scope")
        g.trialtwin_strip_total = True
        return
    from werkzeug.datastructures import ImmutableMultiDict

    value = patient if param == "_id" else f"Patient/{patient}"
    # AND-ed with whatever the client asked: the answer can only shrink to the compartment.
    request.args = ImmutableMultiDict([*request.args.items(multi=True), (param, value)])


def _check_subscription_reach(access, resource: dict | None) -> None:
    """A Subscription sends what its criteria match to its endpoint: a search its creator must be allowed."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Subscription":
        return
    criteria = resource.get("criteria")
    if isinstance(criteria, str) and criteria.split("?", 1)[0].strip():
        target = criteria.split("?", 1)[0].strip()
        if access.require("search", target):
            raise _forbidden("a Subscription delivers matches of any patient; it needs a user/ or system/ search "
                             f"scope on {target}", "subscription-needs-broad-scope")


def _check_create(access, resource_type):
    patient = access.require("create", resource_type)
    new = _body()
    _require_site_body(access, new if (new or {}).get("resourceType") == resource_type else None)
    if resource_type == "Subscription":
        _check_subscription_reach(access, _body())
    if patient:
        _check_type_allowed_for_patient(resource_type, patient)
        body = _body()
        if body is not None and body.get("resourceType") != resource_type:
            return  # the handler answers 400 type-mismatch
        if body is not None and not in_compartment(body, patient):
            raise _forbidden(f"the new {resource_type} does not belong to Patient/{patient}; a patient-scoped token "
                             "writes only into that patient's compartment")


def _check_update(access, resource_type, resource_id):
    patient = access.require("update", resource_type)
    _require_site(access, resource_type, resource_id, missing_ok=True)
    new = _body()
    _require_site_body(access, new if (new or {}).get("resourceType") == resource_type else None)
    if resource_type == "Subscription":
        _check_subscription_reach(access, _body())
    if patient:
        _check_type_allowed_for_patient(resource_type, patient)
        existing = _read_existing(resource_type, resource_id)
        body = _body()
        if body is not None and body.get("resourceType") != resource_type:
            body = None  # the handler answers 400 type-mismatch; the existing resource is still checked
        if (existing is not None and not in_compartment(existing, patient)) or \
                (body is not None and not in_compartment(body, patient)):
            raise _forbidden(f"{resource_type}/{resource_id} is not (or would not stay) in the compartment of "
                             f"Patient/{patient}")


def _check_delete(access, resource_type, resource_id):
    patient = access.require("delete", resource_type)
    _require_site(access, resource_type, resource_id, missing_ok=True)
    if patient:
        _require_in_compartment(access, resource_type, resource_id, patient)


_BUNDLE_METHODS = {"POST": "create", "PUT": "update", "DELETE": "delete"}


def restrict_condition(resource_type: str, pairs) -> list[tuple[str, str]]:
    """A conditional create's (update's, delete's) search, limited as a search by this request's token is.

    A token without broad (user/, system/) search rights on the type only ever matches inside its
    patient's compartment, so a match elsewhere is never revealed: the request goes on as if nothing
    matched, and the write itself is then checked against the compartment as usual.

    Raises
    ------
    Forbidden
        The type cannot be limited to one patient by a search parameter, or the token has no patient.
    """
    pairs = list(pairs)
    access = current_access()
    sites = site_scope(access)
    if sites is not None and in_compartment_type(resource_type):
        restriction = sites.search_restriction(resource_type)
        if restriction is None:
            raise _forbidden(f"a conditional request on {resource_type} cannot be limited to a user's sites",
                             "condition-needs-study-role")
        pairs = [*pairs, restriction]
    if access is None or access.scopes.allows("search", resource_type, ("user", "system")):
        return pairs
    patient = access.patient
    param = _compartment_search_param(resource_type) if patient else None
    if param is None:
        raise _forbidden(f"a conditional request on {resource_type} searches beyond what this token may search; "
                         "it needs a user/ or system/ search scope", "condition-needs-search-scope")
    return [*pairs, (param, patient if param == "_id" else f"Patient/{patient}")]


def bundle_entries(bundle: dict) -> list:
    """The parsed entries of the request's transaction/batch Bundle (those the authorization check read)."""
    from fhir_ops.app import request_base
    from fhir_ops.store.bundle import parse_entries

    cached = g.get("trialtwin_bundle_entries")
    if cached is not None:
        # parsed by _check_bundle from this request's body: the very entries the check decided on
        return cached
    # open mode, or a Bundle read again: parse it now, with the same function the check uses
    return parse_entries(bundle, bundle.get("type"), base=request_base())


def _check_bundle(access):
    from fhir_ops.app import request_base
    from fhir_ops.store.bundle import parse_entries

    body = _body()
    if body is None or body.get("resourceType") != "Bundle" or body.get("type") not in ("transaction", "batch"):
        return  # the handler answers 400 with what is wrong
    entries = parse_entries(body, body["type"], base=request_base())  # 400 naming the entry it cannot read
    for e in entries:
        if e.method in ("GET", "HEAD"):
            interaction = "read" if e.resource_id else "search"
        else:
            interaction = _BUNDLE_METHODS[e.method]
        patient = access.require(interaction, e.resource_type)
        if e.resource_type == AUDIT_TYPE and interaction in ("read", "search"):
            require_audit_scope(access, interaction)
        if site_scope(access) is not None:
            try:
                if e.resource_id and interaction != "search":
                    _require_site(access, e.resource_type, e.resource_id, missing_ok=interaction != "read")
                _require_site_body(access, e.resource)
            except Forbidden as exc:
                raise _forbidden(f"{e.where} ({e.method} {e.url}): {exc.message}", "bundle-entry-refused") from None
        _check_subscription_reach(access, e.resource)
        if interaction == "search":
            # a chain inside a batch searches its target types exactly as it would at the type endpoint
            for target in _chained_targets(e.resource_type, [name for name, _ in e.query or []]):
                access.require("search", target)
        if not patient:
            continue
        if interaction in ("read", "search", "delete") or e.resource is None or not in_compartment(e.resource, patient):
            raise _forbidden(f"{e.where} ({e.method} {e.url}): a token limited to Patient/{patient} may only "
                             "create or update that patient's resources inside a Bundle", "bundle-entry-refused")
        if interaction == "update":
            existing = _read_existing(e.resource_type, e.resource_id)
            if existing is not None and not in_compartment(existing, patient):
                raise _forbidden(f"{e.where}: {e.url} belongs to another patient", "bundle-entry-refused")
        if e.if_none_exist:
            from urllib.parse import parse_qsl, urlencode

            e.if_none_exist = urlencode(restrict_condition(e.resource_type,
                                                           parse_qsl(e.if_none_exist, keep_blank_values=True)))
    # the handler executes exactly these entries (see bundle_entries)
    g.trialtwin_bundle_entries = entries


def _operation_flag(name: str, default: bool) -> bool:
    if request.method == "GET":
        raw = request.args.get(name)
        return default if raw is None else raw.lower() == "true"
    body = _body() or {}
    parameters = body.get("parameter")
    if not isinstance(parameters, list):
        return True  # malformed: count it as writing (the scopes are checked), the registry answers 400
    for p in parameters:
        if isinstance(p, dict) and p.get("name") == name:
            # anything but an explicit false counts as writing: the registry rejects malformed values later
            return p.get("valueBoolean") is not False
    return default


def check_operation(access, level: str, resource_type: str | None, resource_id: str | None, name: str) -> None:
    """Authorize an operation call (see the operations' ``writes`` declarations and docs/smart.md).

    ``r`` on the target type (system level: on every type, ``*``); ``c`` and ``u`` on each type the
    operation writes; a patient-scoped token only on resources of its own compartment and never on a
    cohort (Group, ResearchStudy) or at type/system level.
    """
    from fhir_ops.operations import registry

    op = registry.get(name)
    if op is None:
        # The registry answers 404 unknown-operation, but not about another patient's resource.
        if level == "instance":
            patient = access.require("read", resource_type)
            if patient:
                _require_in_compartment(access, resource_type, resource_id, patient)
        return
    if op.name in AUDIT_OPERATIONS:
        require_audit_scope(access, "read")  # the audit scope alone: an auditor needs no access to patient data
        return
    target = resource_type or "*"
    patient = access.require("read", target) if level != "system" else _require_system(access, op)
    needs: list[tuple[str, str]] = []
    if op.writes is not None:
        # what the operation stores is declared once, with the operation (registry.Writes)
        if op.writes.flag is None or _operation_flag(op.writes.flag, op.writes.default):
            needs = [(interaction, t) for t in op.writes.types for interaction in ("create", "update")]
    elif op.affects_state and resource_type:
        needs = [("update", resource_type)]
    for interaction, written in needs:
        access.require(interaction, written)
    sites = site_scope(access)
    if sites is not None:
        if resource_type in COHORT_TYPES:
            raise _forbidden(f"{op.name} on {resource_type} concerns participants of every site; a user limited to "
                             "their site(s) needs a study-wide role (monitor, sponsor)", "needs-study-role")
        if level == "instance":
            _require_site(access, resource_type, resource_id)
    if resource_type in COHORT_TYPES:
        # A cohort's result aggregates (and may write for) many participants: every permission it uses
        # must come from user/ or system/ scopes, never from one patient's compartment.
        # and what it aggregates is data a search would need broad scopes for (registry: reads=...)
        read_types = () if op.study_summary else ("*",) if op.reads is None else op.reads
        needs = [("read", resource_type), ("search", "ResearchSubject"),
                 *[("search", t) for t in read_types if t != "ResearchSubject"], *needs]
        narrow = [f"{interaction_code(i)} on {'every type (*)' if t == '*' else t}" for i, t in needs
                  if not access.scopes.allows(i, t, ("user", "system"))]
        if narrow:
            raise _forbidden(f"{op.name} on {resource_type} concerns many participants; it needs user/ or system/ "
                             f"scopes for: {', '.join(narrow)}", "cohort-needs-broad-scope")
        return
    if patient:
        if level != "instance":
            raise _forbidden(f"{op.name} at {level} level is not limited to one patient; a token limited to "
                             f"Patient/{patient} may run operations on that patient only")
        _require_in_compartment(access, resource_type, resource_id, patient)
        if op.cross_patient:  # after the compartment check: another patient's id stays "outside-compartment"
            raise _forbidden(f"{op.name} {op.cross_patient}; a token limited to Patient/{patient} cannot run it",
                             "cross-patient-operation")


def _require_system(access, op) -> None:
    # Only a wildcard scope matches type "*": a system-level operation may touch any type.
    if op.backend_only:
        # Bulk Data: a system-wide pull is for backend clients (SMART Backend Services), not a user's app
        if not (access.scopes.allows("r", "*", ("system",)) and access.scopes.allows("s", "*", ("system",))):
            raise Forbidden(f"system-level {op.name} needs a SMART Backend Services token with system/*.rs",
                            error_id="needs-backend-services")
        return None
    if not access.scopes.allows("r", "*", ("user", "system")):
        raise Forbidden(f"system-level {op.name} needs user/*.r or system/*.r", error_id="insufficient-scope")
    return None


def _check_system_operation(access, name):
    check_operation(access, "system", None, None, name)


def _check_type_operation(access, resource_type, name):
    check_operation(access, "type", resource_type, None, name)


def _check_instance_operation(access, resource_type, resource_id, name):
    check_operation(access, "instance", resource_type, resource_id, name)


def _check_job(access, job_id):
    from fhir_ops import jobs

    try:
        job = jobs.manager(current_app).get(job_id)
    except FhirError:
        return  # unknown job: the route answers 404
    owner = getattr(job, "owner", None)
    if owner is not None and owner != job_owner(access):
        raise Forbidden(f"job {job_id} was submitted by another client, user or patient context",
                        error_id="not-job-owner")


def job_owner(access) -> tuple:
    """Who may poll or cancel an async job: same client, same user and same patient context.

    The patient is part of it: one clinician's app holds a token per launched patient, and the
    token of p002's launch must not read the result of a job run for p001.
    """
    return (access.client_id, access.subject, access.patient)


def _check_export_file(access, job_id, file_name):
    # an export's files are the job's result: only whoever may poll the job may fetch them
    _check_job(access, job_id)


# endpoint (blueprint-local name) -> check(access, **view_args)
_CHECKS = {
    "read": _check_read,
    "vread": _check_vread,
    "instance_history": _check_instance_history,
    "type_history": _check_type_history,
    "system_history": _check_system_history,
    "search": _check_search,
    "create": _check_create,
    "update": _check_update,
    "delete": _check_delete,
    "system_bundle": _check_bundle,
    "system_operation": _check_system_operation,
    "type_operation": _check_type_operation,
    "instance_operation": _check_instance_operation,
    "trialtwin_job_status": _check_job,
    "trialtwin_job_cancel": _check_job,
    "trialtwin_export_file": _check_export_file,
}


# --- response filter -----------------------------------------------------------------------------------

def visible(access, resource: dict) -> bool:
    """Whether a token may see ``resource``: the check every search answer passes (scopes, compartment).

    For code that reads data on a caller's behalf outside a request (an export job); ``access`` None
    (open mode) sees everything.
    """
    return access is None or _visible(access, resource)


def _visible(access, resource: dict) -> bool:
    rtype = resource.get("resourceType")
    if not rtype or rtype == "OperationOutcome":
        return True
    if not access.can("read", rtype):
        return False
    if rtype == AUDIT_TYPE and not has_audit_scope(access, "read"):
        return False
    patient = access.compartment_patient("read", rtype)
    if patient is not None and not in_compartment(resource, patient):
        return False
    sites = site_scope(access)
    return sites is None or sites.allows(resource)



def _redact(access, resource: dict) -> dict:
    """What of a visible resource a patient-scoped token may see: of a Group, only its own membership.

    A participant's token may read the cohorts it belongs to, but not who else is in them nor how many.
    """
    if resource.get("resourceType") != "Group":
        return resource
    patient = access.compartment_patient("read", "Group")
    sites = site_scope(access)
    if patient is None and sites is not None:
        # a site user sees a cohort's members at their own sites only, and not its size
        out = {k: v for k, v in resource.items() if k not in ("quantity", "member")}
        members = [m for m in resource.get("member") or [] if isinstance(m, dict)
                   and (compartment_patients({"resourceType": "Group", "member": [m]}) or {"?"}) <= sites.patients]
        if members:
            out["member"] = members
        return out if out != resource else resource
    if patient is None:
        return resource
    from smart_app.resource_server import _points_to_patient

    out = {k: v for k, v in resource.items() if k != "quantity"}
    members = [m for m in resource.get("member") or [] if isinstance(m, dict)
               and _points_to_patient(m.get("entity"), patient)]
    if members:
        out["member"] = members
    else:
        out.pop("member", None)
    return out


#: endpoints whose 200 answers carry participant data straight from the store
_FILTERED = ("search", "system_bundle", "instance_history", "type_history", "system_history", "read", "vread")


def _filter_bundle(response: Response) -> Response:
    """Drop what the token may not see from an answer (matches, _include, _revinclude, versions); redact Groups.

    Defence in depth behind the request checks, and the one place where a Group's other members and
    size are hidden from a patient-scoped token.
    """
    access = current_access()
    if access is None or response.status_code != 200 or "json" not in (response.mimetype or ""):
        return response
    if (request.endpoint or "").rsplit(".", 1)[-1] not in _FILTERED:
        return response
    try:
        body = json.loads(response.get_data())
    except (ValueError, RecursionError):
        return response
    if not isinstance(body, dict):
        return response
    if body.get("resourceType") != "Bundle":
        if not _visible(access, body):
            # a read whose answer lies outside the compartment (e.g. a version moved there): the same 403 as
            # for any other patient's resource, nothing of it returned
            error = _forbidden(f"{body.get('resourceType')}/{body.get('id')} is not in this token's compartment")
            from fhir_ops.app import render_error

            return render_error(error)
        redacted = _redact(access, body)
        if redacted is not body:
            response.set_data(json.dumps(redacted, ensure_ascii=False, separators=(",", ":")))
        return response
    entries = body.get("entry") or []
    kept, changed = [], False
    for e in entries:
        resource = e.get("resource") if isinstance(e, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == "Bundle":
            # a searchset answered inside a transaction/batch: never carried to a patient token (refused
            # earlier), but filter it the same way should that change
            nested = resource.get("entry") or []
            inner = [x for x in nested if not isinstance(x.get("resource"), dict) or _visible(access, x["resource"])]
            if len(inner) != len(nested):
                resource["entry"], changed = inner, True
                resource.pop("total", None)
            kept.append(e)
            continue
        if isinstance(resource, dict) and not _visible(access, resource):
            changed = True
            continue
        if isinstance(resource, dict):
            redacted = _redact(access, resource)
            if redacted is not resource:
                e["resource"], changed = redacted, True
        kept.append(e)
    if g.get("trialtwin_strip_total") and "total" in body:
        body.pop("total")
        changed = True
    if changed:
        if len(kept) != len(entries) and "total" in body:
            # the store counted before this filter: a count that includes hidden resources reveals them
            body.pop("total")
        if kept:
            body["entry"] = kept
        else:
            body.pop("entry", None)
        response.set_data(json.dumps(body, ensure_ascii=False, separators=(",", ":")))
    return response
