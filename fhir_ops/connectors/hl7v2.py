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
#: a result's participant is looked up again after this many seconds (a lab sends many results per
#: participant; the lookup was a tenth of the listener's time). ADT updates always read the store.
PATIENT_TTL = 1.0
_PATIENT_CACHE_SIZE = 10_000


class Outcome:
    """A message's commit outcome, set once by the writer and read by its connection's thread.

    What ``concurrent.futures.Future`` offers here (``result``, ``exception``), on one plain lock held
    until the outcome is set: a Future's Condition, waiter list and state machine were most of the
    per-message cost of handing a message to the writer and back.
    """

    __slots__ = ("_done", "_value", "_error")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self._value = self._error = None

    def set_result(self, value) -> None:
        self._value = value
        self._done.release()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._done.release()

    def _wait(self, timeout: float | None) -> None:
        # blocks until set; released again so that any later read passes at once
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("the message was not committed in time")
        self._done.release()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._error

    def result(self, timeout: float | None = None):
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value


class GroupCommit:
    """One writer thread storing the transaction Bundles of many connections, several per commit.

    Each message stays all-or-nothing: Bundles are merged into one store transaction, and when that
    fails every Bundle of the group is retried alone so only the faulty one fails. Two Bundles with
    the same conditional create never share a commit (the store resolves conditions before writing,
    so both would create). ``submit`` returns after the commit, so an ACK is only sent for stored data.

    A group closes when the queue is empty and neither is another message being prepared
    (``preparing``, counted by ``Hl7Ingest``) nor another sender connected (``connections`` > 1, kept
    by the MLLP server), or after ``linger`` seconds: waiting a moment for a message that is being
    parsed, or that another connection is about to send, costs less than the commit it would
    otherwise need of its own. (A commit costs about as much as two messages' writes; the bench saw
    1.3 messages per commit over 16 connections without this wait.) A lone connection never waits.

    Parameters
    ----------
    store : Store
    max_group : int
        Most messages per commit (1: a commit per message).
    linger : float
        Longest wait, in seconds, for messages being prepared or other senders before a group commits.
    """

    def __init__(self, store, max_group: int = 64, linger: float = 0.002) -> None:
        self.store = store
        self.max_group = max_group
        self.linger = linger
        self.commits = 0
        self.messages = 0
        self.preparing = 0  # messages received and not yet submitted (or failed): more may join a group
        self.connections = 0  # senders connected (MllpServer): with more than one, more may come
        self._prep_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hl7-writer", daemon=True)
        self._thread.start()

    def preparing_add(self, n: int) -> None:
        with self._prep_lock:
            self.preparing += n

    def connections_add(self, n: int) -> None:
        with self._prep_lock:
            self.connections += n

    def submit_async(self, bundle: dict, prepared: bool = False) -> Outcome:
        """Queue ``bundle``; the Outcome holds its transaction-response once committed.

        ``prepared``: this message was counted in ``preparing`` and leaves it now, before it is
        queued, so the writer never lingers for a message that is already in its queue.
        """
        future = Outcome()
        if prepared:
            self.preparing_add(-1)
        self._queue.put((bundle, future, frozenset(_conditions(bundle))))  # read once, by the writer
        return future

    def submit(self, bundle: dict) -> dict:
        return self.submit_async(bundle).result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        carry: list = []
        while True:
            item = carry.pop(0) if carry else self._queue.get()
            if item is None:
                return
            group, conditions = [item], set(item[2])
            deadline = time.monotonic() + self.linger
            while len(group) < self.max_group:
                try:
                    nxt = carry.pop(0) if carry else self._queue.get_nowait()
                except queue.Empty:
                    wait = deadline - time.monotonic()
                    if (self.preparing <= 0 and self.connections <= 1) or wait <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=min(wait, 0.0005))
                    except queue.Empty:
                        continue
                if nxt is None or not conditions.isdisjoint(nxt[2]):
                    carry.insert(0, nxt)
                    break
                group.append(nxt)
                conditions.update(nxt[2])
            self._commit(group)

    def _commit(self, group: list) -> None:
        if len(group) > 1:
            merged = {"resourceType": "Bundle", "type": "transaction",
                      "entry": [e for bundle, _, _ in group for e in bundle["entry"]]}
            try:
                response = self.store.transaction(merged)
            except Exception:  # noqa: BLE001 - one message spoilt the group: each alone says which
                pass
            else:
                self.commits += 1
                self.messages += len(group)
                at = 0
                for bundle, future, _ in group:
                    n = len(bundle["entry"])
                    future.set_result(dict(response, entry=response["entry"][at:at + n]))
                    at += n
                return
        for bundle, future, _ in group:
            try:
                future.set_result(self.store.transaction(bundle))
                self.commits += 1
                self.messages += 1
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting connection thread
                future.set_exception(exc)


def _conditions(bundle: dict) -> list[str]:
    """What two Bundles in one commit must not share: a conditional create's condition, an updated id.
    (A plain create of a new resource conflicts with nothing.)"""
    out = []
    for e in bundle["entry"]:
        req = e.get("request") or {}
        if req.get("ifNoneExist"):
            out.append(f"{req.get('url')}?{req['ifNoneExist']}")
        elif req.get("method") != "POST":
            out.append(f"{req.get('method')} {req.get('url')}")
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
    linger : float
        Longest wait, in seconds, for more messages to join a group (``GroupCommit``).
    """

    def __init__(self, store, naming: hl7v2.Naming | None = None, on_stored=None, group_commit: int = 64,
                 linger: float = 0.002) -> None:
        self.store = store
        self.naming = naming or hl7v2.Naming.shipped()
        self.on_stored = on_stored
        self.writer = GroupCommit(store, group_commit, linger) if group_commit > 1 else None
        self._harmonizer = (0.0, None)
        self._patients: dict[str, tuple[float, dict]] = {}  # identifier -> (looked up at, Patient)
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()
        self.counts = {"AA": 0, "AE": 0, "AR": 0}

    def _find_patient(self, identifier: dict, current: bool = True) -> dict | None:
        key = f"{identifier['system']}|{identifier['value']}"
        now = time.monotonic()
        if not current:
            hit = self._patients.get(key)
            if hit is not None and now - hit[0] <= PATIENT_TTL:
                return hit[1]
        found = self.store.search("Patient", [("identifier", key), ("_count", "2")], strict=True)
        resources = found.matches
        if len(resources) > 1:
            raise Hl7Fault(f"identifier {key} names more than one Patient",
                           segment="PID", field=3, condition=hl7v2.UNKNOWN_KEY)
        if not resources:  # only participants found are remembered: an ADT^A04 may register one any moment
            return None
        if len(self._patients) >= _PATIENT_CACHE_SIZE:
            self._patients.clear()
        self._patients[key] = (now, resources[0])
        return resources[0]

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

    def connection(self, delta: int) -> None:
        """A sender connected (+1) or left (-1); ``MllpServer(on_connection=...)`` calls it."""
        if self.writer is not None:
            self.writer.connections_add(delta)

    def close(self) -> None:
        """Stop the writer thread (the store stays open: it is the caller's)."""
        if self.writer is not None:
            self.writer.close()

    def _ack_id(self) -> str:
        with self._id_lock:
            return f"TT{os.getpid()}-{next(self._ids)}"

    def handle(self, raw: bytes | str) -> str:
        """Store one message; the ACK: AA stored, AE content error (nothing stored), AR rejected."""
        return self.handle_many([raw])[0]

    def handle_many(self, raws: list) -> list[str]:
        """Store messages that arrived together (pipelined on one connection); their ACKs, in order.

        Each message is still its own transaction (a bad one fails alone), but all of them are queued
        for the writer before the first ACK is awaited, so they can share one commit; each ACK is built
        only once its own message is committed.
        """
        if self.writer is not None:
            self.writer.preparing_add(len(raws))
        pending = []
        try:
            for raw in raws:
                if pending and pending[-1][1] is not None and pending[-1][1].kind == "ADT":
                    # a registration must be stored before the results after it look their participant up
                    pending[-1][2].exception()
                pending.append(self._prepare(raw))  # leaves ``preparing`` itself
        finally:
            if self.writer is not None and len(pending) < len(raws):  # only on an unexpected error
                self.writer.preparing_add(-(len(raws) - len(pending)))
        return [self._finish(*p) for p in pending]

    def _prepare(self, raw) -> tuple:
        """Parse, map and harmonize; queue the transaction. ``(msg, mapped, future or ack text)``.

        With a writer, the message was counted in ``writer.preparing`` and leaves it here, exactly once.
        """
        text = decode(raw) if isinstance(raw, bytes) else raw
        msg, queued = None, False
        try:
            msg = hl7v2.parse(text)
            mapped = hl7v2.to_bundle(msg, self.naming, self._find_patient)
            bundle = self._harmonize(mapped)
            if self.writer is not None:
                queued = True
                return msg, mapped, self.writer.submit_async(bundle, prepared=True)
            future = Outcome()
            try:
                future.set_result(self.store.transaction(bundle))
            except Exception as exc:  # noqa: BLE001 - read in _finish, as the writer's would be
                future.set_exception(exc)
            return msg, mapped, future
        except Hl7Fault as fault:
            return msg, None, self._negative(msg, fault)
        except Exception:  # the sender must always get an answer; nothing was stored (one transaction)
            log.exception("HL7 v2 message could not be mapped")
            return msg, None, self._server_error(msg)
        finally:
            if self.writer is not None and not queued:
                self.writer.preparing_add(-1)

    def _finish(self, msg, mapped, outcome) -> str:
        if isinstance(outcome, str):  # already answered (a fault while preparing)
            return outcome
        try:
            try:
                response = outcome.result()
            except FhirError as exc:
                seg, seq = mapped.sources[_entry_index(exc.expression)]
                raise Hl7Fault(exc.message, segment=seg, sequence=seq, condition=DATA_TYPE_ERROR) from None
        except Hl7Fault as fault:
            return self._negative(msg, fault)
        except Exception:  # the sender must always get an answer; nothing was stored (one transaction)
            log.exception("HL7 v2 message could not be stored")
            return self._server_error(msg)
        self.counts["AA"] += 1
        if self.on_stored is not None:
            try:
                self.on_stored(response)
            except Exception:  # a follow-up must not turn a stored message into a negative ACK
                log.exception("after-store hook failed")
        return hl7v2.ack(msg, "AA", self._ack_id())

    def _negative(self, msg, fault: Hl7Fault) -> str:
        self.counts[fault.ack_code] += 1
        return hl7v2.ack(msg if _msh_readable(msg) else None, fault.ack_code, self._ack_id(), fault)

    def _server_error(self, msg) -> str:
        self.counts["AE"] += 1
        fault = Hl7Fault("the message could not be stored (server error); send it again later",
                         condition=INTERNAL_ERROR)
        return hl7v2.ack(msg if _msh_readable(msg) else None, "AE", self._ack_id(), fault)


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
