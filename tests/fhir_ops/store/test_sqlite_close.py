"""Closing the embedded store while another thread is still using one of its connections.

A request thread finishing its response (the audit drain) while a test server's store was closed
crashed the whole process with a segmentation fault: SQLite connections must not be closed under a
running statement. Now close() closes idle connections, and one in use closes when it is handed back.
"""
from __future__ import annotations

import sqlite3
import threading

import pytest

from fhir_ops.store.sqlite import SQLiteStore

pytestmark = pytest.mark.unit


def test_a_connection_in_use_survives_close_and_is_closed_when_handed_back(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.sqlite"))
    store.create({"resourceType": "Patient", "id": "x", "gender": "female"})
    holding, go_on, seen = threading.Event(), threading.Event(), {}

    def reader():
        with store._read() as conn:
            holding.set()
            go_on.wait(30)
            # the store was closed meanwhile: this connection is still open for its thread
            seen["rows"] = conn.execute("SELECT count(*) FROM resources").fetchone()[0]
            seen["conn"] = conn

    thread = threading.Thread(target=reader)
    thread.start()
    assert holding.wait(30)
    store.close()
    go_on.set()
    thread.join(30)
    assert seen["rows"] == 1
    with pytest.raises(sqlite3.ProgrammingError):  # handed back after close: closed then
        seen["conn"].execute("SELECT 1")
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):  # and the store takes no new work
        store.read("Patient", "x")
    store.close()  # twice is harmless
