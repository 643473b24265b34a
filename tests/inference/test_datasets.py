"""The shipped Theophylline data match R's datasets::Theoph."""
from __future__ import annotations

import numpy as np
import pytest

from inference.datasets import ssfol
from inference.population import ObservationData

pytestmark = pytest.mark.unit


def test_theoph_has_r_shape(theoph):
    # R: dim(Theoph) == c(132, 5), 12 subjects with 11 samples each
    assert theoph.n_rows == 132
    assert theoph.n_subjects == 12
    assert np.bincount(theoph.subject).tolist() == [11] * 12


def test_theoph_spot_values(theoph):
    # head(Theoph) in R: Subject 1, Wt 79.6, Dose 4.02, Time 0 / 0.25, conc 0.74 / 2.84
    assert theoph.subject_ids[0] == "1"
    assert theoph.covariates["weight"][0] == 79.6
    assert theoph.design["dose"][0] == 4.02
    assert theoph.time[:2].tolist() == [0.0, 0.25]
    assert theoph.value[:2].tolist() == [0.74, 2.84]
    # largest concentration in the data set (subject 5 at 1 h)
    assert theoph.value.max() == 11.4
    assert theoph.subject_ids[theoph.subject[np.argmax(theoph.value)]] == "5"


def test_theoph_summary_matches_r(theoph):
    # summary(Theoph) in R: mean Time 5.895, mean conc 4.960, mean Dose 4.626 (per row)
    assert theoph.time.mean() == pytest.approx(5.895, abs=5e-4)
    assert theoph.value.mean() == pytest.approx(4.960, abs=5e-4)
    assert theoph.design["dose"].mean() == pytest.approx(4.626, abs=5e-4)


def test_ssfol_closed_form_against_ode():
    # the closed form must solve the one-compartment oral ODE with F = 1:
    # dA_gut = -ka A_gut, dC = ka A_gut / V - ke C, with V = Cl / ke (per kg)
    from scipy.integrate import solve_ivp

    lke, lka, lcl = -2.45, 0.47, -3.23
    ke, ka, cl = np.exp([lke, lka, lcl])
    v = cl / ke
    t = np.array([0.25, 1.0, 3.0, 8.0, 24.0])
    sol = solve_ivp(lambda _, y: [-ka * y[0], ka * y[0] / v - ke * y[1]], (0, 24), [4.0, 0.0],
                    t_eval=t, rtol=1e-10, atol=1e-12)
    data = ObservationData.single(t, np.full(t.size, np.nan), design={"dose": np.full(t.size, 4.0)})
    np.testing.assert_allclose(ssfol(np.array([[lke, lka, lcl]]), data), sol.y[1], rtol=1e-7)


def test_indometh_matches_r_summary():
    # dim(Indometh) == c(66, 3), 6 subjects with 11 samples each; summary(Indometh$conc) in R:
    # min 0.05, mean 0.5918, max 2.72
    from inference.datasets import load_indometh
    indometh = load_indometh()
    assert (indometh.n_rows, indometh.n_subjects) == (66, 6)
    assert np.bincount(indometh.subject).tolist() == [11] * 6
    assert indometh.value.min() == 0.05 and indometh.value.max() == 2.72
    assert indometh.value.mean() == pytest.approx(0.5918, abs=5e-5)
    assert sorted(set(indometh.time.tolist())) == [0.25, 0.5, 0.75, 1.0, 1.25, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]
