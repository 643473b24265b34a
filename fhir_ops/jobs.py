"""Asynchronous operation calls (the FHIR async request pattern): 202, polling, cancel.

Jobs run in a bounded thread pool of the app and live only in this process: a restart forgets
them, and clients then get 404 for their job URL.
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fhir_ops.errors import FhirError, NotFound, TooManyRequests

JOBS_PATH = "_jobs"
_EXTENSION_KEY = "trialtwin.jobs"


def job_url(base_url: str, job_id: str) -> str:
    """The polling URL of a job under a FHIR base URL."""
    return f"{base_url.rstrip('/')}/{JOBS_PATH}/{job_id}"


@dataclass
class Job:
    """One asynchronous call: its state, progress, and, once finished, its response."""

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

    def report(self, fraction: float | None, message: str | None = None) -> None:
        """Record progress from the handler (``fraction`` clipped to [0, 1])."""
        with self._lock:
            if fraction is not None:
                self.fraction = min(max(float(fraction), 0.0), 1.0)
            if message is not None:
                self.message = message

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


class JobManager:
    """The jobs of one app: a bounded worker pool and an in-memory table.

    Parameters
    ----------
    app : flask.Flask
        Handlers run inside this app's context so that ``get_store()`` works in the worker.
    max_workers : int
        Jobs running at once; further jobs wait in the queue (state ``queued``).
    retention_s : float
        How long a finished job's result stays available to pollers.
    max_pending : int
        Unfinished jobs (running or queued) accepted at once; more are refused with 429 so that a
        burst of requests cannot queue unbounded work.
    """

    def __init__(self, app, max_workers: int = 4, retention_s: float = 3600.0, max_pending: int = 100) -> None:
        self.app = app
        self.retention_s = retention_s
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="trialtwin-job")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def submit(self, op, level: str, resource_type: str | None, resource_id: str | None,
               params: dict, base_url: str, headers: dict) -> Job:
        """Queue a call of ``op`` (a registry ``Operation``) and return its job."""
        job = Job(id=uuid.uuid4().hex, operation=op.name)
        with self._lock:
            self._evict_expired()
            pending = sum(not j.done for j in self._jobs.values())
            if pending >= self.max_pending:
                raise TooManyRequests(f"{pending} asynchronous jobs are already pending; retry later",
                                      error_id="too-many-jobs", headers={"Retry-After": "10"})
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, op, level, resource_type, resource_id, params, base_url, headers)
        return job

    def _run(self, job: Job, op, level, resource_type, resource_id, params, base_url, headers) -> None:
        from fhir_ops.operations.registry import OperationContext, invoke

        if job.cancel_requested.is_set():
            self._finish(job, "cancelled", None, None, {})
            return
        job.state = "running"
        ctx = OperationContext(op, level, resource_type, resource_id, base_url, headers=headers, job=job)
        try:
            with self.app.app_context():
                status, body, extra = invoke(op, ctx, params)
        except FhirError as exc:
            self._finish(job, "failed", exc.status, exc.to_outcome(), exc.headers)
            return
        except Exception as exc:  # a defect in a handler: report it without internals
            self.app.logger.exception("job %s (%s) failed", job.id, op.name)
            error = FhirError(f"{op.name} failed with an internal error ({type(exc).__name__})",
                              status=500, code="exception", error_id="internal-error")
            self._finish(job, "failed", 500, error.to_outcome(), {})
            return
        if job.cancel_requested.is_set():
            self._finish(job, "cancelled", None, None, {})
        else:
            self._finish(job, "completed", status, body, extra)

    @staticmethod
    def _finish(job: Job, state: str, status, body, headers) -> None:
        with job._lock:
            job.status, job.body, job.headers = status, body, dict(headers or {})
            job.finished = time.time()
            if state == "completed":
                job.fraction = 1.0
            job.state = state

    def get(self, job_id: str) -> Job:
        """The job with this id; ``NotFound`` when unknown, expired or cancelled."""
        with self._lock:
            self._evict_expired()
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"No job {job_id} (jobs live in the server process and expire "
                           f"{int(self.retention_s)} s after they finish)", error_id="unknown-job")
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask the job to stop and forget it; the worker stops at its next ``ctx.cancelled()`` check."""
        job = self.get(job_id)
        job.cancel_requested.set()
        with self._lock:
            self._jobs.pop(job_id, None)
        return job

    def _evict_expired(self) -> None:
        now = time.time()
        expired = [k for k, j in self._jobs.items() if j.finished and now - j.finished > self.retention_s]
        for key in expired:
            del self._jobs[key]

    def shutdown(self) -> None:
        """Cancel every job and stop the pool (app teardown, tests)."""
        with self._lock:
            for job in self._jobs.values():
                job.cancel_requested.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def manager(app) -> JobManager:
    """The app's job manager, created on first use.

    Config: ``JOBS_MAX_WORKERS`` (default 4), ``JOBS_MAX_PENDING`` (default 100),
    ``JOBS_RETENTION_S`` (default 3600).
    """
    existing = app.extensions.get(_EXTENSION_KEY)
    if existing is None:
        with _CREATE_LOCK:
            existing = app.extensions.get(_EXTENSION_KEY)
            if existing is None:
                existing = JobManager(app, max_workers=int(app.config.get("JOBS_MAX_WORKERS", 4)),
                                      retention_s=float(app.config.get("JOBS_RETENTION_S", 3600)),
                                      max_pending=int(app.config.get("JOBS_MAX_PENDING", 100)))
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
