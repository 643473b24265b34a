"""Shared access to the live HAPI FHIR server for integration tests, and the tally CI shows.

Any conftest that offers a HAPI-backed fixture (this package's, tests/fhir_ops/store's) uses
``hapi_server(config)``; the tally plugin prints which HAPI answered and how many tests ran on it.
Under pytest-xdist the workers probe HAPI and the controller (registered by tests/conftest.py,
since the controller collects nothing) counts the reports and prints the one summary line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

SKIP_ENV = "TRIALTWIN_SKIP_HAPI"
_PLUGIN_NAME = "trialtwin-hapi-tally"


@dataclass(frozen=True)
class HapiServer:
    """A HAPI server that answered ``GET /metadata``: its base URL and software version."""

    base_url: str
    name: str
    version: str


def hapi_base_url() -> str:
    """The base URL integration tests use: ``TRIALTWIN_HAPI_URL`` or scripts/hapi.sh's loopback port."""
    explicit = os.environ.get("TRIALTWIN_HAPI_URL")
    if explicit:
        return explicit.rstrip("/")
    return f"http://127.0.0.1:{os.environ.get('HAPI_PORT', '8090')}/fhir"


def _probe(base_url: str) -> HapiServer:
    response = requests.get(f"{base_url}/metadata", headers={"Accept": "application/fhir+json"}, timeout=30)
    response.raise_for_status()
    software = response.json().get("software", {})
    return HapiServer(base_url, software.get("name", "?"), software.get("version", "?"))


class HapiTally:
    """Counts integration tests that ran (passed or failed) and reports the HAPI they ran against.

    In a plain run one instance does everything. Under pytest-xdist each worker probes HAPI and
    counts its own selection, and hands both to the controller through ``workeroutput``; the
    controller sees every test report, so it alone counts runs, prints and writes the artifact.
    """

    def __init__(self, config) -> None:
        self.config = config
        self.server: HapiServer | None = None
        self.error: str | None = None
        self.ran = 0
        self.selected = 0

    @property
    def is_worker(self) -> bool:
        return hasattr(self.config, "workerinput")

    def pytest_collection_finish(self, session) -> None:
        # session.items is the final selection, after -m/-k deselection.
        self.selected = sum(1 for item in session.items if item.get_closest_marker("integration"))

    def pytest_runtest_logreport(self, report) -> None:
        if "integration" not in report.keywords:
            return
        if report.when == "call" and report.outcome in ("passed", "failed"):
            self.ran += 1

    def pytest_sessionfinish(self, session) -> None:
        if self.is_worker:
            self.config.workeroutput[_PLUGIN_NAME] = {
                "server": None if self.server is None else self.server.__dict__,
                "error": self.error, "selected": self.selected}

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        # xdist controller: every worker collected the same items, so selections agree; any worker
        # that reached HAPI names it.
        sent = getattr(node, "workeroutput", {}).get(_PLUGIN_NAME)
        if not sent:
            return
        self.selected = max(self.selected, sent["selected"])
        if sent["server"] is not None and self.server is None:
            self.server = HapiServer(**sent["server"])
        if sent["error"] is not None and self.error is None:
            self.error = sent["error"]

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.is_worker or (self.server is None and self.error is None):
            return  # a worker's summary goes nowhere; or no test asked for HAPI
        if self.server is not None:
            line = (f"{self.server.name.replace(' Server', '')} {self.server.version} at "
                    f"{self.server.base_url}: {self.ran} integration tests ran")
        else:
            line = f"no HAPI FHIR server: {self.ran} of {self.selected} integration tests ran ({self.error})"
        terminalreporter.write_sep("=", line)
        out = Path(os.environ.get("TRIALTWIN_ARTIFACTS", "test-artifacts"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "hapi-integration.json").write_text(json.dumps({
            "hapi": None if self.server is None else self.server.__dict__,
            "integration_tests_ran": self.ran,
            "integration_tests_selected": self.selected,
        }, indent=2))


def tally(config) -> HapiTally:
    """The session's tally plugin, registered on first use so every test directory shares it."""
    plugin = config.pluginmanager.get_plugin(_PLUGIN_NAME)
    if plugin is None:
        plugin = HapiTally(config)
        config.pluginmanager.register(plugin, _PLUGIN_NAME)
    return plugin


def hapi_server(config) -> HapiServer:
    """Return the live HAPI server, or fail the test loudly (skip only with TRIALTWIN_SKIP_HAPI=1)."""
    counter = tally(config)
    if counter.server is not None:
        return counter.server
    base_url = hapi_base_url()
    try:
        counter.server = _probe(base_url)
    except (requests.RequestException, ValueError) as exc:
        counter.error = f"HAPI not reachable at {base_url}: {exc}"
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"{counter.error} ({SKIP_ENV}=1)")
        pytest.fail(f"{counter.error}. Integration tests need a running HAPI FHIR server: run "
                    f"`scripts/hapi.sh start` (or set {SKIP_ENV}=1 to skip them deliberately).",
                    pytrace=False)
    return counter.server
