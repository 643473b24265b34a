"""Twin model definitions: validation with paths, compilation onto the numeric core, checked against
closed forms and nlme's published Theophylline fit."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from inference import model_definition as md
from inference.datasets import load_theoph, ssfol
from inference.estimation import fit_population
from inference.pk import TwoCompartment
from terminology.ucum import conversion

pytestmark = pytest.mark.unit

# Pinheiro & Bates (2000) fm3Theo, as in tests/inference/test_estimation.py
NLME_FIXED = {"KE": -2.4547, "KA": 0.4657, "CL": -3.2272}
NLME_SIGMA = 0.709


def ucum(a, b):
    return float(conversion(a, b)[1])


def theoph_records():
    th = load_theoph()
    records = []
    for i, sid in enumerate(th.subject_ids):
        rows = th.subject == i
        wt = float(th.covariates["weight"][i])
        records.append(md.SubjectRecord(sid, (md.Dose(0.0, float(th.design["dose"][rows][0]) * wt),),
                                        tuple((float(t), "concentration", float(v))
                                              for t, v in zip(th.time[rows], th.value[rows])), {"WT": wt}))
    return records


def paths(raw):
    return [i.path for i in md.check_definition(raw, ucum)]


@pytest.mark.parametrize("name", ["theophylline", "tt201", "tumour-growth"])
def test_shipped_definitions_validate_and_compile(name):
    raw = md.shipped_definition(name)
    assert md.check_definition(raw, ucum) == []
    model = md.load_definition(raw, ucum)
    assert model.population_model().n_random_effects >= 2


def test_unknown_compartment_count_is_named_by_path():
    raw = md.shipped_definition("theophylline")
    raw["pk"]["compartments"] = 4
    assert paths(raw) == ["$.pk.compartments"]
    with pytest.raises(md.DefinitionError, match=r"\$\.pk\.compartments"):
        md.load_definition(raw, ucum)


def test_schema_errors_carry_the_path():
    raw = md.shipped_definition("theophylline")
    raw["outputs"][0]["error"]["kind"] = "multiplicative"
    del raw["pk"]["amountUnit"]
    assert set(paths(raw)) == {"$.outputs[0].error.kind", "$.pk"}


def test_unknown_parameter_in_a_role():
    raw = md.shipped_definition("theophylline")
    raw["pk"]["parameters"]["KA"] = "KAA"
    assert "$.pk.parameters.KA" in paths(raw)


def test_missing_role_for_the_structure():
    raw = md.shipped_definition("tumour-growth")
    del raw["disease"]["parameters"]["KD"]
    assert "$.disease.parameters" in paths(raw)


def test_inconsistent_units():
    raw = md.shipped_definition("theophylline")
    raw["outputs"][0]["observation"]["unit"] = "mg"          # a mass is no concentration
    raw["dosing"][0]["unit"] = "mL"
    assert set(paths(raw)) == {"$.outputs[0].observation.unit", "$.dosing[0].unit"}


def test_unit_conversion_of_pk_outputs():
    raw = md.shipped_definition("theophylline")
    raw["outputs"][0]["unit"] = "ug/mL"   # the same as mg/L
    raw["outputs"][0]["observation"]["unit"] = "ng/mL"
    model = md.load_definition(raw, ucum)
    assert model.output_scale == (1.0,)
    raw["outputs"][0]["unit"] = "ng/mL"
    assert md.load_definition(raw, ucum).output_scale == (1000.0,)


def test_categorical_covariate_effect_and_correlation_checks():
    raw = md.shipped_definition("theophylline")
    raw["covariates"].append({"name": "SEX", "type": "categorical", "categories": ["female", "male"]})
    raw["covariateEffects"].append({"parameter": "KE", "covariate": "SEX", "form": "categorical",
                                    "category": "male", "coefficient": 0.2})
    model = md.load_definition(raw, ucum)
    rec = md.SubjectRecord("a", (md.Dose(0.0, 300.0),), ((1.0, "concentration", 1.0),), {"WT": 70.0, "SEX": "male"})
    data = md.event_data(model, [rec])
    assert float(data.covariates["SEX=male"][0]) == 1.0 and float(data.covariates["SEX=female"][0]) == 0.0
    bad = copy.deepcopy(raw)
    bad["covariateEffects"][-1]["category"] = "other"
    assert "$.covariateEffects[1].category" in paths(bad)
    bad = copy.deepcopy(raw)
    bad["variability"] = {"structure": "diagonal", "correlations": [{"between": ["KA", "KE"], "value": 0.3}]}
    assert set(paths(bad)) == {"$.variability.correlations[0].between", "$.variability.correlations[0]"}


def test_one_compartment_oral_matches_nlme_ssfol():
    model = md.load_definition(md.shipped_definition("theophylline"), ucum)
    th = load_theoph()
    data = md.event_data(model, theoph_records())
    phi = np.array([[-2.45, 0.47, -3.23]] * th.n_subjects)
    phi[:, 2] += 0.0  # CL per kg: the weight effect comes from the covariate
    got = md.ModelDefinition.structural(model, phi + _weight_shift(model, data), data)
    # event_data puts each subject's dose first; compare the observation rows in order
    obs = data.design["evid"] == 0
    want = ssfol(phi, th)
    # doses were rounded to mg (Dose * Wt) in the records; relative error below 1e-3
    np.testing.assert_allclose(got[obs], want, rtol=1e-3, atol=1e-12)


def _weight_shift(model, data):
    # structural() takes individual phi; the fixed weight effect is part of typical_parameters
    from inference.population import typical_parameters

    return typical_parameters(model.population_model(), data) - model.population_model().theta


def _single(raw_changes, doses, times, output="concentration", covariates=None):
    raw = md.shipped_definition("theophylline")
    raw.update(raw_changes)
    model = md.load_definition(raw, ucum)
    rec = md.SubjectRecord("s", tuple(doses), tuple((t, output, np.nan) for t in times), covariates or {"WT": 1.0})
    return model, md.event_data(model, [rec])


TWO_CMT_IV = {
    "parameters": [{"name": n, "typical": v, "scale": "log", "iiv": 0.2} for n, v in
                   (("CL", 5.0), ("V", 30.0), ("Q", 10.0), ("V2", 60.0))],
    "pk": {"compartments": 2, "absorption": "none", "elimination": "linear",
           "parameters": {"CL": "CL", "V": "V", "Q": "Q", "V2": "V2"}, "amountUnit": "mg", "volumeUnit": "L"},
    "dosing": [{"medication": {"system": "urn:x", "code": "d"}, "route": "iv", "unit": "mg"}],
    "covariates": [], "covariateEffects": [],
}


def test_two_compartment_bolus_and_infusion_closed_forms():
    times = [0.5, 1.0, 2.0, 6.0, 12.0, 24.0]
    model, data = _single(TWO_CMT_IV, [md.Dose(0.0, 100.0, 0.0, "iv"), md.Dose(12.0, 50.0, 2.0, "iv")], times)
    phi = np.log([[5.0, 30.0, 10.0, 60.0]])
    got = model.structural(phi, data)[data.design["evid"] == 0]
    # closed form: bi-exponential bolus response plus the integral of it over the infusion
    m = TwoCompartment(cl=5.0, v=30.0, q=10.0, v2=60.0)
    (a, alpha), (b, beta) = m.disposition()
    t = np.array(times)
    bolus = 100.0 * (a * np.exp(-alpha * t) + b * np.exp(-beta * t))
    rate = 25.0
    tau = np.clip(t - 12.0, 0, None)
    given = np.minimum(tau, 2.0)
    inf = sum(rate * c / lam * (np.exp(-lam * (tau - given)) - np.exp(-lam * tau)) for c, lam in ((a, alpha), (b, beta)))
    np.testing.assert_allclose(got, bolus + inf, rtol=1e-10)


THREE_CMT_ORAL = {
    "parameters": [{"name": n, "typical": v, "scale": "log", "iiv": 0.2} for n, v in
                   (("CL", 5.0), ("V", 10.0), ("Q", 20.0), ("V2", 40.0), ("Q3", 1.5), ("V3", 150.0), ("KA", 0.9))],
    "pk": {"compartments": 3, "absorption": "first-order", "elimination": "linear",
           "parameters": {"CL": "CL", "V": "V", "Q": "Q", "V2": "V2", "Q3": "Q3", "V3": "V3", "KA": "KA"},
           "amountUnit": "mg", "volumeUnit": "L"},
    "covariates": [], "covariateEffects": [],
}


def test_three_compartment_definition_predicts_the_triexponential_closed_form():
    # oral dose: C(t) = F D ka sum_r c_r (exp(-l_r t) - exp(-ka t)) / (ka - l_r), the convolution of the
    # first-order input with the triexponential bolus response (tests/inference/test_pk.py checks that
    # response against the published cubic-root formulas and an ODE)
    from inference.pk import ThreeCompartment

    times = [0.25, 1.0, 3.0, 8.0, 24.0, 72.0]
    model, data = _single(THREE_CMT_ORAL, [md.Dose(0.0, 100.0)], times)
    phi = np.log([[5.0, 10.0, 20.0, 40.0, 1.5, 150.0, 0.9]])
    got = model.structural(phi, data)[data.design["evid"] == 0]
    t = np.array(times)
    want = sum(100.0 * 0.9 * c * (np.exp(-lam * t) - np.exp(-0.9 * t)) / (0.9 - lam)
               for c, lam in ThreeCompartment(cl=5.0, v=10.0, q=20.0, v2=40.0, q3=1.5, v3=150.0).disposition())
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_three_compartment_needs_all_six_roles():
    raw = md.shipped_definition("theophylline")
    raw.update(copy.deepcopy(THREE_CMT_ORAL))
    del raw["pk"]["parameters"]["Q3"]
    raw["parameters"] = [p for p in raw["parameters"] if p["name"] != "Q3"]
    assert paths(raw) == ["$.pk.parameters"]
    assert "Q3" in str(md.check_definition(raw, ucum)[0])


def test_effect_compartment_reaches_the_closed_form():
    # IV bolus into 1 compartment: C = D/V exp(-k t); Ce = D/V ke0/(ke0-k) (exp(-k t) - exp(-ke0 t))
    raw = {
        "parameters": [{"name": n, "typical": v, "scale": "log", "iiv": 0.2} for n, v in
                       (("CL", 5.0), ("V", 50.0), ("KE0", 0.3), ("EMAX", 10.0), ("EC50", 1.0))],
        "pk": {"compartments": 1, "absorption": "none", "elimination": "linear",
               "parameters": {"CL": "CL", "V": "V"}, "amountUnit": "mg", "volumeUnit": "L"},
        "pd": {"model": "effect-compartment", "parameters": {"KE0": "KE0", "EMAX": "EMAX", "EC50": "EC50"}},
        "dosing": [{"medication": {"system": "urn:x", "code": "d"}, "route": "iv", "unit": "mg"}],
        "covariates": [], "covariateEffects": [],
        "outputs": [{"name": "effect", "source": "pd", "unit": "1", "error": {"kind": "additive", "additive": 0.1},
                     "observation": {"codes": [{"system": "urn:x", "code": "e"}], "unit": "1"}}],
    }
    times = [1.0, 3.0, 8.0, 20.0]
    model, data = _single(raw, [md.Dose(0.0, 100.0, 0.0, "iv")], times, output="effect")
    got = model.structural(np.log([[5.0, 50.0, 0.3, 10.0, 1.0]]), data)[1:]
    k, ke0, t = 0.1, 0.3, np.array(times)
    ce = 2.0 * ke0 / (ke0 - k) * (np.exp(-k * t) - np.exp(-ke0 * t))
    # exact for piecewise-linear C; the grid has 240 points over 20 h: error well below 1e-3
    np.testing.assert_allclose(got, 10.0 * ce / (1.0 + ce), rtol=2e-3)


def test_indirect_response_and_tumour_growth_limits():
    # IDR kind 1 with a constant infusion reaches kin/kout (1 - C/(IC50 + C)) (Dayneka et al. 1993)
    raw = {
        "parameters": [{"name": n, "typical": v, "scale": "log", "iiv": 0.2} for n, v in
                       (("CL", 5.0), ("V", 5.0), ("KIN", 10.0), ("KOUT", 0.5), ("IMAX", 0.8), ("IC50", 2.0))],
        "pk": {"compartments": 1, "absorption": "none", "elimination": "linear",
               "parameters": {"CL": "CL", "V": "V"}, "amountUnit": "mg", "volumeUnit": "L"},
        "pd": {"model": "indirect-response", "kind": 1,
               "parameters": {"KIN": "KIN", "KOUT": "KOUT", "EMAX": "IMAX", "EC50": "IC50"}},
        "dosing": [{"medication": {"system": "urn:x", "code": "d"}, "route": "iv", "unit": "mg"}],
        "covariates": [], "covariateEffects": [],
        "outputs": [{"name": "r", "source": "pd", "unit": "1", "error": {"kind": "additive", "additive": 0.1},
                     "observation": {"codes": [{"system": "urn:x", "code": "r"}], "unit": "1"}}],
    }
    # 10 mg/h for 100 h into CL 5 L/h: C -> 2 mg/L within hours; R -> 20 (1 - 0.8 * 0.5) = 12
    model, data = _single(raw, [md.Dose(0.0, 1000.0, 100.0, "iv")], [0.0, 99.0], output="r")
    got = model.structural(np.log([[5.0, 5.0, 10.0, 0.5, 0.8, 2.0]]), data)[1:]
    np.testing.assert_allclose(got, [20.0, 12.0], rtol=1e-3)


def test_tumour_growth_without_drug_is_exponential():
    model = md.load_definition(md.shipped_definition("tumour-growth"), ucum)
    rec = md.SubjectRecord("s", (md.Dose(0.0, 0.0, 1 / 168, "iv"),), tuple((t, "sld", np.nan) for t in (0.0, 10.0, 30.0)))
    data = md.event_data(model, [rec])
    theta = model.population_model().theta[None, :]
    got = model.structural(theta, data)[1:]
    np.testing.assert_allclose(got, 70.0 * np.exp(0.02 * np.array([0.0, 10.0, 30.0])), rtol=1e-12)


def test_event_data_refuses_missing_covariates_and_unknown_outputs():
    model = md.load_definition(md.shipped_definition("theophylline"), ucum)
    with pytest.raises(ValueError, match="lacks covariate 'WT'"):
        md.event_data(model, [md.SubjectRecord("a", (md.Dose(0.0, 1.0),), ())])
    with pytest.raises(ValueError, match="unknown output 'auc'"):
        md.event_data(model, [md.SubjectRecord("a", (), ((1.0, "auc", 2.0),), {"WT": 1.0})])


@pytest.mark.slow
def test_theophylline_definition_fits_fm3theo():
    model = md.load_definition(md.shipped_definition("theophylline"), ucum)
    data = md.event_data(model, theoph_records())
    fit = fit_population(model.population_model(), model.structural, data, standard_errors=False)
    assert fit.converged
    for name, want in NLME_FIXED.items():
        assert abs(fit.model.theta[model.parameter_names.index(name)] - want) < 0.05, name
    assert abs(fit.model.errors[0].additive - NLME_SIGMA) < 0.05


# ------------------------------------------------------------------ cohort simulation (simulate_arms)

def _without_variability(population):
    return population.replace(omega=np.eye(population.n_random_effects) * 1e-14)


def test_cohort_of_typical_participants_is_the_closed_form():
    """Without variability every participant is the typical one: the one-compartment oral closed form
    C(t) = D ka / (V (ka - ke)) (e^(-ke t) - e^(-ka t)), V = CL WT / KE, at 320 mg, 70 kg; and the
    disease model without drug is BASE e^(KL t) (tumour growth, Claret et al. 2009)."""
    m = md.load_definition(md.shipped_definition("theophylline"), ucum)
    t = np.array([0.0, 0.5, 1.0, 2.0, 6.0, 12.0, 24.0])
    res = md.simulate_arms(m, _without_variability(m.population_model()), [[md.Dose(0.0, 320.0)]], np.zeros(5, int),
                           [{"WT": 70.0}] * 5, t, seed=3)
    ke, ka, v = 0.08, 1.5, 0.05 * 70.0 / 0.08
    exact = 320.0 * ka / (v * (ka - ke)) * (np.exp(-ke * t) - np.exp(-ka * t))
    np.testing.assert_allclose(res.median[0]["concentration"], exact, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.low[0]["concentration"], exact, rtol=1e-6, atol=1e-9)

    tgi = md.load_definition(md.shipped_definition("tumour-growth"), ucum)
    weeks = np.arange(0.0, 13.0)
    res = md.simulate_arms(tgi, _without_variability(tgi.population_model()), [[]], np.zeros(3, int), [{}] * 3, weeks)
    np.testing.assert_allclose(res.median[0]["sld"], 70.0 * np.exp(0.02 * weeks), rtol=1e-6)
    assert np.all(res.median[0]["concentration"] == 0.0) and res.days.tolist() == (7.0 * weeks).tolist()


def test_cohort_spread_is_seeded_and_follows_the_arms():
    m = md.load_definition(md.shipped_definition("theophylline"), ucum)
    doses = [[md.Dose(0.0, 320.0)], [md.Dose(0.0, 160.0)]]
    arms = np.repeat([0, 1], 1500)
    cov = [{"WT": 70.0}] * arms.size
    a = md.simulate_arms(m, m.population_model(), doses, arms, cov, [1.0, 4.0, 12.0], seed=5, level=0.9)
    b = md.simulate_arms(m, m.population_model(), doses, arms, cov, [1.0, 4.0, 12.0], seed=5, level=0.9)
    assert a.participants == (1500, 1500)
    for k in ("median", "low", "high"):
        np.testing.assert_array_equal(getattr(a, k)[0]["concentration"], getattr(b, k)[0]["concentration"])
    c = a.median[0]["concentration"]
    assert np.all(a.low[0]["concentration"] < c) and np.all(c < a.high[0]["concentration"])
    # the arms draw their own streams, so 160 mg is about (not exactly) half of 320 mg across 1500 participants
    np.testing.assert_allclose(a.median[1]["concentration"], c / 2, rtol=0.08)
    # each member's end-of-horizon value is reported in input order
    assert np.isfinite(a.member_end["concentration"]).all() and a.member_end["concentration"].shape == (3000,)
    with pytest.raises(ValueError, match="WT"):
        md.simulate_arms(m, m.population_model(), doses, arms[:2], [{}, {}], [1.0])


def test_cohort_section_is_checked():
    d = md.shipped_definition("theophylline")
    d["cohort"] = {"interval": 12, "duration": 1}
    assert [i.path for i in md.check_definition(d)] == ["$.cohort.duration"]  # an infusion of an oral dose
    t = md.shipped_definition("tumour-growth")
    t["cohort"]["duration"] = 4
    assert [i.path for i in md.check_definition(t)] == ["$.cohort.duration"]  # infusion longer than the interval
    t["cohort"] = {"stepHours": 500}
    assert [i.path for i in md.check_definition(t)] == ["$.cohort.stepHours"]


def test_control_prediction_is_the_posterior_mean_of_the_untreated_prediction():
    """The twin's prognostic score (issue 16): the cubature mean over the Laplace posterior equals the Monte
    Carlo mean of 20,000 posterior draws within 3 Monte Carlo standard errors, and ignores later doses."""
    from inference import calibration
    from inference.model_definition import (Dose, SubjectRecord, calibrate_subject, control_prediction, event_data,
                                            load_definition, predict_rows, shipped_definition)

    m = load_definition(shipped_definition("tumour-growth"))
    population = m.population_model()
    for baseline in (40.0, 80.0, 150.0):
        record = SubjectRecord("1", (), ((0.0, "sld", baseline),), {})
        score = control_prediction(m, population, record, "sld", 12.0)
        post = calibrate_subject(m, population, record)
        future = event_data(m, [SubjectRecord("1", (), ((12.0, "sld", np.nan),), {})])
        draws = predict_rows(m, calibration.sample_posterior(post, 20_000, seed=5), future)[:, -1]
        assert abs(score - draws.mean()) < 3 * draws.std() / np.sqrt(draws.size), (baseline, score, draws.mean())
        treated = SubjectRecord("1", (Dose(1.0, 500.0, 0.0, "iv"),), record.observations, {})
        assert control_prediction(m, population, treated, "sld", 12.0) == score  # doses after time 0 are not used
