"""Fixtures for tests against a live HAPI FHIR JPA server (started by scripts/hapi.sh).

A missing server fails the run (unless TRIALTWIN_SKIP_HAPI=1); the terminal summary names the HAPI
version and how many integration tests ran against it, so the CI log shows the tier really ran.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import requests

from fhir_ops.store.remote import RemoteStore
from tests.integration.hapi import HapiServer, hapi_server, tally

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("hapi_validate", ROOT / "scripts" / "hapi_validate.py")
#: scripts/hapi_validate.py, the loader and validator CI uses, importable by the integration tests
hapi_validate = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("hapi_validate", hapi_validate)  # dataclasses look their module up there
_spec.loader.exec_module(hapi_validate)


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


@pytest.fixture(scope="session")
def profiles_on_hapi(hapi) -> str:
    """profiles/ loaded into HAPI (the load must report nothing), so resources that claim our profiles
    can be validated whatever order the tests run in; loading is an idempotent PUT by id."""
    report = hapi_validate.Report()
    with requests.Session() as session:
        hapi_validate.load(hapi.base_url, hapi_validate.find_conformance([ROOT / "profiles"]), report, session)
    assert report.problems == []
    return hapi.base_url
