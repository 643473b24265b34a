"""Unit tier of the twin mapping: every resource $simulate and $calibrate generate passes the
structural profile check, and a stored twin state reads back as the posterior it was built from."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from fhir_ops import conformance
from fhir_ops.demo import ensure_demo_study
from fhir_ops.errors import Unprocessable
from fhir_ops.mapping import twin as twin_fhir
from fhir_ops.mapping.participant import load_participant
from fhir_ops.mapping.provenance import build_provenance
from fhir_ops.operations import twin_common
from fhir_ops.store.bundle import put_entry
from fhir_ops.store.sqlite import SQLiteStore
from inference import twin

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 21, 6, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = SQLiteStore(str(tmp_path_factory.mktemp("twin-mapping") / "store.sqlite"))
    ensure_demo_study(store, participants=6, seed=7)
    yield store
    store.close()


@pytest.fixture(scope="module")
def generated(store):
    """A participant's twin state, forecast Observations and Provenance, as $simulate builds them."""
    pt = twin_common.participant_twin(store, "tt201-p002", twin_common.participant_model(store, "tt201-p002"))
    _, state_ref = twin_common.state_entry(pt, NOW)
    state = twin_fhir.build_twin_state(pt.record, pt.posterior, pt.device, pt.inputs, NOW, pt.model)
    start_h, start = twin_fhir.forecast_start(pt.record)
    fc = twin.forecast(pt.model, pt.posterior, twin.TwinScenario(dose=100.0, start_h=start_h, horizon_days=3),
                       twin_fhir.forecast_times(3, 24), seed=1)
    observations = twin_fhir.forecast_observations(pt.record, fc, start, pt.device, state_ref, NOW, pt.model)
    provenance = build_provenance([state_ref] + [f"Observation/{o['id']}/_history/1" for o in observations],
                                  pt.inputs, pt.device, None, "$simulate", recorded=NOW)
    return pt, state, observations, provenance


def test_every_generated_resource_conforms_to_its_profile(generated):
    pt, state, observations, provenance = generated
    assert len(observations) == 3 * 4
    for resource in [state, provenance, pt.device, *observations]:
        assert resource["meta"]["profile"], resource["resourceType"]
        assert conformance.check(resource) == [], resource["resourceType"]


def test_conformance_check_catches_a_broken_forecast(generated):
    """The check is not vacuous: a forecast that looks like a measurement fails it."""
    _, _, observations, _ = generated
    broken = {**observations[0], "status": "final"}
    broken.pop("extension")  # no longer names its twin state
    problems = conformance.check(broken)
    assert any("status" in p for p in problems) and any("twin-state-reference" in p for p in problems), problems


def test_twin_state_reads_back_as_its_posterior(generated):
    pt, state, _, _ = generated
    stored = twin_fhir.read_twin_state({**state, "meta": {**state["meta"], "versionId": "1"}})
    assert stored.names == tuple(name for name, _, _ in pt.model.parameters)
    np.testing.assert_allclose(stored.mean, pt.posterior.mean, rtol=1e-11)
    np.testing.assert_allclose(stored.cov, pt.posterior.cov, rtol=1e-10, atol=1e-14)
    assert set(stored.inputs) == set(pt.inputs)
    assert stored.model == f"Device/{pt.device['id']}/_history/{pt.device['meta']['versionId']}"
    rebuilt = twin_fhir.posterior_of(stored, pt.data, pt.model)
    np.testing.assert_allclose(rebuilt.sd, pt.posterior.sd, rtol=1e-9)


def test_forecast_observation_is_marked_simulated_with_its_interval(generated):
    _, _, observations, _ = generated
    obs = observations[0]
    assert obs["status"] == "preliminary"
    assert obs["category"][0]["coding"][0]["code"] == "simulated-forecast"
    assert obs["meta"]["tag"][0]["code"] == "simulated"
    assert obs["method"]["coding"][0]["code"] == "twin-simulation"
    rng = obs["component"][0]["valueRange"]
    assert rng["low"]["value"] <= obs["valueQuantity"]["value"] <= rng["high"]["value"]
    assert {c["system"] for c in obs["code"]["coding"]} >= {"https://trialtwin.org/fhir/CodeSystem/twin-output"}


def test_calibration_inputs_are_the_data_the_twin_reads(store):
    record = load_participant(store, "tt201-p003")
    model = twin_common.participant_model(store, "tt201-p003").regimen
    inputs = twin_fhir.calibration_inputs(record, model)
    assert all("/_history/" in ref for ref in inputs)
    assert len([r for r in inputs if r.startswith("MedicationAdministration/")]) == len(record.dose_records)
    outcome = sum(len(record.series_sources.get(o, ())) for o in model.outputs)
    assert outcome == record.n_observations
    # home heart-rate and blood-pressure readings do not move the twin
    assert not any("-hr-" in r or "-sbp-" in r for r in inputs)


def test_participant_without_outcomes_is_unprocessable(store):
    lonely = store.create({"resourceType": "Patient", "gender": "male"}).resource
    model = twin_common.participant_model(store, "tt201-p003").regimen
    with pytest.raises(Unprocessable) as err:
        twin_fhir.participant_data(load_participant(store, lonely["id"]), model)
    assert err.value.error_id == "participant-without-data"


def test_arm_names_and_group_characteristics():
    assert twin_fhir.arm_dose("TTX-101 12.5 mg") == 12.5
    assert twin_fhir.arm_dose("Matching placebo") == 0.0
    group = {"characteristic": [{"code": {"coding": [{"code": "study-arm"}]},
                                 "valueCodeableConcept": {"text": "100 mg"}}]}
    assert twin_fhir.group_arm(group) == "100 mg"
    assert twin_fhir.group_arm({"characteristic": []}) is None


def test_a_failed_persist_writes_nothing(store, generated):
    """Twin state, forecasts and Provenance go in one transaction: a stale If-Match on the state
    (another calibration won the race) leaves no forecast Observation and no Provenance behind."""
    from fhir_ops.errors import FhirError

    pt, state, observations, _ = generated
    store.update("Basic", state["id"], state)  # version 1 exists now
    stale = put_entry({**state}, if_match='W/"7"')
    before = len(store.search_all("Provenance", []))
    with pytest.raises(FhirError) as err:
        twin_common.commit(store, [stale] + [put_entry(o) for o in observations[:3]],
                           [f"Basic/{state['id']}/_history/8"], pt.inputs, pt.device, {}, "$simulate")
    assert err.value.status == 412
    assert len(store.search_all("Provenance", [])) == before
    for obs in observations[:3]:
        assert store.search_all("Observation", [("_id", obs["id"])]) == []


def test_stored_forecasts_are_not_read_back_as_data(store):
    """The participant's own persisted forecasts (tagged simulated) are left out by the search, so the
    record (series, inputs, last data time) is the same with or without them; a preliminary
    Observation without the tag is still read but, as before, is not data."""
    pid = "tt201-p003"
    before = load_participant(store, pid)
    pt = twin_common.participant_twin(store, pid, twin_common.participant_model(store, pid))
    start_h, start = twin_fhir.forecast_start(pt.record)
    fc = twin.forecast(pt.model, pt.posterior, twin.TwinScenario(dose=100.0, start_h=start_h, horizon_days=5),
                       twin_fhir.forecast_times(5, 24), seed=3)
    observations = twin_fhir.forecast_observations(pt.record, fc, start, pt.device, "Basic/x/_history/1", NOW,
                                                   pt.model)
    for obs in observations:
        store.update("Observation", obs["id"], obs)
    # no meta at all (an empty "meta": {} is not valid R4 JSON)
    untagged = {**{k: v for k, v in observations[0].items() if k != "meta"}, "id": "untagged-preliminary"}
    store.update("Observation", untagged["id"], untagged)
    stored = {o["id"] for o in store.search_all("Observation", [("subject", f"Patient/{pid}")])}
    assert {o["id"] for o in observations} <= stored  # they are there, just not read as data
    after = load_participant(store, pid)
    forecast_refs = {f"Observation/{o['id']}" for o in observations}
    assert not any(ref.rsplit("/_history", 1)[0] in forecast_refs for ref in after.source_times)
    assert any(ref.startswith("Observation/untagged-preliminary/") for ref in after.source_times)
    assert after.last_data_time == before.last_data_time
    assert twin_fhir.calibration_inputs(after, pt.model) == twin_fhir.calibration_inputs(before, pt.model)
    for name, series in before.series.items():
        assert np.array_equal(after.series[name].values, series.values)
