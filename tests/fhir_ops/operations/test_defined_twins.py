"""Twins of any study with a model definition: a participant of each shipped example study calibrates and
forecasts with 90 % intervals over HTTP; the study's fitted estimate is the prior and is recorded; a
participant of a study without a model gets a clear OperationOutcome."""
from __future__ import annotations

import json

import pytest

from fhir_ops.cli import main
from fhir_ops.mapping import model_definition as fm
from inference import model_definition as md
from tests.fhir_ops.conftest import error_id
from tests.fhir_ops.operations.model_studies import example_design, mapping_for, simulated_nonmem
from tests.fhir_ops.operations.test_fit_population import load_theoph, params

pytestmark = pytest.mark.api


def build_study(fhir, tmp_path, name: str, *, with_model: bool = True, n: int = 6) -> md.ModelDefinition:
    model = md.load_definition(md.shipped_definition(name), fm.ucum_factor)
    doses, times, covariates = example_design(name)
    text, _ = simulated_nonmem(model, n, doses, times, seed=11, covariates=covariates)
    (tmp_path / f"{name}.csv").write_text(text)
    (tmp_path / f"{name}.map.json").write_text(json.dumps(mapping_for(model, f"ex-{name}", with_model=with_model)))
    assert main(["model", "publish", name, "--url", fhir.base]) == 0
    assert main(["load", "--format", "nonmem", str(tmp_path / f"{name}.csv"), "--mapping",
                 str(tmp_path / f"{name}.map.json"), "--url", fhir.base]) == 0
    return model


@pytest.mark.parametrize("name", ["theophylline", "tt201", "tumour-growth"])
def test_each_example_study_calibrates_and_forecasts(fhir, tmp_path, name):
    model = build_study(fhir, tmp_path, name)
    patient = f"Patient/ex-{name}-1"
    cal = fhir.post(f"{patient}/$calibrate", {"resourceType": "Parameters"})
    assert cal.status_code == 200, cal.text
    got = params(cal.json())
    assert got["modelVersion"] == model.canonical
    assert {p["name"] for p in got["parameter"]} == set(model.population_model().random_effects)
    assert all(p["low"] < p["mean"] < p["high"] for p in got["parameter"])
    horizon = {"theophylline": 1, "tt201": 14, "tumour-growth": 84}[name]
    body = {"resourceType": "Parameters", "parameter": [{"name": "horizonDays", "valueInteger": horizon},
                                                        {"name": "stepHours", "valueInteger": 24 if horizon > 1 else 2},
                                                        {"name": "level", "valueDecimal": 0.9}]}
    sim = fhir.post(f"{patient}/$simulate", body)
    assert sim.status_code == 200, sim.text
    out = params(sim.json())
    assert out["modelVersion"] == model.canonical and "populationEstimate" not in out
    rows = out["forecast"]
    assert {r["output"] for r in rows} == set(model.output_names)
    assert all(r["low"] <= r["median"] <= r["high"] for r in rows)
    assert sum(r["low"] < r["high"] for r in rows) >= 0.9 * len(rows)
    assert {r["unit"] for r in rows} == {model.output_units[o] for o in model.output_names}
    assert out["observed"] and all(o["time"].endswith("Z") for o in out["observed"])
    wrong = fhir.post(f"{patient}/$simulate", {"resourceType": "Parameters", "parameter": [
        {"name": "output", "valueCode": "hba1c" if name != "tt201" else "sld"}]})
    assert wrong.status_code == 400 and error_id(wrong) == "invalid-code"


def test_the_fitted_estimate_is_the_prior_and_is_recorded(fhir):
    load_theoph(fhir.base)
    before = params(fhir.post("Patient/theoph-3/$calibrate", {"resourceType": "Parameters"}).json())
    fit = params(fhir.post("ResearchStudy/theoph/$fit-population", {"resourceType": "Parameters", "parameter": [
        {"name": "vpcReplicates", "valueInteger": 0}, {"name": "standardErrors", "valueBoolean": False}]}).json())
    after = params(fhir.post("Patient/theoph-3/$calibrate", {"resourceType": "Parameters"}).json())
    assert after["populationEstimate"] == fit["estimate"] and "populationEstimate" not in before
    assert before["parameter"] != after["parameter"]
    sim = params(fhir.post("Patient/theoph-3/$simulate", {"resourceType": "Parameters", "parameter": [
        {"name": "horizonDays", "valueInteger": 1}, {"name": "stepHours", "valueInteger": 6}]}).json())
    assert sim["populationEstimate"] == fit["estimate"]


def test_participant_of_a_study_without_a_model(fhir, tmp_path):
    build_study(fhir, tmp_path, "theophylline", with_model=False, n=2)
    for op in ("$simulate", "$calibrate"):
        resp = fhir.post(f"Patient/ex-theophylline-1/{op}", {"resourceType": "Parameters"})
        assert resp.status_code == 422, resp.text
        assert error_id(resp) == "study-without-model"
        assert "references no twin model definition" in resp.json()["issue"][0]["diagnostics"]
