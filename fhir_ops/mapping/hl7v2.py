"""HL7 v2 messages (ORU^R01 results, ADT^A04/A08 patient updates) to FHIR R4, and their ACKs.

Parsing is python-hl7's (``hl7``); coding-system and assigning-authority names come from the shipped
NamingSystem resources (``terminology/data/NamingSystem-hl7v2-*.json``), never from code.
"""
from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable
from urllib.parse import quote

from hl7.parser import create_parse_plan

from fhir_ops.errors import FhirError
from terminology.catalog import shipped

#: HL7 table 0357 message error condition codes used here
REQUIRED_FIELD_MISSING = ("101", "Required field missing")
DATA_TYPE_ERROR = ("102", "Data type error")
TABLE_VALUE_NOT_FOUND = ("103", "Table value not found")
UNSUPPORTED_MESSAGE_TYPE = ("200", "Unsupported message type")
UNSUPPORTED_EVENT = ("201", "Unsupported event code")
UNKNOWN_KEY = ("204", "Unknown key identifier")
INTERNAL_ERROR = ("207", "Application internal error")
#: the error id an HL7 v2 fault carries in its OperationOutcome, one per condition (CodeSystem/error)
CONDITION_ERROR_IDS = {
    REQUIRED_FIELD_MISSING: "hl7v2-required-field-missing",
    DATA_TYPE_ERROR: "hl7v2-data-type-error",
    TABLE_VALUE_NOT_FOUND: "hl7v2-table-value-not-found",
    UNSUPPORTED_MESSAGE_TYPE: "hl7v2-unsupported-message-type",
    UNSUPPORTED_EVENT: "hl7v2-unsupported-event-code",
    UNKNOWN_KEY: "hl7v2-unknown-key-identifier",
    INTERNAL_ERROR: "hl7v2-application-internal-error",
}

SUPPORTED = {("ORU", "R01"), ("ADT", "A04"), ("ADT", "A08")}
IDENTIFIER_SYSTEM_BASE = "https://trialtwin.org/fhir/sid/hl7v2-message/"
_STATUS = {"F": "final", "C": "corrected", "A": "amended", "P": "preliminary", "R": "preliminary",
           "I": "registered", "X": "cancelled", "W": "entered-in-error"}
_GENDER = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}
_CONTROL = str.maketrans({"\x0b": None, "\x1c": None})


class Hl7Fault(FhirError):
    """A message that cannot be stored, located as HL7 v2 does it: segment, its sequence, field.

    ``ack_code`` is ``AR`` (rejected: unparseable, unsupported type) or ``AE`` (an error in its
    content); ``condition`` is an HL7 table 0357 ``(code, text)``.
    """

    def __init__(self, message: str, *, ack_code: str = "AE", segment: str = "MSH", sequence: int = 1,
                 field: int | None = None, condition: tuple[str, str] = DATA_TYPE_ERROR) -> None:
        where = f"{segment}[{sequence}]" + (f"-{field}" if field else "")
        super().__init__(f"{where}: {message}", error_id=CONDITION_ERROR_IDS[condition],
                         expression=[where])
        self.ack_code, self.segment, self.sequence, self.field = ack_code, segment, sequence, field
        self.condition = condition
        self.text = message


# -- naming ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Naming:
    """HL7 v2 names of coding systems and assigning authorities, and the FHIR URIs they stand for."""

    systems: dict[str, str]

    @classmethod
    def shipped(cls) -> "Naming":
        systems = {}
        for ns in shipped("NamingSystem"):
            uri = next((u["value"] for u in ns.get("uniqueId", []) if u.get("type") == "uri"), None)
            for u in ns.get("uniqueId", []):
                if uri and u.get("type") == "other":
                    systems[u["value"]] = uri
        return cls(systems)

    def uri(self, name: str) -> str | None:
        if name.startswith(("http://", "https://", "urn:")):
            return name
        return self.systems.get(name)


# -- reading a message ---------------------------------------------------------------------------
class Segment(list):
    """One segment's fields as received, in HL7 numbering (``seg[3]`` is PID-3; ``msh[1]`` is MSH-1,
    the field separator); repetitions, components and subcomponents are split when a field is read."""

    __slots__ = ("separators",)


class Message:
    """A parsed HL7 v2 message: its segments, in order (``for segment in msg``), and ``segment(name)``.

    python-hl7 reads the encoding characters (``hl7.parser.create_parse_plan``, MSH-1/MSH-2); the fields are
    split with ``str.split`` and a field's repetitions and components only when it is read. python-hl7's
    own ``parse`` builds ~90 container objects per lab result message and was 40 % of the listener's
    CPU time (bench/results/hl7_profile.txt); the values read are the same (tests/fhir_ops/mapping).
    """

    __slots__ = ("segments",)

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments

    def __iter__(self):
        return iter(self.segments)

    def segment(self, name: str) -> Segment:
        """The first segment called ``name``; ``KeyError`` if there is none."""
        for seg in self.segments:
            if seg[0] == name:
                return seg
        raise KeyError(name)


def _get(segment: Segment, field: int, component: int = 1, sub: int = 1, repeat: int = 1) -> str:
    """Field ``field`` of ``segment`` (HL7 numbering, MSH-1 is the field separator), or ''."""
    if field >= len(segment):
        return ""
    value = segment[field]
    if field <= 2 and segment[0] == "MSH":  # MSH-1 / MSH-2 hold the separators themselves
        return value if component == 1 and sub == 1 and repeat == 1 else ""
    rep_sep, comp_sep, sub_sep = segment.separators
    if rep_sep in value:
        reps = value.split(rep_sep)
        if repeat > len(reps):
            return ""
        value = reps[repeat - 1]
    elif repeat > 1:
        return ""
    if comp_sep in value:
        comps = value.split(comp_sep)
        if component > len(comps):
            return ""
        value = comps[component - 1]
    elif component > 1:
        return ""
    if sub_sep in value:
        subs = value.split(sub_sep)
        return subs[sub - 1] if sub <= len(subs) else ""
    return value if sub == 1 else ""


def _repeats(segment: Segment, field: int) -> int:
    if field >= len(segment) or not segment[field]:
        return 0
    return segment[field].count(segment.separators[0]) + 1


def parse(text: str) -> Message:
    """Parse one message (segments separated by CR; LF tolerated); unparseable → ``Hl7Fault`` AR."""
    text = text.translate(_CONTROL).replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH"):
        raise Hl7Fault("a message starts with an MSH segment", ack_code="AR", field=None,
                       condition=REQUIRED_FIELD_MISSING)
    try:
        plan = create_parse_plan(text)  # separators as MSH-1 / MSH-2 declare them
    except Exception as exc:  # python-hl7 raises ParseException and plain errors alike
        raise Hl7Fault(f"not a parseable HL7 v2 message ({exc})", ack_code="AR",
                       condition=DATA_TYPE_ERROR) from None
    # plan.separators: segment, field, repetition, component, subcomponent
    field_sep, nested = plan.separators[1], (plan.separators[2], plan.separators[3], plan.separators[4])
    segments = []
    for line in text.split("\r"):
        if not line:
            continue
        seg = Segment(line.split(field_sep))
        if seg[0] == "MSH":
            seg.insert(1, field_sep)
        seg.separators = nested
        segments.append(seg)
    return Message(segments)


def message_type(msg: Message) -> tuple[str, str]:
    """``(MSH-9.1, MSH-9.2)``; unsupported → ``Hl7Fault`` AR naming MSH-9."""
    msh = msg.segment("MSH")
    kind, event = _get(msh, 9, 1), _get(msh, 9, 2)
    if not _get(msh, 10):
        raise Hl7Fault("MSH-10 (message control id) is required", ack_code="AR", field=10,
                       condition=REQUIRED_FIELD_MISSING)
    if kind not in {k for k, _ in SUPPORTED}:
        raise Hl7Fault(f"message type {kind!r} is not taken here (ORU^R01, ADT^A04, ADT^A08)", ack_code="AR",
                       field=9, condition=UNSUPPORTED_MESSAGE_TYPE)
    if (kind, event) not in SUPPORTED:
        raise Hl7Fault(f"event {kind}^{event} is not taken here (ORU^R01, ADT^A04, ADT^A08)", ack_code="AR",
                       field=9, condition=UNSUPPORTED_EVENT)
    return kind, event


def _timestamp(value: str, segment: str, seq: int, field: int) -> str:
    """HL7 DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) → FHIR dateTime."""
    body, tz = value, ""
    for sign in "+-":
        if sign in value[4:]:
            i = value.index(sign, 4)
            body, tz = value[:i], value[i:]
    frac = ""
    if "." in body:
        body, frac = body.split(".", 1)
    n = len(body)
    try:
        if n not in (4, 6, 8, 10, 12, 14) or not body.isdigit() or (tz and (len(tz) != 5 or not tz[1:].isdigit())) \
                or (frac and not frac.isdigit()):
            raise ValueError
        parts = [int(body[:4])] + [int(body[i:i + 2]) for i in range(4, n, 2)]
        t = dt.datetime(*parts, *(1, 1)[len(parts) - 1:] if len(parts) < 3 else ())
    except ValueError:
        raise Hl7Fault(f"{value!r} is not an HL7 date/time (YYYYMMDD[HHMM[SS]][+ZZZZ])", segment=segment,
                       sequence=seq, field=field, condition=DATA_TYPE_ERROR) from None
    if n <= 8:
        return body[:4] + (f"-{body[4:6]}" if n >= 6 else "") + (f"-{body[6:8]}" if n == 8 else "")
    out = t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "")
    # FHIR needs a zone once there is a time; HL7 without one means the sender's local time: say UTC
    return out + (f"{tz[:3]}:{tz[3:]}" if tz else "Z")


def _identifier(pid, naming: Naming, rep: int = 1) -> dict:
    value = _get(pid, 3, 1, repeat=rep)
    if not value:
        raise Hl7Fault("PID-3 (patient identifier) is required", segment="PID", field=3,
                       condition=REQUIRED_FIELD_MISSING)
    # CX.4 assigning authority (HD): namespace & universal id & universal id type
    namespace, universal, kind = (_get(pid, 3, 4, s, repeat=rep) for s in (1, 2, 3))
    system = universal if universal and kind.upper() == "URI" else naming.uri(namespace) if namespace else None
    if not system:
        raise Hl7Fault(f"assigning authority {namespace or universal!r} of PID-3 is not known here (no "
                       "NamingSystem names it)", segment="PID", field=3, condition=TABLE_VALUE_NOT_FOUND)
    return {"system": system, "value": value}


# -- the mapping ----------------------------------------------------------------------------------
@dataclass
class Mapped:
    """A message as a transaction Bundle plus, per entry, the segment it came from (for faults)."""

    bundle: dict
    sources: list[tuple[str, int]]
    control_id: str
    kind: str


def _patient_from_pid(pid, naming: Naming, base: dict | None) -> dict:
    patient = dict(base or {"resourceType": "Patient"})
    identifiers = list(patient.get("identifier") or [])
    for rep in range(1, _repeats(pid, 3) + 1):
        ident = _identifier(pid, naming, rep)
        if not any(i.get("system") == ident["system"] and i.get("value") == ident["value"] for i in identifiers):
            identifiers.append(ident)
    patient["identifier"] = identifiers
    family, given = _get(pid, 5, 1), _get(pid, 5, 2)
    if family or given:
        patient["name"] = [{k: v for k, v in (("family", family), ("given", [given] if given else None)) if v}]
    if _get(pid, 7):
        birth = _timestamp(_get(pid, 7), "PID", 1, 7)
        patient["birthDate"] = birth[:10]
    sex = _get(pid, 8)
    if sex:
        if sex not in _GENDER:
            raise Hl7Fault(f"administrative sex {sex!r} is not in HL7 table 0001", segment="PID", field=8,
                           condition=TABLE_VALUE_NOT_FOUND)
        patient["gender"] = _GENDER[sex]
    return patient


def _observation(obx, seq: int, subject: str, obr_time: str, ident: dict, naming: Naming) -> dict:
    vtype = _get(obx, 2)
    code, display, sysname = _get(obx, 3, 1), _get(obx, 3, 2), _get(obx, 3, 3)
    if not code:
        raise Hl7Fault("OBX-3 (observation identifier) is required", segment="OBX", sequence=seq, field=3,
                       condition=REQUIRED_FIELD_MISSING)
    system = naming.uri(sysname) if sysname else None
    if not system:
        raise Hl7Fault(f"coding system {sysname!r} of OBX-3 is not known here (no NamingSystem names it)",
                       segment="OBX", sequence=seq, field=3, condition=TABLE_VALUE_NOT_FOUND)
    status = _get(obx, 11)
    if not status:
        raise Hl7Fault("OBX-11 (result status) is required", segment="OBX", sequence=seq, field=11,
                       condition=REQUIRED_FIELD_MISSING)
    if status not in _STATUS:
        raise Hl7Fault(f"result status {status!r} is not in HL7 table 0085", segment="OBX", sequence=seq,
                       field=11, condition=TABLE_VALUE_NOT_FOUND)
    when = _get(obx, 14)
    effective = _timestamp(when, "OBX", seq, 14) if when else obr_time
    if not effective:
        raise Hl7Fault("OBX-14 (or OBR-7) observation date/time is required", segment="OBX", sequence=seq,
                       field=14, condition=REQUIRED_FIELD_MISSING)
    coding = {"system": system, "code": code, **({"display": display} if display else {})}
    obs = {"resourceType": "Observation", "identifier": [ident], "status": _STATUS[status],
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                     "code": "laboratory"}]}],
           "code": {"coding": [coding], **({"text": display} if display else {})},
           "subject": {"reference": subject}, "effectiveDateTime": effective}
    raw = _get(obx, 5)
    if status in ("X", "W") and not raw:
        return obs
    if vtype == "NM":
        try:
            value = Decimal(raw.strip())
            if not value.is_finite():
                raise InvalidOperation
        except InvalidOperation:
            raise Hl7Fault(f"OBX-5 {raw!r} is not a number (OBX-2 says NM)", segment="OBX", sequence=seq,
                           field=5, condition=DATA_TYPE_ERROR) from None
        unit, unit_text, unit_sys = _get(obx, 6, 1), _get(obx, 6, 2), _get(obx, 6, 3)
        qty = {"value": int(value) if value == value.to_integral_value() and "." not in raw else float(value)}
        if unit:
            qty["unit"] = unit_text or unit
            if naming.uri(unit_sys or "UCUM") == "http://unitsofmeasure.org":
                qty.update(system="http://unitsofmeasure.org", code=unit)
            else:
                qty["unit"] = unit
        obs["valueQuantity"] = qty
    elif vtype in ("ST", "TX", "FT"):
        obs["valueString"] = raw
    else:
        raise Hl7Fault(f"value type {vtype!r} is not taken here (NM, ST, TX, FT)", segment="OBX", sequence=seq,
                       field=2, condition=TABLE_VALUE_NOT_FOUND)
    return obs


def to_bundle(msg: Message, naming: Naming, find_patient: Callable[..., dict | None]) -> Mapped:
    """Map a parsed message to one transaction Bundle.

    Parameters
    ----------
    msg : Message
    naming : Naming
    find_patient : callable
        ``(identifier dict, current=bool) -> Patient or None``: the stored participant with that
        identifier; ``current`` asks for the current version (an ADT update), else a recent lookup may
        answer (a result only uses the id).

    Raises
    ------
    Hl7Fault
        Naming the segment and field at fault.
    """
    kind, event = message_type(msg)
    msh = msg.segment("MSH")
    control_id = _get(msh, 10)
    facility = _get(msh, 4) or _get(msh, 3) or "unknown"
    try:
        pid = msg.segment("PID")
    except KeyError:
        raise Hl7Fault(f"{kind}^{event} needs a PID segment", segment="PID", condition=REQUIRED_FIELD_MISSING,
                       ack_code="AE") from None
    ident = _identifier(pid, naming)
    # an ADT update is merged into the stored Patient, so it must read the current version; a result only
    # needs to know who the participant is
    existing = find_patient(ident, current=kind == "ADT")
    if kind == "ADT":
        patient = _patient_from_pid(pid, naming, existing)
        if existing:
            entry = {"resource": patient, "request": {"method": "PUT", "url": f"Patient/{existing['id']}"}}
        else:
            entry = {"resource": patient, "request": {"method": "POST", "url": "Patient",
                                                      "ifNoneExist": f"identifier={ident['system']}|{ident['value']}"}}
        return Mapped({"resourceType": "Bundle", "type": "transaction", "entry": [entry]}, [("PID", 1)],
                      control_id, kind)
    if existing is None:
        raise Hl7Fault(f"no participant has identifier {ident['system']}|{ident['value']} (send ADT^A04 first)",
                       segment="PID", field=3, condition=UNKNOWN_KEY)
    subject = f"Patient/{existing['id']}"
    entries, sources = [], []
    obr_time, obr_seq = "", 0
    counters: dict[str, itertools.count] = {}
    for segment in msg:
        name = segment[0]
        seq = next(counters.setdefault(name, itertools.count(1)))
        if name == "OBR":
            obr_seq = seq
            obr_time = _timestamp(_get(segment, 7), "OBR", seq, 7) if _get(segment, 7) else ""
        elif name == "OBX":
            # a resent message (same sending facility and MSH-10) matches what it stored the first time
            ident_obs = {"system": IDENTIFIER_SYSTEM_BASE + quote(facility, safe=""),
                         "value": f"{control_id}-{obr_seq}-{_get(segment, 1) or seq}"}
            obs = _observation(segment, seq, subject, obr_time, ident_obs, naming)
            entries.append({"resource": obs, "request": {
                "method": "POST", "url": "Observation",
                "ifNoneExist": f"identifier={ident_obs['system']}|{ident_obs['value']}"}})
            sources.append(("OBX", seq))
    if not entries:
        raise Hl7Fault("ORU^R01 carries no OBX segment", segment="OBX", condition=REQUIRED_FIELD_MISSING)
    return Mapped({"resourceType": "Bundle", "type": "transaction", "entry": entries}, sources, control_id, kind)


# -- acknowledgements ------------------------------------------------------------------------------
#: HL7's escapes for the default delimiters; CR/LF (segment ends) become spaces. One str.translate
#: pass (the ACK escapes ~9 fields per message; a replace per delimiter was 3 % of the listener's CPU)
_ESCAPES = str.maketrans({"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\",
                          "\r": " ", "\n": " "})


def _escape(text: str) -> str:
    return text.translate(_ESCAPES)


def ack(msg: Message | None, code: str, ack_id: str, fault: Hl7Fault | None = None,
        text: str | None = None) -> str:
    """The ACK (MSH, MSA and, for AE/AR, ERR) answering ``msg``; segments joined by CR.

    ``msg`` None (MSH unreadable) gives an ACK whose MSA-2 is empty.
    """
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d%H%M%S")
    if msg is not None:
        msh = msg.segment("MSH")
        sender = (_get(msh, 3), _get(msh, 4))
        receiver = (_get(msh, 5), _get(msh, 6))
        event, version, control = _get(msh, 9, 2), _get(msh, 12) or "2.5.1", _get(msh, 10)
        processing = _get(msh, 11) or "P"
    else:
        sender, receiver, event, version, control, processing = ("", ""), ("TRIALTWIN", ""), "", "2.5.1", "", "P"
    message = text or (fault.text if fault else "")
    lines = [f"MSH|^~\\&|{_escape(receiver[0] or 'TRIALTWIN')}|{_escape(receiver[1])}|{_escape(sender[0])}|"
             f"{_escape(sender[1])}|{now}||ACK^{_escape(event)}^ACK|{_escape(ack_id)}|{_escape(processing)}|"
             f"{_escape(version)}",
             f"MSA|{code}|{_escape(control)}" + (f"|{_escape(message[:80])}" if message else "")]
    if fault is not None:
        location = f"{fault.segment}^{fault.sequence}" + (f"^{fault.field}" if fault.field else "")
        lines.append(f"ERR||{location}|{fault.condition[0]}^{_escape(fault.condition[1])}^HL70357|E||||"
                     f"{_escape(fault.text)}")
    return "\r".join(lines)


__all__ = ["Hl7Fault", "Mapped", "Message", "Naming", "SUPPORTED", "ack", "message_type", "parse", "to_bundle"]
