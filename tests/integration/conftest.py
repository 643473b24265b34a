"""Fixtures for tests against a live HAPI FHIR JPA server (started by scripts/hapi.sh).

A missing server fails the run (unless TRIALTWIN_SKIP_HAPI=1); the terminal summary names the HAPI
version and how many integration tests ran against it, so the CI log shows the tier really ran.
"""
from __future__ import annotations

import pytest

from fhir_ops.store.remote import RemoteStore
from tests.integration.hapi import HapiServer, hapi_server, tally


def pytest_configure(config) -> None:
    tally(config)


@pytest.fixture(scope="session")
def hapi(request) -> HapiServer:
    """The live HAPI server (base URL and version); fails loudly when none answers."""
    return hapi_server(request.config)


@pytest.fixture
def remote_store(hapi):
    """A RemoteStore on the live HAPI; tests use unique identifiers, so no cleanup between tests."""
    store = RemoteStore(hapi.base_url)
    yield store
    store.close()
