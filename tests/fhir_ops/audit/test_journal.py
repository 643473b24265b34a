"""The audit journal's guarantees: a write's record is committed with the write (or not at all), a request
that died before its record still gets one, an answered read's record survives ``kill -9``, and an access
that cannot be recorded is not answered (fail closed)."""
from __future__ import annotations

import json
import sqlite3

import pytest
import requests

from fhir_ops.app import create_app
from fhir_ops.audit import recorder
from fhir_ops.audit.chain import verify
from fhir_ops.errors import FhirError
from fhir_ops.mapping.audit_event import patients_of, request_id_of
from fhir_ops.store.base import WRITE_AUDIT
from fhir_ops.store.sqlite import SQLiteStore
from tests.app_config import open_config
from tests.fhir_ops.store.test_durability import _kill9, _start
from tests.live_server import serve

PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female"}


def _obs(patient: str) -> dict:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "HbA1c"},
            "subject": {"reference": f"Patient/{patient}"}}


@pytest.mark.unit
def test_a_write_records_what_it_wrote_in_its_own_transaction_and_a_failed_one_nothing(tmp_path):
    store = SQLiteStore(tmp_path / "s.sqlite")
    seen = []

    def hook(written):
        seen.append(written)
        return "req-1", json.dumps([f"{t}/{i}/_history/{v}" for t, i, v, _ in written])

    token = WRITE_AUDIT.set(hook)
    try:
        store.update("Patient", "p1", PATIENT)
        store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": _obs("p1"), "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "DELETE", "url": "Patient/p1"}}]})
        with pytest.raises(FhirError):  # an entry fails: nothing of the transaction, nor its record, is kept
            store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": _obs("p1"), "request": {"method": "POST", "url": "Observation"}},
                {"resource": {"resourceType": "Patient", "id": "p1"},
                 "request": {"method": "PUT", "url": "Patient/p1", "ifMatch": 'W/"1"'}}]})
        with pytest.raises(FhirError):
            store.update("Patient", "p1", PATIENT, if_match='W/"1"')
    finally:
        WRITE_AUDIT.reset(token)
    pending = [json.loads(t) for t in store.audit_pending("req-1")]
    assert pending[0] == ["Patient/p1/_history/1"]
    assert len(pending) == 2 and "Patient/p1/_history/2" in pending[1]
    assert [r.split("/")[0] for r in pending[1]].count("Observation") == 1 and len(seen) == 2
    store.update("Patient", "p2", {**PATIENT, "id": "p2"})  # no request: no hook, no record
    assert len(store.audit_pending("req-1")) == 2 and not store.audit_orphans(float("inf")).keys() - {"req-1"}
    store.close()


@pytest.mark.unit
def test_a_request_that_died_after_its_write_gets_its_audit_event_from_the_pending_record(tmp_path):
    store = SQLiteStore(tmp_path / "s.sqlite")
    written = [{"ref": "Observation/o1/_history/1", "patients": ["p1"]}]
    with store._write() as tx:  # what a write leaves when the process dies before its after-request hook
        tx.conn.execute("INSERT INTO audit_pending(request, written, at) VALUES (?,?,?)", ("lost", json.dumps(written), 1.0))
    assert recorder.settle_orphans(store, before=2.0) == 1
    assert not store.audit_orphans(float("inf"))
    rows = store.audit_journal()
    assert verify([r[:4] for r in rows]).broken is None
    event = json.loads(rows[-1][1])
    assert request_id_of(event) == "lost" and patients_of(event) == {"p1"} and "committed" in event["outcomeDesc"]
    store.close()


@pytest.mark.api
def test_an_access_that_cannot_be_recorded_is_not_answered(tmp_path):
    app = create_app(open_config(DATA_DIR=str(tmp_path)))
    with serve(app) as base:
        fhir = base + "/fhir"
        assert requests.put(f"{fhir}/Patient/p1", json=PATIENT, timeout=30).status_code == 201
        with sqlite3.connect(tmp_path / "trialtwin.sqlite") as db:  # the journal becomes unwritable
            db.execute("ALTER TABLE audit_log RENAME TO audit_log_gone")
        refused = requests.get(f"{fhir}/Patient/p1", timeout=30)
        assert refused.status_code == 500 and "p1" not in refused.text and "gender" not in refused.text
        assert refused.json()["issue"][0]["details"]["coding"][0]["code"] == "audit-failed"
        # a write commits with its pending record: answered, and recorded once the journal is back
        wrote = requests.put(f"{fhir}/Patient/p1", json={**PATIENT, "gender": "male"}, timeout=30,
                             headers={"X-Request-Id": "while-broken"})
        assert wrote.status_code == 200
        with sqlite3.connect(tmp_path / "trialtwin.sqlite") as db:
            db.execute("ALTER TABLE audit_log_gone RENAME TO audit_log")
        app.extensions["trialtwin.audit"].drain(orphans_before=float("inf"))
        events = requests.get(f"{fhir}/AuditEvent", params={"_count": 100}, timeout=30).json()["entry"]
        assert [request_id_of(e["resource"]) for e in events].count("while-broken") == 1
    app.extensions["trialtwin.store"].close()


@pytest.mark.api
def test_an_answered_read_is_on_record_after_kill_9(tmp_path):
    data = tmp_path / "data"
    proc, base = _start(data)
    try:
        assert requests.put(f"{base}/Patient/p1", json=PATIENT, timeout=30).status_code == 201
        answered = [requests.get(f"{base}/Patient/p1", headers={"X-Request-Id": f"read-{i}"}, timeout=30)
                    for i in range(20)]
        assert all(r.status_code == 200 for r in answered)
    finally:
        _kill9(proc)
    store = SQLiteStore(data / "trialtwin.sqlite")
    ids = [request_id_of(json.loads(r[1])) for r in store.audit_journal(0, 10_000)]
    assert all(ids.count(f"read-{i}") == 1 for i in range(20))
    store.close()
