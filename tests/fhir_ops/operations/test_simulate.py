"""``$simulate`` over real HTTP on a seeded TT-201 demo study: forecasts with intervals, what-if
scenarios, persisted outputs traced through Provenance, cohort runs, async jobs and bad input."""
from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from fhir_ops import conformance
from tests.fhir_ops.operations.twin_client import (HEADERS, entries, error_id, issue_text, params, series, simulate,
                                                   single)

pytestmark = pytest.mark.api

ACTIVE_PARTICIPANT = "tt201-p002"  # 100 mg arm, on study at the data cut, PK sampled


# ------------------------------------------------------------------------- acceptance 2: forecasts

def test_patient_forecast_carries_90_percent_prediction_intervals(twin_server):
    base, _ = twin_server
    resp = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", params(seed=11))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    rows = entries(body, "forecast")
    assert {r["output"] for r in rows} == {"concentration", "fpg", "hba1c"}
    assert len(rows) == 3 * 29  # 28 days at 24 h steps, both ends included
    for r in rows:
        assert r["low"] <= r["median"] <= r["high"]
        assert r["unit"] == {"concentration": "ng/mL", "fpg": "mg/dL", "hba1c": "%"}[r["output"]]
    assert any(r["high"] > r["low"] for r in rows if r["output"] == "hba1c")
    summary = {s["name"]: s["value"] for s in entries(body, "summary")}
    assert summary["interval-level"] == pytest.approx(0.9)
    assert single(body, "modelVersion") == "https://trialtwin.org/fhir/Library/tt201-twin|1.1.0"
    observed = entries(body, "observed")
    assert observed and {o["output"] for o in observed} <= {"concentration", "fpg", "hba1c"}
    # the forecast starts after the last observation it was calibrated on
    assert min(r["time"] for r in rows) > max(o["time"] for o in observed)


def test_same_seed_gives_identical_output_and_another_seed_does_not(twin_server):
    base, _ = twin_server
    body = params(seed=5, samples=300, horizonDays=14, stepHours=12)
    first = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", body).json()
    again = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", body).json()
    other = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", params(seed=6, samples=300, horizonDays=14,
                                                                     stepHours=12)).json()
    assert entries(first, "forecast") == entries(again, "forecast")
    assert entries(first, "forecast") != entries(other, "forecast")


def test_higher_dose_raises_and_missed_doses_lower_the_exposure_forecast(twin_server):
    base, _ = twin_server
    target = f"Patient/{ACTIVE_PARTICIPANT}"
    usual = simulate(base, target, params(seed=3, horizonDays=14, stepHours=6)).json()
    summary = {s["name"]: s["value"] for s in entries(usual, "summary")}
    assert summary["dose"] == pytest.approx(100.0)  # the participant's current dose is the default
    doubled = simulate(base, target, params(seed=3, horizonDays=14, stepHours=6, dose=200.0)).json()
    missed = simulate(base, target, params(seed=3, horizonDays=14, stepHours=6,
                                           missedDoseDay=[2, 3, 4, 5, 6])).json()
    conc = series(usual, "concentration")
    assert series(doubled, "concentration").mean() > 1.5 * conc.mean()
    assert series(missed, "concentration").mean() < 0.85 * conc.mean()
    day6 = [i for i, r in enumerate(r for r in entries(usual, "forecast") if r["output"] == "concentration")
            if r["day"] == 6.75][0]
    assert series(missed, "concentration")[day6] < 0.3 * conc[day6]
    # lower exposure, less glucose lowering
    assert series(missed, "fpg")[-1] >= series(usual, "fpg")[-1] - 1e-9


def test_output_selection_and_level(twin_server):
    base, _ = twin_server
    body = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}",
                    params(output="hba1c", level=0.5, horizonDays=7)).json()
    rows = entries(body, "forecast")
    assert {r["output"] for r in rows} == {"hba1c"} and len(rows) == 8
    wide = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", params(output="hba1c", level=0.95, horizonDays=7)).json()
    narrow_w = np.mean([r["high"] - r["low"] for r in rows])
    wide_w = np.mean([r["high"] - r["low"] for r in entries(wide, "forecast")])
    assert wide_w > 1.5 * narrow_w


# ------------------------------------------------------------ acceptance 3 (and 1): provenance

def _get(base: str, reference: str) -> dict:
    resp = requests.get(f"{base}/{reference}", timeout=30)
    assert resp.status_code == 200, f"{reference}: {resp.status_code} {resp.text[:200]}"
    return resp.json()


def test_persisted_forecast_links_through_provenance_to_exact_inputs_and_model(twin_server):
    base, _ = twin_server
    pid = "tt201-p005"
    resp = simulate(base, f"Patient/{pid}", params(persist=True, horizonDays=7, seed=2),
                    headers={"X-Requesting-Agent": "Practitioner/dr-who"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    state_ref = single(body, "twinState")["reference"]
    obs_refs = [p["valueReference"]["reference"] for p in body["parameter"] if p["name"] == "forecastObservation"]
    prov_ref = single(body, "provenance")["reference"]
    assert state_ref.startswith(f"Basic/twin-{pid}/_history/") and len(obs_refs) == 3 * 8

    provenance = _get(base, prov_ref)
    assert conformance.check(provenance) == []
    targets = [t["reference"] for t in provenance["target"]]
    assert set(targets) == set(obs_refs) | {state_ref}
    for ref in targets:  # every target is readable at exactly the version named
        resource = _get(base, ref)
        assert resource["meta"]["versionId"] == ref.rsplit("/", 1)[1]
        assert conformance.check(resource) == []

    # agents: the model Device at its version, and who asked
    agents = {a["type"]["coding"][0]["code"]: a["who"] for a in provenance["agent"]}
    device = _get(base, agents["assembler"]["reference"])
    assert conformance.check(device) == []
    assert device["deviceName"][0]["name"] == "tt201-twin" and device["version"][0]["value"] == "1.1.0"
    assert agents["author"]["reference"] == "Practitioner/dr-who"

    # inputs: exact versions of every Observation and dose the twin used, each readable by vread
    inputs = [e["what"]["reference"] for e in provenance["entity"]]
    assert all("/_history/" in ref for ref in inputs)
    outcome_obs = []
    for code in ("http://loinc.org|4548-4", "http://loinc.org|1558-6",
                 "https://trialtwin.org/fhir/CodeSystem/assay|TTX101-PK"):
        bundle = requests.get(f"{base}/Observation", params={"subject": f"Patient/{pid}", "code": code,
                                                             "_count": "500"}, timeout=30).json()
        outcome_obs += [f"Observation/{e['resource']['id']}/_history/{e['resource']['meta']['versionId']}"
                        for e in bundle.get("entry", []) if e["resource"]["status"] == "final"]
    doses = requests.get(f"{base}/MedicationAdministration", params={"subject": f"Patient/{pid}", "_count": "500"},
                         timeout=30).json()
    dose_refs = [f"MedicationAdministration/{e['resource']['id']}/_history/{e['resource']['meta']['versionId']}"
                 for e in doses["entry"]]
    assert outcome_obs and set(outcome_obs) <= set(inputs)
    assert set(dose_refs) <= set(inputs)
    assert any(ref.startswith(f"Patient/{pid}/_history/") for ref in inputs)
    for ref in inputs[:40] + inputs[-10:]:
        assert _get(base, ref)["id"] == ref.split("/")[1]

    # the forecast Observations say what they are and where they came from
    forecast = _get(base, obs_refs[0])
    assert forecast["status"] == "preliminary"
    assert forecast["extension"] == [{"url": "https://trialtwin.org/fhir/StructureDefinition/twin-state-reference",
                                      "valueReference": {"reference": state_ref}}]
    assert "derivedFrom" not in forecast
    assert forecast["device"]["reference"] == agents["assembler"]["reference"]
    interval = forecast["component"][0]
    assert interval["extension"][0]["valueDecimal"] == pytest.approx(0.9)
    assert interval["valueRange"]["low"]["value"] <= forecast["valueQuantity"]["value"] <= \
        interval["valueRange"]["high"]["value"]
    state = _get(base, state_ref)
    calibrated_on = [e["valueReference"]["reference"] for e in state["extension"]
                     if e["url"].endswith("/twin-calibrated-on")]
    assert set(outcome_obs) <= set(calibrated_on) <= set(inputs)

    # simulated forecasts never count as data: the twin is unchanged after storing them, and the
    # next forecast starts where this one did (not after the stored forecast's horizon)
    again = simulate(base, f"Patient/{pid}", params(horizonDays=7, seed=2)).json()
    assert single(again, "twinState")["reference"] == state_ref
    assert entries(again, "forecast") == entries(body, "forecast")
    assert {s["name"]: s["value"] for s in entries(again, "summary")}["twin-reused"] == 1


def test_persist_again_reuses_the_state_and_records_it_as_an_input(twin_server):
    base, _ = twin_server
    pid = "tt201-p007"
    first = simulate(base, f"Patient/{pid}", params(persist=True, horizonDays=3)).json()
    second = simulate(base, f"Patient/{pid}", params(persist=True, horizonDays=3)).json()
    state_ref = single(first, "twinState")["reference"]
    assert single(second, "twinState")["reference"] == state_ref
    provenance = _get(base, single(second, "provenance")["reference"])
    assert state_ref in [e["what"]["reference"] for e in provenance["entity"]]
    assert state_ref not in [t["reference"] for t in provenance["target"]]
    history = requests.get(f"{base}/Basic/twin-{pid}/_history", timeout=30).json()
    assert history["total"] == 1


# --------------------------------------------------------------------- Group and ResearchStudy

def test_research_study_simulation_summarizes_each_arm(twin_server):
    base, _ = twin_server
    resp = simulate(base, "ResearchStudy/tt-201", params(horizonDays=56, stepHours=168, memberOutputs=True, seed=1))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    arms = entries(body, "armSummary")
    assert {a["arm"] for a in arms} == {"placebo", "50 mg", "100 mg"}
    sizes = {a["arm"]: a["participants"] for a in arms}
    assert sum(sizes.values()) == 30
    end = {a["arm"]: a["median"] for a in arms if a["output"] == "hba1c" and a["day"] == 55}
    start = {a["arm"]: a["median"] for a in arms if a["output"] == "hba1c" and a["day"] == 0}
    assert end["100 mg"] - start["100 mg"] < end["placebo"] - start["placebo"]
    members = entries(body, "member")
    assert len(members) == 30 * 3
    assert all(m["subject"]["reference"].startswith("Patient/tt201-p") for m in members)


def test_actual_group_uses_members_and_virtual_group_samples_participants(twin_server):
    base, _ = twin_server
    members = [{"entity": {"reference": f"Patient/tt201-p{i:03d}"}} for i in range(1, 7)]
    actual = requests.post(f"{base}/Group", json={"resourceType": "Group", "type": "person", "actual": True,
                                                  "member": members}, headers=HEADERS, timeout=30).json()
    body = simulate(base, f"Group/{actual['id']}", params(horizonDays=14, memberOutputs=True)).json()
    assert sum(a["participants"] for a in entries(body, "armSummary") if a["output"] == "hba1c" and a["day"] == 0) == 6
    assert {m["subject"]["reference"] for m in entries(body, "member")} == {m["entity"]["reference"] for m in members}

    virtual = requests.post(f"{base}/Group", json={
        "resourceType": "Group", "type": "person", "actual": False, "quantity": 600,
        "characteristic": [{"code": {"coding": [{"system": "https://trialtwin.org/fhir/CodeSystem/trialtwin",
                                                 "code": "study-arm"}], "text": "arm"},
                            "valueCodeableConcept": {"text": "50 mg"}, "exclude": False}, STUDY_CHARACTERISTIC]},
        headers=HEADERS, timeout=30).json()
    body = simulate(base, f"Group/{virtual['id']}", params(horizonDays=28, seed=4)).json()
    arms = entries(body, "armSummary")
    assert {a["arm"] for a in arms} == {"50 mg"} and arms[0]["participants"] == 600
    conc = [a for a in arms if a["output"] == "concentration" and a["day"] == 27][0]
    assert 0 < conc["low"] < conc["median"] < conc["high"]
    assert single(body, "modelVersion") == "https://trialtwin.org/fhir/Library/tt201-twin|1.1.0"


# -------------------------------------------------------------------------- acceptance 5: async

#: a virtual Group is simulated under the twin model of the study it names
STUDY_CHARACTERISTIC = {"code": {"coding": [{"system": "https://trialtwin.org/fhir/CodeSystem/trialtwin",
                                             "code": "research-study"}], "text": "study"},
                        "valueReference": {"reference": "ResearchStudy/tt-201"}, "exclude": False}


def _virtual_group(base: str, quantity: int) -> str:
    group = requests.post(f"{base}/Group", json={"resourceType": "Group", "type": "person", "actual": False,
                                                 "quantity": quantity, "characteristic": [STUDY_CHARACTERISTIC]},
                          headers=HEADERS, timeout=30).json()
    return group["id"]


def test_async_cohort_simulation_reports_progress_and_result(twin_server):
    base, _ = twin_server
    gid = _virtual_group(base, 5000)
    resp = simulate(base, f"Group/{gid}", params(horizonDays=365, stepHours=168, seed=9),
                    headers={"Prefer": "respond-async"})
    assert resp.status_code == 202, resp.text
    status_url = resp.headers["Content-Location"]
    assert "/_jobs/" in status_url
    progress, final = [], None
    deadline = time.time() + 300
    while time.time() < deadline:
        poll = requests.get(status_url, timeout=30)
        if poll.status_code == 202:
            progress.append(poll.headers["X-Progress"])
            time.sleep(0.05)
            continue
        final = poll
        break
    assert final is not None and final.status_code == 200, final and final.text
    assert progress, "the job finished before a single poll saw it running"
    assert any("%" in p or p in ("queued", "running") for p in progress)
    body = final.json()
    arms = entries(body, "armSummary")
    assert {a["arm"] for a in arms} == {"placebo", "50 mg", "100 mg"}
    assert sum({a["arm"]: a["participants"] for a in arms}.values()) == 5000
    assert max(a["day"] for a in arms) == 364


def test_async_job_can_be_cancelled(twin_server):
    from fhir_ops import jobs

    base, app = twin_server
    gid = _virtual_group(base, 100_000)
    resp = simulate(base, f"Group/{gid}", params(horizonDays=365, stepHours=168),
                    headers={"Prefer": "respond-async"})
    assert resp.status_code == 202
    status_url = resp.headers["Content-Location"]
    # The worker's own Job object (a table read would be a snapshot); cancelling forgets the job's row.
    job = jobs.manager(app).live(status_url.rstrip("/").rsplit("/", 1)[-1])
    assert job is not None
    cancelled = requests.delete(status_url, timeout=30)
    assert cancelled.status_code == 202
    assert "cancelled" in issue_text(cancelled)
    gone = requests.get(status_url, timeout=30)
    assert gone.status_code == 404 and error_id(gone) == "unknown-job"
    # The worker stops the cancelled run at its next chunk of 1000 participants (of 100): it ends as
    # cancelled, short of the whole cohort. Judged by state and progress, not by a clock: CI may be busy.
    deadline = time.monotonic() + 600
    while not job.done:
        assert time.monotonic() < deadline, "the cancelled job never stopped"
        time.sleep(0.05)
    assert job.state == "cancelled" and (job.fraction or 0.0) < 1.0, (job.state, job.fraction)
    # ... and the single job worker then takes the next job.
    small = _virtual_group(base, 30)
    follow = simulate(base, f"Group/{small}", params(horizonDays=7), headers={"Prefer": "respond-async"})
    url = follow.headers["Content-Location"]
    while requests.get(url, timeout=30).status_code == 202:
        assert time.monotonic() < deadline, "the job after a cancelled one never finished"
        time.sleep(0.05)
    assert requests.get(url, timeout=30).status_code == 200


# ---------------------------------------------------------------------- acceptance 6: bad input

def test_unknown_parameter_is_refused_by_name(twin_server):
    base, _ = twin_server
    resp = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", params(doze=50.0))
    assert resp.status_code == 400 and error_id(resp) == "unknown-parameter"
    assert "doze" in issue_text(resp)


def test_wrong_type_is_refused_by_name(twin_server):
    base, _ = twin_server
    body = {"resourceType": "Parameters", "parameter": [{"name": "horizonDays", "valueString": "four weeks"}]}
    resp = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", body)
    assert resp.status_code == 400 and error_id(resp) == "wrong-type"
    assert "horizonDays" in issue_text(resp)
    resp = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", params(samples=2.5))
    assert resp.status_code == 400 and "samples" in issue_text(resp)


def test_parameter_without_value_and_repeated_single_parameter(twin_server):
    """$simulate declares no required input (every one has a default), so the contract's
    cardinality is tested where it binds: an entry without its value, and a 0..1 parameter twice."""
    base, _ = twin_server
    resp = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", {"resourceType": "Parameters",
                                                             "parameter": [{"name": "dose"}]})
    assert resp.status_code == 400 and "dose" in issue_text(resp)
    resp = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", params(seed=[1, 2]))
    assert resp.status_code == 400 and error_id(resp) == "too-many-values" and "seed" in issue_text(resp)


def test_participant_without_data_is_unprocessable(twin_server):
    base, _ = twin_server
    patient = requests.post(f"{base}/Patient", json={"resourceType": "Patient", "gender": "female"},
                            headers=HEADERS, timeout=30).json()
    # not in any study: no twin model applies
    resp = simulate(base, f"Patient/{patient['id']}")
    assert resp.status_code == 422 and error_id(resp) == "participant-without-study"
    assert f"Patient/{patient['id']}" in issue_text(resp)
    # enrolled, but nothing of the model's outputs observed yet
    requests.post(f"{base}/ResearchSubject", json={
        "resourceType": "ResearchSubject", "status": "on-study", "study": {"reference": "ResearchStudy/tt-201"},
        "individual": {"reference": f"Patient/{patient['id']}"}, "assignedArm": "50 mg",
        "period": {"start": "2026-11-01T00:00:00Z"}},
        headers=HEADERS, timeout=30).raise_for_status()
    resp = simulate(base, f"Patient/{patient['id']}")
    assert resp.status_code == 422 and error_id(resp) == "participant-without-data"
    assert f"Patient/{patient['id']}" in issue_text(resp) and "Hemoglobin A1c" in issue_text(resp)
    missing = simulate(base, "Patient/no-such-patient")
    assert missing.status_code == 404


def test_horizon_beyond_the_model_limit_is_refused(twin_server):
    base, _ = twin_server
    resp = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", params(horizonDays=400))
    assert resp.status_code == 400 and error_id(resp) == "horizon-beyond-model-limit"
    text = issue_text(resp)
    assert "horizonDays" in text and "365" in text


@pytest.mark.parametrize("body, name", [(params(dose=5000.0), "dose"), (params(level=0.999), "level"),
                                        (params(samples=5), "samples"), (params(output="weight"), "output"),
                                        (params(missedDoseDay=40), "missedDoseDay"),
                                        (params(stepHours=1, horizonDays=365), "stepHours")])
def test_out_of_range_values_name_the_parameter(twin_server, body, name):
    base, _ = twin_server
    resp = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", body)
    assert resp.status_code == 400
    assert name in issue_text(resp)


def test_get_with_primitive_inputs_answers_like_post(twin_server):
    """A call that only computes is idempotent: GET with primitive inputs answers as POST does."""
    base, _ = twin_server
    query = {"horizonDays": "7", "seed": "3", "samples": "50", "dose": "75", "missedDoseDay": ["2", "3"]}
    got = requests.get(f"{base}/Patient/{ACTIVE_PARTICIPANT}/$simulate", params=query, timeout=60)
    assert got.status_code == 200, got.text
    posted = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", params(horizonDays=7, seed=3, samples=50, dose=75.0,
                                                                     missedDoseDay=[2, 3]))
    assert posted.status_code == 200
    forecasts = lambda body: [p for p in body["parameter"] if p["name"] == "forecast"]
    assert forecasts(got.json()) == forecasts(posted.json())


def test_get_that_would_persist_is_method_not_allowed(twin_server):
    base, _ = twin_server
    count = lambda: requests.get(f"{base}/Basic", params={"_summary": "count"}, timeout=10).json()["total"]
    before = count()
    resp = requests.get(f"{base}/Patient/{ACTIVE_PARTICIPANT}/$simulate",
                        params={"horizonDays": "7", "persist": "true"}, timeout=30)
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "POST"
    assert "$simulate" in issue_text(resp) and "persist" in issue_text(resp)
    assert count() == before  # nothing written


def test_get_on_calibrate_is_method_not_allowed(twin_server):
    base, _ = twin_server
    resp = requests.get(f"{base}/Patient/{ACTIVE_PARTICIPANT}/$calibrate", timeout=30)
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "POST"


def test_simulate_on_an_unsupported_resource_type(twin_server):
    base, _ = twin_server
    resp = simulate(base, "Observation/tt201-p002-hba1c-v1")
    assert 400 <= resp.status_code < 500
    text = issue_text(resp)
    assert "$simulate" in text and "Observation" in text


def test_patient_only_and_cohort_only_parameters(twin_server):
    base, _ = twin_server
    resp = simulate(base, "ResearchStudy/tt-201", params(persist=True))
    assert resp.status_code == 400 and "persist" in issue_text(resp)
    resp = simulate(base, f"Patient/{ACTIVE_PARTICIPANT}", params(memberOutputs=True))
    assert resp.status_code == 400 and "memberOutputs" in issue_text(resp)


def test_capability_statement_lists_the_twin_operations(twin_server):
    base, _ = twin_server
    statement = requests.get(f"{base}/metadata", timeout=60).json()
    listed = {r["type"]: {o["name"]: o["definition"] for o in r.get("operation", [])}
              for r in statement["rest"][0]["resource"]}
    canon = "https://trialtwin.org/fhir/OperationDefinition/"
    for resource_type in ("Patient", "Group", "ResearchStudy"):
        assert listed[resource_type]["simulate"] == canon + "simulate"
    assert listed["Patient"]["calibrate"] == canon + "calibrate"
    assert "calibrate" not in listed.get("Group", {})
    published = requests.get(f"{base}/OperationDefinition/simulate", timeout=30).json()
    # computing is the default; only persist=true stores (and then GET is refused)
    assert published["affectsState"] is False and published["instance"] is True
