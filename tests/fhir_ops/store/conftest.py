"""The ``store`` fixture: one fresh store per test for every Store implementation under contract.

Add an implementation by adding a param (the HAPI tier adds ``pytest.param("hapi", marks=...)``).
"""
from __future__ import annotations

import pytest


def _embedded(tmp_path):
    from fhir_ops.store.sqlite import SQLiteStore

    return SQLiteStore(tmp_path / "contract.sqlite")


FACTORIES = {"embedded": _embedded}


@pytest.fixture(params=["embedded"])
def store(request, tmp_path):
    s = FACTORIES[request.param](tmp_path)
    yield s
    s.close()
