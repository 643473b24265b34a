"""Flask hooks that give every request to the FHIR server exactly one hash-chained AuditEvent.

Before the request: an id (``X-Request-Id``) and the write hook; the store then records what each write
transaction wrote in that same transaction. After it (the response is final, authorization filters
included): one record appended to the journal before the answer leaves. The journal is drained into
AuditEvent resources in batches, after responses are sent, and always before the trail is read.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from datetime import datetime, timezone

from flask import Flask, Response, current_app, g, request

from fhir_ops.mapping.audit_event import Access, audit_event, chained_resource
from fhir_ops.store.base import WRITE_AUDIT

log = logging.getLogger(__name__)

AUDIT_MODES = ("auto", "on", "off")
#: A client's own request id is kept when it is this plain; any other gets a server-made one.
REQUEST_ID = re.compile(r"^[A-Za-z0-9\-._]{1,64}$")
_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
#: endpoint (blueprint-local) -> restful-interaction code
_INTERACTIONS = {
    "read": "read", "vread": "vread", "instance_history": "history-instance", "type_history": "history-type",
    "system_history": "history-system", "search": "search-type", "create": "create", "update": "update",
    "delete": "delete", "system_operation": "operation", "type_operation": "operation",
    "instance_operation": "operation", "metadata": "capabilities", "smart_configuration": "capabilities",
    "trialtwin_job_status": "read", "trialtwin_job_cancel": "delete",
}
_BY_METHOD = {"GET": "read", "HEAD": "read", "POST": "create", "PUT": "update", "DELETE": "delete", "PATCH": "patch"}
#: pending write records older than this (seconds) belong to a request that never finished
ORPHAN_AGE = 600.0


class Recorder:
    """The audit state of one app: its store and the drain that turns journal records into resources."""

    def __init__(self, store, drain_every: int):
        self.store, self.drain_every = store, max(1, int(drain_every))
        self._lock = threading.Lock()
        self._since_drain = 0
        self._counter_lock = threading.Lock()

    def appended(self) -> bool:
        """Count one appended record; True when a drain is due."""
        with self._counter_lock:
            self._since_drain += 1
            if self._since_drain >= self.drain_every:
                self._since_drain = 0
                return True
        return False

    def drain(self, *, orphans_before: float | None = None) -> int:
        """Settle orphaned write records, then store every journal record not yet an AuditEvent resource."""
        with self._lock:
            settle_orphans(self.store, time.time() - ORPHAN_AGE if orphans_before is None else orphans_before)
            total = 0
            while True:
                n = self.store.drain_audit(chained_resource)
                total += n
                if n < 2000:
                    return total

    def drain_quietly(self) -> None:
        try:
            self.drain()
        except Exception:  # the records stay in the journal; the next drain takes them
            log.exception("draining the audit journal failed")


def init_app(app: Flask) -> None:
    """Install auditing on the FHIR app according to ``AUDIT``.

    ``AUDIT``: "auto" (default: on when the store keeps an audit journal, as the embedded store does),
    "on" (refuse to start without one) or "off". ``AUDIT_DRAIN_EVERY``: records between background
    drains (default 64). Must run before :func:`fhir_ops.auth.init_app`: its hooks then run first
    before the request and last after it, so refused requests and filtered answers are recorded as sent.
    """
    mode = str(app.config.get("AUDIT") or "auto").lower()
    if mode not in AUDIT_MODES:
        raise ValueError(f"AUDIT must be one of {', '.join(AUDIT_MODES)}, got {mode!r}")
    store = app.extensions["trialtwin.store"]
    if mode == "off":
        return
    if not hasattr(store, "append_audit"):
        if mode == "on":
            raise ValueError(f"AUDIT=on needs a store that keeps an audit journal; the {store.name} store does not")
        log.warning("the %s store keeps no audit journal: requests are not audited", store.name)
        return
    recorder = Recorder(store, app.config.get("AUDIT_DRAIN_EVERY") or 64)
    app.extensions["trialtwin.audit"] = recorder
    # A request that wrote and never got its record (the process died in between) is recorded now.
    settle_orphans(store, time.time())
    app.before_request(_begin)
    app.after_request(_record)
    app.teardown_request(_end)


def recorder_of(app) -> Recorder | None:
    """The app's :class:`Recorder`, None when auditing is off."""
    return app.extensions.get("trialtwin.audit")


def drain(app=None) -> int:
    """Make every journal record searchable as an AuditEvent now (what the trail's readers see)."""
    recorder = recorder_of(app or current_app)
    return 0 if recorder is None else recorder.drain()


# --- the hooks ---------------------------------------------------------------------------------------

def _fhir_path() -> str | None:
    prefix = (current_app.config.get("FHIR_PREFIX") or "").rstrip("/")
    if not prefix:
        return request.path
    if request.path == prefix or request.path.startswith(prefix + "/"):
        return request.path[len(prefix):] or "/"
    return None


def _begin():
    path = _fhir_path()
    if path is None or request.method == "OPTIONS":
        return None  # outside the FHIR base (landing page) and CORS preflights carry no data
    given = request.headers.get("X-Request-Id", "")
    rid = given if REQUEST_ID.match(given) else str(uuid.uuid4())
    # the client's own query: the authorization check may AND restrictions onto request.args later
    state = {"id": rid, "wrote": False, "path": path, "written": [], "args": list(request.args.items(multi=True))}
    g.trialtwin_audit = state

    def hook(written: list) -> tuple[str, str]:
        entries = [_written_entry(*w) for w in written]
        # kept here for this request's record; the row the store commits with the write is for recovery
        state["written"] += entries
        state["wrote"] = True
        return rid, json.dumps(entries, separators=(",", ":"))

    state["token"] = WRITE_AUDIT.set(hook)
    if _reads_audit(path):
        # the trail's readers see every record up to their own request
        recorder_of(current_app).drain()
    return None


def _end(_exc=None) -> None:
    state = g.get("trialtwin_audit")
    if state and state.get("token") is not None:
        WRITE_AUDIT.reset(state.pop("token"))


def _reads_audit(path: str) -> bool:
    parts = path.strip("/").split("/")
    return parts[0] == "AuditEvent" or parts[-1] == "$verify-audit"


def _written_entry(rtype: str, rid: str, version: int, resource: dict | None) -> dict:
    from fhir_ops.auth import compartment_patients

    entry = {"ref": f"{rtype}/{rid}/_history/{version}"}
    if resource is not None:
        entry["patients"] = sorted(compartment_patients(resource))
    else:
        entry["deleted"] = True
    return entry


def _record(response: Response) -> Response:
    state = g.get("trialtwin_audit")
    if not state or state.get("done"):
        return response
    state["done"] = True
    recorder = recorder_of(current_app)
    response.headers["X-Request-Id"] = state["id"]
    try:
        event = audit_event(_access(response, state, state["written"]))
        recorder.store.append_audit([event], settle=state["id"] if state["wrote"] else None)
    except Exception:
        log.exception("the audit record of request %s could not be written", state["id"])
        if state["wrote"]:
            # the write committed with its pending record, which the next drain turns into the AuditEvent
            return response
        from fhir_ops.app import render_error
        from fhir_ops.errors import FhirError

        # fail closed: an answer whose access cannot be recorded is not given
        failed = render_error(FhirError("the access could not be recorded in the audit trail; nothing was "
                                        "returned", status=500, code="exception", error_id="audit-failed"))
        failed.headers["X-Request-Id"] = state["id"]
        return failed
    if recorder.appended():
        response.call_on_close(recorder.drain_quietly)
    return response


# --- what the request did ------------------------------------------------------------------------------

def _now() -> str:
    ms = time.time_ns() // 1_000_000
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _access(response: Response, state: dict, written: list[dict]) -> Access:
    from fhir_ops import auth

    endpoint = (request.endpoint or "").rsplit(".", 1)[-1]
    args = request.view_args or {}
    rtype, rid = args.get("resource_type"), args.get("resource_id")
    interaction = _INTERACTIONS.get(endpoint) or _BY_METHOD.get(request.method, "read")
    operation = None
    if interaction == "operation":
        from fhir_ops.operations import registry

        # coded in CodeSystem/operation only when it is one of ours; an unknown name stays in the path (a 404)
        known = registry.get(args.get("name") or "")
        operation = known.name if known else None
    if endpoint == "system_bundle":
        interaction = g.get("trialtwin_bundle_type") or "transaction"
    if endpoint == "search" and rtype is None:
        interaction = "search-system"
    access = auth.current_access()
    status = response.status_code
    refused = status in (401, 403)
    message = _error_message(response) if status >= 400 else None
    if current_app.config.get("AUTH_MODE") == "open":
        decision = "granted (authorization off)"
    else:
        decision = "refused" if refused else "granted"

    patients: set[str] = set()
    resources: list[str] = []
    if rtype == "Patient" and rid:
        patients.add(rid)
    disclosed = g.get("trialtwin_disclosed") or []
    if status < 400 and disclosed:
        for resource in disclosed:
            if access is None or auth.visible(access, resource):
                patients |= auth.compartment_patients(resource)
        if interaction in ("read", "vread") and len(disclosed) == 1:
            meta = disclosed[0].get("meta") or {}
            resources.append(f"{disclosed[0].get('resourceType')}/{disclosed[0].get('id')}"
                             + (f"/_history/{meta['versionId']}" if meta.get("versionId") else ""))
    for w in written:
        resources.append(w["ref"])
        patients.update(w.get("patients") or ())
        if w.get("deleted"):
            patients |= _patients_before_delete(w["ref"])
    if rtype and rid and not resources and endpoint not in ("trialtwin_job_status", "trialtwin_job_cancel"):
        resources.append(f"{rtype}/{rid}")
        if status >= 400 or interaction == "operation":
            # refused or failed: whose data was asked for, from the stored target
            patients |= _patients_of_stored(rtype, rid)
    query = request.query_string.decode("utf-8", "replace")
    audit_log_used = _reads_audit(state["path"])
    if audit_log_used:
        # Reading the trail names no patients: a patient's events (AuditEvent?patient=) stay the accesses to
        # their data, and do not grow with every look at the trail. The read itself is recorded (type
        # "Audit Log Used", with its query), so who looked at whose trail is still on record.
        patients = set()
    elif interaction in ("search-type", "search-system"):
        patients |= _patients_in_query(rtype, state["args"])
        if request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded":
            patients |= _patients_in_query(rtype, request.form.items(multi=True))
            query = "&".join(filter(None, [query, request.get_data(cache=True).decode("utf-8", "replace")]))
    return Access(
        request_id=state["id"], recorded=_now(), interaction=interaction, method=request.method,
        path=state["path"], status=status, decision=decision, query=query[:4000], operation=operation,
        message=message,
        client_id=access.client_id if access is not None else None,
        user=access.user if access is not None else None,
        subject=access.subject if access is not None else None,
        address=request.remote_addr,
        resources=tuple(dict.fromkeys(resources)), patients=tuple(sorted(patients)),
        audit_log_used=audit_log_used,
    )


def _error_message(response: Response) -> str | None:
    try:
        body = json.loads(response.get_data())
        issue = (body.get("issue") or [{}])[0]
        code = ((issue.get("details") or {}).get("coding") or [{}])[0].get("code")
        return f"{code}: {issue.get('diagnostics')}" if code else issue.get("diagnostics")
    except (ValueError, AttributeError, IndexError, TypeError):
        return None


def _patients_in_query(rtype: str | None, pairs) -> set[str]:
    out = set()
    for name, value in pairs:
        for v in str(value).split(","):
            m = _PATIENT_REF.search(v.strip())
            if m:
                out.add(m.group(1))
            elif rtype == "Patient" and name == "_id" and v.strip():
                out.add(v.strip())
    return out


def _patients_of_stored(rtype: str, rid: str) -> set[str]:
    from fhir_ops.app import get_store
    from fhir_ops.auth import compartment_patients, in_compartment_type
    from fhir_ops.errors import FhirError

    if rtype == "Patient" or not in_compartment_type(rtype):
        return set()
    try:
        return compartment_patients(get_store().read(rtype, rid))
    except FhirError:
        return set()


def _patients_before_delete(ref: str) -> set[str]:
    from fhir_ops.app import get_store
    from fhir_ops.auth import compartment_patients
    from fhir_ops.errors import FhirError

    rtype, rid, _, version = ref.split("/")
    if rtype == "Patient":
        return {rid}
    try:
        return compartment_patients(get_store().vread(rtype, rid, str(int(version) - 1)))
    except (FhirError, ValueError):
        return set()


def settle_orphans(store, before: float) -> int:
    """Record, as their AuditEvents, the writes of requests that ended before writing their own record."""
    orphans = store.audit_orphans(before)
    for request_id, texts in orphans.items():
        written = [w for text in texts for w in json.loads(text)]
        patients = sorted({p for w in written for p in w.get("patients") or ()})
        event = audit_event(Access(
            request_id=request_id, recorded=_now(), interaction="update", method="(unknown)", path="(unknown)",
            status=200, decision="granted",
            message="the write was committed; the request ended before its audit record was written",
            resources=tuple(w["ref"] for w in written), patients=tuple(patients)))
        store.append_audit([event], settle=request_id)
    return len(orphans)
