"""The daily-regimen family of model definitions: what the format states (derived parameters, bounds of
virtual participants, onset delay, arms, virtual population), how it compiles, and the definitions it
refuses, each with the path of the problem in the document."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from inference import twin
from inference.cohort import Scenario, simulate_cohort
from inference.covariates import Covariates
from inference.model_definition import (Dose, SubjectRecord, check_definition, event_data, example_regimen,
                                        load_definition, mass_concentration_units, shipped_definition)

pytestmark = pytest.mark.unit

MODEL = example_regimen()
RAW = MODEL.definition.to_json()


def _issues(doc) -> list[str]:
    return [str(i) for i in check_definition(doc, mass_concentration_units)]


def _covariates(weight, egfr):
    n = len(weight)
    return Covariates(weight_kg=weight, age_y=[50.0] * n, egfr=egfr, sex_female=[0] * n, distance_km=[5.0] * n,
                      site=[0] * n)


def test_typical_individuals_follow_the_covariate_effects_and_derived_parameters():
    p = MODEL.sample_parameters(_covariates([70.0, 140.0], [90.0, 45.0]), None)
    # CL = 5 (WT/70)^0.75 (eGFR/90)^0.5 and V = 50 WT/70 (power effects, closed form)
    np.testing.assert_allclose(p["cl"], [5.0, 5.0 * 2 ** 0.75 * 0.5 ** 0.5], rtol=1e-12)
    np.testing.assert_allclose(p["v"], [50.0, 100.0], rtol=1e-12)
    # baseline glucose from baseline HbA1c by the ADAG relation (Nathan et al. 2008): 28.7 * 8.2 - 46.7
    np.testing.assert_allclose(p["named"]["FPG0"], 188.64, rtol=1e-12)
    assert p["k_onset"][0] == pytest.approx(1.0 / 40.0)  # TONSET 960 h = 40 days
    assert p["slope"][0] == pytest.approx(0.2 / 365.25, rel=1e-12)  # 0.2 % HbA1c per year


def test_bounds_clip_virtual_participants_and_derived_minimum_holds():
    rng = np.random.default_rng(0)
    p = MODEL.sample_parameters(_covariates([80.0] * 20000, [85.0] * 20000), rng)
    named = p["named"]
    assert named["HBA1C0"].min() >= 5.5 and named["HBA1C0"].max() <= 13.0
    assert named["FPG0"].min() >= 70.0
    # away from the bounds the IIV is the definition's: SD of log CL about 0.3
    assert np.std(np.log(named["CL"])) == pytest.approx(0.3, rel=0.03)


def test_event_rows_and_participant_rows_predict_the_same():
    """The generic event path of a daily-regimen definition (used by $fit-population and NONMEM data)
    runs the daily engine: the same predictions as the participant twin's path."""
    doses = 24.0 * np.arange(40)
    times = [3.0, 400.0, 950.0]
    record = SubjectRecord("s", tuple(Dose(float(t), 100.0) for t in doses),
                           tuple((t, name, np.nan) for t in times for name in MODEL.outputs), {"WT": 82.0, "EGFR": 70.0})
    events = event_data(MODEL.definition, [record])
    phi = np.array(MODEL.population.theta, dtype=float)[None, :]
    phi[0, MODEL.population.random_index] += 0.1
    via_events = MODEL.definition.structural(phi, events)[events.design["evid"] == 0]
    obs = [(t, k) for t in times for k in range(len(MODEL.outputs))]
    data = twin.ParticipantData(doses, np.full(doses.size, 100.0), [k for _, k in obs], [t for t, _ in obs],
                                [np.nan] * len(obs), {"WT": 82.0, "EGFR": 70.0}).observation_data()
    np.testing.assert_allclose(via_events, MODEL.structural(phi, data), rtol=1e-12)


def test_a_compiled_model_pickles_for_worker_processes():
    again = pickle.loads(pickle.dumps(MODEL))
    assert again.canonical == MODEL.canonical and again.outputs == MODEL.outputs
    res = simulate_cohort(Scenario(dose_mg=50.0, n_days=14), n=50, seed=1, model=again)
    ref = simulate_cohort(Scenario(dose_mg=50.0, n_days=14), n=50, seed=1, model=MODEL)
    np.testing.assert_array_equal(res.summary["hba1c_last"], ref.summary["hba1c_last"])


def test_a_definition_without_virtual_population_needs_observed_covariates():
    doc = copy.deepcopy(RAW)
    del doc["virtualPopulation"]
    model = load_definition(doc, mass_concentration_units).regimen
    with pytest.raises(ValueError, match="no virtual population"):
        simulate_cohort(Scenario(n_days=7), n=10, model=model)
    res = simulate_cohort(Scenario(n_days=7), covariates=_covariates([70.0, 80.0], [90.0, 90.0]), model=model)
    assert res.n == 2


def _broken(change) -> list[str]:
    doc = copy.deepcopy(RAW)
    change(doc)
    return _issues(doc)


@pytest.mark.parametrize("change, path, words", [
    (lambda d: d["derived"][0]["terms"].append({"parameter": "NOPE", "coefficient": 1.0}),
     "$.derived[0].terms[2].parameter", "unknown parameter 'NOPE'"),
    (lambda d: d["derived"].append({"name": "CL", "terms": [{"parameter": "V", "coefficient": 0.1}]}),
     "$.derived[2].name", "already a parameter"),
    (lambda d: d["parameters"][5].update(bounds=[13.0, 5.5]), "$.parameters[5].bounds", "low < high"),
    (lambda d: d["pd"].update(exposure="concentration"), "$.disease.parameters.TONSET", "daily-regimen engine only"),
    (lambda d: (d["pk"].update(compartments=2), d["pk"]["parameters"].update(Q="CL", V2="V")), "$.pk",
     "1-compartment first-order oral"),
    (lambda d: d["parameters"][11].update(iiv=0.1), "$.disease.parameters.TONSET", "without inter-individual"),
    (lambda d: d["arms"].append({"name": "placebo", "dose": 5}), "$.arms[3].name", "declared twice"),
    (lambda d: d["virtualPopulation"].update(correlation=[[1, 2, 0, 0], [2, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
     "$.virtualPopulation.correlation[0][1]", "greater than the maximum"),
    (lambda d: d["virtualPopulation"].update(correlation=[[1, .99, 0, 0], [.99, 1, -.99, 0], [0, -.99, 1, 0],
                                                          [0, 0, 0, 1]]),
     "$.virtualPopulation.correlation", "positive definite"),
    (lambda d: d["covariates"][0].pop("participantAttribute"), "$.covariateEffects[0].covariate", "participantAttribute"),
    (lambda d: d["covariates"][1].update(participantAttribute="weight_kg"), "$.covariates[1].participantAttribute",
     "more than one"),
])
def test_broken_daily_definitions_are_refused_with_the_path(change, path, words):
    issues = _broken(change)
    assert any(i.startswith(path + ":") and (words is None or words in i) for i in issues), issues


def test_the_shipped_examples_are_valid_and_only_one_is_a_daily_regimen():
    daily = []
    for name in ("theophylline", "tt201", "tumour-growth"):
        doc = shipped_definition(name)
        assert _issues(doc) == [], name
        if load_definition(doc, mass_concentration_units).regimen is not None:
            daily.append(name)
    assert daily == ["tt201"]
