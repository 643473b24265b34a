"""The ``store`` fixture: one fresh store per test for every Store implementation under contract.

``embedded`` is a new SQLite file per test; ``hapi`` is a RemoteStore on the live HAPI FHIR server
started by scripts/hapi.sh (marked ``integration``; a missing server fails the run unless
TRIALTWIN_SKIP_HAPI=1). The contract tests use unique identifiers, so HAPI needs no reset between tests.
"""
from __future__ import annotations

import pytest

from tests.integration.hapi import hapi_server


def _embedded(request, tmp_path):
    from fhir_ops.store.sqlite import SQLiteStore

    return SQLiteStore(tmp_path / "contract.sqlite")


def _hapi(request, tmp_path):
    from fhir_ops.store.remote import RemoteStore

    return RemoteStore(request.getfixturevalue("hapi_contract_server").base_url)


FACTORIES = {"embedded": _embedded, "hapi": _hapi}


@pytest.fixture(scope="session")
def hapi_contract_server(request):
    return hapi_server(request.config)


@pytest.fixture(params=["embedded", pytest.param("hapi", marks=pytest.mark.integration)])
def store(request, tmp_path):
    s = FACTORIES[request.param](request, tmp_path)
    yield s
    s.close()


@pytest.fixture
def client(store, tmp_path):
    """TrialTwin's FHIR app on ``store``, served on a real loopback socket, and a client for it."""
    from fhir_ops.app import create_app
    from tests.fhir_ops.conftest import FhirClient
    from tests.live_server import serve

    # AUTH_MODE open: these tests are about the store, not the SMART enforcement in front of it
    app = create_app({"STORE": store, "DATA_DIR": str(tmp_path), "AUTH_MODE": "open"})
    with serve(app) as base:
        client = FhirClient(base + "/fhir")
        yield client
        client.http.close()


_FAST_TIERS = {"unit", "api"}


def _runs_on_hapi(item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("store") == "hapi"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Treat the HAPI-backed contract tests as ``integration`` only.

    The contract modules carry ``pytestmark = unit`` (store calls) or ``api`` (operations over HTTP)
    for their embedded runs, so ``-m unit`` / ``-m api`` would otherwise pick up the HAPI runs too
    and demand a live server from the fast tiers.
    """
    expression = config.option.markexpr
    if not expression:
        return
    from _pytest.mark.expression import Expression  # the same evaluator pytest's -m uses

    compiled = Expression.compile(expression)
    keep, drop = [], []
    for item in items:
        if _runs_on_hapi(item):
            marks = {m.name for m in item.iter_markers()} - _FAST_TIERS
            matched = compiled.evaluate(lambda name, /, **kwargs: name in marks)
            (keep if matched else drop).append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
