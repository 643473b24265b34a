"""Issue #11, the resource-server findings (3, 4, 5, 7, 9, 11, 12): each reproduced over real HTTP with real
tokens against ``trialtwin serve`` (smart mode, small TT-201 demo), and shown closed.
"""
from __future__ import annotations

import threading

import pytest
import requests

from tests.smart_app.test_fhir_enforcement import P1, P2, call, observation, outcome_id

pytestmark = pytest.mark.api


@pytest.fixture(scope="module")
def p1_cu(combined):
    """The attacker of finding 3: create/update on Observation in p001's compartment, no search."""
    return combined.user_token("patient/Observation.cu", patient=P1)["access_token"]


@pytest.fixture(scope="module")
def p1_all(combined):
    return combined.user_token("patient/*.cruds", patient=P1)["access_token"]


@pytest.fixture(scope="module")
def admin(combined):
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "hardening-admin", "alg": "RS384"})
    return combined.backend_token("system/*.cruds", key)["access_token"]


@pytest.fixture(scope="module")
def p2_obs(combined, admin):
    bundle = call("GET", f"{combined.fhir}/Observation", admin, params={"subject": f"Patient/{P2}", "_count": 1}).json()
    return bundle["entry"][0]["resource"]


def _version(combined, admin, path: str) -> str:
    return call("GET", f"{combined.fhir}/{path}", admin).json()["meta"]["versionId"]


# --- finding 3: conditional create never reveals another patient's resource ---------------------------------

def test_if_none_exist_does_not_reveal_another_patients_resource(combined, p1_cu, p2_obs):
    response = call("POST", f"{combined.fhir}/Observation", p1_cu, json=observation(P1),
                    headers={"If-None-Exist": f"_id={p2_obs['id']}"})
    # as if nothing matched: a new Observation of p001 is created, p003's never comes back
    assert response.status_code == 201, response.text
    assert p2_obs["id"] not in response.text and P2 not in response.text
    assert response.json()["subject"]["reference"] == f"Patient/{P1}"


def test_transaction_if_none_exist_is_no_oracle_on_other_patients_values(combined, p1_cu, p2_obs):
    value = p2_obs["valueQuantity"]["value"] if "valueQuantity" in p2_obs else 1
    answers = []
    for probe in (f"_id={p2_obs['id']}", f"subject=Patient/{P2}", f"value-quantity={value}&subject=Patient/{P2}",
                  f"value-quantity=ne{value}&subject=Patient/{P2}"):
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{
            "fullUrl": "urn:uuid:0b0c5a5e-0000-4000-8000-000000000001", "resource": observation(P1),
            "request": {"method": "POST", "url": "Observation", "ifNoneExist": probe}}]}
        response = call("POST", combined.fhir, p1_cu, json=bundle)
        assert response.status_code == 200, response.text
        assert p2_obs["id"] not in response.text
        answers.append(response.json()["entry"][0]["response"]["status"])
    # every probe creates: the answer says nothing about p002's data
    assert answers == ["201 Created"] * 4


def test_if_none_exist_still_matches_inside_the_compartment(combined, p1_all):
    first = call("POST", f"{combined.fhir}/Observation", p1_all, json={
        **observation(P1), "identifier": [{"system": "urn:test:hardening", "value": "cond-1"}]})
    assert first.status_code == 201
    again = call("POST", f"{combined.fhir}/Observation", p1_all, json=observation(P1),
                 headers={"If-None-Exist": "identifier=urn:test:hardening|cond-1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


# --- finding 4: one parse of each entry URL, for the check and the write ------------------------------------

@pytest.mark.parametrize("url", ["Observation//{id}", "Observation/./{id}", "Observation/../Observation/{id}",
                                 "http://elsewhere.example/fhir/Observation/{id}", "Observation/{id}?x=1",
                                 "Observation/{id}#frag", "Observation/{id}/", " Observation/{id}"])
def test_malformed_transaction_urls_are_refused_naming_the_entry(combined, p1_all, admin, p2_obs, url):
    before = _version(combined, admin, f"Observation/{p2_obs['id']}")
    resource = {**observation(P1), "id": p2_obs["id"]}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": observation(P1), "request": {"method": "POST", "url": "Observation"}},
        {"resource": resource, "request": {"method": "PUT", "url": url.format(id=p2_obs["id"])}}]}
    response = call("POST", combined.fhir, p1_all, json=bundle)
    assert response.status_code == 400, response.text
    assert "Bundle.entry[1]" in response.text
    assert _version(combined, admin, f"Observation/{p2_obs['id']}") == before


def test_absolute_url_on_our_own_base_is_checked_like_a_relative_one(combined, p1_all, admin, p2_obs):
    before = _version(combined, admin, f"Observation/{p2_obs['id']}")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {**observation(P1), "id": p2_obs["id"]},
         "request": {"method": "PUT", "url": f"{combined.fhir}/Observation/{p2_obs['id']}"}}]}
    response = call("POST", combined.fhir, p1_all, json=bundle)
    assert response.status_code == 403 and outcome_id(response) == "bundle-entry-refused"
    assert _version(combined, admin, f"Observation/{p2_obs['id']}") == before
    # and with a system token the same absolute URL writes exactly that resource
    own = call("POST", combined.fhir, admin, json={"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {**p2_obs}, "request": {"method": "PUT", "url": f"{combined.fhir}/Observation/{p2_obs['id']}"}}]})
    assert own.status_code == 200, own.text
    assert own.json()["entry"][0]["response"]["location"].startswith(f"Observation/{p2_obs['id']}/_history/")


# --- finding 5: vread and history check every version ------------------------------------------------------

def test_vread_and_history_check_the_compartment_of_each_version(combined, p1_read_all, admin):
    created = call("POST", f"{combined.fhir}/Observation", admin, json=observation(P2, 9.9)).json()
    moved = call("PUT", f"{combined.fhir}/Observation/{created['id']}", admin,
                 json={**observation(P1, 5.5), "id": created["id"]})
    assert moved.status_code == 200
    old = call("GET", f"{combined.fhir}/Observation/{created['id']}/_history/1", p1_read_all)
    assert old.status_code == 403 and P2 not in old.text and "9.9" not in old.text
    assert call("GET", f"{combined.fhir}/Observation/{created['id']}/_history/2", p1_read_all).status_code == 200
    history = call("GET", f"{combined.fhir}/Observation/{created['id']}/_history", p1_read_all)
    assert history.status_code == 200 and P2 not in history.text
    assert [e["resource"]["meta"]["versionId"] for e in history.json()["entry"]] == ["2"]


@pytest.fixture(scope="module")
def p1_read_all(combined):
    return combined.user_token("patient/*.rs", patient=P1)["access_token"]


# --- finding 11: Groups and counts ----------------------------------------------------------------------------

def test_group_members_and_counts_are_limited_to_the_compartment(combined, admin, p1_read_all):
    members = [{"entity": {"reference": f"Patient/{p}"}} for p in (P1, P2, "tt201-p003")]
    for i in range(3):
        group = {"resourceType": "Group", "type": "person", "actual": True, "quantity": 3, "name": f"arm {i}",
                 "member": members if i == 0 else members[1:]}
        assert call("POST", f"{combined.fhir}/Group", admin, json=group).status_code == 201
    seen = call("GET", f"{combined.fhir}/Group", p1_read_all, params={"name": "arm"})
    assert seen.status_code == 200, seen.text
    entries = seen.json().get("entry", [])
    assert len(entries) == 1 and seen.json()["total"] == 1
    assert P2 not in seen.text and "tt201-p003" not in seen.text
    assert entries[0]["resource"]["member"] == [{"entity": {"reference": f"Patient/{P1}"}}]
    assert "quantity" not in entries[0]["resource"]
    count = call("GET", f"{combined.fhir}/Group", p1_read_all, params={"name": "arm", "_summary": "count"})
    assert count.json()["total"] == 1
    direct = call("GET", f"{combined.fhir}/Group/{entries[0]['resource']['id']}", p1_read_all)
    assert direct.status_code == 200 and P2 not in direct.text


# --- finding 12: empty answers carry no HTML content type -----------------------------------------------------

def test_empty_answers_have_no_html_content_type(combined, admin):
    created = call("POST", f"{combined.fhir}/Observation", admin, json=observation(P1)).json()
    deleted = call("DELETE", f"{combined.fhir}/Observation/{created['id']}", admin)
    assert deleted.status_code == 204 and "text/html" not in deleted.headers.get("Content-Type", "")
    options = requests.options(f"{combined.fhir}/Observation", timeout=10)
    assert "text/html" not in options.headers.get("Content-Type", "")
    minimal = call("POST", f"{combined.fhir}/Observation", admin, json=observation(P1),
                   headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and "text/html" not in minimal.headers.get("Content-Type", "")


# --- findings 7 and 9: bounded parsers, 4xx for bad input ------------------------------------------------------

def _deep(levels: int) -> str:
    return '{"resourceType":"Observation","extension":' + "[" * levels + "]" * levels + "}"


BAD_INPUTS = [
    ("POST", "Observation", {"data": _deep(900)}),
    ("POST", "", {"data": _deep(5000)}),
    ("POST", "Patient/$validate", {"data": _deep(2000)}),
    ("GET", "Observation?_offset=9223372036854775808", {}),
    ("GET", "Observation?code=" + ",".join(f"c{i}" for i in range(1200)), {}),
    ("GET", "CodeSystem/$lookup?system=http://unitsofmeasure.org&code=10*20000000", {}),
    ("GET", "CodeSystem/$lookup?system=http://unitsofmeasure.org&code=" + "(" * 3000 + "g" + ")" * 3000, {}),
    ("GET", "CodeSystem/$lookup?system=http://unitsofmeasure.org&code=" + "1" * 5000, {}),
    ("POST", "ConceptMap/$import-map", {"json": {"resourceType": "Parameters", "parameter": [
        {"name": "conceptMap", "resource": {"resourceType": "ConceptMap", "status": "draft", "url": "https://x.example/cm",
                                            "version": "1", "group": "x"}}]}}),
    ("POST", "", {"json": {"resourceType": "Bundle", "type": "transaction", "entry": [1]}}),
    ("POST", "", {"json": {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": "x"}]}}),
    ("POST", "", {"json": {"resourceType": "Bundle", "type": "batch", "entry": {"a": 1}}}),
    ("POST", "", {"json": {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": "Observation", "request": {"method": "POST", "url": "Observation"}}]}}),
    ("POST", f"Patient/{P1}/$validate", {"json": {"resourceType": "Parameters", "parameter": 5}}),
    ("POST", f"Patient/{P1}/$simulate", {"json": {"resourceType": "Parameters", "parameter": 5}}),
    ("POST", f"Patient/{P1}/$predict-dropout", {"json": {"resourceType": "Parameters", "parameter": [5, "x"]}}),
    ("POST", "", {"json": {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": "Observation", "request": {"method": "PUT", "url": "Observation/x1", "ifNoneExist": 5}}]}}),
    ("POST", "Observation", {"json": {"resourceType": ["Observation"]}}),
    ("PUT", "Observation/x1", {"json": {"resourceType": ["Observation"], "id": "x1"}}),
]


@pytest.mark.parametrize("who", ["system", "patient"])
@pytest.mark.parametrize("method,path,kw", BAD_INPUTS, ids=lambda v: str(v)[:40] if isinstance(v, str) else None)
def test_bad_input_is_a_4xx_operation_outcome(combined, admin, p1_all, who, method, path, kw):
    kw = dict(kw)
    headers = {"Content-Type": "application/fhir+json"} if "data" in kw else {}
    url = f"{combined.fhir}/{path}" if path else combined.fhir
    response = call(method, url, admin if who == "system" else p1_all, headers=headers, **kw)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.json()["resourceType"] == "OperationOutcome"


def test_validate_code_answers_a_unit_bomb_with_its_bound(combined, admin):
    response = call("GET", f"{combined.fhir}/CodeSystem/$validate-code", admin,
                    params={"system": "http://unitsofmeasure.org", "code": "10*400000"})
    assert response.status_code == 200
    params = {p["name"]: p for p in response.json()["parameter"]}
    assert params["result"]["valueBoolean"] is False and "beyond" in params["message"]["valueString"]


def test_an_observation_with_a_unit_bomb_is_refused_or_stored_unconverted(combined, admin):
    obs = observation(P1)
    obs["valueQuantity"] = {"value": 1, "unit": "x", "system": "http://unitsofmeasure.org", "code": "10*400"}
    response = call("POST", f"{combined.fhir}/Observation", admin, json=obs)
    assert response.status_code < 500, response.text


def test_inference_refuses_a_400_digit_feature(combined, admin):
    models = call("GET", f"{combined.base}/inference/models", admin).json()["models"]
    name = models[0]["name"] if isinstance(models[0], dict) else models[0]
    response = requests.post(f"{combined.base}/inference/predict/{name}", data='{"rows": [[' + "9" * 400 + "]]}",
                             headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
                             timeout=30)
    assert 400 <= response.status_code < 500, response.text


def test_sort_by_date_descending_uses_the_per_resource_index(combined, admin):
    response = call("GET", f"{combined.fhir}/Observation", admin, params={"_sort": "-date", "_count": 10})
    assert response.status_code == 200
    dates = [e["resource"].get("effectiveDateTime") for e in response.json()["entry"]]
    assert dates == sorted(dates, reverse=True)
    from fhir_ops.search.query import compile_search

    # the plan the issue measured at 103 s: now each sort key is one (rid, param) index lookup
    assert "INDEXED BY idx_date_r" in compile_search("Observation", [("_sort", "-date")]).order_by


def test_a_pathological_request_is_bounded_while_another_is_answered(combined, admin):
    """Two requests at once: the unit bomb is refused by its bound (4xx); a normal read is answered meanwhile."""
    answers: dict = {}

    def bomb():
        answers["bomb"] = call("GET", f"{combined.fhir}/CodeSystem/$lookup", admin, params={
            "system": "http://unitsofmeasure.org", "code": "10*20000000"})

    thread = threading.Thread(target=bomb)
    thread.start()
    normal = call("GET", f"{combined.fhir}/Patient/{P1}", admin)
    thread.join(timeout=120)
    assert normal.status_code == 200
    assert not thread.is_alive() and 400 <= answers["bomb"].status_code < 500


def test_the_request_time_budget_interrupts_store_work(tmp_path):
    """A store query past the budget is interrupted (503, nothing written); a cheap one is not.

    The budget here is a microsecond, so whether a statement is interrupted depends only on whether
    SQLite reaches its progress callback (every 10,000 VM steps), not on the machine's speed.
    """
    from fhir_ops.app import create_app
    from tests.app_config import open_config
    from tests.live_server import serve

    app = create_app(open_config(DATA_DIR=str(tmp_path), REQUEST_TIME_BUDGET=1e-6))
    store = app.extensions["trialtwin.store"]
    ids = [store.create(observation(P1, float(i))).resource["id"] for i in range(300)]
    with serve(app) as base:
        heavy = call("GET", f"{base}/fhir/Observation", params={"_sort": "-date,value-quantity", "_count": 1000,
                                                                "value-quantity": "ne5"})
        assert heavy.status_code == 503 and outcome_id(heavy) == "request-budget-exceeded"
        assert heavy.headers.get("Retry-After") == "1"
        light = call("GET", f"{base}/fhir/Observation/{ids[0]}")
        assert light.status_code == 200
    store.close()
