"""``$predict-dropout`` with ``outcome=withdrawal`` over real HTTP: horizon, outcome code, Tasks, no duplicates, errors.

The purpose-built participants of ``test_predict_dropout`` are reused; the served probability must equal
the in-process withdrawal model's for the same ``ParticipantHistory``.
"""
from __future__ import annotations

import datetime as dt

import pytest

from fhir_ops.conformance import check
from inference.registry import default_registry
from inference.service import InferenceService
from inference.withdrawal import assess_withdrawal_risk
from tests.fhir_ops.conftest import error_id
from tests.fhir_ops.test_predict_dropout import (AS_OF, AS_OF_DAY, high_risk, load, low_risk, out, predictions,
                                                 search, study_resources, value)

pytestmark = pytest.mark.api

OP = "$predict-dropout"
KINDS = {"threshold": "valueDecimal", "horizonDays": "valueInteger", "asOf": "valueDateTime", "model": "valueString",
         "persist": "valueBoolean", "createTasks": "valueBoolean", "outcome": "valueCode"}


def run(fhir, target: str, **params):
    body = {"resourceType": "Parameters", "parameter": [{"name": k, KINDS[k]: v} for k, v in params.items()]}
    return fhir.post(f"{target}/{OP}", body)


def in_process(horizon: int) -> dict:
    svc = InferenceService(micro_batching=False, force_cpu=True)
    hi, lo = assess_withdrawal_risk([high_risk()[1], low_risk()[1]], AS_OF_DAY, horizon_days=horizon,
                                    threshold=0.5, service=svc)
    svc.close()
    return {"pd-high": hi.probability, "pd-low": lo.probability}


@pytest.fixture(scope="module")
def expected():
    p = in_process(28)
    assert p["pd-high"] > p["pd-low"], p
    return p | {"threshold": round((p["pd-high"] + p["pd-low"]) / 2, 6)}


@pytest.fixture
def seeded(fhir):
    load(fhir, study_resources() + high_risk()[0] + low_risk()[0])
    return fhir


def test_withdrawal_risk_names_outcome_and_horizon(seeded, expected):
    resp = run(seeded, "Patient/pd-high", outcome="withdrawal", threshold=expected["threshold"], asOf=AS_OF)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert value(body, "outcome") == "withdrawal" and value(body, "horizonDays") == 28
    assert value(body, "model") == f"withdrawal@{default_registry().latest('withdrawal').version}"
    pred = predictions(body)["pd-high"]
    assert value(pred, "probability") == pytest.approx(expected["pd-high"], abs=1e-5)
    assert value(pred, "flagged") is True
    end = (dt.datetime(2026, 4, 25, 0, 30) + dt.timedelta(days=28)).isoformat() + "Z"
    assert value(pred, "horizonEnd") == end
    ra = seeded.get(value(pred, "riskAssessment")["reference"]).json()
    assert check(ra) == []
    assert ra["prediction"][0]["outcome"]["coding"][0] == {
        "system": "https://trialtwin.org/fhir/CodeSystem/trialtwin", "code": "withdrawal",
        "display": "Withdraws from the study within the horizon"}
    assert ra["prediction"][0]["whenPeriod"] == {"start": AS_OF, "end": end}
    assert ra["prediction"][0]["probabilityDecimal"] == pytest.approx(expected["pd-high"], abs=1e-5)
    device = seeded.get(ra["performer"]["reference"]).json()
    assert any(v.get("value") == default_registry().latest("withdrawal").version for v in device.get("version", []))
    task = seeded.get(value(pred, "task")["reference"]).json()
    assert check(task) == [] and "withdrawing from the study within 28 days" in task["description"]
    assert task["restriction"]["period"]["end"] == end


def test_below_threshold_no_task_and_rerun_does_not_duplicate(seeded, expected):
    low = run(seeded, "Patient/pd-low", outcome="withdrawal", threshold=expected["threshold"], asOf=AS_OF).json()
    assert value(predictions(low)["pd-low"], "flagged") is False
    assert search(seeded, "Task?patient=Patient/pd-low") == []
    first = run(seeded, "Patient/pd-high", outcome="withdrawal", threshold=expected["threshold"], asOf=AS_OF).json()
    second = run(seeded, "Patient/pd-high", outcome="withdrawal", threshold=expected["threshold"], asOf=AS_OF).json()
    assert (value(first, "tasksCreated"), value(second, "tasksCreated"), value(second, "tasksUpdated")) == (1, 0, 1)
    assert len(search(seeded, "Task?patient=Patient/pd-high")) == 1
    # a missed-visit run afterwards refreshes the same open outreach Task: one outreach per participant
    third = run(seeded, "Patient/pd-high", threshold=0.01, asOf=AS_OF).json()
    assert value(third, "outcome") == "missed-visit" and value(third, "tasksUpdated") == 1
    assert len(search(seeded, "Task?patient=Patient/pd-high")) == 1


def test_longer_horizon_means_higher_risk(seeded):
    probs = []
    for horizon in (7, 28, 84):
        body = run(seeded, "Patient/pd-high", outcome="withdrawal", horizonDays=horizon, asOf=AS_OF,
                   persist=False).json()
        probs.append(value(predictions(body)["pd-high"], "probability"))
        assert value(predictions(body)["pd-high"], "probability") == pytest.approx(
            in_process(horizon)["pd-high"], abs=1e-5)
    assert probs[0] < probs[1] < probs[2]


def test_study_level_withdrawal(seeded, expected):
    body = run(seeded, "ResearchStudy/pd-study", outcome="withdrawal", threshold=expected["threshold"],
               asOf=AS_OF).json()
    assert value(body, "evaluated") == 2 and value(body, "flagged") == 1 and value(body, "tasksCreated") == 1
    assert {value(p, "subject")["reference"] for p in out(body, "prediction")} == {"Patient/pd-high", "Patient/pd-low"}


@pytest.mark.parametrize("params, status, eid", [
    ({"outcome": "death"}, 400, "unknown-outcome"),
    ({"outcome": "withdrawal", "horizonDays": 85}, 400, "horizon-out-of-range"),
    ({"outcome": "withdrawal", "horizonDays": 0}, 400, "horizon-out-of-range"),
    ({"outcome": "withdrawal", "model": "dropout"}, 400, "model-not-applicable"),
    ({"model": "withdrawal"}, 400, "model-not-applicable"),
    ({"outcome": "withdrawal", "model": "withdrawal@9.9.9"}, 404, "unknown-model"),
])
def test_bad_withdrawal_parameters_write_nothing(seeded, params, status, eid):
    resp = run(seeded, "Patient/pd-high", asOf=AS_OF, **params)
    assert resp.status_code == status, resp.text
    assert error_id(resp) == eid
    for kind in ("RiskAssessment", "Task", "Provenance"):
        assert search(seeded, kind) == []


# ------------------------------------------------------------------ per-study thresholds from a stated target

def _study_with_policy(fhir, *extensions):
    from fhir_ops.mapping.outreach_policy import policy_extension  # noqa: F401 (documents the format used)

    study = dict(study_resources()[0], extension=list(extensions))
    assert fhir.put(f"ResearchStudy/{study['id']}", study).status_code in (200, 201)


def _policy(outcome, kind, value):
    return {"url": "https://trialtwin.org/fhir/StructureDefinition/outreach-policy",
            "extension": [{"url": "outcome", "valueCode": outcome}, {"url": "target", "valueCode": kind},
                          {"url": "value", "valueDecimal": value}]}


def test_default_threshold_is_the_models_recorded_operating_point(seeded):
    body = run(seeded, "Patient/pd-high", outcome="withdrawal", asOf=AS_OF, persist=False).json()
    meta = default_registry().latest("withdrawal").metadata
    assert value(body, "threshold") == meta["output"]["product_threshold"]
    assert value(body, "thresholdBasis").startswith("model default")
    # the missed-visit default is unchanged
    body = run(seeded, "Patient/pd-high", asOf=AS_OF, persist=False).json()
    assert (value(body, "threshold"), value(body, "thresholdBasis")) == (0.8, "product default 0.8")


@pytest.mark.parametrize("target, value_, n_on_study", [("precision", 0.3, None), ("weekly-capacity", 1, 2)])
def test_study_policy_sets_the_threshold(seeded, target, value_, n_on_study):
    from inference.outreach import OutreachTarget, choose_threshold

    _study_with_policy(seeded, _policy("withdrawal", target, value_))
    meta = default_registry().latest("withdrawal").metadata
    point = choose_threshold(meta["validation"]["operating_points"], OutreachTarget(target, value_), n_on_study)
    for where in ("ResearchStudy/pd-study", "Patient/pd-high"):  # a participant's call finds its study's policy
        body = run(seeded, where, outcome="withdrawal", asOf=AS_OF, persist=False).json()
        assert value(body, "threshold") == point["threshold"], body
        assert value(body, "thresholdBasis").startswith("ResearchStudy/pd-study outreach policy")
        assert f"precision {point['precision']:.3f}" in value(body, "thresholdBasis")
    # an explicit parameter still wins
    body = run(seeded, "Patient/pd-high", outcome="withdrawal", asOf=AS_OF, persist=False, threshold=0.5).json()
    assert (value(body, "threshold"), value(body, "thresholdBasis")) == (0.5, "parameter")


@pytest.mark.parametrize("policy, eid", [
    (_policy("withdrawal", "recall", 0.5), "invalid-outreach-policy"),
    (_policy("withdrawal", "precision", 1.5), "invalid-outreach-policy"),
    (_policy("withdrawal", "precision", 0.99), "outreach-policy-unreachable"),
])
def test_bad_study_policy_is_422_and_writes_nothing(seeded, policy, eid):
    _study_with_policy(seeded, policy)
    resp = run(seeded, "ResearchStudy/pd-study", outcome="withdrawal", asOf=AS_OF)
    assert (resp.status_code, error_id(resp)) == (422, eid), resp.text
    for kind in ("RiskAssessment", "Task", "Provenance"):
        assert search(seeded, kind) == []


def test_missed_visit_policy_needs_operating_points(seeded):
    _study_with_policy(seeded, _policy("missed-visit", "precision", 0.5))
    resp = run(seeded, "ResearchStudy/pd-study", asOf=AS_OF)
    assert (resp.status_code, error_id(resp)) == (422, "outreach-policy-unsupported"), resp.text


def test_withdrawal_on_the_demo_study(module_fhir):
    from fhir_ops.demo import STUDY_ID, build_demo_resources, simulate_demo_records

    resources = build_demo_resources(simulate_demo_records(seed=7, n=24))
    for start in range(0, len(resources), 500):  # the test server takes bodies up to 1 MiB
        load(module_fhir, resources[start:start + 500])
    resp = run(module_fhir, f"ResearchStudy/{STUDY_ID}", outcome="withdrawal", horizonDays=56, persist=False)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    probs = [value(p, "probability") for p in out(body, "prediction")]
    assert probs and all(0 < p < 1 for p in probs)
    assert value(body, "evaluated") == len(probs) and value(body, "horizonDays") == 56
    assert search(module_fhir, "RiskAssessment") == []  # persist=false wrote nothing


def test_completed_schedule_has_no_withdrawal_to_predict(seeded):
    from tests.fhir_ops.test_predict_dropout import participant

    done, _ = participant("pd-done", visits=[(0, "fulfilled", False), (28, "fulfilled", True), (56, "fulfilled", True)],
                          taken_days=list(range(60)), travel_km=5.0, age_days=int(50 * 365.25), female=True,
                          weight_kg=70.0, egfr=90.0)
    load(seeded, done)
    resp = run(seeded, "Patient/pd-done", outcome="withdrawal")
    assert (resp.status_code, error_id(resp)) == (422, "no-next-visit"), resp.text
    assert "no withdrawal left to predict" in resp.json()["issue"][0]["diagnostics"]
