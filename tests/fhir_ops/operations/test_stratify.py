"""``$stratify`` over HTTP on a seeded demo study: strata from the participants' twins stored as
profiled Groups with Provenance, idempotent re-runs, the Group level, and 4xx for bad input.
The recovery of planted subgroups (acceptance 1) is tested on the engine, tests/inference/test_stratify.py."""
from __future__ import annotations

import pytest
import requests

from fhir_ops import conformance
from tests.fhir_ops.operations.twin_client import HEADERS, entries, error_id, params, single

pytestmark = pytest.mark.api
CS = "https://trialtwin.org/fhir/CodeSystem/trialtwin"


def _stratify(base, target, body=None):
    return requests.post(f"{base}/{target}/$stratify", json=body or params(bootstrap=4), headers=HEADERS, timeout=300)


def _count(base, rtype, **query):
    return requests.get(f"{base}/{rtype}", params={**query, "_summary": "count"}, timeout=30).json()["total"]


def _strata_count(base):
    return _count(base, "Group", code=f"{CS}|responder-stratum")


def test_study_strata_are_stored_as_profiled_groups_with_provenance_and_reruns_write_nothing(twin_server):
    base, _ = twin_server
    r = _stratify(base, "ResearchStudy/tt-201")
    assert r.status_code == 200, r.text[:800]
    body = r.json()
    k, n = single(body, "strata"), single(body, "participants")
    # placebo participants' twins hold the prior's Emax and EC50 (no drug, nothing to learn them from): they
    # are left out, named in an information issue, instead of forming a spurious stratum of identical rows
    subjects = requests.get(f"{base}/ResearchSubject", params={"study": "ResearchStudy/tt-201", "_count": 100},
                            timeout=30).json()["entry"]
    placebo = {e["resource"]["individual"]["reference"].split("/")[1] for e in subjects
               if e["resource"]["assignedArm"] == "placebo"}
    assert len(placebo) == 10 and n == 30 - len(placebo)
    notes = {i["details"]["coding"][0]["code"]: i["diagnostics"]
             for p in body["parameter"] if p["name"] == "issues" for i in p["resource"]["issue"]}
    assert all(pid in notes["participants-uninformative"] for pid in placebo)
    # the demo population has no planted subgroups: one stratum (BIC's spurious split of 20 is unstable)
    assert k == 1 and "strata-unstable" in notes, notes
    strata = [p for p in body["parameter"] if p["name"] == "stratum"]
    assert len(strata) == k
    sizes, members = 0, set()
    for s in strata:
        parts = {q["name"]: q for q in s["part"]}
        group = requests.get(f"{base}/{parts['group']['valueReference']['reference']}", timeout=30).json()
        assert conformance.check(group) == []
        assert group["quantity"] == parts["size"]["valueInteger"] == len(group["member"])
        sizes += group["quantity"]
        members |= {m["entity"]["reference"] for m in group["member"]}
        rule = next(c for c in group["characteristic"] if c["code"]["coding"][0]["code"] == "stratum-rule")
        assert rule["valueCodeableConcept"]["text"] == parts["rule"]["valueString"]
        # the response of every dosed arm (50 mg and 100 mg; placebo's is 0), more drug → more response
        resp = {q["part"][0]["valueString"]: q for q in s["part"] if q["name"] == "response"}
        assert set(resp) == {"placebo", "50 mg", "100 mg"}
        med = {a: next(x["valueDecimal"] for x in q["part"] if x["name"] == "median") for a, q in resp.items()}
        assert med["placebo"] == 0 and 0 < med["50 mg"] < med["100 mg"]
    assert sizes == n and len(members) == n and not members & {f"Patient/{pid}" for pid in placebo}
    prov = requests.get(f"{base}/{single(body, 'provenance')['reference']}", timeout=30).json()
    assert conformance.check(prov) == []
    assert {t["reference"].split("/_history/")[0] for t in prov["target"]} == \
        {p["valueReference"]["reference"] for s in strata for p in s["part"] if p["name"] == "group"}
    sources = [e["what"]["reference"] for e in prov["entity"]]
    assert any(s.startswith("ResearchStudy/tt-201/_history/") for s in sources)
    assert any(s.startswith("Observation/") or s.startswith("Basic/") for s in sources)  # the twins' inputs
    assert single(body, "created") == k + 1

    groups, provs = _strata_count(base), _count(base, "Provenance")
    refs = [p["valueReference"]["reference"] for s in strata for p in s["part"] if p["name"] == "group"]
    versions = [requests.get(f"{base}/{ref}", timeout=30).json()["meta"]["versionId"] for ref in refs]
    again = _stratify(base, "ResearchStudy/tt-201")
    assert again.status_code == 200
    assert single(again.json(), "created") == 0
    assert entries(again.json(), "bic") == entries(body, "bic")
    assert _strata_count(base) == groups and _count(base, "Provenance") == provs
    # ... and no new version of any stratum either
    assert [requests.get(f"{base}/{ref}", timeout=30).json()["meta"]["versionId"] for ref in refs] == versions


def test_group_level_and_response_feature(twin_server):
    base, _ = twin_server
    members = [{"entity": {"reference": f"Patient/tt201-p{i:03d}"}} for i in range(1, 16)]
    g = requests.post(f"{base}/Group", json={"resourceType": "Group", "type": "person", "actual": True,
                                             "member": members}, headers=HEADERS, timeout=30).json()
    r = _stratify(base, f"Group/{g['id']}", params(feature=["EC50", "response"], scenarioDose=100.0, bootstrap=3,
                                                   persist=False))
    assert r.status_code == 200, r.text[:800]
    body = r.json()
    assert single(body, "participants") == 10 and single(body, "provenance") is None  # 5 of 15 on placebo
    first = next(p for p in body["parameter"] if p["name"] == "stratum")
    features = [next(x["valueString"] for x in q["part"] if x["name"] == "feature")
                for q in first["part"] if q["name"] == "mean"]
    assert features == ["log EC50", "log response"]


@pytest.mark.parametrize("body, status, eid", [
    (params(feature="Cmax"), 400, "unknown-code"),
    (params(feature="response"), 400, "missing-parameter"),
    (params(maxStrata=0), 400, "parameter-out-of-range"),
    (params(covariate="height"), 400, "unknown-code"),
    (params(scenarioDose=5000.0, feature="response"), 400, "parameter-out-of-range"),
])
def test_bad_input_is_a_4xx_outcome_and_stores_nothing(twin_server, body, status, eid):
    base, _ = twin_server
    before = _strata_count(base)
    r = _stratify(base, "ResearchStudy/tt-201", body)
    assert r.status_code == status, r.text[:400]
    assert error_id(r) == eid
    assert _strata_count(base) == before


def test_unknown_target_too_few_participants_and_get_are_refused(twin_server):
    base, _ = twin_server
    assert _stratify(base, "ResearchStudy/nope").status_code == 404
    small = requests.post(f"{base}/Group", json={"resourceType": "Group", "type": "person", "actual": True, "member": [
        {"entity": {"reference": f"Patient/tt201-p{i:03d}"}} for i in range(1, 6)]}, headers=HEADERS, timeout=30).json()
    r = _stratify(base, f"Group/{small['id']}")
    assert r.status_code == 422 and error_id(r) == "too-few-participants"
    empty = requests.post(f"{base}/Group", json={"resourceType": "Group", "type": "person", "actual": True},
                          headers=HEADERS, timeout=30).json()
    r = _stratify(base, f"Group/{empty['id']}")
    assert r.status_code == 422 and error_id(r) == "no-participants"
    r = requests.get(f"{base}/ResearchStudy/tt-201/$stratify", timeout=30)
    assert r.status_code == 405


def test_asynchronous_stratification_answers_the_same_as_a_synchronous_one(twin_server):
    import time

    base, _ = twin_server
    body = params(bootstrap=2, seed=3, persist=False)
    sync = _stratify(base, "ResearchStudy/tt-201", body)
    assert sync.status_code == 200
    resp = requests.post(f"{base}/ResearchStudy/tt-201/$stratify", json=body,
                         headers={**HEADERS, "Prefer": "respond-async"}, timeout=60)
    assert resp.status_code == 202, resp.text[:400]
    deadline = time.time() + 300
    while time.time() < deadline:
        poll = requests.get(resp.headers["Content-Location"], timeout=30)
        if poll.status_code != 202:
            break
        time.sleep(0.1)
    assert poll.status_code == 200, poll.text[:400]
    assert entries(poll.json(), "bic") == entries(sync.json(), "bic")
    assert single(poll.json(), "strata") == single(sync.json(), "strata")


def test_default_features_are_the_study_models_emax_and_ec50_parameters(twin_server):
    """The features default to the parameters in the pd roles EMAX and EC50 of the study's definition
    (TT-201's are named EMAX and EC50); the response is in the EMAX parameter's unit."""
    base, _ = twin_server
    r = _stratify(base, "ResearchStudy/tt-201", params(bootstrap=0, persist=False))
    assert r.status_code == 200, r.text[:400]
    first = next(p for p in r.json()["parameter"] if p["name"] == "stratum")
    assert [next(x["valueString"] for x in q["part"] if x["name"] == "feature")
            for q in first["part"] if q["name"] == "mean"] == ["log EMAX", "log EC50"]
    units = {x["valueString"] for q in first["part"] if q["name"] == "response"
             for x in q["part"] if x["name"] == "unit"}
    assert units == {"mg/dL"}
    r = _stratify(base, "ResearchStudy/tt-201", params(feature="Emax"))  # the removed built-in twin's name
    assert r.status_code == 400 and error_id(r) == "unknown-code" and "EMAX" in r.text


def test_a_study_whose_model_is_not_a_daily_regimen_is_refused_by_both_operations(twin_server):
    """Theophylline's definition runs on the event engine: it has no daily-regimen roles to read the
    twins' clearance, bioavailability, Emax and EC50 from, so $stratify and $safety-signal refuse it (422)."""
    from fhir_ops.mapping import model_definition as fm
    from inference.model_definition import shipped_definition

    base, _ = twin_server
    theoph = fm.compile_definition(shipped_definition("theophylline"))
    library = fm.definition_library(theoph)
    puts = [library, fm.with_study_model({"resourceType": "ResearchStudy", "id": "theoph-strat", "status": "active",
                                          "arm": [{"name": "placebo"}, {"name": "320 mg"}]}, theoph.canonical)]
    for i in range(12):
        pid = f"theoph-strat-p{i}"
        puts += [{"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1960-03-01"},
                 {"resourceType": "ResearchSubject", "id": f"{pid}-rs", "status": "on-study",
                  "study": {"reference": "ResearchStudy/theoph-strat"}, "individual": {"reference": f"Patient/{pid}"},
                  "assignedArm": ("placebo", "320 mg")[i % 2], "period": {"start": "2026-10-01T08:00:00Z"}}]
    puts.append({"resourceType": "AdverseEvent", "id": "theoph-strat-ae", "actuality": "actual",
                 "event": {"coding": [{"system": "http://snomed.info/sct", "code": "25064002"}]},
                 "subject": {"reference": "Patient/theoph-strat-p1"}, "date": "2026-10-05T10:00:00Z",
                 "study": [{"reference": "ResearchStudy/theoph-strat"}]})
    for res in puts:
        resp = requests.put(f"{base}/{res['resourceType']}/{res['id']}", json=res, headers=HEADERS, timeout=30)
        assert resp.status_code in (200, 201), resp.text[:400]
    before = _strata_count(base)
    r = _stratify(base, "ResearchStudy/theoph-strat")
    assert r.status_code == 422 and error_id(r) == "model-not-daily-regimen", r.text[:400]
    assert theoph.canonical in r.text
    r = requests.post(f"{base}/ResearchStudy/theoph-strat/$safety-signal", json=params(), headers=HEADERS, timeout=60)
    assert r.status_code == 422 and error_id(r) == "model-not-daily-regimen", r.text[:400]
    assert _strata_count(base) == before


def test_one_blas_thread_gives_the_same_answer_and_stored_strata_as_the_default_threads(twin_server, monkeypatch):
    # $stratify calibrates and fits with one BLAS thread (inference.stratify.single_threaded_blas); as it ran
    # before, with the process's threads, it stores exactly the same strata and Provenance: run that way
    # first with settings of its own, the shipped run then finds everything stored and writes nothing
    import contextlib

    import inference.stratify as engine
    from threadpoolctl import threadpool_limits

    base, _ = twin_server
    body = params(bootstrap=3, seed=11, maxStrata=3)
    monkeypatch.setattr(engine, "single_threaded_blas", contextlib.nullcontext)
    with threadpool_limits(2):
        before = _stratify(base, "ResearchStudy/tt-201", body)
    monkeypatch.undo()
    assert before.status_code == 200, before.text[:500]
    groups, provs = _strata_count(base), _count(base, "Provenance")
    after = _stratify(base, "ResearchStudy/tt-201", body)
    assert after.status_code == 200, after.text[:500]
    assert single(before.json(), "created") >= 2 and single(after.json(), "created") == 0
    assert after.json() == {**before.json(), "parameter": [p if p["name"] != "created" else {**p, "valueInteger": 0}
                                                           for p in before.json()["parameter"]]}
    assert _strata_count(base) == groups and _count(base, "Provenance") == provs
