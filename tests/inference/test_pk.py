"""Closed-form PK against a tight scipy.integrate.solve_ivp reference, and the Michaelis-Menten ODE path.

Reference: the compartment ODEs themselves (mass balance), integrated per participant with
DOP853 at rtol=1e-10 between dose events. Tolerance: relative error <= 1e-6 wherever the
concentration exceeds 1e-6 of its maximum (below that the comparison is at absolute 1e-12).
"""
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from inference.dosing import DoseRecord, regimen, with_delays, with_missed
from inference.pk import (DailyOneCompartmentOral, MichaelisMenten, OneCompartment, ThreeCompartment,
                          TwoCompartment, concentration)

pytestmark = pytest.mark.unit


def reference(p, times, amounts, durations, route, t_out, vmax=None, km=None):
    """One participant: amounts in (depot, central, peripheral), integrated between events."""
    cl, v, q, v2, ka, tlag, f = (p.get(k, d) for k, d in
                                 (("cl", 0.0), ("v", 1.0), ("q", 0.0), ("v2", 1.0), ("ka", 1.0),
                                  ("tlag", 0.0), ("f", 1.0)))
    infusions = [(t, a / d, t + d) for t, a, d in zip(times, amounts, durations) if route == "iv" and d > 0]

    def rhs(t, y):
        depot, central, periph = y
        c = central / v
        elim = vmax * c / (km + c) if vmax is not None else cl * c
        inp = sum(r for (s, r, e) in infusions if s <= t < e)
        return [-ka * depot, ka * depot - elim - q * c + q * periph / v2 + inp, q * c - q * periph / v2]

    jumps = {}
    for t, a, d in zip(times, amounts, durations):
        if a == 0:
            continue
        if route == "oral":
            jumps.setdefault(t + tlag, np.zeros(3))[0] += f * a
        elif d == 0:
            jumps.setdefault(t, np.zeros(3))[1] += a
    edges = sorted(set(jumps) | {s for s, _, _ in infusions} | {e for _, _, e in infusions}
                   | {0.0, float(max(t_out))})
    y = np.zeros(3)
    out = np.full(len(t_out), np.nan)
    t_out = np.asarray(t_out)
    for i, lo in enumerate(edges):
        y = y + jumps.get(lo, 0.0)
        if i == len(edges) - 1:
            out[t_out == lo] = y[1] / v
            break
        hi = edges[i + 1]
        sel = (t_out >= lo) & (t_out < hi)
        sol = solve_ivp(rhs, (lo, hi), y, method="DOP853", rtol=1e-10, atol=1e-14,
                        t_eval=np.append(t_out[sel], hi))
        out[sel] = sol.y[1, :-1] / v
        y = sol.y[:, -1]
    return out


def assert_close(got, want):
    scale = np.max(np.abs(want))
    mask = np.abs(want) > 1e-6 * scale
    rel = np.abs(got[mask] - want[mask]) / np.abs(want[mask])
    assert rel.max() <= 1e-6, rel.max()
    np.testing.assert_allclose(got[~mask], want[~mask], atol=1e-12 + 1e-6 * scale * 1e-3)


T_OUT = np.unique(np.concatenate([np.linspace(0, 170, 341), [0.7, 24.7, 48.25, 72.1]]))

CASES = {
    "oral single": (dict(cl=5.0, v=50.0, ka=1.2, tlag=0.0, f=0.8), regimen(100.0, 24.0, 1)),
    "oral repeated with lag": (dict(cl=5.0, v=50.0, ka=0.9, tlag=0.75, f=0.7), regimen(100.0, 24.0, 7)),
    "oral ka equals k": (dict(cl=5.0, v=50.0, ka=0.1, tlag=0.5), regimen(100.0, 12.0, 8)),
    "oral ka nearly k": (dict(cl=5.0, v=50.0, ka=0.1 * (1 + 1e-7), tlag=0.5), regimen(100.0, 12.0, 8)),
    "iv bolus repeated": (dict(cl=3.0, v=20.0), regimen(50.0, 12.0, 10, route="iv")),
    "iv infusion": (dict(cl=3.0, v=20.0), regimen(50.0, 24.0, 5, duration_h=2.5, route="iv")),
    "missed and late": (dict(cl=4.0, v=40.0, ka=1.5, tlag=0.5, f=0.9),
                        with_delays(with_missed(regimen(100.0, 24.0, 7), [0, 0, 1, 0, 1, 0, 0]),
                                    [0, 3.0, 0, 7.5, 0, 0, 1.0])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_compartment_matches_ode(name):
    p, doses = CASES[name]
    got = concentration(OneCompartment(**p), doses, T_OUT)[0]
    want = reference(p, doses.times[0], doses.amounts[0], doses.durations[0], doses.route, T_OUT)
    assert_close(got, want)


@pytest.mark.parametrize("route", ["oral", "iv bolus", "iv infusion"])
def test_two_compartment_matches_ode(route):
    p = dict(cl=5.0, v=30.0, q=8.0, v2=70.0, ka=0.8, tlag=0.4, f=0.85)
    doses = {"oral": regimen(100.0, 24.0, 6),
             "iv bolus": regimen(100.0, 24.0, 6, route="iv"),
             "iv infusion": regimen(100.0, 24.0, 6, duration_h=1.5, route="iv")}[route]
    got = concentration(TwoCompartment(**p), doses, T_OUT)[0]
    want = reference(p, doses.times[0], doses.amounts[0], doses.durations[0], doses.route, T_OUT)
    assert_close(got, want)


def test_vectorized_over_participants_equals_one_by_one():
    rng = np.random.default_rng(0)
    n = 6
    params = dict(cl=rng.uniform(2, 8, n), v=rng.uniform(20, 80, n), q=rng.uniform(2, 10, n),
                  v2=rng.uniform(30, 90, n), ka=rng.uniform(0.3, 2, n), tlag=rng.uniform(0, 1, n))
    missed = rng.random((n, 7)) < 0.3
    doses = with_delays(with_missed(regimen(100.0, 24.0, 7), missed), rng.uniform(0, 4, (n, 7)))
    c = concentration(TwoCompartment(**params), doses, T_OUT)
    for i in range(n):
        p = {k: v[i] for k, v in params.items()}
        want = reference(p, doses.times[i], doses.amounts[i], doses.durations[i], "oral", T_OUT)
        assert_close(c[i], want)


def _simpson(y, h):
    return h / 3 * (y[..., 0] + y[..., -1] + 4 * y[..., 1:-1:2].sum(-1) + 2 * y[..., 2:-1:2].sum(-1))


def test_daily_stepper_matches_closed_form_average_and_trough():
    # exact average over each day = (1/24) * integral of the closed-form curve, by Simpson's rule
    # on the two smooth pieces of the day (before and after the lag-time kink)
    rng = np.random.default_rng(1)
    n = 5
    p = dict(cl=rng.uniform(2, 8, n), v=rng.uniform(20, 80, n), ka=rng.uniform(0.05, 2, n),
             tlag=rng.uniform(0.1, 2, n), f=0.8)
    p["ka"][0] = p["cl"][0] / p["v"][0]  # equal rates on one participant
    taken = rng.random((n, 10)) < 0.7
    doses = with_missed(regimen(100.0, 24.0, 10), ~taken)
    stepper = DailyOneCompartmentOral(**p)
    model = OneCompartment(**p)
    state = stepper.start(n)
    u = np.linspace(0.0, 1.0, 4001)
    for day in range(10):
        state, avg = stepper.step(state, np.where(taken[:, day], 100.0, 0.0))
        start, lag, end = day * 24.0, day * 24.0 + p["tlag"], (day + 1) * 24.0
        first = concentration(model, doses, start + u[None, :] * (lag - start)[:, None])
        second = concentration(model, doses, lag[:, None] + u[None, :] * (end - lag)[:, None])
        integral = _simpson(first, (lag - start) * (u[1] - u[0])) + _simpson(second, (end - lag) * (u[1] - u[0]))
        np.testing.assert_allclose(avg, integral / 24.0, rtol=1e-7)
        np.testing.assert_allclose(stepper.trough(state), concentration(model, doses, np.full((n, 1), end))[:, 0],
                                   rtol=1e-9)


def test_michaelis_menten_matches_ode():
    rng = np.random.default_rng(2)
    n = 4
    vmax, km = rng.uniform(5, 20, n), rng.uniform(0.5, 3, n)
    v, ka, tlag = rng.uniform(30, 60, n), rng.uniform(0.5, 2, n), rng.uniform(0, 1, n)
    missed = np.zeros((n, 6), bool)
    missed[1, 2] = True
    doses = with_missed(regimen(200.0, 24.0, 6), missed)
    got = concentration(MichaelisMenten(vmax=vmax, km=km, v=v, ka=ka, tlag=tlag, f=0.9), doses, T_OUT)
    for i in range(n):
        want = reference(dict(v=v[i], ka=ka[i], tlag=tlag[i], f=0.9), doses.times[i], doses.amounts[i],
                         doses.durations[i], "oral", T_OUT, vmax=vmax[i], km=km[i])
        scale = want.max()
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-9 * scale)


def test_michaelis_menten_iv_bolus_and_infusion():
    for doses in (regimen(100.0, 12.0, 4, route="iv"), regimen(100.0, 12.0, 4, duration_h=3.0, route="iv")):
        got = concentration(MichaelisMenten(vmax=8.0, km=1.0, v=25.0), doses, T_OUT)[0]
        want = reference(dict(v=25.0), doses.times[0], doses.amounts[0], doses.durations[0], "iv",
                         T_OUT, vmax=8.0, km=1.0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * want.max())


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="cl must be > 0"):
        OneCompartment(cl=-1.0, v=10.0)
    with pytest.raises(ValueError, match="f must lie"):
        OneCompartment(cl=1.0, v=10.0, f=1.5)
    with pytest.raises(ValueError, match="oral doses have no duration"):
        DoseRecord(times=[0.0], amounts=[10.0], durations=1.0, route="oral")
    with pytest.raises(ValueError, match="must match"):
        concentration(OneCompartment(cl=[1.0, 2.0], v=10.0), regimen([1.0, 2.0, 3.0], 24, 2), [1.0])


def reference_three(p, doses, t_out):
    """One participant of a 3-compartment model: amounts (depot, central, periph 1, periph 2) by
    DOP853 at rtol 1e-12 between events (the mass balance itself, nothing of inference/pk.py)."""
    cl, v, q, v2, q3, v3 = (p[k] for k in ("cl", "v", "q", "v2", "q3", "v3"))
    ka, tlag, f = p.get("ka", 1.0), p.get("tlag", 0.0), p.get("f", 1.0)
    times, amounts, durations = doses.times[0], doses.amounts[0], np.broadcast_to(doses.durations, doses.times.shape)[0]
    iv = doses.route == "iv"
    infusions = [(t, a / d, t + d) for t, a, d in zip(times, amounts, durations) if iv and d > 0]

    def rhs(t, y):
        depot, a1, a2, a3 = y
        c1, c2, c3 = a1 / v, a2 / v2, a3 / v3
        inp = sum(r for (s_, r, e) in infusions if s_ <= t < e)
        return [-ka * depot, ka * depot - cl * c1 - q * (c1 - c2) - q3 * (c1 - c3) + inp, q * (c1 - c2), q3 * (c1 - c3)]

    jumps = {}
    for t, a, d in zip(times, amounts, durations):
        if a and not iv:
            jumps.setdefault(t + tlag, np.zeros(4))[0] += f * a
        elif a and d == 0:
            jumps.setdefault(t, np.zeros(4))[1] += a
    edges = sorted(set(jumps) | {s_ for s_, _, _ in infusions} | {e for _, _, e in infusions}
                   | {0.0, float(max(t_out))})
    y, out = np.zeros(4), np.full(len(t_out), np.nan)
    for i, lo in enumerate(edges):
        y = y + jumps.get(lo, 0.0)
        if i == len(edges) - 1:
            out[t_out == lo] = y[1] / v
            break
        hi = edges[i + 1]
        sel = (t_out >= lo) & (t_out < hi)
        sol = solve_ivp(rhs, (lo, hi), y, method="DOP853", rtol=1e-12, atol=1e-16, t_eval=np.append(t_out[sel], hi))
        out[sel] = sol.y[1, :-1] / v
        y = sol.y[:, -1]
    return out


# a typical 3-compartment drug (fast and slow distribution, e.g. propofol-like in L and L/h)
THREE = dict(cl=5.0, v=10.0, q=20.0, v2=40.0, q3=1.5, v3=150.0, ka=0.9, tlag=0.3, f=0.8)


@pytest.mark.parametrize("route", ["oral", "iv bolus", "iv infusion"])
def test_three_compartment_matches_ode(route):
    doses = {"oral": regimen(100.0, 24.0, 6),
             "iv bolus": regimen(100.0, 24.0, 6, route="iv"),
             "iv infusion": regimen(100.0, 24.0, 6, duration_h=1.5, route="iv")}[route]
    got = concentration(ThreeCompartment(**THREE), doses, T_OUT)[0]
    want = reference_three(THREE, doses, T_OUT)
    # tolerance: relative 1e-8 where the concentration is above 1e-6 of its maximum
    scale = np.max(np.abs(want))
    big = np.abs(want) > 1e-6 * scale
    assert np.max(np.abs(got[big] - want[big]) / want[big]) <= 1e-8
    np.testing.assert_allclose(got[~big], want[~big], atol=1e-14 * scale)


def triexponential(p, dose, t):
    """Published closed form of a 3-compartment IV bolus (Gibaldi & Perrier, Pharmacokinetics 2nd ed.,
    appendix; NONMEM ADVAN11): rates are the roots of the cubic by the trigonometric method, each
    coefficient ``(k21 - l)(k31 - l) / prod(other roots - l) / V``."""
    k10, k12, k13 = p["cl"] / p["v"], p["q"] / p["v"], p["q3"] / p["v"]
    k21, k31 = p["q"] / p["v2"], p["q3"] / p["v3"]
    a0 = k10 * k21 * k31
    a1 = k10 * k31 + k21 * k31 + k21 * k13 + k10 * k21 + k31 * k12
    a2 = k10 + k12 + k13 + k21 + k31
    pp = a1 - a2 * a2 / 3.0
    qq = 2.0 * a2 ** 3 / 27.0 - a1 * a2 / 3.0 + a0
    r1 = np.sqrt(-pp ** 3 / 27.0)
    r2 = 2.0 * r1 ** (1.0 / 3.0)
    theta = np.arccos(-qq / (2.0 * r1)) / 3.0
    roots = [-(np.cos(theta + k * 2.0 * np.pi / 3.0) * r2 - a2 / 3.0) for k in range(3)]
    out = 0.0
    for i, lam in enumerate(roots):
        others = [roots[j] for j in range(3) if j != i]
        coef = (k21 - lam) * (k31 - lam) / ((others[0] - lam) * (others[1] - lam)) / p["v"]
        out = out + dose * coef * np.exp(-lam * t)
    return out


def test_three_compartment_bolus_is_the_published_triexponential():
    rng = np.random.default_rng(3)
    t = np.linspace(0.0, 240.0, 97)
    for _ in range(20):
        p = dict(cl=rng.uniform(1, 10), v=rng.uniform(5, 50), q=rng.uniform(5, 40), v2=rng.uniform(20, 100),
                 q3=rng.uniform(0.2, 5), v3=rng.uniform(50, 500))
        got = concentration(ThreeCompartment(**p), regimen(100.0, 1000.0, 1, route="iv"), t)[0]
        np.testing.assert_allclose(got, triexponential(p, 100.0, t), rtol=1e-9)


def test_three_compartment_with_nearly_equal_peripheral_rates():
    # k21 = k31 (up to 1e-9) makes the cubic's textbook coefficients 0/0-prone; the ODE is the judge
    p = dict(cl=4.0, v=20.0, q=6.0, v2=30.0, q3=6.0 * (1 + 1e-9), v3=30.0, ka=1.1)
    doses = regimen(100.0, 12.0, 4)
    got = concentration(ThreeCompartment(**p), doses, T_OUT)[0]
    want = reference_three(p, doses, T_OUT)
    big = want > 1e-6 * want.max()
    assert np.max(np.abs(got[big] - want[big]) / want[big]) <= 1e-8


def test_three_compartment_vectorized_over_participants_equals_one_by_one():
    rng = np.random.default_rng(4)
    n = 5
    params = dict(cl=rng.uniform(2, 8, n), v=rng.uniform(5, 30, n), q=rng.uniform(5, 30, n), v2=rng.uniform(20, 90, n),
                  q3=rng.uniform(0.5, 3, n), v3=rng.uniform(80, 300, n), ka=rng.uniform(0.3, 2, n))
    doses = with_missed(regimen(100.0, 24.0, 5), rng.random((n, 5)) < 0.3)
    c = concentration(ThreeCompartment(**params), doses, T_OUT)
    for i in range(n):
        one = concentration(ThreeCompartment(**{k: v[i] for k, v in params.items()}),
                            DoseRecord(times=doses.times[i:i + 1], amounts=doses.amounts[i:i + 1]), T_OUT)[0]
        np.testing.assert_allclose(c[i], one, rtol=1e-12, atol=1e-15)


def test_three_compartment_refuses_a_bad_volume():
    with pytest.raises(ValueError, match="v3 must be > 0"):
        ThreeCompartment(cl=1.0, v=10.0, q=1.0, v2=10.0, q3=1.0, v3=0.0)
