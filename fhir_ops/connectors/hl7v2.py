"""HL7 v2 ingest: one message in, one FHIR transaction stored (or none), one ACK out.

Local codes and units go through the terminology layer strictly: a code with no standard coding or
a unit that cannot be brought to the analyte's canonical UCUM unit rejects the message (AE) instead
of being stored as received, because a lab feed has no person to read a warning.
"""
from __future__ import annotations

import itertools
import logging
import threading

from fhir_ops.errors import FhirError
from fhir_ops.mapping import hl7v2
from fhir_ops.mapping.hl7v2 import DATA_TYPE_ERROR, INTERNAL_ERROR, REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND, Hl7Fault
from terminology.workflow import active_harmonizer

log = logging.getLogger(__name__)

#: harmonizer warning id -> (OBX field, HL7 table 0357 condition)
_STRICT = {"unmapped-code": (3, TABLE_VALUE_NOT_FOUND), "unit-not-convertible": (6, TABLE_VALUE_NOT_FOUND),
           "missing-unit": (6, REQUIRED_FIELD_MISSING)}


def decode(raw: bytes) -> str:
    """Message bytes as text: UTF-8, else ISO 8859-1 (HL7's default character set, MSH-18 empty)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class Hl7Ingest:
    """Store HL7 v2 messages in ``store``; ``handle`` returns the ACK text and never raises.

    Parameters
    ----------
    store : fhir_ops.store.base.Store
    naming : hl7v2.Naming, optional
        HL7 names of coding systems / assigning authorities (default: the shipped NamingSystems).
    on_stored : callable, optional
        Called with the transaction-response Bundle after each stored message (e.g. the closed loop).
    """

    def __init__(self, store, naming: hl7v2.Naming | None = None, on_stored=None) -> None:
        self.store = store
        self.naming = naming or hl7v2.Naming.shipped()
        self.on_stored = on_stored
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()
        self.counts = {"AA": 0, "AE": 0, "AR": 0}

    def _find_patient(self, identifier: dict) -> dict | None:
        found = self.store.search("Patient", [("identifier", f"{identifier['system']}|{identifier['value']}"),
                                              ("_count", "2")], strict=True)
        resources = found.matches
        if len(resources) > 1:
            raise Hl7Fault(f"identifier {identifier['system']}|{identifier['value']} names more than one Patient",
                           segment="PID", field=3, condition=hl7v2.UNKNOWN_KEY)
        return resources[0] if resources else None

    def _harmonize(self, mapped: hl7v2.Mapped) -> dict:
        harmonizer = active_harmonizer(self.store)
        entries = []
        for entry, (segment, seq) in zip(mapped.bundle["entry"], mapped.sources):
            resource, warnings = harmonizer.harmonize(entry["resource"])
            for w in warnings:
                code = w["details"]["coding"][0]["code"]
                field, condition = _STRICT.get(code, (None, DATA_TYPE_ERROR))
                raise Hl7Fault(w["diagnostics"], segment=segment, sequence=seq, field=field, condition=condition)
            entries.append(dict(entry, resource=resource))
        return dict(mapped.bundle, entry=entries)

    def _ack_id(self) -> str:
        with self._id_lock:
            return f"TT{next(self._ids)}"

    def handle(self, raw: bytes | str) -> str:
        """Store one message; the ACK: AA stored, AE content error (nothing stored), AR rejected."""
        text = decode(raw) if isinstance(raw, bytes) else raw
        msg = None
        try:
            msg = hl7v2.parse(text)
            mapped = hl7v2.to_bundle(msg, self.naming, self._find_patient)
            bundle = self._harmonize(mapped)
            try:
                response = self.store.transaction(bundle)
            except FhirError as exc:
                seg, seq = mapped.sources[_entry_index(exc.expression)]
                raise Hl7Fault(exc.message, segment=seg, sequence=seq, condition=DATA_TYPE_ERROR) from None
        except Hl7Fault as fault:
            self.counts[fault.ack_code] += 1
            return hl7v2.ack(msg if _msh_readable(msg) else None, fault.ack_code, self._ack_id(), fault)
        except Exception:  # the sender must always get an answer; nothing was stored (one transaction)
            log.exception("HL7 v2 message could not be stored")
            self.counts["AE"] += 1
            fault = Hl7Fault("the message could not be stored (server error); send it again later",
                             condition=INTERNAL_ERROR)
            return hl7v2.ack(msg if _msh_readable(msg) else None, "AE", self._ack_id(), fault)
        self.counts["AA"] += 1
        if self.on_stored is not None:
            try:
                self.on_stored(response)
            except Exception:  # a follow-up must not turn a stored message into a negative ACK
                log.exception("after-store hook failed")
        return hl7v2.ack(msg, "AA", self._ack_id())


def _entry_index(expression: list[str]) -> int:
    for expr in expression or []:
        if expr.startswith("Bundle.entry["):
            try:
                return int(expr[len("Bundle.entry["):].split("]", 1)[0])
            except ValueError:
                pass
    return 0


def _msh_readable(msg) -> bool:
    if msg is None:
        return False
    try:
        msg.segment("MSH")
        return True
    except KeyError:
        return False


__all__ = ["Hl7Ingest", "decode"]
