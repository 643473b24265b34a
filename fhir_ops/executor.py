"""Where cohort-scale work runs: in the server process (the default) or on an existing Dask cluster.

``trialtwin serve --dask-scheduler tcp://HOST:PORT`` (or ``TRIALTWIN_DASK_SCHEDULER``) connects one
``dask.distributed.Client`` at start-up; operations read it with :func:`get_executor`.
"""
from __future__ import annotations

import atexit
import logging

from fhir_ops.errors import FhirError

log = logging.getLogger(__name__)
EXTENSION_KEY = "trialtwin.executor"
#: seconds to wait for the scheduler's answer at start-up before giving up with a clear error
CONNECT_TIMEOUT_S = 10.0


def connect(address: str, timeout: float = CONNECT_TIMEOUT_S):
    """A ``dask.distributed.Client`` on the scheduler at ``address``, after checking that it answers.

    Raises
    ------
    FhirError
        ``dask-not-installed`` when the ``dask`` extra is missing; ``dask-scheduler-unreachable``
        when nothing answers at ``address`` within ``timeout`` seconds, so ``serve`` stops at
        start-up with the reason instead of failing every simulation later.
    """
    try:
        from distributed import Client
    except ImportError:
        raise FhirError(f"--dask-scheduler {address} needs dask.distributed: pip install 'trialtwin[dask]'",
                        status=500, code="not-supported", error_id="dask-not-installed") from None
    _check_reachable(address, timeout)
    try:
        # set_as_default=False: the server hands the client to the engine explicitly, nothing else
        # in the process should start sending dask collections to the cluster behind its back
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise _unreachable(address, exc) from None
    log.info("executor: %s", describe(client))
    return client


def _unreachable(address: str, why) -> FhirError:
    return FhirError(f"cannot reach the Dask scheduler at {address} ({why}); start it ('dask scheduler' and "
                     "'dask worker ADDRESS') or correct --dask-scheduler / TRIALTWIN_DASK_SCHEDULER",
                     status=503, code="transient", error_id="dask-scheduler-unreachable")


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast on a closed TCP port: a ``Client`` that cannot connect retries until its timeout and
    then lingers, blocking interpreter exit for another 20 s while it tries to close."""
    import socket

    from distributed.comm import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme != "tcp":
            return  # tls://, ws://, inproc:// ... are left to the client's own handshake
        host, port = parse_host_port(location)
    except ValueError as exc:
        raise FhirError(f"--dask-scheduler {address!r} is not a scheduler address such as tcp://HOST:8786 ({exc})",
                        status=400, code="invalid", error_id="bad-dask-scheduler") from None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise _unreachable(address, exc.strerror or exc) from None


def describe(executor) -> str:
    """Where cohort work runs, for logs and the start-up banner."""
    if executor is None:
        return "in process"
    info = getattr(executor, "scheduler_info", None)
    if info is None:
        return type(executor).__name__
    workers = info().get("workers", {})
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    return f"Dask scheduler {executor.scheduler.address} ({len(workers)} workers, {threads} threads now)"


#: seconds a shutting-down server waits for the scheduler to acknowledge its client's goodbye
CLOSE_TIMEOUT = 10


def close(executor) -> None:
    """Close a client this server opened (idempotent; the cluster itself keeps running)."""
    if executor is None:
        return
    try:
        executor.close(timeout=CLOSE_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - at shutdown a dead scheduler must not hide the real exit status
        log.warning("closing the Dask client failed: %s", exc)


def init_app(app) -> None:
    """Set ``app.extensions["trialtwin.executor"]``.

    ``EXECUTOR`` in the config (a ready client, shared by the apps of one ``serve``; the command
    closes it) wins; else ``DASK_SCHEDULER`` (``TRIALTWIN_DASK_SCHEDULER`` in a WSGI deployment)
    connects a client owned by this app, closed when the process exits; else None (in process).
    """
    executor = app.config.get("EXECUTOR")
    if executor is None and app.config.get("DASK_SCHEDULER"):
        executor = connect(str(app.config["DASK_SCHEDULER"]))
        atexit.register(close, executor)
    app.extensions[EXTENSION_KEY] = executor


def get_executor():
    """The current app's executor (None: run in this process)."""
    from flask import current_app

    return current_app.extensions.get(EXTENSION_KEY)
