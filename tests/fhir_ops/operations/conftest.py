"""Fixtures for operation tests: a FHIR app served on loopback and test operations in the registry."""
from __future__ import annotations

import threading
import time

import pytest

from fhir_ops import jobs
from fhir_ops.app import create_app, get_store
from fhir_ops.errors import FhirError
from fhir_ops.operations import registry
from fhir_ops.operations.registry import OperationResult
from tests.app_config import open_config
from tests.live_server import serve

CANON = "https://trialtwin.org/fhir/OperationDefinition/"


@pytest.fixture
def app(tmp_path):
    """A fresh FHIR app with its own SQLite database."""
    app = create_app(open_config(TESTING=True, DATA_DIR=str(tmp_path)))
    yield app
    jobs.manager(app).shutdown()
    get_store_of(app).close()


def get_store_of(app):
    with app.app_context():
        return get_store()


@pytest.fixture
def base_url(app):
    """Base URL (``http://127.0.0.1:port``) of the app on a real loopback socket."""
    with serve(app) as url:
        yield url


ECHO = {
    "resourceType": "OperationDefinition", "id": "test-echo", "url": CANON + "test-echo", "name": "TestEcho",
    "status": "draft", "kind": "operation", "code": "test-echo", "affectsState": False,
    "resource": ["Patient", "Group"], "system": True, "type": True, "instance": True,
    "parameter": [
        {"name": "count", "use": "in", "min": 0, "max": "1", "type": "integer"},
        {"name": "dose", "use": "in", "min": 0, "max": "1", "type": "Quantity"},
        {"name": "where", "use": "out", "min": 1, "max": "1", "type": "string"},
        {"name": "count", "use": "out", "min": 0, "max": "1", "type": "integer"},
        {"name": "dose", "use": "out", "min": 0, "max": "1", "type": "Quantity"},
    ],
}
TOUCH = {
    "resourceType": "OperationDefinition", "id": "test-touch", "url": CANON + "test-touch", "name": "TestTouch",
    "status": "draft", "kind": "operation", "code": "test-touch", "affectsState": True,
    "resource": ["Patient"], "system": False, "type": True, "instance": False,
    "parameter": [{"name": "return", "use": "out", "min": 1, "max": "1", "type": "Patient"}],
}
SLOW = {
    "resourceType": "OperationDefinition", "id": "test-slow", "url": CANON + "test-slow", "name": "TestSlow",
    "status": "draft", "kind": "operation", "code": "test-slow", "affectsState": False,
    "system": True, "type": False, "instance": False,
    "parameter": [
        {"name": "steps", "use": "in", "min": 1, "max": "1", "type": "positiveInt"},
        {"name": "fail", "use": "in", "min": 0, "max": "1", "type": "boolean"},
        {"name": "done", "use": "out", "min": 1, "max": "1", "type": "integer"},
    ],
}


class SlowProbe:
    """Lets a test step the slow operation forward and see how far a cancelled job got."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.steps_run = 0
        self.stopped = threading.Event()


@pytest.fixture
def test_operations():
    """Register three operations defined here (sync echo, state-changing, slow async); remove after."""
    probe = SlowProbe()

    @registry.operation(ECHO)
    def echo(ctx, params):
        where = f"{ctx.level}:{ctx.resource_type or '-'}:{ctx.resource_id or '-'}"
        return {"where": where, **params}

    @registry.operation(TOUCH)
    def touch(ctx, params):
        return OperationResult(outputs={"return": {"resourceType": "Patient", "id": "new"}}, status=201,
                               headers={"Location": f"{ctx.base_url}/Patient/new"})

    @registry.operation(SLOW, async_allowed=True)
    def slow(ctx, params):
        for step in range(params["steps"]):
            if ctx.cancelled():
                probe.stopped.set()
                return {"done": step}
            if ctx.is_async:
                probe.gate.acquire(timeout=10)
            if ctx.cancelled():
                probe.stopped.set()
                return {"done": step}
            probe.steps_run = step + 1
            ctx.progress((step + 1) / params["steps"], f"step {step + 1} of {params['steps']}")
            if params.get("fail") and step == 0:
                raise FhirError("step 1 failed on purpose", status=422, code="processing", error_id="failed-step")
        return {"done": params["steps"]}

    yield probe
    for code in ("test-echo", "test-touch", "test-slow"):
        registry.unregister(code)


def wait_for(predicate, timeout: float = 300.0):
    """Poll ``predicate`` until it is truthy; the deadline is generous because CI machines may be busy."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def fhir_server(tmp_path):
    """The full FHIR app (``fhir_ops.app.create_app``) on a fresh SQLite store, served on loopback.

    Yields ``(base_url, store)``; ``base_url`` ends in ``/fhir``.
    """
    from fhir_ops.app import create_app
    from fhir_ops.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "ops.sqlite"))
    app = create_app(open_config(STORE=store, TESTING=True))
    with serve(app) as url:
        yield f"{url}/fhir", store
    store.close()


@pytest.fixture(scope="module")
def twin_server(tmp_path_factory):
    """A FHIR app holding a small seeded TT-201 demo study (30 participants), served on loopback.

    Module-scoped: loading the study and calibrating twins is the slow part, so the twin tests of
    one module share it. Yields ``(fhir_base_url, app)``; ``fhir_base_url`` ends in ``/fhir``.
    """
    from fhir_ops.demo import ensure_demo_study

    app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path_factory.mktemp("twin")), "AUTH_MODE": "open",
                      "JOBS_MAX_WORKERS": 1})
    store = get_store_of(app)
    ensure_demo_study(store, participants=30, seed=7)
    with serve(app) as url:
        yield f"{url}/fhir", app
    jobs.manager(app).shutdown()
    store.close()
