"""Resource-server side of SMART: validate bearer tokens and decide what they may touch.

Framework-free, for ``fhir_ops``: JWT access tokens checked against the issuer's JWKS (cached), or opaque
tokens checked by RFC 7662 introspection; scopes and the Patient compartment (FHIR R4) decide access.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import requests
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from fhir_ops.errors import FhirError, Forbidden, Unauthorized

from .jwks import JwksCache, select_keys
from .scopes import ScopeSet, interaction_code, parse_scopes

#: Algorithms accepted on access tokens (asymmetric only: a shared secret would let the FHIR server mint tokens).
TOKEN_ALGORITHMS = ("RS256", "RS384", "ES256", "ES384")


def _challenge(realm: str, error: str | None = None, description: str | None = None, scope: str | None = None) -> str:
    parts = [f'realm="{realm}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append('error_description="{}"'.format(description.replace('"', "'")))
    if scope:
        parts.append(f'scope="{scope}"')
    return "Bearer " + ", ".join(parts)


@dataclass(frozen=True)
class AccessContext:
    """What a validated token allows.

    Parameters
    ----------
    client_id : str
    scopes : ScopeSet
        Granted scopes (v1 forms already mapped to v2).
    patient : str, optional
        Patient id from the launch context; patient/ scopes are limited to this patient's compartment.
    fhir_context : tuple of dict
        ``fhirContext`` entries such as ``{"reference": "ResearchStudy/study-1"}``.
    user : str, optional
        The ``fhirUser`` (``Practitioner/abc``), relative to the FHIR base when it was on the same server.
    subject : str, optional
        The token's ``sub``.
    encounter : str, optional
    expires_at : float, optional
    """

    client_id: str
    scopes: ScopeSet
    patient: str | None = None
    fhir_context: tuple = ()
    user: str | None = None
    subject: str | None = None
    encounter: str | None = None
    expires_at: float | None = None
    claims: dict = field(default_factory=dict, compare=False, repr=False)

    def can(self, interaction: str, resource_type: str) -> bool:
        """Whether any granted scope permits ``interaction`` (c/r/u/d/s, a name, or ``operation``) on the type.

        A ``patient/`` scope only counts when the token carries a patient; callers then restrict the
        data with :meth:`compartment_patient` and :func:`patient_compartment_allows`.
        """
        contexts = ["user", "system"] + (["patient"] if self.patient else [])
        return self.scopes.allows(interaction, resource_type, contexts)

    def compartment_patient(self, interaction: str, resource_type: str) -> str | None:
        """The patient id whose compartment bounds this access, or None when user/system scopes allow it broadly."""
        if self.scopes.allows(interaction, resource_type, ("user", "system")):
            return None
        return self.patient

    def require(self, interaction: str, resource_type: str) -> str | None:
        """Raise ``Forbidden`` unless :meth:`can`; return :meth:`compartment_patient` for the caller to enforce."""
        if not self.can(interaction, resource_type):
            code = interaction_code(interaction)
            raise Forbidden(
                f"the access token's scopes ({self.scopes.text or 'none'}) do not allow '{code}' on {resource_type}",
                error_id="insufficient-scope",
                headers={"WWW-Authenticate": _challenge("fhir", "insufficient_scope",
                                                        scope=f"patient/{resource_type}.{code} user/{resource_type}.{code}")},
            )
        return self.compartment_patient(interaction, resource_type)


def _relative(reference: str | None, base: str) -> str | None:
    if reference and base and reference.startswith(base.rstrip("/") + "/"):
        return reference[len(base.rstrip("/")) + 1:]
    return reference


def access_context_from_claims(claims: dict, fhir_base: str = "") -> AccessContext:
    """Build an :class:`AccessContext` from JWT or introspection claims."""
    fhir_context = claims.get("fhirContext") or []
    if not isinstance(fhir_context, list):
        fhir_context = []
    return AccessContext(
        client_id=str(claims.get("client_id") or claims.get("azp") or ""),
        scopes=parse_scopes(claims.get("scope") if isinstance(claims.get("scope"), str) else " ".join(claims.get("scope") or [])),
        patient=claims.get("patient"), fhir_context=tuple(fhir_context),
        user=_relative(claims.get("fhirUser"), fhir_base), subject=claims.get("sub"),
        encounter=claims.get("encounter"), expires_at=claims.get("exp"), claims=dict(claims),
    )


class TokenValidator:
    """Turn an ``Authorization`` header into an :class:`AccessContext` or a FHIR error.

    Parameters
    ----------
    issuer : str
        Expected ``iss`` of JWT access tokens.
    audience : str
        This FHIR server's base URL; expected ``aud``.
    jwks_uri : str, optional
        Where the issuer publishes its keys; fetched lazily and cached.
    jwks : dict, optional
        A static JWKS instead of ``jwks_uri`` (for an issuer in the same process).
    introspection_endpoint : str, optional
        RFC 7662 endpoint for tokens that are not locally verifiable JWTs.
    introspection_auth : tuple of (client_id, client_secret), optional
        HTTP Basic credentials of this resource server at the introspection endpoint.
    leeway : int
        Clock skew tolerated on ``exp``/``nbf`` (seconds).
    revocation : object with ``is_revoked(jti) -> bool``, optional
        The issuer's revocation list (:class:`smart_app.revocation.RevocationList`), asked on every
        request so that a revoked token stops working at once, not when it expires.
    """

    def __init__(self, *, issuer: str, audience: str, jwks_uri: str | None = None, jwks: dict | None = None,
                 introspection_endpoint: str | None = None, introspection_auth: tuple[str, str] | None = None,
                 leeway: int = 30, realm: str = "fhir", http: requests.Session | None = None,
                 cache_ttl: float = 300.0, clock: Callable[[], float] = time.time, revocation=None) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience.rstrip("/")
        self.http = http or requests.Session()
        self.static_keys = KeySet.import_key_set(jwks) if jwks else None
        self.jwks_cache = JwksCache(jwks_uri, ttl=cache_ttl, http=self.http, clock=clock) if jwks_uri else None
        self.introspection_endpoint = introspection_endpoint
        self.introspection_auth = introspection_auth
        self.leeway = leeway
        self.realm = realm
        self.clock = clock
        self.revocation = revocation

    def _invalid(self, description: str) -> Unauthorized:
        return Unauthorized(f"invalid access token: {description}", error_id="invalid-token",
                            headers={"WWW-Authenticate": _challenge(self.realm, "invalid_token", description)})

    def authenticate(self, authorization: str | None) -> AccessContext:
        """Validate an ``Authorization`` header value.

        Raises
        ------
        fhir_ops.errors.Unauthorized
            No bearer token (``WWW-Authenticate: Bearer realm=...``) or an invalid one (``error="invalid_token"``).
        """
        if not authorization:
            raise Unauthorized("this request needs an access token: send Authorization: Bearer <token>",
                               error_id="missing-token", headers={"WWW-Authenticate": _challenge(self.realm)})
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("the Authorization header must use the Bearer scheme", error_id="missing-token",
                               headers={"WWW-Authenticate": _challenge(self.realm, "invalid_request")})
        return self.validate(value.strip())

    def validate(self, token: str) -> AccessContext:
        """Validate a bearer token by signature (JWKS) when possible, else by introspection."""
        if token.count(".") == 2 and (self.static_keys is not None or self.jwks_cache is not None):
            return self._validate_jwt(token)
        if self.introspection_endpoint:
            return self._introspect(token)
        raise self._invalid("token is not a JWT this server can verify and no introspection endpoint is configured")

    def _validate_jwt(self, token: str) -> AccessContext:
        try:
            header = jws.extract_compact(token.encode("ascii")).protected
        except (JoseError, ValueError, UnicodeError):
            raise self._invalid("malformed JWT") from None
        alg = header.get("alg")
        if alg not in TOKEN_ALGORITHMS:
            raise self._invalid(f"algorithm {alg!r} is not accepted")
        try:
            keys = self.static_keys if self.static_keys is not None else self.jwks_cache.get(header.get("kid"))
        except (requests.RequestException, ValueError, JoseError) as exc:
            raise FhirError(f"the issuer's keys could not be fetched: {exc}", error_id="jwks-unavailable",
                            status=503, code="transient") from None
        decoded = None
        for key in select_keys(keys, header.get("kid"), alg):
            try:
                decoded = jwt.decode(token, key, algorithms=[alg])
                break
            except JoseError:
                continue
        if decoded is None:
            raise self._invalid("signature does not verify with the issuer's keys")
        claims = decoded.claims
        now = self.clock()
        if claims.get("iss", "").rstrip("/") != self.issuer:
            raise self._invalid("wrong issuer")
        aud = claims.get("aud")
        audiences = [a.rstrip("/") for a in (aud if isinstance(aud, list) else [aud]) if isinstance(a, str)]
        if self.audience not in audiences:
            raise self._invalid(f"audience is not {self.audience}")
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or exp + self.leeway < now:
            raise self._invalid("token has expired")
        nbf = claims.get("nbf")
        if isinstance(nbf, (int, float)) and nbf - self.leeway > now:
            raise self._invalid("token is not yet valid")
        if self.revocation is not None:
            self._check_not_revoked(claims.get("jti"))
        return access_context_from_claims(claims, self.audience)

    def _check_not_revoked(self, jti) -> None:
        import sqlite3

        if not isinstance(jti, str) or not jti:
            raise self._invalid("token has no jti, so its revocation cannot be checked")
        try:
            revoked = self.revocation.is_revoked(jti)
        except sqlite3.Error as exc:
            # Fail closed: an unreadable list must not turn a revoked token back into a valid one.
            raise FhirError(f"the token revocation list could not be read: {exc}", error_id="revocation-unavailable",
                            status=503, code="transient") from None
        if revoked:
            raise self._invalid("token has been revoked")

    def _introspect(self, token: str) -> AccessContext:
        try:
            response = self.http.post(self.introspection_endpoint, data={"token": token},
                                      auth=self.introspection_auth, timeout=5,
                                      headers={"Accept": "application/json"})
            response.raise_for_status()
            claims = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise FhirError(f"the token could not be introspected: {exc}", error_id="introspection-failed",
                            status=503, code="transient") from None
        if not isinstance(claims, dict) or claims.get("active") is not True:
            raise self._invalid("token is not active")
        if str(claims.get("token_type", "Bearer")).lower() not in ("bearer", "access_token"):
            raise self._invalid("only access tokens are accepted here")
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and exp + self.leeway < self.clock():
            raise self._invalid("token has expired")
        return access_context_from_claims(claims, self.audience)


# --- Patient compartment (FHIR R4 CompartmentDefinition/patient) -----------------------------------

#: For each resource type, the element paths whose references put a resource in a Patient's compartment
#: (R4 CompartmentDefinition "patient", search parameters resolved to their elements). Types absent here
#: are not in the compartment (e.g. Medication, Organization, ResearchStudy, Task in R4).
PATIENT_COMPARTMENT: dict[str, tuple[str, ...]] = {
    "Account": ("subject",),
    "AdverseEvent": ("subject",),
    "AllergyIntolerance": ("patient", "recorder", "asserter"),
    "Appointment": ("participant.actor",),
    "AppointmentResponse": ("actor",),
    "AuditEvent": ("entity.what",),
    "Basic": ("subject", "author"),
    "BodyStructure": ("patient",),
    "CarePlan": ("subject", "activity.detail.performer"),
    "CareTeam": ("subject", "participant.member"),
    "ClinicalImpression": ("subject",),
    "Communication": ("subject", "sender", "recipient"),
    "CommunicationRequest": ("subject", "sender", "recipient", "requester"),
    "Composition": ("subject", "author", "attester.party"),
    "Condition": ("subject", "asserter"),
    "Consent": ("patient",),
    "Coverage": ("policyHolder", "subscriber", "beneficiary", "payor"),
    "DetectedIssue": ("patient",),
    "DeviceRequest": ("subject", "performer"),
    "DeviceUseStatement": ("subject",),
    "DiagnosticReport": ("subject",),
    "DocumentReference": ("subject", "author"),
    "Encounter": ("subject",),
    "EpisodeOfCare": ("patient",),
    "FamilyMemberHistory": ("patient",),
    "Flag": ("subject",),
    "Goal": ("subject",),
    "Group": ("member.entity",),
    "ImagingStudy": ("subject",),
    "Immunization": ("patient",),
    "List": ("subject", "source"),
    "MeasureReport": ("subject",),
    "Media": ("subject",),
    "MedicationAdministration": ("subject", "performer.actor"),
    "MedicationDispense": ("subject", "receiver"),
    "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",),
    "NutritionOrder": ("patient",),
    "Observation": ("subject", "performer"),
    "Patient": ("link.other",),
    "Procedure": ("subject", "performer.actor"),
    "Provenance": ("target",),
    "QuestionnaireResponse": ("subject", "author"),
    "RelatedPerson": ("patient",),
    "ResearchSubject": ("individual",),
    "RiskAssessment": ("subject",),
    "Schedule": ("actor",),
    "ServiceRequest": ("subject", "performer"),
    "Specimen": ("subject",),
    "VisionPrescription": ("patient",),
}


def _values(node: Any, path: Iterable[str]) -> list:
    nodes = [node]
    for step in path:
        nxt = []
        for n in nodes:
            if isinstance(n, dict) and step in n:
                value = n[step]
                nxt.extend(value if isinstance(value, list) else [value])
        nodes = nxt
    return nodes


def _points_to_patient(reference: Any, patient_id: str) -> bool:
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return False
    parts = reference["reference"].split("/")
    # Relative "Patient/x", absolute ".../Patient/x" and versioned ".../Patient/x/_history/2" all count.
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return len(parts) >= 2 and parts[-2] == "Patient" and parts[-1] == patient_id


def patient_compartment_allows(resource: dict, patient_id: str) -> bool:
    """Whether ``resource`` belongs to the Patient compartment of ``patient_id`` (FHIR R4).

    Examples
    --------
    >>> patient_compartment_allows({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}, "p1")
    True
    >>> patient_compartment_allows({"resourceType": "ResearchSubject", "individual": {"reference": "Patient/p2"}}, "p1")
    False
    >>> patient_compartment_allows({"resourceType": "Patient", "id": "p1"}, "p1")
    True
    """
    rtype = resource.get("resourceType")
    if rtype == "Patient" and resource.get("id") == patient_id:
        return True
    for path in PATIENT_COMPARTMENT.get(rtype, ()):
        if any(_points_to_patient(ref, patient_id) for ref in _values(resource, path.split("."))):
            return True
    return False


def in_patient_compartment(resource_type: str) -> bool:
    """Whether resources of this type can belong to a Patient compartment at all."""
    return resource_type in PATIENT_COMPARTMENT


def compartment_paths(resource_type: str) -> tuple[str, ...]:
    """Element paths (dot-separated) whose references place ``resource_type`` in a Patient compartment."""
    return PATIENT_COMPARTMENT.get(resource_type, ())


def validator_from_config(config) -> TokenValidator | None:
    """Build the FHIR app's :class:`TokenValidator` from its Flask config, or None when SMART is off.

    Keys read: ``SMART_ISSUER`` (required to enable), ``FHIR_BASE_URL`` (the audience), and one or more of
    ``SMART_JWKS_URI``, ``SMART_KEYS_FILE`` (the co-located auth server's key file: no HTTP round trip),
    ``SMART_INTROSPECTION_ENDPOINT`` with ``SMART_INTROSPECTION_CLIENT_ID``/``_SECRET``;
    ``SMART_REVOCATION_DB``, the co-located authorization server's SQLite file, checked on each request.
    """
    issuer = config.get("SMART_ISSUER")
    if not issuer:
        return None
    jwks = None
    if config.get("SMART_KEYS_FILE"):
        from .jwks import SigningKeys
        jwks = SigningKeys.load(config["SMART_KEYS_FILE"]).public_jwks()
    auth = None
    if config.get("SMART_INTROSPECTION_CLIENT_ID"):
        auth = (config["SMART_INTROSPECTION_CLIENT_ID"], config.get("SMART_INTROSPECTION_CLIENT_SECRET", ""))
    revocation = None
    if config.get("SMART_REVOCATION_DB"):
        from .revocation import RevocationList
        revocation = RevocationList(config["SMART_REVOCATION_DB"])
    return TokenValidator(issuer=issuer, audience=config["FHIR_BASE_URL"], jwks=jwks,
                          jwks_uri=None if jwks else config.get("SMART_JWKS_URI"),
                          introspection_endpoint=config.get("SMART_INTROSPECTION_ENDPOINT"),
                          introspection_auth=auth, revocation=revocation)
