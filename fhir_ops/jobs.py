"""Asynchronous operation calls (the FHIR async request pattern): 202, polling, cancel.

Jobs run in a bounded thread pool of the server process that accepted them; their state, progress
and results live in SQLite beside the store, so any server process on the same data directory
answers a poll, a finished result survives a restart, and a job whose process died is reported
failed (with an OperationOutcome) instead of running forever.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fhir_ops.errors import FhirError, NotFound, TooManyRequests
from terminology.catalog import OPERATION_CS

JOBS_PATH = "_jobs"
_EXTENSION_KEY = "trialtwin.jobs"
JOBS_FILE = "trialtwin-jobs.sqlite"
# a job's process refreshes its heartbeat this often; one silent for STALE_AFTER_S has lost it
HEARTBEAT_S = 2.0
STALE_AFTER_S = 30.0
_UNFINISHED = ("queued", "running")


def job_url(base_url: str, job_id: str) -> str:
    """The polling URL of a job under a FHIR base URL."""
    return f"{base_url.rstrip('/')}/{JOBS_PATH}/{job_id}"


@dataclass
class Job:
    """One asynchronous call: its state, progress, and, once finished, its response.

    The process running the job holds the live object (progress reports, the cancel event); other
    processes see snapshots read from the jobs table.
    """

    id: str
    operation: str
    created: float = field(default_factory=time.time)
    state: str = "queued"  # queued → running → completed | failed | cancelled
    fraction: float | None = None
    message: str | None = None
    status: int | None = None
    body: dict | None = None
    headers: dict = field(default_factory=dict)
    finished: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _table: Any = field(default=None, repr=False)
    _owner: tuple | None = field(default=None, repr=False)

    @property
    def owner(self) -> tuple | None:
        """``(client_id, subject)`` of the submitter when the server enforces SMART; else None."""
        return self._owner

    @owner.setter
    def owner(self, value) -> None:
        self._owner = tuple(value) if value is not None else None
        if self._table is not None:
            self._table.update(self.id, owner=json.dumps(self._owner))

    def report(self, fraction: float | None, message: str | None = None) -> None:
        """Record progress from the handler (``fraction`` clipped to [0, 1])."""
        with self._lock:
            if fraction is not None:
                self.fraction = min(max(float(fraction), 0.0), 1.0)
            if message is not None:
                self.message = message
            if self._table is not None:
                self._table.update(self.id, fraction=self.fraction, message=self.message)

    def progress_text(self) -> str:
        """The ``X-Progress`` header value: ``"37%"``, ``"37%: fitting cohort"`` or a state."""
        with self._lock:
            parts = []
            if self.fraction is not None:
                parts.append(f"{round(self.fraction * 100)}%")
            if self.message:
                parts.append(self.message)
            return ": ".join(parts) if parts else self.state

    @property
    def done(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")


_COLUMNS = ("id", "operation", "created", "state", "fraction", "message", "status", "body", "headers",
            "finished", "owner", "process", "heartbeat")


class JobTable:
    """The jobs table in its own SQLite file (WAL: readers in other processes never block a worker).

    One short-lived connection per call keeps it safe from any thread of any process.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, operation TEXT NOT NULL, "
                        "created REAL NOT NULL, state TEXT NOT NULL, fraction REAL, message TEXT, "
                        "status INTEGER, body TEXT, headers TEXT, finished REAL, owner TEXT, "
                        "process TEXT NOT NULL, heartbeat REAL NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        con.execute("PRAGMA busy_timeout=30000")
        return _Closing(con)

    def insert(self, job: Job, process: str) -> None:
        with self._connect() as con:
            con.execute("INSERT INTO jobs (id, operation, created, state, process, heartbeat, headers) "
                        "VALUES (?, ?, ?, ?, ?, ?, '{}')",
                        (job.id, job.operation, job.created, job.state, process, time.time()))

    def update(self, job_id: str, **values) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        with self._connect() as con:
            con.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*values.values(), job_id))

    def finish(self, job_id: str, state: str, status, body, headers, fraction) -> None:
        """Record the outcome unless the job was cancelled (deleted) meanwhile."""
        with self._connect() as con:
            con.execute("UPDATE jobs SET state = ?, status = ?, body = ?, headers = ?, finished = ?, "
                        "fraction = COALESCE(?, fraction) WHERE id = ?",
                        (state, status, json.dumps(body) if body is not None else None,
                         json.dumps(headers or {}), time.time(), fraction, job_id))

    def get(self, job_id: str) -> Job | None:
        with self._connect() as con:
            row = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        r = dict(zip(_COLUMNS, row))
        job = Job(id=r["id"], operation=r["operation"], created=r["created"], state=r["state"],
                  fraction=r["fraction"], message=r["message"], status=r["status"],
                  body=json.loads(r["body"]) if r["body"] else None,
                  headers=json.loads(r["headers"] or "{}"), finished=r["finished"])
        owner = json.loads(r["owner"]) if r["owner"] else None
        job._owner = tuple(owner) if owner is not None else None
        job._process = r["process"]
        job._heartbeat = r["heartbeat"]
        return job

    def delete(self, job_id: str) -> bool:
        with self._connect() as con:
            return con.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    def count_unfinished(self) -> int:
        with self._connect() as con:
            return con.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", _UNFINISHED).fetchone()[0]

    def beat(self, process: str, job_ids) -> list[str]:
        """Refresh this process's unfinished jobs; return those that are gone (cancelled elsewhere)."""
        ids = list(job_ids)
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        with self._connect() as con:
            con.execute(f"UPDATE jobs SET heartbeat = ? WHERE process = ? AND id IN ({marks})",
                        (time.time(), process, *ids))
            present = {r[0] for r in con.execute(f"SELECT id FROM jobs WHERE id IN ({marks})", ids)}
        return [i for i in ids if i not in present]

    def fail_lost(self, is_lost) -> list[str]:
        """Mark unfinished jobs whose process is gone as failed, with an OperationOutcome; their ids."""
        with self._connect() as con:
            rows = con.execute("SELECT id, operation, process, heartbeat FROM jobs WHERE state IN (?, ?)",
                               _UNFINISHED).fetchall()
            lost = [(i, op) for i, op, proc, beat in rows if is_lost(proc, beat)]
            for job_id, operation in lost:
                outcome = FhirError(
                    f"{operation} did not finish: the server process running it stopped (restart or "
                    f"crash); submit it again", status=500, code="incomplete",
                    error_id="job-lost").to_outcome()
                # the state test keeps a job that finished meanwhile as it is
                con.execute("UPDATE jobs SET state = 'failed', status = 500, body = ?, headers = '{}', "
                            "finished = ? WHERE id = ? AND state IN (?, ?)",
                            (json.dumps(outcome), time.time(), job_id, *_UNFINISHED))
        return [job_id for job_id, _ in lost]

    def evict(self, before: float) -> list[str]:
        """Delete jobs that finished before ``before``; return their ids."""
        with self._connect() as con:
            ids = [r[0] for r in con.execute("SELECT id FROM jobs WHERE finished IS NOT NULL AND finished < ?",
                                             (before,))]
            if ids:
                con.execute("DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (before,))
        return ids


class _Closing:
    """``with`` on a sqlite3 connection commits but does not close it: this closes it too."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def __enter__(self) -> sqlite3.Connection:
        return self.con

    def __exit__(self, *exc) -> None:
        self.con.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobManager:
    """The jobs of one app: a bounded worker pool here, the job table shared through SQLite.

    Parameters
    ----------
    app : flask.Flask
        Handlers run inside this app's context so that ``get_store()`` works in the worker.
    max_workers : int
        Jobs running at once in this process; further jobs wait in the queue (state ``queued``).
    retention_s : float
        How long a finished job's result stays available to pollers.
    max_pending : int
        Unfinished jobs (running or queued, all processes) accepted at once; more are refused with
        429 so that a burst of requests cannot queue unbounded work.
    path : str
        The jobs database (``<DATA_DIR>/trialtwin-jobs.sqlite`` by default, see :func:`manager`).
    """

    def __init__(self, app, max_workers: int = 4, retention_s: float = 3600.0, max_pending: int = 100,
                 path: str | None = None) -> None:
        # the app itself, never flask's current_app proxy: job threads run outside any app context, so
        # a manager first made while answering a poll (manager(current_app)) could run no job at all
        self.app = app._get_current_object() if hasattr(app, "_get_current_object") else app
        self.retention_s = retention_s
        self.max_pending = max_pending
        if path is None:
            path = os.path.join(tempfile.mkdtemp(prefix="trialtwin-jobs-"), JOBS_FILE)
        self.table = JobTable(path)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.process = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="trialtwin-job")
        self._live: dict[str, Job] = {}
        #: called with a job id when the job is cancelled or expires (an export removes its files)
        self.on_forget: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # jobs of a process that is gone (this host, pid dead) fail at once; others once silent
        self._fail_lost(self._is_lost)
        self._beater = threading.Thread(target=self._heartbeat, name="trialtwin-job-heartbeat", daemon=True)
        self._beater.start()

    def _is_lost(self, process: str, heartbeat: float) -> bool:
        if process == self.process:
            return False
        host, pid, _ = process.rsplit(":", 2)
        if host == self.host and int(pid) != self.pid and not _pid_alive(int(pid)):
            return True
        return time.time() - heartbeat > STALE_AFTER_S

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                ids = [k for k, j in self._live.items() if not j.done]
            try:
                for gone in self.table.beat(self.process, ids):
                    job = self._live.get(gone)
                    if job is not None:  # deleted by a cancel in another process
                        job.cancel_requested.set()
            except sqlite3.Error:
                self.app.logger.exception("job heartbeat failed")

    def _evict(self) -> None:
        for job_id in self.table.evict(time.time() - self.retention_s):
            self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        # hooks of the app (an export's file clean-up, registered at start) and of this manager
        for hook in [*self.app.extensions.get("trialtwin.jobs.cleanup", []), *self.on_forget]:
            try:
                hook(job_id)
            except Exception:  # a hook's failure must not fail the poll or cancel that triggered it
                self.app.logger.exception("cleaning up job %s failed", job_id)

    def submit(self, op, level: str, resource_type: str | None, resource_id: str | None,
               params: dict, base_url: str, headers: dict, access: Any = None) -> Job:
        """Queue a call of ``op`` (a registry ``Operation``) and return its job.

        ``access`` (the caller's SMART AccessContext) is handed to the handler as ``ctx.access``.
        """
        job = Job(id=uuid.uuid4().hex, operation=op.name)
        self._evict()
        pending = self.table.count_unfinished()
        if pending >= self.max_pending:
            raise TooManyRequests(f"{pending} asynchronous jobs are already pending; retry later",
                                  error_id="too-many-jobs", headers={"Retry-After": "10"})
        self.table.insert(job, self.process)
        job._table = self.table
        with self._lock:
            self._live[job.id] = job
        self._pool.submit(self._run, job, op, level, resource_type, resource_id, params, base_url, headers, access)
        return job

    def _run(self, job: Job, op, level, resource_type, resource_id, params, base_url, headers, access=None) -> None:
        from fhir_ops.operations.registry import OperationContext, invoke

        target = (level, resource_type, resource_id, base_url)
        if job.cancel_requested.is_set():
            self._finish(job, "cancelled", None, None, {}, target)
            return
        job.state = "running"
        self.table.update(job.id, state="running")
        ctx = OperationContext(op, level, resource_type, resource_id, base_url, headers=headers, job=job,
                               access=access)
        try:
            with self.app.app_context():
                status, body, extra = invoke(op, ctx, params)
        except FhirError as exc:
            self._finish(job, "failed", exc.status, exc.to_outcome(), exc.headers, target)
            return
        except Exception as exc:  # a defect in a handler: report it without internals
            self.app.logger.exception("job %s (%s) failed", job.id, op.name)
            error = FhirError(f"{op.name} failed with an internal error ({type(exc).__name__})",
                              status=500, code="exception", error_id="internal-error")
            self._finish(job, "failed", 500, error.to_outcome(), {}, target)
            return
        if job.cancel_requested.is_set():
            self._finish(job, "cancelled", None, None, {}, target)
        else:
            self._finish(job, "completed", status, body, extra, target)

    def _finish(self, job: Job, state: str, status, body, headers, target: tuple) -> None:
        with job._lock:
            job.status, job.body, job.headers = status, body, dict(headers or {})
            job.finished = time.time()
            if state == "completed":
                job.fraction = 1.0
            job.state = state
        try:
            self.table.finish(job.id, state, status, body, headers, job.fraction)
        finally:
            with self._lock:
                self._live.pop(job.id, None)
        self._record_task(job, *target)

    def _record_task(self, job: Job, level: str | None, resource_type: str | None, resource_id: str | None,
                     base_url: str) -> None:
        """``JOB_TASKS``: store the finished job as a FHIR Task, which a Subscription can watch for.

        Off by default (one more write per job). A failure to store it is logged: the job's own result
        is already recorded and its poll answers as before.
        """
        if not self.app.config.get("JOB_TASKS"):
            return
        try:
            task = job_task(job, level, resource_type, resource_id, base_url)
            self.app.extensions["trialtwin.store"].update("Task", task["id"], task)
        except Exception:  # noqa: BLE001 - bookkeeping must not turn a finished job into a failure
            self.app.logger.exception("recording job %s as a Task failed", job.id)

    def _fail_lost(self, is_lost) -> None:
        """Fail the unfinished jobs of processes that are gone; each becomes a failed Task too."""
        lost = self.table.fail_lost(is_lost)
        if not lost or not self.app.config.get("JOB_TASKS"):
            return
        from flask import has_request_context

        from fhir_ops.operations.registry import fhir_base_url

        # found while answering a request (a poll, or the first use of the manager): that request's base
        base = fhir_base_url() if has_request_context() else self.app.config.get("BASE_URL") or ""
        for job_id in lost:
            job = self.table.get(job_id)
            if job is not None:
                self._record_task(job, None, None, None, base)

    def get(self, job_id: str) -> Job:
        """The job with this id (from any process); ``NotFound`` when unknown, expired or cancelled."""
        self._evict()
        job = self.table.get(job_id)
        if job is not None and not job.done and self._is_lost(job._process, job._heartbeat):
            self._fail_lost(lambda proc, beat: proc == job._process)
            job = self.table.get(job_id)
        if job is None:
            raise NotFound(f"No job {job_id} (finished jobs expire {int(self.retention_s)} s after they "
                           f"finish; cancelled ones at once)", error_id="unknown-job")
        return job

    def live(self, job_id: str) -> Job | None:
        """This process's in-memory Job while its worker runs (None once finished or elsewhere): the
        object the worker updates, unlike :meth:`get`, which reads a snapshot from the table."""
        with self._lock:
            return self._live.get(job_id)

    def cancel(self, job_id: str) -> Job:
        """Ask the job to stop and forget it; the worker (in whichever process) stops at its next
        ``ctx.cancelled()`` check."""
        job = self.get(job_id)
        self.table.delete(job_id)
        with self._lock:
            live = self._live.get(job_id)
        if live is not None:
            live.cancel_requested.set()
        self._forget(job_id)
        return job

    def shutdown(self) -> None:
        """Cancel this process's jobs and stop the pool (app teardown, tests)."""
        with self._lock:
            for job in self._live.values():
                job.cancel_requested.set()
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _instant(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_task(job: Job, level: str | None, resource_type: str | None, resource_id: str | None,
             base_url: str) -> dict:
    """A finished job as an R4 Task: the operation (``CodeSystem/operation``), the resource it ran on
    (``focus``; ``for`` when that is a Patient, which puts the Task in the participant's compartment),
    when it ran, how it ended, and its polling URL, which answers with the result.

    >>> j = Job(id="ab12", operation="$simulate", created=0.0, state="completed", status=200, finished=1.5)
    >>> t = job_task(j, "instance", "Patient", "p1", "http://x/fhir")
    >>> t["status"], t["code"]["coding"][0]["code"], t["for"], t["output"][0]["valueUrl"]
    ('completed', '$simulate', {'reference': 'Patient/p1'}, 'http://x/fhir/_jobs/ab12')
    """
    url = job_url(base_url, job.id) if base_url else f"{JOBS_PATH}/{job.id}"
    finished = job.finished if job.finished is not None else time.time()
    task = {"resourceType": "Task", "id": f"job-{job.id}",
            "identifier": [{"system": "urn:ietf:rfc:3986", "value": url}],
            "status": job.state if job.state in ("completed", "failed", "cancelled") else "failed",
            "intent": "order",
            "code": {"coding": [{"system": OPERATION_CS, "code": job.operation}]},
            "description": f"Asynchronous {job.operation}"
                           + (f" on {resource_type}/{resource_id}" if resource_type and resource_id
                              else f" on {resource_type}" if resource_type else ""),
            "authoredOn": _instant(job.created), "lastModified": _instant(finished),
            "executionPeriod": {"start": _instant(job.created), "end": _instant(finished)},
            "output": [{"type": {"text": "result (poll this URL)"}, "valueUrl": url}]}
    if resource_type and resource_id:
        task["focus"] = {"reference": f"{resource_type}/{resource_id}"}
        if resource_type == "Patient":
            task["for"] = {"reference": f"Patient/{resource_id}"}
    if job.status:
        task["businessStatus"] = {"text": f"HTTP {job.status}"}
    if job.state == "failed" and isinstance(job.body, dict):
        reasons = [i.get("diagnostics") for i in job.body.get("issue") or [] if i.get("diagnostics")]
        if reasons:
            task["statusReason"] = {"text": "; ".join(reasons)[:1000]}
    return task


def manager(app) -> JobManager:
    """The app's job manager, created on first use.

    Config: ``JOBS_MAX_WORKERS`` (default 4), ``JOBS_MAX_PENDING`` (default 100),
    ``JOBS_RETENTION_S`` (default 3600), ``JOBS_DB`` (the jobs database; default
    ``<DATA_DIR>/trialtwin-jobs.sqlite`` beside the embedded store, and a private temporary file
    when the app was handed a ``STORE`` object and no ``JOBS_DB``).
    """
    existing = app.extensions.get(_EXTENSION_KEY)
    if existing is None:
        with _CREATE_LOCK:
            existing = app.extensions.get(_EXTENSION_KEY)
            if existing is None:
                path = app.config.get("JOBS_DB")
                if path is None and app.config.get("STORE") is None:
                    path = os.path.join(app.config.get("DATA_DIR", "./data"), JOBS_FILE)
                existing = JobManager(app, max_workers=int(app.config.get("JOBS_MAX_WORKERS", 4)),
                                      retention_s=float(app.config.get("JOBS_RETENTION_S", 3600)),
                                      max_pending=int(app.config.get("JOBS_MAX_PENDING", 100)),
                                      path=path)
                app.extensions[_EXTENSION_KEY] = existing
    return existing


_CREATE_LOCK = threading.Lock()


def init_app(app) -> None:
    """Register ``GET``/``DELETE <FHIR_PREFIX>/_jobs/<id>`` on a FHIR app."""
    from fhir_ops.operations.registry import fhir_prefix

    if "trialtwin_job_status" in app.view_functions:
        return
    rule = f"{fhir_prefix(app)}/{JOBS_PATH}/<job_id>"
    app.add_url_rule(rule, "trialtwin_job_status", _job_status, methods=["GET"])
    app.add_url_rule(rule, "trialtwin_job_cancel", _job_cancel, methods=["DELETE"])


def _job_status(job_id: str):
    from flask import current_app

    from fhir_ops.operations.registry import fhir_response

    job = manager(current_app).get(job_id)
    if not job.done:
        progress = job.progress_text()
        return fhir_response(
            {"resourceType": "OperationOutcome", "issue": [{
                "severity": "information", "code": "informational",
                "diagnostics": f"{job.operation} is {job.state}: {progress}"}]},
            # header values must be latin-1: keep the full text in the body
            202, {"X-Progress": progress.encode("ascii", "replace").decode("ascii"), "Retry-After": "1"})
    return fhir_response(job.body or {}, job.status or 200, job.headers)


def _job_cancel(job_id: str):
    from flask import current_app

    from fhir_ops.operations.registry import fhir_response

    job = manager(current_app).cancel(job_id)
    return fhir_response(
        {"resourceType": "OperationOutcome", "issue": [{
            "severity": "information", "code": "informational",
            "diagnostics": f"job {job.id} ({job.operation}) cancelled"}]}, 202)
