"""Fixtures for the terminology tests: a fresh store per test, the shipped maps, sample resources."""
from __future__ import annotations

import pytest

from terminology.catalog import shipped


def _sqlite_store(tmp_path):
    try:
        from fhir_ops.store.sqlite import SQLiteStore
    except ImportError:
        return None
    return SQLiteStore(str(tmp_path / "tt.sqlite"))


@pytest.fixture
def store(tmp_path):
    """The embedded SQLite store when it is available, else the in-memory contract double."""
    real = _sqlite_store(tmp_path)
    if real is not None:
        yield real
        real.close()
        return
    from tests.terminology.memory_store import MemoryStore

    yield MemoryStore()


@pytest.fixture(scope="session")
def concept_maps():
    return shipped("ConceptMap")
