"""HL7 v2 ingest: one message in, one FHIR transaction stored (or none), one ACK out.

Local codes and units go through the terminology layer strictly: a code with no standard coding or
a unit that cannot be brought to the analyte's canonical UCUM unit rejects the message (AE) instead
of being stored as received, because a lab feed has no person to read a warning.
"""
from __future__ import annotations

import itertools
import os
import logging
import queue
import threading
import time
from concurrent.futures import Future

from fhir_ops.errors import FhirError
from fhir_ops.mapping import hl7v2
from fhir_ops.mapping.hl7v2 import DATA_TYPE_ERROR, INTERNAL_ERROR, REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND, Hl7Fault
from terminology.workflow import active_harmonizer

log = logging.getLogger(__name__)

#: harmonizer warning id -> (OBX field, HL7 table 0357 condition)
_STRICT = {"unmapped-code": (3, TABLE_VALUE_NOT_FOUND), "unit-not-convertible": (6, TABLE_VALUE_NOT_FOUND),
           "missing-unit": (6, REQUIRED_FIELD_MISSING)}


#: a newly published ConceptMap version reaches the listener within this many seconds
HARMONIZER_TTL = 1.0


class GroupCommit:
    """One writer thread storing the transaction Bundles of many connections, several per commit.

    Each message stays all-or-nothing: Bundles are merged into one store transaction, and when that
    fails every Bundle of the group is retried alone so only the faulty one fails. Two Bundles with
    the same conditional create never share a commit (the store resolves conditions before writing,
    so both would create). ``submit`` returns after the commit, so an ACK is only sent for stored data.

    Parameters
    ----------
    store : Store
    max_group : int
        Most messages per commit (1: a commit per message).
    """

    def __init__(self, store, max_group: int = 64) -> None:
        self.store = store
        self.max_group = max_group
        self.commits = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hl7-writer", daemon=True)
        self._thread.start()

    def submit(self, bundle: dict) -> dict:
        future: Future = Future()
        self._queue.put((bundle, future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        carry: list = []
        while True:
            item = carry.pop(0) if carry else self._queue.get()
            if item is None:
                return
            group, conditions = [item], set(_conditions(item[0]))
            while len(group) < self.max_group:
                try:
                    nxt = carry.pop(0) if carry else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or conditions & set(_conditions(nxt[0])):
                    carry.insert(0, nxt)
                    break
                group.append(nxt)
                conditions.update(_conditions(nxt[0]))
            self._commit(group)

    def _commit(self, group: list) -> None:
        if len(group) > 1:
            merged = {"resourceType": "Bundle", "type": "transaction",
                      "entry": [e for bundle, _ in group for e in bundle["entry"]]}
            try:
                response = self.store.transaction(merged)
            except Exception:  # noqa: BLE001 - one message spoilt the group: each alone says which
                pass
            else:
                self.commits += 1
                at = 0
                for bundle, future in group:
                    n = len(bundle["entry"])
                    future.set_result(dict(response, entry=response["entry"][at:at + n]))
                    at += n
                return
        for bundle, future in group:
            try:
                future.set_result(self.store.transaction(bundle))
                self.commits += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting connection thread
                future.set_exception(exc)


def _conditions(bundle: dict) -> list[str]:
    out = []
    for e in bundle["entry"]:
        req = e.get("request") or {}
        out.append(f"{req.get('url')}?{req['ifNoneExist']}" if req.get("ifNoneExist") else
                   f"{req.get('method')} {req.get('url')}")
    return out


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
    group_commit : int
        Most messages sharing one commit when they arrive together (see ``GroupCommit``); 1 commits
        each message alone, in the calling thread.
    """

    def __init__(self, store, naming: hl7v2.Naming | None = None, on_stored=None, group_commit: int = 64) -> None:
        self.store = store
        self.naming = naming or hl7v2.Naming.shipped()
        self.on_stored = on_stored
        self.writer = GroupCommit(store, group_commit) if group_commit > 1 else None
        self._harmonizer = (0.0, None)
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
        at, harmonizer = self._harmonizer
        if harmonizer is None or time.monotonic() - at > HARMONIZER_TTL:
            harmonizer = active_harmonizer(self.store)
            self._harmonizer = (time.monotonic(), harmonizer)
        entries = []
        for entry, (segment, seq) in zip(mapped.bundle["entry"], mapped.sources):
            resource, warnings = harmonizer.harmonize(entry["resource"])
            for w in warnings:
                code = w["details"]["coding"][0]["code"]
                field, condition = _STRICT.get(code, (None, DATA_TYPE_ERROR))
                raise Hl7Fault(w["diagnostics"], segment=segment, sequence=seq, field=field, condition=condition)
            entries.append(dict(entry, resource=resource))
        return dict(mapped.bundle, entry=entries)

    def close(self) -> None:
        """Stop the writer thread (the store stays open: it is the caller's)."""
        if self.writer is not None:
            self.writer.close()

    def _ack_id(self) -> str:
        with self._id_lock:
            return f"TT{os.getpid()}-{next(self._ids)}"

    def handle(self, raw: bytes | str) -> str:
        """Store one message; the ACK: AA stored, AE content error (nothing stored), AR rejected."""
        text = decode(raw) if isinstance(raw, bytes) else raw
        msg = None
        try:
            msg = hl7v2.parse(text)
            mapped = hl7v2.to_bundle(msg, self.naming, self._find_patient)
            bundle = self._harmonize(mapped)
            try:
                response = self.writer.submit(bundle) if self.writer else self.store.transaction(bundle)
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
