"""Wire-level tests of the FHIR REST interactions against a real server on loopback."""
from __future__ import annotations

import json

import pytest

from tests.fhir_ops.conftest import error_id

pytestmark = pytest.mark.api


def patient(family="Doe", **extra):
    return {"resourceType": "Patient", "name": [{"family": family, "given": ["Jane"]}], "gender": "female",
            "birthDate": "1970-05-01", **extra}


def test_create_read_update_delete_cycle(fhir):
    created = fhir.post("Patient", patient())
    assert created.status_code == 201
    body = created.json()
    pid = body["id"]
    assert body["meta"]["versionId"] == "1"
    assert created.headers["Location"] == f"{fhir.base}/Patient/{pid}/_history/1"
    assert created.headers["ETag"] == 'W/"1"'
    assert created.headers["Last-Modified"].endswith("GMT")

    read = fhir.get(f"Patient/{pid}")
    assert read.status_code == 200 and read.json()["name"][0]["family"] == "Doe"
    assert read.headers["ETag"] == 'W/"1"'

    changed = {**read.json(), "gender": "other"}
    updated = fhir.put(f"Patient/{pid}", changed)
    assert updated.status_code == 200
    assert updated.json()["meta"]["versionId"] == "2"
    assert fhir.get(f"Patient/{pid}").json()["gender"] == "other"

    old = fhir.get(f"Patient/{pid}/_history/1")
    assert old.status_code == 200 and old.json()["gender"] == "female"
    assert fhir.get(f"Patient/{pid}/_history/9").status_code == 404

    assert fhir.delete(f"Patient/{pid}").status_code == 204
    gone = fhir.get(f"Patient/{pid}")
    assert gone.status_code == 410 and error_id(gone) == "deleted"
    assert fhir.get(f"Patient/{pid}/_history/3").status_code == 410
    # earlier versions stay readable after the delete
    assert fhir.get(f"Patient/{pid}/_history/2").json()["gender"] == "other"

    history = fhir.get(f"Patient/{pid}/_history").json()
    assert history["type"] == "history" and history["total"] == 3
    methods = [e["request"]["method"] for e in history["entry"]]
    assert methods == ["DELETE", "PUT", "POST"]
    assert "resource" not in history["entry"][0]
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"][1:]] == ["2", "1"]


def test_type_history_lists_versions_of_all_instances(fhir):
    a = fhir.post("Patient", patient("A")).json()
    fhir.post("Patient", patient("B"))
    fhir.put(f"Patient/{a['id']}", {**a, "gender": "male"})
    bundle = fhir.get("Patient/_history").json()
    assert bundle["total"] == 3
    page = fhir.get("Patient/_history?_count=2").json()
    assert page["total"] == 3 and len(page["entry"]) == 2  # the total counts every version, not the page


def _walk_history(fhir, url):
    """Follow next links from ``url``; return (every page's total, every entry's type/id/version)."""
    totals, seen = [], []
    while url:
        page = fhir.get(url).json()
        assert page["type"] == "history"
        totals.append(page["total"])
        seen += [(e["fullUrl"].rsplit("/", 2)[-2], e["fullUrl"].rsplit("/", 1)[-1],
                  e["response"]["etag"]) for e in page.get("entry", [])]
        links = {link["relation"]: link["url"] for link in page["link"]}
        assert links["self"].startswith(fhir.base)
        url = links.get("next")
    return totals, seen


@pytest.mark.parametrize("level", ["system", "type", "instance"])
def test_history_pages_with_next_links_and_the_full_total(fhir, level):
    # HAPI's client and fhirpy page with _count and follow next; 12 versions must come back in 3 pages.
    a = fhir.post("Patient", patient("A")).json()
    for gender in ("male", "female", "other", "unknown", "male", "female", "other"):
        fhir.put(f"Patient/{a['id']}", {**a, "gender": gender})
    fhir.post("Patient", patient("B"))
    obs = fhir.post("Observation", {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}).json()
    fhir.put(f"Observation/{obs['id']}", {**obs, "status": "amended"})
    fhir.delete(f"Observation/{obs['id']}")
    expected = {"system": 12, "type": 9, "instance": 8}[level]
    path = {"system": "_history", "type": "Patient/_history", "instance": f"Patient/{a['id']}/_history"}[level]
    totals, seen = _walk_history(fhir, f"{path}?_count=5")
    assert totals == [expected] * -(-expected // 5)  # every page says the full total
    assert len(seen) == len(set(seen)) == expected  # no version repeated or skipped across pages
    everything = fhir.get(path).json()
    assert [(e["fullUrl"].rsplit("/", 2)[-2], e["fullUrl"].rsplit("/", 1)[-1], e["response"]["etag"])
            for e in everything["entry"]] == seen  # paging keeps the newest-first order
    last = fhir.get(f"{path}?_count=5&_offset=10").json()
    assert {link["relation"] for link in last["link"]} >= {"self", "first", "previous", "last"}
    assert "next" not in {link["relation"] for link in last["link"]} or expected > 15


def test_history_without_count_is_one_default_page_not_every_version(fhir):
    from fhir_ops.search.query import DEFAULT_COUNT, MAX_COUNT

    a = fhir.post("Patient", patient("A")).json()
    for i in range(DEFAULT_COUNT + 4):
        fhir.put(f"Patient/{a['id']}", {**a, "gender": ("male", "female")[i % 2]})
    page = fhir.get(f"Patient/{a['id']}/_history").json()
    assert page["total"] == DEFAULT_COUNT + 5 and len(page["entry"]) == DEFAULT_COUNT
    assert any(link["relation"] == "next" for link in page["link"])
    huge = fhir.get(f"Patient/{a['id']}/_history?_count={MAX_COUNT * 10}").json()
    assert len(huge["entry"]) == DEFAULT_COUNT + 5  # capped at MAX_COUNT, and here all fit


@pytest.mark.parametrize("query", ["_count=-1", "_offset=-5", "_offset=x"])
def test_history_paging_parameters_are_checked(fhir, query):
    bad = fhir.get(f"_history?{query}")
    assert bad.status_code == 400 and error_id(bad) == "invalid-search-value"


def test_update_creates_a_new_id_and_deleted_resource_can_come_back(fhir):
    resp = fhir.put("Patient/site-1-p001", patient(id="site-1-p001"))
    assert resp.status_code == 201 and resp.json()["id"] == "site-1-p001"
    fhir.delete("Patient/site-1-p001")
    back = fhir.put("Patient/site-1-p001", patient(id="site-1-p001"))
    assert back.status_code == 201 and back.json()["meta"]["versionId"] == "3"


def test_if_match_guards_against_lost_updates(fhir):
    p = fhir.post("Patient", patient()).json()
    ok = fhir.put(f"Patient/{p['id']}", {**p, "gender": "male"}, headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200 and ok.headers["ETag"] == 'W/"2"'
    stale = fhir.put(f"Patient/{p['id']}", {**p, "gender": "unknown"}, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412 and error_id(stale) == "version-conflict"
    assert fhir.get(f"Patient/{p['id']}").json()["gender"] == "male"
    bare = fhir.put(f"Patient/{p['id']}", {**p, "gender": "unknown"}, headers={"If-Match": "2"})
    assert bare.status_code == 200


def test_if_none_exist_with_zero_one_and_two_matches(fhir):
    ident = {"identifier": [{"system": "urn:trial:TT-201", "value": "S-001"}]}
    first = fhir.post("Patient", patient(**ident), headers={"If-None-Exist": "identifier=urn:trial:TT-201|S-001"})
    assert first.status_code == 201
    again = fhir.post("Patient", patient(**ident), headers={"If-None-Exist": "identifier=urn:trial:TT-201|S-001"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert fhir.get("Patient?_summary=count").json()["total"] == 1
    fhir.post("Patient", patient("Twin", **ident))  # unconditional: now two share the identifier
    ambiguous = fhir.post("Patient", patient(**ident),
                          headers={"If-None-Exist": "identifier=urn:trial:TT-201|S-001"})
    assert ambiguous.status_code == 412 and error_id(ambiguous) == "multiple-matches"
    assert fhir.get("Patient?_summary=count").json()["total"] == 2


@pytest.mark.parametrize("spelling", ["{base}/Patient?identifier=urn:trial:TT-201|S-002",  # HAPI's Java client
                                      "Patient?identifier=urn:trial:TT-201|S-002",
                                      "?identifier=urn:trial:TT-201|S-002"])
def test_if_none_exist_accepts_the_absolute_and_type_qualified_spellings(fhir, spelling):
    ident = {"identifier": [{"system": "urn:trial:TT-201", "value": "S-002"}]}
    header = {"If-None-Exist": spelling.format(base=fhir.base)}
    first = fhir.post("Patient", patient(**ident), headers=header)
    again = fhir.post("Patient", patient(**ident), headers=header)
    assert (first.status_code, again.status_code) == (201, 200) and again.json()["id"] == first.json()["id"]
    assert fhir.get("Patient?_summary=count").json()["total"] == 1


@pytest.mark.parametrize("spelling", ["http://elsewhere.example/fhir/Patient?identifier=a|b",
                                      "{base}/Observation?identifier=a|b", "Observation?identifier=a|b",
                                      "{base}/Patient?"])
def test_if_none_exist_on_another_server_or_type_is_refused(fhir, spelling):
    refused = fhir.post("Patient", patient(), headers={"If-None-Exist": spelling.format(base=fhir.base)})
    assert refused.status_code == 400 and error_id(refused) == "invalid-condition"
    assert fhir.get("Patient?_summary=count").json()["total"] == 0  # nothing written


def test_prefer_return_minimal_and_operation_outcome(fhir):
    minimal = fhir.post("Patient", patient(), headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.content == b"" and "Location" in minimal.headers
    oo = fhir.post("Patient", patient(), headers={"Prefer": "return=OperationOutcome"})
    assert oo.json()["resourceType"] == "OperationOutcome"


def test_transaction_resolves_urn_uuid_references_and_reports_each_entry(fhir):
    resp = fhir.transaction([
        {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", "resource": patient("Urn"),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
         "resource": {"resourceType": "Observation", "status": "final",
                      "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                      "subject": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"},
                      "valueQuantity": {"value": 7.2, "unit": "%", "system": "http://unitsofmeasure.org",
                                        "code": "%"}},
         "request": {"method": "POST", "url": "Observation"}},
    ])
    assert resp.status_code == 200
    bundle = resp.json()
    assert bundle["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in bundle["entry"]]
    assert statuses == ["201 Created", "201 Created"]
    patient_loc = bundle["entry"][0]["response"]["location"]
    assert bundle["entry"][0]["response"]["etag"] == 'W/"1"'
    pid = patient_loc.split("/")[1]
    obs_id = bundle["entry"][1]["response"]["location"].split("/")[1]
    obs = fhir.get(f"Observation/{obs_id}").json()
    assert obs["subject"]["reference"] == f"Patient/{pid}"
    assert fhir.get(f"Observation?subject=Patient/{pid}").json()["total"] == 1


def test_transaction_with_one_invalid_entry_stores_nothing(fhir):
    entries = [{"resource": patient(f"P{i}"), "request": {"method": "POST", "url": "Patient"}} for i in range(5)]
    entries[3] = {"resource": patient("Bad", birthDate="1970-02-30"), "request": {"method": "POST", "url": "Patient"}}
    resp = fhir.transaction(entries)
    assert resp.status_code == 400
    outcome = resp.json()
    assert error_id(resp) == "invalid-resource"
    assert outcome["issue"][0]["expression"][0] == "Bundle.entry[3]"
    assert "Bundle.entry[3].resource.birthDate" in outcome["issue"][0]["expression"]
    assert fhir.get("Patient?_summary=count").json()["total"] == 0


def test_transaction_rolls_back_when_a_later_entry_fails_at_run_time(fhir):
    p = fhir.post("Patient", patient()).json()
    resp = fhir.transaction([
        {"resource": patient("New"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**p, "gender": "male"}, "request": {"method": "PUT", "url": f"Patient/{p['id']}",
                                                          "ifMatch": 'W/"7"'}},
    ])
    assert resp.status_code == 412
    assert resp.json()["issue"][0]["expression"][0] == "Bundle.entry[1]"
    assert fhir.get("Patient?_summary=count").json()["total"] == 1
    assert fhir.get(f"Patient/{p['id']}").json()["gender"] == "female"


def test_transaction_conditional_create_reuses_existing_resource(fhir):
    ident = {"identifier": [{"system": "urn:site", "value": "X1"}]}
    existing = fhir.post("Patient", patient(**ident)).json()
    resp = fhir.transaction([
        {"fullUrl": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", "resource": patient(**ident),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:site|X1"}},
        {"resource": {"resourceType": "ResearchSubject", "status": "on-study",
                      "study": {"reference": "ResearchStudy/tt-201"},
                      "individual": {"reference": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"}},
         "request": {"method": "POST", "url": "ResearchSubject"}},
    ])
    assert resp.status_code == 200, resp.text
    entries = resp.json()["entry"]
    assert entries[0]["response"]["status"] == "200 OK"
    subj = fhir.get(f"ResearchSubject?individual={existing['id']}").json()
    assert subj["total"] == 1


def test_transaction_processes_deletes_before_creates(fhir):
    p = fhir.post("Patient", patient()).json()
    resp = fhir.transaction([
        {"resource": patient("After"), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": f"Patient/{p['id']}/_history/1"}},
        {"request": {"method": "DELETE", "url": f"Patient/{p['id']}"}},
    ])
    assert resp.status_code == 200
    statuses = [e["response"]["status"] for e in resp.json()["entry"]]
    assert statuses == ["201 Created", "200 OK", "204 No Content"]
    assert fhir.get(f"Patient/{p['id']}").status_code == 410


def test_batch_reports_failures_per_entry(fhir):
    resp = fhir.post("", {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient("Good"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": patient("Bad", birthDate="not-a-date"), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
    ]})
    assert resp.status_code == 200
    entries = resp.json()["entry"]
    assert resp.json()["type"] == "batch-response"
    assert entries[0]["response"]["status"] == "201 Created"
    assert entries[1]["response"]["status"] == "400 Bad Request"
    assert entries[1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert entries[2]["response"]["status"] == "404 Not Found"
    assert fhir.get("Patient?_summary=count").json()["total"] == 1


# -- bad input: each answered with a specific OperationOutcome ------------------------------------
def test_malformed_json_is_400(fhir):
    resp = fhir.post("Patient", b'{"resourceType": "Patient",')
    assert resp.status_code == 400 and error_id(resp) == "malformed-json"


def test_body_type_differs_from_url_is_400(fhir):
    resp = fhir.post("Observation", patient())
    assert resp.status_code == 400 and error_id(resp) == "type-mismatch"
    p = fhir.post("Patient", patient()).json()
    wrong_id = fhir.put(f"Patient/{p['id']}", {**p, "id": "other"})
    assert wrong_id.status_code == 400 and error_id(wrong_id) == "id-mismatch"


def test_unknown_element_is_400_with_its_path(fhir):
    resp = fhir.post("Patient", patient(favouriteColour="blue"))
    assert resp.status_code == 400 and error_id(resp) == "invalid-resource"
    assert resp.json()["issue"][0]["expression"] == ["Patient.favouriteColour"]
    nested = fhir.post("Patient", {"resourceType": "Patient", "name": [{"family": "X", "nickname": "Y"}]})
    assert nested.json()["issue"][0]["expression"] == ["Patient.name[0].nickname"]


def test_invalid_date_is_400_with_its_path(fhir):
    resp = fhir.post("Patient", patient(birthDate="1970-13-45"))
    assert resp.status_code == 400 and error_id(resp) == "invalid-resource"
    assert resp.json()["issue"][0]["expression"] == ["Patient.birthDate"]


def test_unknown_search_parameter_ignored_unless_strict(fhir):
    lenient = fhir.get("Patient?shoe-size=44")
    assert lenient.status_code == 200
    bundle = lenient.json()
    outcome = [e for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"]
    assert outcome and "shoe-size" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    assert "shoe-size" not in bundle["link"][0]["url"]
    strict = fhir.get("Patient?shoe-size=44", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400 and error_id(strict) == "unknown-search-parameter"


def test_unsupported_media_type_is_415(fhir):
    xml = fhir.post("Patient", b"<Patient xmlns='http://hl7.org/fhir'/>", headers={"Content-Type": "application/fhir+xml"})
    assert xml.status_code == 415 and error_id(xml) == "unsupported-media-type"
    text = fhir.post("Patient", json.dumps(patient()), headers={"Content-Type": "text/plain"})
    assert text.status_code == 415
    plain_json = fhir.post("Patient", json.dumps(patient()), headers={"Content-Type": "application/json"})
    assert plain_json.status_code == 201


def test_oversized_body_is_413(fhir):
    big = patient(name=[{"family": "x" * (2 * 1024 * 1024)}])
    resp = fhir.post("Patient", big)
    assert resp.status_code == 413 and error_id(resp) == "payload-too-large"


def test_unknown_resource_type_is_404(fhir):
    for resp in (fhir.get("Spaceship/1"), fhir.get("Spaceship?name=x"),
                 fhir.post("Spaceship", {"resourceType": "Spaceship"})):
        assert resp.status_code == 404 and error_id(resp) == "unknown-resource-type"
    datatype = fhir.post("HumanName", {"resourceType": "HumanName"})
    assert datatype.status_code == 404


def test_unknown_id_404_and_deleted_410(fhir):
    missing = fhir.get("Patient/no-such-patient")
    assert missing.status_code == 404 and error_id(missing) == "unknown-id"
    p = fhir.post("Patient", patient()).json()
    fhir.delete(f"Patient/{p['id']}")
    gone = fhir.get(f"Patient/{p['id']}")
    assert gone.status_code == 410 and error_id(gone) == "deleted"


def test_unknown_route_wrong_method_and_format_are_operation_outcomes(fhir):
    nowhere = fhir.get(f"{fhir.base.rsplit('/fhir', 1)[0]}/not-fhir/at/all")
    assert nowhere.status_code == 404 and error_id(nowhere) == "unknown-route"
    wrong = fhir.http.patch(fhir.url("Patient/1"), json={}, timeout=10)
    assert wrong.status_code == 405 and error_id(wrong) == "method-not-allowed" and "PUT" in wrong.headers["Allow"]
    xml = fhir.get("metadata?_format=xml")
    assert xml.status_code == 406 and error_id(xml) == "not-acceptable"
    assert fhir.get("metadata?_format=json").status_code == 200


def test_operation_segments_route_to_the_operation_registry(fhir):
    from fhir_ops.rest import _operations_module

    resp = fhir.post("Patient/123/$simulate", {"resourceType": "Parameters"})
    if _operations_module() is None:
        assert resp.status_code == 404 and error_id(resp) == "unknown-operation"
    else:  # h-ops' registry is present: it answers (an unknown operation is its 404, never our read)
        assert resp.status_code != 405
    unknown = fhir.get("$no-such-operation")
    assert unknown.status_code == 404


def test_capability_statement_lists_types_interactions_and_search_params(fhir):
    cap = fhir.get("metadata").json()
    assert cap["resourceType"] == "CapabilityStatement" and cap["fhirVersion"] == "4.0.1"
    assert "json" in cap["format"]
    by_type = {r["type"]: r for r in cap["rest"][0]["resource"]}
    assert len(by_type) > 140  # every R4B resource type
    obs = by_type["Observation"]
    assert {i["code"] for i in obs["interaction"]} == {"read", "vread", "update", "delete", "history-instance",
                                                       "history-type", "create", "search-type"}
    params = {p["name"]: p["type"] for p in obs["searchParam"]}
    assert params["code"] == "token" and params["subject"] == "reference" and params["date"] == "date"
    assert "_lastUpdated" in params
    assert "Observation:subject" in by_type["Patient"]["searchRevInclude"]
    assert {i["code"] for i in cap["rest"][0]["interaction"]} == {"transaction", "batch"}


def test_concurrent_writers_lose_nothing(fhir):
    from concurrent.futures import ThreadPoolExecutor

    target = fhir.post("Patient", patient("Shared")).json()

    def work(n):
        import requests

        s = requests.Session()
        created = [s.post(fhir.url("Patient"), json=patient(f"T{n}-{i}"),
                          headers={"Content-Type": "application/fhir+json"}, timeout=60).status_code
                   for i in range(10)]
        updated = [s.put(fhir.url(f"Patient/{target['id']}"), json={**target, "gender": "male"},
                         headers={"Content-Type": "application/fhir+json"}, timeout=60).status_code
                   for _ in range(5)]
        return created, updated

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(work, range(6)))
    assert all(c == 201 for created, _ in results for c in created)
    assert all(u == 200 for _, updated in results for u in updated)
    assert fhir.get("Patient?_summary=count").json()["total"] == 61
    assert fhir.get(f"Patient/{target['id']}").json()["meta"]["versionId"] == "31"
    assert fhir.get(f"Patient/{target['id']}/_history").json()["total"] == 31


def test_unexpected_failure_is_a_generic_500_outcome(tmp_path, caplog):
    """A store that breaks in an unforeseen way: the client sees a generic OperationOutcome, the log the cause."""
    from fhir_ops.app import create_app
    from fhir_ops.store.sqlite import SQLiteStore
    from tests.live_server import serve

    class BrokenStore(SQLiteStore):
        def read(self, resource_type, resource_id):
            raise RuntimeError("disk controller secret detail")

    store = BrokenStore(tmp_path / "broken.sqlite")
    from tests.app_config import open_config

    app = create_app(open_config(STORE=store))
    with serve(app) as base:
        import requests

        resp = requests.get(f"{base}/fhir/Patient/x", timeout=10)
    store.close()
    assert resp.status_code == 500 and error_id(resp) == "internal-error"
    assert "secret" not in resp.text and "Traceback" not in resp.text
    assert any("secret detail" in (r.exc_text or "") or "secret detail" in str(r.exc_info) for r in caplog.records)


def test_base_url_with_and_without_trailing_slash_takes_bundles_directly(fhir):
    bundle = {"resourceType": "Bundle", "type": "batch",
              "entry": [{"resource": patient(), "request": {"method": "POST", "url": "Patient"}}]}
    for url in (fhir.base, fhir.base + "/"):
        resp = fhir.http.post(url, json=bundle, headers={"Content-Type": "application/fhir+json"},
                              allow_redirects=False, timeout=30)
        assert resp.status_code == 200 and resp.json()["type"] == "batch-response"
    slash = fhir.http.get(fhir.url("Patient/"), allow_redirects=False, timeout=30)
    assert slash.status_code == 200 and slash.json()["type"] == "searchset"
