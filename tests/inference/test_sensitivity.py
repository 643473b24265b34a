"""Sobol indices against the analytic Ishigami values, and the sensitivity ranking of a daily-regimen
definition (the shipped example).

Ishigami function f = sin x1 + a sin^2 x2 + b x3^4 sin x1 on [-pi, pi]^3 (Ishigami & Homma 1990;
analytic variances in Saltelli et al. 2008, Global Sensitivity Analysis: The Primer, sec. 4.9 and
Sobol' & Levitan 1999):
  V   = a^2/8 + b pi^4/5 + b^2 pi^8/18 + 1/2
  V1  = (1 + b pi^4/5)^2 / 2,  V2 = a^2/8,  V3 = 0,  V13 = b^2 pi^8 (1/18 - 1/50)
  S1 = V1/V, S2 = V2/V, S3 = 0;  ST1 = (V1 + V13)/V, ST2 = V2/V, ST3 = V13/V.
With a = 7, b = 0.1: S1 = 0.3139, S2 = 0.4424, S3 = 0, ST1 = 0.5576, ST2 = 0.4424, ST3 = 0.2437.
Tolerance 0.02 on every index.
"""
import numpy as np
import pytest

from inference.model_definition import example_regimen
from inference.sensitivity import (plot_sensitivity, regimen_drug_effect, regimen_factors, regimen_sensitivity,
                                   sobol_indices)

pytestmark = pytest.mark.unit

A, B = 7.0, 0.1


def ishigami(x):
    return np.sin(x[:, 0]) + A * np.sin(x[:, 1]) ** 2 + B * x[:, 2] ** 4 * np.sin(x[:, 0])


def analytic():
    pi = np.pi
    v = A ** 2 / 8 + B * pi ** 4 / 5 + B ** 2 * pi ** 8 / 18 + 0.5
    v1 = 0.5 * (1 + B * pi ** 4 / 5) ** 2
    v2 = A ** 2 / 8
    v13 = B ** 2 * pi ** 8 * (1 / 18 - 1 / 50)
    return {"x1": (v1 / v, (v1 + v13) / v), "x2": (v2 / v, v2 / v), "x3": (0.0, v13 / v)}


def test_ishigami_matches_analytic_indices():
    rows = sobol_indices(ishigami, [(-np.pi, np.pi)] * 3, ["x1", "x2", "x3"], n_base=2 ** 14, seed=1)
    expected = analytic()
    # the published numbers, as a check on the formulas themselves
    assert expected["x1"][0] == pytest.approx(0.3139, abs=1e-4)
    assert expected["x3"][1] == pytest.approx(0.2437, abs=1e-4)
    for row in rows:
        s1, st = expected[row["name"]]
        assert row["S1"] == pytest.approx(s1, abs=0.02), row
        assert row["ST"] == pytest.approx(st, abs=0.02), row
    assert [r["name"] for r in rows] == ["x1", "x2", "x3"]  # ranked by total index


MODEL = example_regimen()


def test_regimen_ranking_reflects_steady_state_pharmacology(tmp_path):
    rows = regimen_sensitivity(MODEL, 100.0, n_base=2 ** 10, seed=3)
    st = {r["name"]: r["ST"] for r in rows}
    # the daily average concentration is F * dose / (24 CL) whatever V and ka are, so once
    # steady state is reached they cannot matter; CL, EC50 and Emax must; baselines never do
    assert st["V"] < 0.01 and st["KA"] < 0.01
    assert st["HBA1C0"] < 0.01 and st["FPG0DEV"] < 0.01
    for name in ("CL", "EC50", "EMAX"):
        assert st[name] > 0.1
    png = plot_sensitivity(rows, tmp_path / "regimen.png")
    assert (tmp_path / "regimen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.endswith("regimen.png")


def test_drug_effect_matches_steady_state_emax():
    # at steady state, fully adherent, onset complete (TONSET 5 days over 24 weeks):
    # effect = -EMAX * EFFSCALE * Cavg / (EC50 + Cavg), Cavg = F dose / (CL tau) (closed form)
    names = ["CL", "V", "KA", "EMAX", "EC50", "TONSET", "adherence"]
    x = np.array([[5.0, 50.0, 1.0, 45.0, 0.5, 120.0, 1.0]])
    cavg = 0.8 * 100.0 / (5.0 * 24.0)
    expected = -45.0 / 28.7 * cavg / (0.5 + cavg)
    assert regimen_drug_effect(MODEL, x, names, 100.0)[0] == pytest.approx(expected, rel=1e-6)
    # half the doses taken: half the average concentration
    x[0, -1] = 0.5
    assert regimen_drug_effect(MODEL, x, names, 100.0)[0] == pytest.approx(
        -45.0 / 28.7 * (cavg / 2) / (0.5 + cavg / 2), rel=1e-6)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="power of 2"):
        sobol_indices(ishigami, [(-1, 1)] * 3, n_base=1000)
    with pytest.raises(ValueError, match="low < high"):
        sobol_indices(ishigami, [(1, -1)] * 3)
    with pytest.raises(ValueError, match="shape"):
        sobol_indices(lambda x: x, [(0, 1)] * 3, n_base=8)
    with pytest.raises(ValueError, match="unknown factor"):
        regimen_drug_effect(MODEL, np.ones((1, 1)), ["NOPE"], 100.0)
    assert len(regimen_factors(MODEL)) == MODEL.population.n_random_effects + 1  # and adherence
