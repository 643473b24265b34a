"""Session-wide hooks only (fixtures live in each package's conftest): the HAPI integration tally.

Registered here because the pytest-xdist controller collects nothing and so never loads
tests/integration/conftest.py, yet it is the process that prints the summary CI shows.
"""
from __future__ import annotations

from tests.integration.hapi import tally


def pytest_configure(config) -> None:
    tally(config)
