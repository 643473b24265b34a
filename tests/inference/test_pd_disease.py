"""PD and disease models: indirect-response ODEs against solve_ivp and their closed-form steady states.

Steady states (Dayneka, Garg & Jusko 1993, J Pharmacokinet Biopharm 21:457): with drug factor
I(C) = Imax C/(IC50 + C) or S(C) = Emax C/(EC50 + C), R_ss = kin/kout * (1 - I) (model I),
kin/(kout (1 - I)) (II), kin/kout * (1 + S) (III), kin/(kout (1 + S)) (IV).
"""
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from inference.disease import DiseaseProgression, progress
from inference.dosing import regimen
from inference.pd import IndirectResponse, emax, idr_steady_state, sigmoid_emax, simulate_idr
from inference.pk import OneCompartment, concentration

pytestmark = pytest.mark.unit


def test_emax_hill_values():
    # at C = EC50 half the maximal effect whatever the Hill coefficient; large C -> Emax
    for h in (0.5, 1.0, 3.0, 40.0):
        assert sigmoid_emax(2.5, 7.0, 2.5, h) == pytest.approx(3.5, rel=1e-14)
        assert sigmoid_emax(1e6, 7.0, 2.5, h) == pytest.approx(7.0, rel=1e-2)
    np.testing.assert_allclose(emax([1.0, 3.0], 2.0, 1.0), [1.0, 1.5])


@pytest.mark.parametrize("kind", [1, 2, 3, 4])
def test_idr_reaches_closed_form_steady_state(kind):
    emax_ = 0.7 if kind in (1, 2) else 2.0
    m = IndirectResponse(kind=kind, kin=[4.0, 1.0], kout=[0.4, 0.05], effect_max=emax_, c50=1.5)
    c = np.array([1.5, 6.0])
    r = simulate_idr(m, lambda t: c, [0.0, 1000.0])
    i = emax_ * c / (1.5 + c)
    base = np.array([10.0, 20.0])
    expected = {1: lambda: base * (1 - i), 2: lambda: base / (1 - i), 3: lambda: base * (1 + i),
                4: lambda: base / (1 + i)}[kind]()
    np.testing.assert_allclose(r[:, -1], expected, rtol=1e-6)
    np.testing.assert_allclose(idr_steady_state(m, c), expected, rtol=1e-12)


@pytest.mark.parametrize("kind", [1, 2, 3, 4])
def test_idr_with_pk_input_matches_per_participant_solve_ivp(kind):
    rng = np.random.default_rng(kind)
    n = 4
    pk = OneCompartment(cl=rng.uniform(3, 8, n), v=rng.uniform(30, 60, n), ka=1.0, tlag=0.3)
    doses = regimen(100.0, 24.0, 5)
    m = IndirectResponse(kind=kind, kin=rng.uniform(1, 5, n), kout=rng.uniform(0.05, 0.3, n),
                         effect_max=0.8 if kind < 3 else 3.0, c50=rng.uniform(0.5, 2, n), hill=1.5)
    times = np.linspace(0, 120, 121)
    conc = lambda t: concentration(pk, doses, np.full((n, 1), t))[:, 0]
    got = simulate_idr(m, conc, times, rtol=1e-10, atol=1e-12)
    for i in range(n):
        k = pk.cl[i] / pk.v[i]

        def rhs(t, r, k=k, i=i):
            # Bateman function summed over the daily doses (textbook closed form, ka != k here)
            tau = t - 24.0 * np.arange(5) - 0.3
            tau = tau[tau > 0]
            c = np.sum(100.0 * 1.0 / (pk.v[i] * (1.0 - k)) * (np.exp(-k * tau) - np.exp(-1.0 * tau)))
            s = m.effect_max[i] * c ** 1.5 / (m.c50[i] ** 1.5 + c ** 1.5)
            kin, kout = m.kin[i], m.kout[i]
            return {1: kin * (1 - s) - kout * r, 2: kin - kout * (1 - s) * r,
                    3: kin * (1 + s) - kout * r, 4: kin - kout * (1 + s) * r}[kind]
        ref = solve_ivp(rhs, (0, 120), [m.kin[i] / m.kout[i]], t_eval=times, method="DOP853",
                        rtol=1e-11, atol=1e-12, max_step=0.5)
        np.testing.assert_allclose(got[i], ref.y[0], rtol=1e-6)


def test_disease_linear_offset_with_delay_matches_ode():
    # dD/dt = k (E - D) with E piecewise constant per day; reference by solve_ivp day by day
    rng = np.random.default_rng(0)
    e = rng.uniform(0, 1, (3, 40))
    m = DiseaseProgression(baseline=[8.0, 7.5, 9.0], slope=0.003, max_offset=[1.0, 0.5, 1.2], k_onset=0.05)
    b = progress(m, e)
    for i in range(3):
        d, ref = 0.0, []
        for day in range(40):
            d = solve_ivp(lambda t, y: 0.05 * (e[i, day] - y), (0, 1), [d], rtol=1e-12, atol=1e-14).y[0, -1]
            ref.append(m.baseline[0 if i == 0 else i] + 0.003 * day - m.max_offset[i] * d)
        np.testing.assert_allclose(b[i], ref, rtol=1e-9)


def test_disease_slope_effect_and_exponential_drift():
    e = np.zeros((2, 5))
    e[1] = 1.0  # full activity stops the drift entirely
    lin = progress(DiseaseProgression(baseline=5.0, slope=0.1, effect="slope"), e)
    np.testing.assert_allclose(lin, [[5.0, 5.1, 5.2, 5.3, 5.4], [5.0] * 5])
    exp = progress(DiseaseProgression(baseline=2.0, slope=np.log(2) / 2, drift="exponential"), e[:1])
    np.testing.assert_allclose(exp[0, [0, 2, 4]], [2.0, 4.0, 8.0])
    with pytest.raises(ValueError, match="activity must lie"):
        progress(DiseaseProgression(baseline=1.0, slope=0.0), np.full((1, 2), 1.5))
    with pytest.raises(ValueError, match="kind must be"):
        IndirectResponse(kind=5, kin=1.0, kout=1.0, effect_max=0.5, c50=1.0)
