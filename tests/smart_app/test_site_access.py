"""Site-level access (issue #19, item 5 / acceptance 5), as a matrix over every path into the data.

Dr. Okafor (fhirUser Practitioner/dr-okafor) holds a PractitionerRole at site A only; Dr. Chen monitors the
study. With the same broad scopes (``user/*.cruds``), Okafor gets nothing of a site-B participant through
read, vread, search, _include/_revinclude, history, batch/transaction, conditional writes, operations,
Groups or async job URLs, while each path still answers for site A (so every check could fail); the
monitor sees both sites. Real tokens from the real authorization server over HTTP.
"""
from __future__ import annotations

import pytest
from joserfc.jwk import RSAKey

from tests.smart_app.conftest import combined_server
from tests.smart_app.helpers import UserAgent
from tests.smart_app.test_compartment_probe import COMPARTMENT_SEARCHES, Probe
from tests.smart_app.test_fhir_enforcement import call, observation

pytestmark = pytest.mark.api


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from combined_server(tmp_path_factory)


def _user_token(server, username: str, scope: str, patient: str | None = None) -> str:
    client = server.stack.register_public_app(scope=f"launch/patient openid fhirUser {scope}")
    wanted = f"{'launch/patient ' if patient else ''}openid fhirUser {scope}"
    query, verifier = server.stack.authorize(UserAgent(username), client["client_id"], wanted, patient=patient)
    response = server.stack.exchange(client["client_id"], query["code"], verifier)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


@pytest.fixture(scope="module")
def world(server):
    """Tokens, and two participants at different sites, with Okafor's role moved to A's site."""
    key = RSAKey.generate_key(2048, parameters={"kid": "site-admin", "alg": "RS384"})
    admin = server.backend_token("system/*.cruds", key)["access_token"]
    patients = [e["resource"] for e in call("GET", f"{server.fhir}/Patient", admin, params={"_count": 100}).json()["entry"]]
    site_of = {p["id"]: p["managingOrganization"]["reference"] for p in patients}
    a = patients[0]["id"]
    b = next(p for p, org in site_of.items() if org != site_of[a])
    role = call("GET", f"{server.fhir}/PractitionerRole/tt201-role-dr-okafor", admin).json()
    role["organization"] = {"reference": site_of[a]}
    role.pop("location", None)
    assert call("PUT", f"{server.fhir}/PractitionerRole/tt201-role-dr-okafor", admin, json=role).status_code == 200
    return {"admin": admin, "a": a, "b": b, "site_of": site_of,
            "okafor": _user_token(server, "dr.okafor", "user/*.cruds"),
            "chen": _user_token(server, "dr.chen", "user/*.rs")}


def _compartment(server, admin, patient: str) -> dict[tuple[str, str], str]:
    out = {("Patient", patient): "1"}
    for rtype, param in COMPARTMENT_SEARCHES.items():
        bundle = call("GET", f"{server.fhir}/{rtype}", admin, params={param: f"Patient/{patient}", "_count": 1000}).json()
        out.update({(rtype, e["resource"]["id"]): e["resource"]["meta"]["versionId"] for e in bundle.get("entry", [])})
    return out


def _ids(response) -> set[str]:
    body = response.json()
    out = set()
    for e in body.get("entry", []):
        res = e.get("resource") or {}
        out.add(f"{res.get('resourceType')}/{res.get('id')}")
        out |= {f"{x['resource']['resourceType']}/{x['resource']['id']}" for x in res.get("entry", []) if "resource" in x}
    return out


def test_a_site_user_gets_nothing_of_another_sites_participants_by_any_path(server, world):
    a, b, admin = world["a"], world["b"], world["admin"]
    theirs, mine = _compartment(server, admin, b), _compartment(server, admin, a)
    secrets = {rid for _, rid in theirs}
    probe = Probe(server, world["okafor"], secrets)
    obs_b = next(rid for t, rid in theirs if t == "Observation")
    obs_a = next(rid for t, rid in mine if t == "Observation")
    base = server.fhir

    # read, vread, instance history: every resource of B refused; A's answered
    for rtype, rid in theirs:
        assert probe("GET", f"{rtype}/{rid}").status_code == 403, (rtype, rid)
    assert probe("GET", f"Observation/{obs_b}/_history/1").status_code == 403
    assert probe("GET", f"Observation/{obs_b}/_history").status_code == 403
    assert probe("GET", f"Patient/{a}").status_code == 200
    assert probe("GET", f"Observation/{obs_a}/_history/1").status_code == 200
    assert probe("GET", f"Observation/{obs_a}/_history").status_code == 200
    # type and system history span every site
    assert probe("GET", "Observation/_history").status_code == 403
    assert probe("GET", "_history").status_code == 403

    # search: aimed at B (nothing), broad (only A's site), counts that equal the site's own
    for rtype, param in COMPARTMENT_SEARCHES.items():
        aimed = probe("GET", rtype, params={param: f"Patient/{b}"})
        assert aimed.status_code == 200 and not aimed.json().get("entry"), rtype
        probe("POST", f"{rtype}/_search", data={param: f"Patient/{b}"},
              headers={"Content-Type": "application/x-www-form-urlencoded"})
    site_a = sorted(p for p, org in world["site_of"].items() if org == world["site_of"][a])
    every = probe("GET", "Patient", params={"_count": 1000})
    assert sorted(e["resource"]["id"] for e in every.json()["entry"]) == site_a
    counted = probe("GET", "Observation", params={"_summary": "count"}).json()["total"]
    expected = call("GET", f"{base}/Observation", admin, params={"subject": ",".join(f"Patient/{p}" for p in site_a),
                                                                   "_summary": "count"}).json()["total"]
    assert counted == expected > 0
    probe("GET", "Observation", params={"_id": obs_b})
    # _include / _revinclude
    included = probe("GET", "Observation", params={"_include": "Observation:subject", "_count": 1000})
    assert f"Patient/{a}" in _ids(included)
    probe("GET", "Observation", params={"_include": "*", "_revinclude": "*", "_count": 1000})
    rev = probe("GET", "Patient", params={"_revinclude": "Observation:subject", "_count": 1000})
    assert f"Observation/{obs_a}" in _ids(rev)
    study = probe("GET", "ResearchStudy", params={"_revinclude": "ResearchSubject:study"})
    assert any(i.startswith("ResearchSubject/") for i in _ids(study))
    probe("GET", "ResearchSubject", params={"_include": "ResearchSubject:individual"})

    # batch and transaction: reads, searches and writes of B's data
    for kind in ("batch", "transaction"):
        for entry in ({"request": {"method": "GET", "url": f"Observation/{obs_b}"}},
                      {"request": {"method": "GET", "url": f"Patient/{b}"}},
                      {"request": {"method": "DELETE", "url": f"Observation/{obs_b}"}},
                      {"request": {"method": "PUT", "url": f"Observation/{obs_b}"}, "resource": {**observation(a), "id": obs_b}},
                      {"request": {"method": "POST", "url": "Observation"}, "resource": observation(b)}):
            assert probe("POST", "", json={"resourceType": "Bundle", "type": kind, "entry": [entry]}).status_code == 403
        searched = probe("POST", "", json={"resourceType": "Bundle", "type": kind, "entry": [
            {"request": {"method": "GET", "url": f"Observation?subject=Patient/{b}"}},
            {"request": {"method": "GET", "url": f"Observation?subject=Patient/{a}"}}]})
        assert searched.status_code == 200 and f"Observation/{obs_a}" in _ids(searched), kind
    # single writes into B's compartment, and conditional creates aimed at B's data
    assert probe("POST", "Observation", json=observation(b)).status_code == 403
    assert probe("PUT", f"Observation/{obs_b}", json={**observation(a), "id": obs_b}).status_code == 403
    assert probe("DELETE", f"Observation/{obs_b}").status_code == 403
    conditional = probe("POST", "Observation", json=observation(a), headers={"If-None-Exist": f"_id={obs_b}"})
    assert conditional.status_code == 201  # nothing matched at A's site: a new resource, B's not revealed
    assert probe("POST", "Observation", json=observation(a)).status_code == 201

    # operations: on B refused, on A answered, cohort operations need a study-wide role
    for op in ("$simulate", "$predict-dropout", "$calibrate"):
        assert probe("POST", f"Patient/{b}/{op}", json={"resourceType": "Parameters", "parameter": []}).status_code == 403
    assert probe("GET", f"Observation/{obs_b}/$validate").status_code == 403
    assert probe("GET", f"Patient/{a}/$validate").status_code == 200
    assert probe("POST", f"Patient/{a}/$simulate", json={"resourceType": "Parameters", "parameter": []}).status_code == 200
    for op in ("$simulate", "$forecast-enrollment", "$fit-population", "$train-model"):
        assert probe("POST", f"ResearchStudy/tt-201/{op}",
                     json={"resourceType": "Parameters", "parameter": []}).status_code == 403
    # a Group of both sites: its B member and its size are cut
    group = call("POST", f"{base}/Group", admin, json={
        "resourceType": "Group", "type": "person", "actual": True, "quantity": 2,
        "member": [{"entity": {"reference": f"Patient/{a}"}}, {"entity": {"reference": f"Patient/{b}"}}]}).json()
    seen = probe("GET", f"Group/{group['id']}").json()
    assert seen["member"] == [{"entity": {"reference": f"Patient/{a}"}}] and "quantity" not in seen
    assert probe("POST", f"Group/{group['id']}/$simulate", json={"resourceType": "Parameters", "parameter": []}).status_code == 403

    # async job URLs: the monitor's job about B is not Okafor's to poll or cancel
    job = call("POST", f"{base}/Patient/{b}/$validate", world["chen"], json={"resourceType": "Parameters", "parameter": []},
               headers={"Prefer": "respond-async"})
    assert job.status_code == 202, job.text
    url = job.headers["Content-Location"]
    assert probe("GET", url).status_code == 403 and probe("DELETE", url).status_code == 403
    assert probe("POST", f"Patient/{b}/$validate", json={"resourceType": "Parameters", "parameter": []},
                 headers={"Prefer": "respond-async"}).status_code == 403

    assert _compartment(server, admin, b) == theirs, "site B's data changed"
    assert len(probe.answers) > 60


def test_the_monitor_sees_every_site_and_a_user_without_a_role_sees_no_participant(server, world):
    a, b, admin = world["a"], world["b"], world["admin"]
    chen = world["chen"]
    for patient in (a, b):
        assert call("GET", f"{server.fhir}/Patient/{patient}", chen).status_code == 200
    total = call("GET", f"{server.fhir}/Patient", admin, params={"_summary": "count"}).json()["total"]
    assert call("GET", f"{server.fhir}/Patient", chen, params={"_summary": "count"}).json()["total"] == total
    assert call("GET", f"{server.fhir}/Observation/_history", chen, params={"_count": 1}).status_code == 200
    # Okafor's role deactivated: deny by default, no participant at all (the study itself stays visible)
    role = call("GET", f"{server.fhir}/PractitionerRole/tt201-role-dr-okafor", admin).json()
    call("PUT", f"{server.fhir}/PractitionerRole/tt201-role-dr-okafor", admin, json={**role, "active": False})
    try:
        okafor = world["okafor"]
        assert call("GET", f"{server.fhir}/Patient/{a}", okafor).status_code == 403
        assert call("GET", f"{server.fhir}/Patient", okafor, params={"_summary": "count"}).json()["total"] == 0
        assert call("GET", f"{server.fhir}/ResearchStudy/tt-201", okafor).status_code == 200
    finally:
        call("PUT", f"{server.fhir}/PractitionerRole/tt201-role-dr-okafor", admin, json=role)
    assert call("GET", f"{server.fhir}/Patient/{a}", world["okafor"]).status_code == 200


def test_a_patient_launch_of_a_site_user_is_bounded_by_both_compartment_and_site(server, world):
    a, b = world["a"], world["b"]
    mine = _user_token(server, "dr.okafor", "patient/*.rs", patient=a)
    assert call("GET", f"{server.fhir}/Patient/{a}", mine).status_code == 200
    theirs = _user_token(server, "dr.okafor", "patient/*.rs", patient=b)
    assert call("GET", f"{server.fhir}/Patient/{b}", theirs).status_code == 403
    assert not call("GET", f"{server.fhir}/Observation", theirs).json().get("entry")


def test_the_audit_record_of_a_site_users_search_names_the_patients_asked_for_not_the_whole_site(server, world):
    a, b = world["a"], world["b"]
    okafor = world["okafor"]
    aimed = call("GET", f"{server.fhir}/Observation", okafor, params={"subject": f"Patient/{b}"},
                 headers={"X-Request-Id": "site-search-b"})
    assert aimed.status_code == 200 and not aimed.json().get("entry")
    key = RSAKey.generate_key(2048, parameters={"kid": "site-auditor", "alg": "RS384"})
    auditor = server.backend_token("system/AuditEvent.rs", key)["access_token"]
    from fhir_ops.mapping.audit_event import patients_of, request_id_of

    events = [e["resource"] for e in call("GET", f"{server.fhir}/AuditEvent", auditor,
                                          params={"agent": "Practitioner/dr-okafor", "_count": 1000}).json()["entry"]]
    mine = [e for e in events if request_id_of(e) == "site-search-b"]
    assert len(mine) == 1 and patients_of(mine[0]) == {b} and mine[0]["outcome"] == "0"
    refused = call("GET", f"{server.fhir}/Patient/{b}", okafor, headers={"X-Request-Id": "site-read-b"})
    assert refused.status_code == 403
    events = [e["resource"] for e in call("GET", f"{server.fhir}/AuditEvent", auditor,
                                          params={"patient": f"Patient/{b}", "outcome": "4", "_count": 1000}).json()["entry"]]
    record = next(e for e in events if request_id_of(e) == "site-read-b")
    assert "outside-site" in record["outcomeDesc"] and record["outcomeDesc"].startswith("refused")
    assert a not in patients_of(record)
