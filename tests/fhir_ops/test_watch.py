"""The watchers' view of change: every version after a cursor once, however many share an instant."""
from __future__ import annotations

import pytest

from fhir_ops import watch
from fhir_ops.store.sqlite import SQLiteStore

pytestmark = pytest.mark.unit


def obs(k: int) -> dict:
    return {"resourceType": "Observation", "status": "final", "code": {"text": f"reading {k}"},
            "subject": {"reference": "Patient/p1"}}


def test_a_transaction_larger_than_a_page_is_read_whole_then_only_what_is_new(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.sqlite"))
    try:
        store.create(obs(-1))
        lu = store.search("Observation", []).matches[0]["meta"]["lastUpdated"]
        n = 2 * watch.PAGE + 7  # one instant for all of them (one transaction)
        store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": obs(k), "request": {"method": "POST", "url": "Observation"}} for k in range(n)]})
        new, lu2, seen = watch.changes(store, "Observation", [], lu, set())
        assert len(new) == n + 1 and len({watch.key(r) for r in new}) == n + 1
        assert len(seen) == n  # all of the transaction share the newest instant
        again, lu3, seen3 = watch.changes(store, "Observation", [], lu2, seen)
        assert again == [] and (lu3, seen3) == (lu2, seen)
        last = store.create(obs(n)).resource
        new, _, _ = watch.changes(store, "Observation", [], lu2, seen)
        assert [watch.key(r) for r in new] == [watch.key(last)]
    finally:
        store.close()
