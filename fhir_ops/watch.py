"""What changed since a cursor, found by search: the one way the background watchers see new data.

A cursor is the newest ``meta.lastUpdated`` seen plus the versions seen at exactly that instant
(the next search starts there again, ``ge``). Pages are followed to the end, so a transaction of
many resources sharing one instant is read whole, never stuck at a page boundary.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator

PAGE = 500


@contextmanager
def state_db(path: str) -> Iterator[sqlite3.Connection]:
    """A short-lived connection to a watcher's own state file (cursors, outbox), committed and closed.

    Closed on exit: ``with sqlite3.connect(...)`` only commits, and a connection left to the cyclic
    garbage collector keeps its file descriptors until a collection runs, which under the serving
    process's GC settings (fhir_ops.gc_tuning) came after thousands of polls: past 1024 descriptors
    waitress's select() failed and the server stopped.
    """
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        with db:
            yield db
    finally:
        db.close()


def changes(store, resource_type: str, params: list[tuple[str, str]], lu: str, seen: set[str]
            ) -> tuple[list[dict], str, set[str]]:
    """Resources matching ``params`` changed at or after ``lu`` and not in ``seen``.

    Returns
    -------
    (list of dict, str, set of str)
        The new resource versions (oldest first), the new cursor instant, and the ``id/version``
        keys seen at that instant.
    """
    found, offset = [], 0
    while True:
        page = store.search(resource_type, [*params, ("_lastUpdated", f"ge{lu}"), ("_sort", "_lastUpdated,_id"),
                                            ("_count", str(PAGE)), ("_offset", str(offset))]).matches
        found.extend(page)
        if len(page) < PAGE:
            break
        offset += PAGE
    new = [r for r in found if key(r) not in seen]
    if not found:
        return [], lu, seen
    newest = max(r["meta"]["lastUpdated"] for r in found)
    at_newest = {key(r) for r in found if r["meta"]["lastUpdated"] == newest}
    return new, newest, at_newest | (seen if newest == lu else set())


def key(resource: dict) -> str:
    return f"{resource['id']}/{resource['meta']['versionId']}"


__all__ = ["changes", "key"]
