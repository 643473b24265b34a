"""Fixtures for the terminology tests: a fresh embedded store per test and the shipped maps."""
from __future__ import annotations

import pytest

from fhir_ops.store.sqlite import SQLiteStore
from terminology.catalog import shipped


@pytest.fixture
def store(tmp_path):
    """A fresh embedded SQLite store in a temporary directory."""
    s = SQLiteStore(str(tmp_path / "tt.sqlite"))
    yield s
    s.close()


@pytest.fixture(scope="session")
def concept_maps():
    return shipped("ConceptMap")
