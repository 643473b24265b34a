"""Fixtures for the FHIR server tests: a fresh app on a real loopback socket and a small client."""
from __future__ import annotations

import pytest
import requests

from fhir_ops.app import create_app
from tests.app_config import open_config
from tests.live_server import serve

FHIR_JSON = "application/fhir+json"


class FhirClient:
    """Thin wrapper over ``requests`` that speaks FHIR JSON to one base URL (user actions in tests)."""

    def __init__(self, base: str):
        self.base = base
        self.http = requests.Session()

    def url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.base}/{path.lstrip('/')}"

    def get(self, path: str, **kw) -> requests.Response:
        return self.http.get(self.url(path), timeout=60, **kw)

    def post(self, path: str, body=None, headers=None, **kw) -> requests.Response:
        if body is not None and not isinstance(body, (bytes, str)):
            kw["json"] = body
        elif body is not None:
            kw["data"] = body
        return self.http.post(self.url(path), headers={"Content-Type": FHIR_JSON, **(headers or {})},
                              timeout=120, **kw)

    def put(self, path: str, body, headers=None) -> requests.Response:
        return self.http.put(self.url(path), json=body, headers={"Content-Type": FHIR_JSON, **(headers or {})},
                             timeout=60)

    def delete(self, path: str) -> requests.Response:
        return self.http.delete(self.url(path), timeout=60)

    def transaction(self, entries: list[dict]) -> requests.Response:
        return self.post("", {"resourceType": "Bundle", "type": "transaction", "entry": entries})


def error_id(resp: requests.Response) -> str:
    """The stable error id of an OperationOutcome response (and check it is one)."""
    assert resp.headers["Content-Type"].startswith(FHIR_JSON), resp.headers["Content-Type"]
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]["details"]["coding"][0]["code"]


def _served(tmp_path):
    app = create_app(open_config(DATA_DIR=str(tmp_path), MAX_CONTENT_LENGTH=1024 * 1024))
    return app


@pytest.fixture
def fhir(tmp_path):
    """A fresh server with an empty store for one test."""
    app = _served(tmp_path)
    with serve(app) as base:
        yield FhirClient(base + "/fhir")
    app.extensions["trialtwin.store"].close()


@pytest.fixture(scope="module")
def module_fhir(tmp_path_factory):
    """A fresh server shared by one test module (for tests that load a large data set once)."""
    app = _served(tmp_path_factory.mktemp("fhir"))
    with serve(app) as base:
        yield FhirClient(base + "/fhir")
    app.extensions["trialtwin.store"].close()
