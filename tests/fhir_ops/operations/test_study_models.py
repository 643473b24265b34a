"""Every twin operation is generic over studies (issue #13, acceptance 3 and 4), over real HTTP.

* The demo study's results are those of the engine before TT-201 moved from code into its definition
  (numbers committed from main at cadeb45, ``data/demo_before_refactor.json``), within Monte Carlo error.
* Study- and Group-level ``$simulate`` take the arms from ``ResearchStudy.arm`` and
  ``ResearchSubject.assignedArm`` and each arm's dose from the model definition or the study's arm.
* A participant or study without a model, a Group without a study, an arm without a dose and a model
  without a cohort engine are each a clear 4xx OperationOutcome.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests

from fhir_ops import jobs
from fhir_ops.app import create_app
from fhir_ops.mapping import model_definition as fm
from inference.model_definition import shipped_definition
from tests.fhir_ops.operations.conftest import get_store_of
from tests.fhir_ops.operations.twin_client import HEADERS, entries, error_id, issue_text, params, simulate, single
from tests.live_server import serve

pytestmark = pytest.mark.api

BEFORE = json.loads((Path(__file__).parent / "data" / "demo_before_refactor.json").read_text())
TT201 = fm.compile_definition(shipped_definition("tt201"))
STUDY_CHARACTERISTIC = {"code": {"coding": [{"system": "https://trialtwin.org/fhir/CodeSystem/trialtwin",
                                             "code": "research-study"}], "text": "study"},
                        "valueReference": {"reference": "ResearchStudy/tt-201"}, "exclude": False}
Z90 = 1.6448536269514722


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The 30-participant demo study (seed 7) the reference numbers were computed on, served on loopback."""
    from fhir_ops.demo import ensure_demo_study

    app = create_app({"TESTING": True, "DATA_DIR": str(tmp_path_factory.mktemp("study-models")), "AUTH_MODE": "open",
                      "JOBS_MAX_WORKERS": 1})
    store = get_store_of(app)
    ensure_demo_study(store, participants=30, seed=7)
    with serve(app) as url:
        yield f"{url}/fhir", app
    jobs.manager(app).shutdown()
    store.close()


def post(base: str, path: str, resource: dict) -> dict:
    resp = requests.put(f"{base}/{path}", json=resource, headers=HEADERS, timeout=30)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def _mc_tolerance(low: float, high: float, n: int) -> float:
    """Three Monte Carlo standard errors of a median of ``n`` draws whose middle 90 % spans [low, high]
    (a normal's median has SE 1.2533 sigma / sqrt(n)), plus rounding of the 6-decimal output."""
    sigma = max(high - low, 0.0) / (2 * Z90)
    return 3.0 * 1.2533 * sigma / np.sqrt(n) + 2e-6


# ------------------------------------------------------------- the demo's results are unchanged

def test_demo_results_unchanged_from_before_the_refactor(server):
    base, _ = server
    # the demo data themselves: the same simulated values are stored
    obs = requests.get(f"{base}/Observation", params={"subject": "Patient/tt201-p002", "code": "http://loinc.org|4548-4",
                                                      "_sort": "date"}, timeout=30).json()
    assert [e["resource"]["valueQuantity"]["value"] for e in obs["entry"]] == BEFORE["p002_hba1c"]

    # participant forecasts (2000 posterior-predictive draws each)
    for pid, rows in BEFORE["patient_forecasts"].items():
        body = simulate(base, f"Patient/{pid}", params(seed=11, samples=2000, horizonDays=28, stepHours=168)).json()
        now = {(r["output"], r["time"]): r for r in entries(body, "forecast")}
        assert len(now) == len(rows)
        for r in rows:
            got = now[(r["output"], r["time"])]
            for key in ("median", "low", "high"):
                assert got[key] == pytest.approx(r[key], abs=_mc_tolerance(r["low"], r["high"], 2000)), (pid, r, got)

    # the study per arm (across its 10 participants per arm) and a virtual cohort of 3000 at 100 mg
    study = simulate(base, "ResearchStudy/tt-201", params(horizonDays=84, stepHours=168, seed=5)).json()
    group = requests.post(f"{base}/Group", json={"resourceType": "Group", "type": "person", "actual": False,
                                                 "quantity": 3000, "characteristic": [STUDY_CHARACTERISTIC]},
                          headers=HEADERS, timeout=30).json()
    cohort = simulate(base, f"Group/{group['id']}", params(horizonDays=84, stepHours=168, seed=9, dose=100.0)).json()
    for body, reference in ((study, BEFORE["study_arm_summary"]), (cohort, BEFORE["virtual_group_100mg"])):
        now = {(r["arm"], r["output"], r["day"]): r for r in entries(body, "armSummary")}
        assert len(now) == len(reference)
        for r in reference:
            got = now[(r["arm"], r["output"], r["day"])]
            assert got["participants"] == r["participants"]
            tol = _mc_tolerance(r["low"], r["high"], r["participants"])
            for key in ("median", "low", "high"):
                assert got[key] == pytest.approx(r[key], abs=tol), (r, got)


# ------------------------------------------------------------- arms from the study, doses from data

def _participant(base: str, pid: str, study: str, arm: str | None, weight: float) -> None:
    post(base, f"Patient/{pid}", {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1960-03-01"})
    subject = {"resourceType": "ResearchSubject", "id": f"{pid}-rs", "status": "on-study",
               "study": {"reference": f"ResearchStudy/{study}"}, "individual": {"reference": f"Patient/{pid}"},
               "period": {"start": "2026-10-01T08:00:00Z"}}
    if arm:
        subject["assignedArm"] = arm
    post(base, f"ResearchSubject/{pid}-rs", subject)
    post(base, f"Observation/{pid}-wt", {
        "resourceType": "Observation", "id": f"{pid}-wt", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": "2026-10-01T08:00:00Z",
        "valueQuantity": {"value": weight, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}})


def _study(base: str, sid: str, arms: list[dict], model: str | None = TT201.canonical) -> None:
    study = {"resourceType": "ResearchStudy", "id": sid, "status": "active", "arm": arms}
    if model:
        study["extension"] = [{"url": fm.STUDY_MODEL_EXTENSION, "valueCanonical": model}]
    post(base, f"ResearchStudy/{sid}", study)


def test_study_arms_and_assigned_arms_drive_the_cohort(server):
    """A study with its own arm names: the definition lists none of them, so each arm's dose is what the
    study's arm says; members are simulated in the arm their ResearchSubject assigns."""
    base, _ = server
    _study(base, "arms-study", [{"name": "low", "description": "TTX-101 25 mg once daily"},
                                {"name": "high", "description": "TTX-101 200 mg once daily"},
                                {"name": "placebo"}])
    for i, (arm, weight) in enumerate([("low", 70.0), ("high", 72.0), ("low", 90.0), ("high", 88.0),
                                       ("placebo", 80.0), (None, 75.0)]):
        _participant(base, f"arms-p{i}", "arms-study", arm, weight)
    resp = simulate(base, "ResearchStudy/arms-study", params(horizonDays=28, stepHours=168, seed=2,
                                                             memberOutputs=True))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    rows = entries(body, "armSummary")
    assert {r["arm"]: r["participants"] for r in rows} == {"low": 2, "high": 2, "placebo": 1}
    end = {r["arm"]: r["median"] for r in rows if r["output"] == "concentration" and r["day"] == 27}
    assert end["placebo"] == 0.0 and end["high"] > end["low"] > 0
    # each arm ran at the dose its description states: the same members at that dose given explicitly
    # (same seeds, same chunks) give exactly that arm's rows
    for arm, dose in (("low", 25.0), ("high", 200.0)):
        forced = simulate(base, "ResearchStudy/arms-study", params(horizonDays=28, stepHours=168, seed=2,
                                                                   dose=dose)).json()
        assert [r for r in entries(forced, "armSummary") if r["arm"] == arm] == [r for r in rows if r["arm"] == arm]
    assert {r["output"] for r in rows} == set(TT201.output_names)
    assert {r["unit"] for r in rows if r["output"] == "fpg"} == {"mg/dL"}
    members = {m["subject"]["reference"]: m["arm"] for m in entries(body, "member")}
    assert members["Patient/arms-p1"] == "high" and "Patient/arms-p5" not in members
    assert "arms-p5 skipped: no assigned arm" in issue_text_of(body)
    assert single(body, "modelVersion") == TT201.canonical


def issue_text_of(body: dict) -> str:
    outcome = next((p["resource"] for p in body["parameter"] if p["name"] == "information"), {})
    return " ".join(i.get("diagnostics", "") for i in outcome.get("issue", []))


def test_definition_arms_give_the_doses_of_arms_of_the_same_name(server):
    """The demo's arms are the definition's: 'placebo' 0, '50 mg' 50, '100 mg' 100 (not parsed from names:
    a study arm named like a definition arm takes the definition's dose even when its text says otherwise)."""
    base, _ = server
    _study(base, "named-arms", [{"name": "50 mg", "description": "TTX-101 400 mg (mislabelled)"}])
    _participant(base, "named-p0", "named-arms", "50 mg", 80.0)
    body = simulate(base, "ResearchStudy/named-arms", params(horizonDays=14, stepHours=168, seed=1)).json()
    conc = [r["median"] for r in entries(body, "armSummary") if r["output"] == "concentration" and r["day"] == 13][0]
    reference = simulate(base, "ResearchStudy/named-arms", params(horizonDays=14, stepHours=168, seed=1,
                                                                 dose=50.0)).json()
    same = [r["median"] for r in entries(reference, "armSummary") if r["output"] == "concentration" and r["day"] == 13]
    assert conc == same[0]


def test_arm_without_a_dose_is_refused_unless_the_dose_is_given(server):
    base, _ = server
    # an arm nobody is in needs no dose; one with members does
    _study(base, "doseless", [{"name": "standard of care"}, {"name": "not yet used"}])
    _participant(base, "doseless-p0", "doseless", "standard of care", 80.0)
    resp = simulate(base, "ResearchStudy/doseless", params(horizonDays=7))
    assert resp.status_code == 422 and error_id(resp) == "arm-without-dose"
    assert "standard of care" in issue_text(resp)
    given = simulate(base, "ResearchStudy/doseless", params(horizonDays=7, dose=25.0))
    assert given.status_code == 200, given.text


def test_without_a_model_there_is_no_twin(server):
    base, _ = server
    _study(base, "no-model", [{"name": "a"}], model=None)
    _participant(base, "no-model-p0", "no-model", "a", 80.0)
    for target in ("ResearchStudy/no-model", "Patient/no-model-p0"):
        resp = simulate(base, target, params(horizonDays=7))
        assert resp.status_code == 422 and error_id(resp) == "study-without-model", target
        assert "model publish" in issue_text(resp)
    resp = requests.post(f"{base}/Patient/no-model-p0/$calibrate", json=params(), headers=HEADERS, timeout=30)
    assert resp.status_code == 422 and error_id(resp) == "study-without-model"
    # a study naming a definition that is not stored
    _study(base, "lost-model", [{"name": "a"}], model="https://example.org/Library/missing|1.0.0")
    resp = simulate(base, "ResearchStudy/lost-model", params(horizonDays=7))
    assert resp.status_code == 422 and error_id(resp) == "study-model-missing"


def test_group_without_a_study(server):
    base, _ = server
    group = requests.post(f"{base}/Group", json={"resourceType": "Group", "type": "person", "actual": False,
                                                 "quantity": 10}, headers=HEADERS, timeout=30).json()
    resp = simulate(base, f"Group/{group['id']}", params(horizonDays=7))
    assert resp.status_code == 422 and error_id(resp) == "group-without-study"


def _publish(base: str, name: str):
    model = fm.compile_definition(shipped_definition(name))
    library = fm.definition_library(model)
    post(base, f"Library/{library['id']}", library)
    return model


def _group(base: str, body: dict) -> str:
    resp = requests.post(f"{base}/Group", json={"resourceType": "Group", "type": "person", **body}, headers=HEADERS,
                         timeout=30)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _study_characteristic(sid: str) -> dict:
    return {**STUDY_CHARACTERISTIC, "valueReference": {"reference": f"ResearchStudy/{sid}"}}


def test_cohort_of_the_pk_only_theophylline_model(server):
    """The theophylline definition (event engine, single oral dose) simulates as a cohort: the study's
    members in their arms, doses from the arms' text, the definition's summary defaults (24 h, hourly);
    linear PK, so the same members at half the dose give exactly half the concentrations."""
    base, _ = server
    theoph = _publish(base, "theophylline")
    _study(base, "theoph-cohort", [{"name": "high", "description": "theophylline 320 mg once"},
                                   {"name": "low", "description": "theophylline 160 mg once"}, {"name": "placebo"}],
           model=theoph.canonical)
    for i, (arm, weight) in enumerate([("high", 60.0), ("high", 90.0), ("low", 70.0), ("placebo", 75.0)]):
        _participant(base, f"theoph-p{i}", "theoph-cohort", arm, weight)
    resp = simulate(base, "ResearchStudy/theoph-cohort", params(seed=4, memberOutputs=True))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert single(body, "modelVersion") == theoph.canonical
    rows = entries(body, "armSummary")
    assert {r["arm"]: r["participants"] for r in rows} == {"high": 2, "low": 1, "placebo": 1}
    assert {(r["output"], r["unit"]) for r in rows} == {("concentration", "mg/L")}
    high = [r for r in rows if r["arm"] == "high"]
    assert [r["day"] for r in high] == [round(h / 24, 6) for h in range(25)]  # the definition's 1 day, hourly
    assert high[0]["median"] == 0.0 and 2.0 < max(r["median"] for r in high) < 20.0  # mg/L after 320 mg, 60-90 kg
    assert all(r["low"] <= r["median"] <= r["high"] for r in rows)
    assert all(r["median"] == 0.0 for r in rows if r["arm"] == "placebo")
    members = {m["subject"]["reference"]: m for m in entries(body, "member")}
    assert set(members) == {f"Patient/theoph-p{i}" for i in range(4)} and members["Patient/theoph-p0"]["arm"] == "high"
    full = simulate(base, "ResearchStudy/theoph-cohort", params(seed=4, dose=320.0)).json()
    half = simulate(base, "ResearchStudy/theoph-cohort", params(seed=4, dose=160.0)).json()
    for a, b in zip(entries(full, "armSummary"), entries(half, "armSummary")):
        assert b["median"] == pytest.approx(a["median"] / 2, abs=2e-6) and b["high"] == pytest.approx(a["high"] / 2,
                                                                                                    abs=2e-6)
    # the "low" arm ran at the 160 mg its description states: the same as everyone at 160 mg
    assert [r for r in entries(half, "armSummary") if r["arm"] == "low"] == [r for r in rows if r["arm"] == "low"]
    # a Group of the study's members runs the same engine, one arm when the Group names it
    gid = _group(base, {"actual": True, "member": [{"entity": {"reference": f"Patient/theoph-p{i}"}} for i in range(4)],
                        "characteristic": [_study_characteristic("theoph-cohort")]})
    group = simulate(base, f"Group/{gid}", params(seed=4))
    assert group.status_code == 200, group.text
    assert {r["arm"] for r in entries(group.json(), "armSummary")} == {"high", "low", "placebo"}


def test_theophylline_virtual_participants_need_their_covariate(server):
    """Virtual participants of a definition without a virtual population take each covariate's default;
    the theophylline definition has none for body weight, so the answer names it."""
    base, _ = server
    theoph = _publish(base, "theophylline")
    _study(base, "theoph-virtual", [{"name": "320 mg"}], model=theoph.canonical)
    resp = simulate(base, "ResearchStudy/theoph-virtual", params(virtualParticipants=100))
    assert resp.status_code == 422 and error_id(resp) == "model-without-virtual-population"
    assert "WT" in issue_text(resp) and "default" in issue_text(resp)
    gid = _group(base, {"actual": False, "quantity": 50, "characteristic": [_study_characteristic("theoph-virtual")]})
    resp = simulate(base, f"Group/{gid}", params())
    assert resp.status_code == 422 and error_id(resp) == "model-without-virtual-population"


def test_cohort_of_the_tumour_growth_model(server):
    """The disease-progression definition (IV infusion every 3 weeks, tumour growth inhibition): virtual
    participants of a study, weekly summaries over the definition's 12 weeks; untreated tumours grow as
    BASE e^(KL t), treated ones hardly change."""
    base, _ = server
    tgi = _publish(base, "tumour-growth")
    _study(base, "tgi-cohort", [{"name": "500 mg", "description": "TGI-CYTO 500 mg every 3 weeks"},
                                {"name": "placebo"}], model=tgi.canonical)
    resp = simulate(base, "ResearchStudy/tgi-cohort", params(virtualParticipants=2000, seed=8))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    rows = entries(body, "armSummary")
    assert {r["arm"]: r["participants"] for r in rows} == {"500 mg": 1000, "placebo": 1000}
    sld = {arm: [r for r in rows if r["arm"] == arm and r["output"] == "sld"] for arm in ("500 mg", "placebo")}
    assert [r["day"] for r in sld["placebo"]] == [7.0 * w for w in range(13)] and sld["placebo"][0]["unit"] == "mm"
    # no drug: log SLD = log BASE + KL t with log-normal BASE and KL; the median of BASE e^(KL t) at 12 weeks
    # lies within a few % of 70 e^(0.02 * 12) = 88.98 mm (1000 draws: SE of the median ~2 %)
    assert sld["placebo"][-1]["median"] == pytest.approx(70.0 * np.exp(0.24), rel=0.06)
    # four 500 mg infusions take about as much off log SLD (KD x AUC = 0.1 x 500/840 each) as 12 weeks of growth add
    assert sld["500 mg"][-1]["median"] == pytest.approx(sld["500 mg"][0]["median"], rel=0.08)
    assert sld["500 mg"][-1]["median"] < 0.85 * sld["placebo"][-1]["median"]
    change = {s["name"]: s["value"] for s in entries(body, "summary")}
    assert change["sld-change-median:placebo"] > 10.0 > abs(change["sld-change-median:500mg"])
    conc = [r for r in rows if r["arm"] == "500 mg" and r["output"] == "concentration"]
    assert conc[0]["median"] == 0.0 and all(r["median"] >= 0 for r in conc)
    assert all(r["median"] == 0.0 for r in rows if r["arm"] == "placebo" and r["output"] == "concentration")
    # seeded: the same call gives the same numbers
    again = simulate(base, "ResearchStudy/tgi-cohort", params(virtualParticipants=2000, seed=8)).json()
    assert entries(again, "armSummary") == rows


def test_study_simulation_runs_on_the_apps_executor(server):
    """``trialtwin serve --dask-scheduler`` puts a distributed client in ``app.extensions``; the study-level
    $simulate hands its chunks to it, with the same result as in process."""
    from concurrent.futures import ThreadPoolExecutor

    base, app = server
    body = params(horizonDays=14, stepHours=168, seed=3)
    local = simulate(base, "ResearchStudy/tt-201", body).json()

    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn, *args, **kwargs):
            Counting.submitted += 1
            return super().submit(fn, *args, **kwargs)

    with Counting(max_workers=2) as executor:
        app.extensions["trialtwin.executor"] = executor
        try:
            remote = simulate(base, "ResearchStudy/tt-201", body).json()
        finally:
            del app.extensions["trialtwin.executor"]
    assert Counting.submitted >= 3  # one chunk per arm at least
    assert entries(remote, "armSummary") == entries(local, "armSummary")


def test_a_daily_regimen_study_with_its_own_assay_and_arms(server):
    """Another study of the daily-regimen family, with its own URL, assay code (unknown to the participant
    mapping's table) and unit: its participant is twinned from the observations its definition names."""
    import copy

    base, _ = server
    raw = copy.deepcopy(TT201.to_json())
    raw.update(url="https://example.org/fhir/Library/other-daily", version="1.0.0", name="other-daily",
               arms=[{"name": "high", "dose": 100}])
    raw["outputs"][0]["observation"] = {"codes": [{"system": "https://example.org/assay", "code": "XYZ-PK"}],
                                        "unit": "ug/L"}
    model = fm.compile_definition(raw)
    library = fm.definition_library(model)
    post(base, f"Library/{library['id']}", library)
    _study(base, "own-assay", [{"name": "high"}], model=model.canonical)
    _participant(base, "own-p0", "own-assay", "high", 80.0)
    start = np.datetime64("2026-10-01T08:00:00")
    for day in range(20):
        when = str(start + np.timedelta64(24 * day, "h")) + "Z"
        post(base, f"MedicationAdministration/own-p0-d{day}", {
            "resourceType": "MedicationAdministration", "id": f"own-p0-d{day}", "status": "completed",
            "medicationCodeableConcept": {"coding": [{"system": raw["dosing"][0]["medication"]["system"],
                                                      "code": raw["dosing"][0]["medication"]["code"]}]},
            "subject": {"reference": "Patient/own-p0"}, "effectiveDateTime": when,
            "dosage": {"dose": {"value": 100, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}})
    for day, value in ((2, 1500.0), (19, 1900.0)):
        when = str(start + np.timedelta64(24 * day + 3, "h")) + "Z"
        post(base, f"Observation/own-p0-pk{day}", {
            "resourceType": "Observation", "id": f"own-p0-pk{day}", "status": "final",
            "code": {"coding": [{"system": "https://example.org/assay", "code": "XYZ-PK"}]},
            "subject": {"reference": "Patient/own-p0"}, "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": "ug/L", "system": "http://unitsofmeasure.org", "code": "ug/L"}})
    resp = simulate(base, "Patient/own-p0", params(horizonDays=7, seed=1, persist=True))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert single(body, "modelVersion") == model.canonical
    observed = [o for o in entries(body, "observed") if o["output"] == "concentration"]
    assert [o["value"] for o in observed] == [1500.0, 1900.0]  # ug/L read as ng/mL (same quantity)
    conc = [r for r in entries(body, "forecast") if r["output"] == "concentration"]
    assert conc and all(r["low"] < r["median"] < r["high"] for r in conc) and all(r["unit"] == "ng/mL" for r in conc)
    state = requests.get(f"{base}/{single(body, 'twinState')['reference']}", timeout=30).json()
    inputs = {e["valueReference"]["reference"] for e in state["extension"] if e["url"].endswith("/twin-calibrated-on")}
    assert {f"Observation/own-p0-pk{d}/_history/1" for d in (2, 19)} <= inputs
    assert any(ref.startswith(f"Library/{library['id']}/_history/") for ref in inputs)
    cohort = simulate(base, "ResearchStudy/own-assay", params(horizonDays=7, stepHours=168))
    assert cohort.status_code == 200 and {r["arm"] for r in entries(cohort.json(), "armSummary")} == {"high"}
