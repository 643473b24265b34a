"""Every request to the FHIR server leaves exactly one AuditEvent (issue #19, acceptance 1).

A real server in smart mode with the small TT-201 demo, real tokens from the real authorization server.
1,000 mixed requests (reads, searches, writes, operations, transactions, refusals) each carry their own
X-Request-Id; the trail must hold exactly one AuditEvent per request with the right outcome and patient,
be readable only with the audit scope, and report an edited record through ``$verify-audit``.
"""
from __future__ import annotations

import random
import sqlite3
import uuid
from collections import Counter, defaultdict

import pytest
from joserfc.jwk import RSAKey

from fhir_ops.mapping.audit_event import patients_of, request_id_of
from tests.smart_app.conftest import combined_server
from tests.smart_app.test_fhir_enforcement import FHIR_JSON, P1, P2, call, observation

pytestmark = pytest.mark.api

PATIENTS = [f"tt201-p{i:03d}" for i in range(1, 7)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from combined_server(tmp_path_factory)


def _backend(server, scope: str) -> str:
    key = RSAKey.generate_key(2048, parameters={"kid": f"k-{uuid.uuid4().hex[:8]}", "alg": "RS384"})
    return server.backend_token(scope, key)["access_token"]


@pytest.fixture(scope="module")
def admin(server):
    return _backend(server, "system/*.cruds")


@pytest.fixture(scope="module")
def auditor(server):
    return _backend(server, "system/AuditEvent.rs")


def trail(server, auditor, **params) -> list[dict]:
    """Every AuditEvent matching ``params``, all pages, read with the audit scope."""
    out, offset = [], 0
    while True:
        page = call("GET", f"{server.fhir}/AuditEvent", auditor,
                    params={**params, "_count": 1000, "_offset": offset})
        assert page.status_code == 200, page.text
        entries = [e["resource"] for e in page.json().get("entry", [])]
        out += entries
        if len(entries) < 1000:
            return out
        offset += len(entries)


def test_a_thousand_mixed_requests_leave_exactly_one_matching_audit_event_each(server, admin, auditor):
    p1 = server.user_token("patient/*.cruds", patient=P1)["access_token"]
    observations = {}
    for patient in PATIENTS:
        bundle = call("GET", f"{server.fhir}/Observation", admin, params={"subject": f"Patient/{patient}", "_count": 3})
        observations[patient] = [e["resource"]["id"] for e in bundle.json()["entry"]]
    rng = random.Random(19)
    created: list[tuple[str, str]] = []  # (observation id, patient)
    expected: dict[str, tuple[str, int, set[str], bool]] = {}  # request id -> (kind, status, patients, exact)

    def send(kind, method, path, token, status, patients, exact=True, **kw):
        rid = f"t19-{len(expected):04d}"
        response = call(method, f"{server.fhir}/{path}", token, headers={"X-Request-Id": rid, **kw.pop("headers", {})},
                        **kw)
        assert response.status_code == status, (kind, path, response.status_code, response.text[:300])
        assert response.headers["X-Request-Id"] == rid
        expected[rid] = (kind, status, set(patients), exact)
        return response

    kinds = ["read", "read-obs", "search", "create", "update", "delete", "operation", "transaction", "batch",
             "refused-patient", "refused-token", "refused-scope", "not-found"]
    for _ in range(1000):
        kind = rng.choice(kinds)
        patient = rng.choice(PATIENTS)
        if kind == "read":
            send(kind, "GET", f"Patient/{patient}", admin, 200, [patient])
        elif kind == "read-obs":
            send(kind, "GET", f"Observation/{rng.choice(observations[patient])}", admin, 200, [patient])
        elif kind == "search":
            send(kind, "GET", "Observation", admin, 200, [patient], exact=False,
                 params={"subject": f"Patient/{patient}", "_count": 5})
        elif kind == "create" or (kind in ("update", "delete") and not created):
            r = send("create", "POST", "Observation", admin, 201, [patient], json=observation(patient, rng.uniform(5, 9)))
            created.append((r.json()["id"], patient))
        elif kind == "update":
            oid, owner = rng.choice(created)
            body = {**observation(owner, rng.uniform(5, 9)), "id": oid}
            send(kind, "PUT", f"Observation/{oid}", admin, 200, [owner], json=body)
        elif kind == "delete":
            oid, owner = created.pop(rng.randrange(len(created)))
            send(kind, "DELETE", f"Observation/{oid}", admin, 204, [owner])
        elif kind == "operation":
            send(kind, "GET", f"Patient/{patient}/$validate", admin, 200, [patient])
        elif kind == "transaction":
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": observation(patient, 6.0), "request": {"method": "POST", "url": "Observation"}},
                {"resource": observation(patient, 6.5), "request": {"method": "POST", "url": "Observation"}}]}
            send(kind, "POST", "", admin, 200, [patient], json=bundle)
        elif kind == "batch":  # each entry in its own store transaction, one AuditEvent for the request
            bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
                {"request": {"method": "GET", "url": f"Patient/{patient}"}},
                {"resource": observation(patient, 6.2), "request": {"method": "POST", "url": "Observation"}},
                {"resource": observation(patient, 6.3), "request": {"method": "POST", "url": "Observation"}}]}
            send(kind, "POST", "", admin, 200, [patient], json=bundle)
        elif kind == "refused-patient":
            other = rng.choice([p for p in PATIENTS if p != P1])
            send(kind, "GET", f"Observation/{rng.choice(observations[other])}", p1, 403, [other])
        elif kind == "refused-token":
            send(kind, "GET", f"Patient/{patient}", None, 401, [patient])
        elif kind == "refused-scope":
            send(kind, "GET", "AuditEvent", admin, 403, [], params={"patient": f"Patient/{patient}"})
        else:
            send(kind, "GET", f"Observation/no-such-{rng.randrange(10**6)}", admin, 404, [])

    events = trail(server, auditor)
    by_request: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        by_request[request_id_of(event)].append(event)
    counts = Counter(kind for kind, *_ in expected.values())
    assert all(counts[k] > 40 for k in ("read", "search", "create", "operation", "batch", "refused-patient")), counts
    for rid, (kind, status, patients, exact) in expected.items():
        found = by_request.get(rid, [])
        assert len(found) == 1, (rid, kind, len(found))
        event = found[0]
        assert event["outcome"] == ("0" if status < 400 else "4"), (rid, kind, event["outcome"])
        assert event["outcomeDesc"].startswith("refused" if status in (401, 403) else "granted"), (rid, kind)
        assert f"HTTP {status}" in event["outcomeDesc"]
        named = patients_of(event)
        if kind == "refused-scope":
            # a look at the trail itself (refused here) names no patient; it is typed "Audit Log Used"
            assert event["type"]["code"] == "110101" and not named, (rid, named)
        else:
            assert event["type"]["code"] == "rest"
            assert (named == patients) if exact else (patients <= named), (rid, kind, named, patients)
        if kind in ("batch", "transaction"):
            written = [e["what"]["reference"] for e in event["entity"] if (e.get("role") or {}).get("code") == "4"]
            assert len(written) == 2 and all(w.startswith("Observation/") for w in written), (rid, written)
    # the client, the user and the address are on every record of an authenticated request
    admin_events = [by_request[r][0] for r, (k, *_rest) in expected.items() if k == "read"]
    assert all(e["agent"][0]["altId"] != "unauthenticated" and e["agent"][0].get("network") for e in admin_events)
    p1_events = [by_request[r][0] for r, (k, *_rest) in expected.items() if k == "refused-patient"]
    assert all(any(a.get("who", {}).get("reference") == "Practitioner/dr-chen" for a in e["agent"]) for e in p1_events)


def test_the_trail_is_searchable_by_patient_agent_date_and_action(server, admin, auditor):
    before = call("GET", f"{server.fhir}/metadata").json()["date"]
    created = call("POST", f"{server.fhir}/Observation", admin, json=observation(P2), headers={"X-Request-Id": "find-me"})
    assert created.status_code == 201
    ref = f"Observation/{created.json()['id']}"
    by_patient = trail(server, auditor, patient=f"Patient/{P2}", action="C")
    assert "find-me" in {request_id_of(e) for e in by_patient}
    assert all(P2 in patients_of(e) and e["action"] == "C" for e in by_patient)
    by_entity = trail(server, auditor, entity=ref)
    assert [request_id_of(e) for e in by_entity] == ["find-me"]
    client_id = by_entity[0]["agent"][0]["altId"]
    assert "find-me" in {request_id_of(e) for e in trail(server, auditor, altid=client_id, date=f"ge{before}")}
    user_token = server.user_token("patient/*.rs", patient=P1)["access_token"]
    call("GET", f"{server.fhir}/Patient/{P1}", user_token, headers={"X-Request-Id": "by-user"})
    by_agent = trail(server, auditor, agent="Practitioner/dr-chen", subtype="read")
    assert "by-user" in {request_id_of(e) for e in by_agent}
    assert not trail(server, auditor, date="lt2000-01-01")


def test_only_the_audit_scope_reads_the_trail(server, admin, auditor):
    p1 = server.user_token("patient/*.cruds", patient=P1)["access_token"]
    wildcard_reader = _backend(server, "system/*.rs")
    for token in (admin, wildcard_reader, p1):
        for path, params in (("AuditEvent", {}), ("AuditEvent/audit-1", None), ("AuditEvent/_history", None),
                             ("$verify-audit", None)):
            response = call("GET", f"{server.fhir}/{path}", token, params=params)
            assert response.status_code == 403, (path, response.status_code)
    # nor through _revinclude / _include, history or a Bundle
    pulled = call("GET", f"{server.fhir}/Patient", admin, params={"_id": P1, "_revinclude": "AuditEvent:patient"}).json()
    assert {e["resource"]["resourceType"] for e in pulled["entry"]} == {"Patient"}
    history = call("GET", f"{server.fhir}/_history", admin, params={"_count": 200}).json()
    assert "AuditEvent" not in {e.get("resource", {}).get("resourceType") for e in history.get("entry", [])}
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": "AuditEvent/audit-1"}}]}
    assert call("POST", server.fhir, admin, json=batch).status_code == 403
    # the auditor reads, and nobody writes
    assert call("GET", f"{server.fhir}/AuditEvent/audit-1", auditor).status_code == 200
    for method, path in (("POST", "AuditEvent"), ("PUT", "AuditEvent/audit-1"), ("DELETE", "AuditEvent/audit-1")):
        body = {"resourceType": "AuditEvent", **({"id": "audit-1"} if method == "PUT" else {})}
        response = call(method, f"{server.fhir}/{path}", admin, json=body if method != "DELETE" else None)
        assert response.status_code == 405, (method, response.status_code)
        assert response.headers["Content-Type"].startswith(FHIR_JSON)
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "AuditEvent"}, "request": {"method": "POST", "url": "AuditEvent"}}]}
    assert call("POST", server.fhir, admin, json=tx).status_code == 405


def _verify(server, auditor) -> dict:
    response = call("GET", f"{server.fhir}/$verify-audit", auditor)
    assert response.status_code == 200, response.text
    return {p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in response.json()["parameter"]}


def test_verify_audit_finds_an_edited_record_and_an_edited_audit_event(server, admin, auditor):
    # records of its own, whatever ran before: answered reads and a refused one
    for _ in range(8):
        call("GET", f"{server.fhir}/Patient/{P1}", admin)
    assert call("GET", f"{server.fhir}/AuditEvent", admin).status_code == 403
    intact = _verify(server, auditor)
    assert intact["valid"] is True and intact["checked"] > 5
    path = server.config["DATA_DIR"] + "/trialtwin.sqlite"
    with sqlite3.connect(path) as db:  # the attacker edits the SQLite file directly
        seq, content = db.execute("SELECT seq, content FROM audit_log WHERE content LIKE '%\"outcome\":\"4\"%' "
                                  "ORDER BY seq LIMIT 1").fetchone()
        db.execute("UPDATE audit_log SET content = ? WHERE seq = ?", (content.replace('"outcome":"4"', '"outcome":"0"'), seq))
    broken = _verify(server, auditor)
    assert broken["valid"] is False and broken["brokenAt"] == seq and "changed" in broken["reason"]
    assert broken["auditEvent"] == {"reference": f"AuditEvent/audit-{seq}"} and broken["checked"] == seq - 1
    with sqlite3.connect(path) as db:  # put it back; now edit the stored AuditEvent resource of an earlier one
        db.execute("UPDATE audit_log SET content = ? WHERE seq = ?", (content, seq))
        text = db.execute("SELECT json FROM resources WHERE type = 'AuditEvent' AND id = 'audit-3'").fetchone()[0]
        db.execute("UPDATE resources SET json = ? WHERE type = 'AuditEvent' AND id = 'audit-3'",
                   (text.replace("HTTP ", "HTTP 2"),))
    broken = _verify(server, auditor)
    assert broken["valid"] is False and broken["brokenAt"] == 3 and "AuditEvent audit-3" in broken["reason"]
    with sqlite3.connect(path) as db:
        db.execute("UPDATE resources SET json = ? WHERE type = 'AuditEvent' AND id = 'audit-3'", (text,))
        row = db.execute("SELECT * FROM audit_log WHERE seq = 7").fetchone()
        db.execute("DELETE FROM audit_log WHERE seq = 7")
    broken = _verify(server, auditor)
    assert broken["valid"] is False and broken["brokenAt"] == 7 and "missing" in broken["reason"]
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO audit_log VALUES (?,?,?,?,?)", row)
    assert _verify(server, auditor)["valid"] is True


def test_bad_input_to_the_trail_is_a_clear_outcome(server, admin, auditor):
    unknown = call("GET", f"{server.fhir}/$verify-audit", auditor, params={"from": "3"})
    assert unknown.status_code == 400 and unknown.json()["resourceType"] == "OperationOutcome"
    not_parameters = call("POST", f"{server.fhir}/$verify-audit", auditor, json={"resourceType": "Patient"})
    assert not_parameters.status_code == 400 and not_parameters.json()["resourceType"] == "OperationOutcome"
    assert call("GET", f"{server.fhir}/Patient/$verify-audit", auditor).status_code in (400, 404)
    # a request id that is not plain is replaced, never stored as sent
    odd = call("GET", f"{server.fhir}/Patient/{P1}", admin, headers={"X-Request-Id": "a b<script>" + "x" * 80})
    assert odd.status_code == 200 and odd.headers["X-Request-Id"] != "a b<script>" + "x" * 80
    assert len(odd.headers["X-Request-Id"]) == 36


@pytest.mark.unit
def test_the_audit_setting_is_checked_at_start_up(tmp_path):
    from fhir_ops.app import create_app
    from tests.app_config import open_config

    with pytest.raises(ValueError, match="AUDIT must be one of"):
        create_app(open_config(DATA_DIR=str(tmp_path), AUDIT="sometimes"))

    class NoJournal:  # a store without an audit journal, as the remote (HAPI) store is
        name = "remote"

    with pytest.raises(ValueError, match="needs a store that keeps an audit journal"):
        create_app(open_config(STORE=NoJournal(), AUDIT="on"))
    app = create_app(open_config(STORE=NoJournal()))  # auto: runs, unaudited, and says so in the log
    assert "trialtwin.audit" not in app.extensions


def test_an_operation_is_coded_by_its_registered_name_an_unknown_one_is_not(server, admin, auditor):
    # AuditEvent.subtype codes an operation in CodeSystem/operation, which lists the registered operations only
    import profiles
    from fhir_ops.mapping.audit_event import OPERATION_SYSTEM

    before = call("GET", f"{server.fhir}/metadata").json()["date"]
    assert call("GET", f"{server.fhir}/Patient/{P1}/$validate", admin,
                headers={"X-Request-Id": "op-known"}).status_code == 200
    assert call("GET", f"{server.fhir}/Patient/{P1}/$no-such-operation", admin,
                headers={"X-Request-Id": "op-unknown"}).status_code == 404
    events = {request_id_of(e): e for e in trail(server, auditor, date=f"ge{before}")}
    codes = {rid: [c["code"] for c in events[rid]["subtype"] if c["system"] == OPERATION_SYSTEM]
             for rid in ("op-known", "op-unknown")}
    assert codes == {"op-known": ["$validate"], "op-unknown": []}
    defined = {c["code"] for c in profiles.load("CodeSystem-operation.json")["concept"]}
    assert "$validate" in defined
    assert [c["code"] for c in events["op-unknown"]["subtype"]] == ["operation"]
