"""FHIR mapping of one access to the FHIR server: an R4 AuditEvent in the shapes of IHE BALP.

The recorder (fhir_ops.audit.recorder) gathers plain facts about a request into an :class:`Access`;
:func:`audit_event` turns them into the AuditEvent; :func:`chain_extension` marks its place in the chain.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

from terminology.catalog import OPERATION_CS

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
CLIENT_ID_SYSTEM = "https://trialtwin.org/fhir/sid/oauth-client-id"
OPERATION_SYSTEM = OPERATION_CS
CHAIN_EXTENSION = "https://trialtwin.org/fhir/StructureDefinition/audit-chain"
#: DICOM "Audit Log Used": the event type of a request that reads the audit trail itself.
AUDIT_LOG_USED = "110101"

#: interaction -> AuditEvent.action (C create, R read/view/print, U update, D delete, E execute)
ACTIONS = {"read": "R", "vread": "R", "history-instance": "R", "history-type": "R", "history-system": "R",
           "search-type": "E", "search-system": "E", "create": "C", "update": "U", "delete": "D",
           "operation": "E", "transaction": "E", "batch": "E", "capabilities": "R"}


@dataclass(frozen=True)
class Access:
    """What one request did, in plain values (no FHIR shapes).

    ``interaction`` is a FHIR restful-interaction code (``read``, ``search-type``, ``operation``, ...);
    ``status`` the HTTP status answered; ``decision`` ``granted`` or ``refused`` (the authorization
    check's answer; ``refused`` with a 401/403); ``resources`` the references (with version where known)
    read, written or targeted; ``patients`` the ids of the patients whose data the request concerned.
    """

    request_id: str
    recorded: str
    interaction: str
    method: str
    path: str
    status: int
    decision: str
    query: str = ""
    operation: str | None = None
    message: str | None = None
    client_id: str | None = None
    user: str | None = None
    subject: str | None = None
    address: str | None = None
    server: str = "TrialTwin FHIR server"
    resources: tuple[str, ...] = ()
    patients: tuple[str, ...] = ()
    audit_log_used: bool = False
    extra: dict = field(default_factory=dict)


def outcome_code(status: int) -> str:
    """AuditEvent.outcome for an HTTP status: 0 success, 4 minor failure (4xx), 8 serious failure (5xx).

    Examples
    --------
    >>> outcome_code(200), outcome_code(403), outcome_code(500)
    ('0', '4', '8')
    """
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


def _coding(system: str, code: str, display: str | None = None) -> dict:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def audit_event(access: Access) -> dict:
    """The AuditEvent (BALP shapes: RESTful type, interaction subtype, client/user/server agents, patient,
    data and query entities, the request id as an ``XrequestId`` entity) for one access."""
    if access.audit_log_used:
        event_type = _coding(DCM, AUDIT_LOG_USED, "Audit Log Used")
    else:
        event_type = _coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation")
    subtype = [_coding(RESTFUL_INTERACTION, access.interaction)]
    if access.operation:
        subtype.append(_coding(OPERATION_SYSTEM, access.operation))
    outcome_desc = f"{access.decision}; HTTP {access.status}"
    if access.message:
        outcome_desc += f": {access.message[:500]}"
    agents = [{
        # the client application (SMART client id) and where the request came from
        "type": {"coding": [_coding(DCM, "110153", "Source Role ID")]},
        "who": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": access.client_id or "unauthenticated"}},
        "altId": access.client_id or "unauthenticated",
        "requestor": access.user is None,
        **({"network": {"address": access.address, "type": "2"}} if access.address else {}),
    }]
    if access.user or access.subject:
        user: dict = {"type": {"coding": [_coding(PARTICIPATION, "IRCP", "information recipient")]},
                      "requestor": True}
        if access.user:
            user["who"] = {"reference": access.user}
        if access.subject:
            user["altId"] = access.subject
        agents.append(user)
    agents.append({"type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
                   "who": {"display": access.server}, "requestor": False})
    entities: list[dict] = [{
        "what": {"identifier": {"value": access.request_id}},
        "type": _coding(BALP_ENTITY_TYPE, "XrequestId", "X-Request-Id"),
    }]
    for patient in access.patients:
        entities.append({"what": {"reference": f"Patient/{patient}"}, "type": _coding(ENTITY_TYPE, "1", "Person"),
                         "role": _coding(OBJECT_ROLE, "1", "Patient")})
    for ref in access.resources:
        entities.append({"what": {"reference": ref}, "type": _coding(ENTITY_TYPE, "2", "System Object"),
                         "role": _coding(OBJECT_ROLE, "4", "Domain Resource")})
    request_entity = {"type": _coding(ENTITY_TYPE, "2", "System Object"),
                      "role": _coding(OBJECT_ROLE, "24", "Query"),
                      "description": f"{access.method} {access.path}"[:1000]}
    if access.query:
        request_entity["query"] = base64.b64encode(access.query.encode("utf-8")).decode("ascii")
    entities.append(request_entity)
    return {
        "resourceType": "AuditEvent",
        "type": event_type,
        "subtype": subtype,
        "action": ACTIONS.get(access.interaction, "E"),
        "recorded": access.recorded,
        "outcome": outcome_code(access.status),
        "outcomeDesc": outcome_desc,
        "agent": agents,
        "source": {"observer": {"display": access.server},
                   "type": [_coding(SOURCE_TYPE, "4", "Application Server")]},
        "entity": entities,
    }


def chain_extension(seq: int, prev: str, digest: str) -> dict:
    """The extension that places a stored AuditEvent in the hash chain (sequence, previous hash, hash)."""
    return {"url": CHAIN_EXTENSION, "extension": [
        {"url": "sequence", "valueInteger": seq},
        {"url": "previous", "valueString": prev},
        {"url": "hash", "valueString": digest}]}


def chained_resource(seq: int, content: dict, prev: str, digest: str) -> dict:
    """The AuditEvent resource stored for journal record ``seq``: its content, id and chain extension."""
    return {"resourceType": "AuditEvent", "id": f"audit-{seq}",
            **{k: v for k, v in content.items() if k != "resourceType"},
            "extension": [chain_extension(seq, prev, digest)]}


def chained_content(resource: dict) -> dict:
    """What of a stored AuditEvent was hashed: everything but id, meta, text and the chain extension."""
    out = {k: v for k, v in resource.items() if k not in ("id", "meta", "text", "extension")}
    others = [e for e in resource.get("extension") or [] if not (isinstance(e, dict) and e.get("url") == CHAIN_EXTENSION)]
    if others:
        out["extension"] = others
    return out


def request_id_of(event: dict) -> str | None:
    """The X-Request-Id an AuditEvent records (its ``XrequestId`` entity)."""
    for entity in event.get("entity") or []:
        if (entity.get("type") or {}).get("code") == "XrequestId":
            return ((entity.get("what") or {}).get("identifier") or {}).get("value")
    return None


def patients_of(event: dict) -> set[str]:
    """The patient ids an AuditEvent names as entities."""
    return {e["what"]["reference"].split("/", 1)[1] for e in event.get("entity") or []
            if (e.get("role") or {}).get("code") == "1" and "reference" in (e.get("what") or {})}
