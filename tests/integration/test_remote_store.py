"""RemoteStore against a live HAPI FHIR JPA server: CRUD, versions, conditional writes, search, Bundles.

Every test writes resources with its own random identifier, so runs can share one HAPI database.
"""
from __future__ import annotations

import uuid

import pytest

from fhir_ops.errors import FhirError, Gone, InvalidRequest, NotFound, PreconditionFailed
from fhir_ops.store.sqlite import DELETED_TAG

pytestmark = pytest.mark.integration

SYSTEM = "https://trialtwin.org/fhir/test-identifier"


def _patient(value: str, **extra) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": value}], **extra}


@pytest.fixture
def tag() -> str:
    return f"t-{uuid.uuid4()}"


def test_create_assigns_id_and_version_and_read_returns_it(remote_store, tag):
    written = remote_store.create(_patient(tag, id="client-chosen", gender="female"))
    assert written.created is True
    stored = written.resource
    assert stored["id"] != "client-chosen"  # create always gets a server-assigned id
    assert stored["meta"]["versionId"] == "1"
    assert "lastUpdated" in stored["meta"]
    read = remote_store.read("Patient", stored["id"])
    assert read["gender"] == "female"
    assert read["identifier"] == [{"system": SYSTEM, "value": tag}]


def test_update_makes_versions_that_vread_and_history_return(remote_store, tag):
    first = remote_store.create(_patient(tag, active=False)).resource
    pid = first["id"]
    second = remote_store.update("Patient", pid, {**first, "active": True})
    assert second.created is False
    assert second.resource["meta"]["versionId"] == "2"
    assert remote_store.vread("Patient", pid, "1")["active"] is False
    assert remote_store.vread("Patient", pid, "2")["active"] is True
    versions = remote_store.history("Patient", pid)
    assert [v["meta"]["versionId"] for v in versions] == ["2", "1"]
    assert [v["meta"]["versionId"] for v in remote_store.history("Patient", pid, count=1)] == ["2"]
    with pytest.raises(NotFound):
        remote_store.vread("Patient", pid, "9")


def test_update_of_a_new_id_creates_it(remote_store, tag):
    written = remote_store.update("Patient", tag, _patient(tag))
    assert written.created is True
    assert remote_store.read("Patient", tag)["id"] == tag


def test_update_rejects_an_id_that_differs_from_the_url(remote_store, tag):
    with pytest.raises(InvalidRequest):
        remote_store.update("Patient", tag, _patient(tag, id="other"))


def test_if_match_accepts_current_version_and_rejects_stale_with_412(remote_store, tag):
    first = remote_store.create(_patient(tag)).resource
    pid = first["id"]
    ok = remote_store.update("Patient", pid, {**first, "active": True}, if_match='W/"1"')
    assert ok.resource["meta"]["versionId"] == "2"
    with pytest.raises(PreconditionFailed) as err:
        remote_store.update("Patient", pid, {**first, "active": False}, if_match="1")
    assert err.value.status == 412
    assert remote_store.read("Patient", pid)["active"] is True  # the stale write changed nothing


def test_if_none_exist_returns_the_match_and_412_when_ambiguous(remote_store, tag):
    first = remote_store.create(_patient(tag))
    again = remote_store.create(_patient(tag, active=True), if_none_exist=f"identifier={SYSTEM}|{tag}")
    assert again.created is False
    assert again.resource["id"] == first.resource["id"]
    assert "active" not in remote_store.read("Patient", first.resource["id"])
    remote_store.create(_patient(tag))  # now two match
    with pytest.raises(PreconditionFailed):
        remote_store.create(_patient(tag), if_none_exist=f"identifier={SYSTEM}|{tag}")


def test_delete_makes_reads_gone_and_leaves_a_deleted_version(remote_store, tag):
    pid = remote_store.create(_patient(tag)).resource["id"]
    remote_store.delete("Patient", pid)
    with pytest.raises(Gone) as err:
        remote_store.read("Patient", pid)
    assert err.value.status == 410
    newest, oldest = remote_store.history("Patient", pid)
    assert newest["meta"]["versionId"] == "2" and DELETED_TAG in newest["meta"]["tag"]
    assert oldest["meta"]["versionId"] == "1" and "tag" not in oldest["meta"]
    assert remote_store.vread("Patient", pid, "1")["id"] == pid
    assert remote_store.search("Patient", [("identifier", f"{SYSTEM}|{tag}")]).total == 0
    remote_store.delete("Patient", pid)  # deleting again is a no-op, as in the embedded store


def test_unknown_ids_are_not_found_and_their_delete_is_a_no_op(remote_store, tag):
    with pytest.raises(NotFound) as err:
        remote_store.read("Patient", tag)
    assert err.value.status == 404 and tag in err.value.message
    remote_store.delete("Patient", tag)


def test_invalid_resource_is_invalid_request_with_server_diagnostics(remote_store, tag):
    with pytest.raises(InvalidRequest) as err:
        remote_store.create(_patient(tag, gender="sometimes"))
    assert err.value.status == 400
    assert "sometimes" in err.value.message  # HAPI's own diagnostics, not a generic text
    assert remote_store.search("Patient", [("identifier", f"{SYSTEM}|{tag}")]).total == 0


def test_search_filters_counts_pages_and_includes(remote_store, tag):
    pids = [remote_store.create(_patient(tag, gender=g)).resource["id"]
            for g in ("male", "female", "female")]
    for pid in pids:
        remote_store.create({"resourceType": "Observation", "status": "final",
                             "identifier": [{"system": SYSTEM, "value": tag}],
                             "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                             "subject": {"reference": f"Patient/{pid}"}})
    by_tag = [("identifier", f"{SYSTEM}|{tag}")]
    assert remote_store.search("Patient", by_tag).total == 3
    females = remote_store.search("Patient", [*by_tag, ("gender", "female")])
    assert females.total == 2 and {m["id"] for m in females.matches} == set(pids[1:])
    page = remote_store.search("Patient", [*by_tag, ("_count", "2"), ("_offset", "2")])
    assert (page.total, len(page.matches), page.offset, page.count) == (3, 1, 2, 2)
    counted = remote_store.search("Patient", [*by_tag, ("_summary", "count")])
    assert counted.total == 3 and counted.matches == []
    with_subjects = remote_store.search("Observation", [*by_tag, ("_include", "Observation:subject")])
    assert len(with_subjects.matches) == 3
    assert {p["id"] for p in with_subjects.included} == set(pids)


def test_unknown_search_parameter_is_ignored_or_rejected_when_strict(remote_store, tag):
    remote_store.create(_patient(tag))
    lenient = remote_store.search("Patient", [("identifier", f"{SYSTEM}|{tag}"), ("shoe-size", "44")])
    assert lenient.total == 1 and lenient.ignored == ["shoe-size"]
    with pytest.raises(InvalidRequest) as err:
        remote_store.search("Patient", [("shoe-size", "44")], strict=True)
    assert "shoe-size" in err.value.message


def test_transaction_rewrites_urn_uuid_references(remote_store, tag):
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": patient_urn, "resource": _patient(tag),
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final",
                      "identifier": [{"system": SYSTEM, "value": tag}],
                      "code": {"text": "HbA1c"}, "subject": {"reference": patient_urn}},
         "request": {"method": "POST", "url": "Observation"}},
    ]}
    response = remote_store.transaction(bundle)
    assert response["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in response["entry"]]
    assert all(s.startswith("201") for s in statuses), statuses
    patient = remote_store.search("Patient", [("identifier", f"{SYSTEM}|{tag}")]).matches[0]
    observation = remote_store.search("Observation", [("identifier", f"{SYSTEM}|{tag}")]).matches[0]
    assert observation["subject"]["reference"] == f"Patient/{patient['id']}"


def test_failed_transaction_leaves_nothing_written(remote_store, tag):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": _patient(tag), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": f"Patient/{tag}-missing"}},
         "request": {"method": "POST", "url": "Observation"}},
    ]}
    with pytest.raises(FhirError) as err:
        remote_store.transaction(bundle)
    assert err.value.status in (400, 404, 409, 422)
    assert remote_store.search("Patient", [("identifier", f"{SYSTEM}|{tag}")]).total == 0


def test_batch_reports_failures_per_entry(remote_store, tag):
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": _patient(tag), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": f"Patient/{tag}-missing"}},
    ]}
    response = remote_store.batch(bundle)
    created, missing = response["entry"]
    assert created["response"]["status"].startswith("201")
    assert missing["response"]["status"].startswith("404")
    assert missing["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert remote_store.search("Patient", [("identifier", f"{SYSTEM}|{tag}")]).total == 1


def test_bundle_of_the_wrong_type_is_refused_before_sending(remote_store):
    with pytest.raises(InvalidRequest):
        remote_store.transaction({"resourceType": "Bundle", "type": "batch", "entry": []})



def test_unknown_type_and_history_of_unknown_id_are_not_found(remote_store, tag):
    with pytest.raises(NotFound):
        remote_store.read("NotAResourceType", tag)
    with pytest.raises(NotFound):
        remote_store.history("Patient", tag)


def test_type_history_lists_versions_of_many_resources_newest_first(remote_store, tag):
    first = remote_store.create(_patient(tag)).resource
    second = remote_store.create(_patient(tag)).resource
    remote_store.update("Patient", first["id"], {**first, "active": True})
    recent = remote_store.history("Patient", count=3)
    assert [(r["id"], r["meta"]["versionId"]) for r in recent] == [
        (first["id"], "2"), (second["id"], "1"), (first["id"], "1")]


def test_concurrent_threads_each_get_their_own_connection_pool(remote_store, tag):
    """The server is threaded: concurrent requests through one RemoteStore must not share a
    requests Session (not documented as thread-safe), and every write must land."""
    from concurrent.futures import ThreadPoolExecutor

    def work(worker: int) -> list[str]:
        ids = []
        for i in range(5):
            created = remote_store.create(_patient(f"{tag}-{worker}-{i}")).resource
            assert remote_store.read("Patient", created["id"])["id"] == created["id"]
            ids.append(created["id"])
        return ids

    with ThreadPoolExecutor(max_workers=6) as pool:
        ids = [i for batch in pool.map(work, range(6)) for i in batch]
    assert len(set(ids)) == 30
    assert len(remote_store._sessions) >= 6  # one pool per worker thread (plus the test's own)
    found = remote_store.search("Patient", [("_id", ",".join(ids)), ("_count", "100")])
    assert sorted(r["id"] for r in found.matches) == sorted(ids)


def test_concurrent_transactions_creating_one_client_id_all_succeed(remote_store, tag):
    """Several writers PUT the same new id at once (the demo's shared model Library does under pytest -n):
    HAPI rejects all but one with 409 HAPI-0825 and rolls them back; the store sends them again, so every
    writer succeeds and the resource exists once."""
    from concurrent.futures import ThreadPoolExecutor

    shared = f"{tag[:40]}-shared"

    def work(worker: int) -> dict:
        own = _patient(f"{tag}-{worker}", id=f"{tag[:40]}-{worker}")
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": _patient(f"{tag}-shared", id=shared), "request": {"method": "PUT", "url": f"Patient/{shared}"}},
            {"resource": own, "request": {"method": "PUT", "url": f"Patient/{own['id']}"}}]}
        return remote_store.transaction(bundle)

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(work, range(6)))
    assert all(a["type"] == "transaction-response" for a in answers)
    found = remote_store.search("Patient", [("identifier", f"{SYSTEM}|{tag}-shared")])
    assert [r["id"] for r in found.matches] == [shared]
    assert len(remote_store.history("Patient", shared)) >= 1
