"""Event-driven PK core against superposition, the matrix exponential and solve_ivp (rel. 1e-9).

References from outside the core: ``scipy.linalg.expm`` of each participant's compartment rate
matrix (exact transition between events), ``scipy.integrate.solve_ivp`` (DOP853, rtol 1e-13) of
the same ODEs, and the previous closed-form superposition. Tolerance: relative 1e-9 wherever the
concentration exceeds 1e-9 of its maximum, absolute 1e-15 of the maximum below (e.g. the
zeros before the first dose).
"""
import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from inference import pk_events
from inference.dosing import regimen, with_delays, with_missed
from inference.pk import (MichaelisMenten, OneCompartment, TwoCompartment, _superposition_concentration,
                          concentration)

pytestmark = pytest.mark.unit


def assert_rel(got, want, rtol=1e-9):
    got, want = np.asarray(got), np.asarray(want)
    scale = np.max(np.abs(want))
    big = np.abs(want) > 1e-9 * scale
    rel = np.abs(got[big] - want[big]) / np.abs(want[big])
    assert rel.max() <= rtol, rel.max()
    assert np.all(np.abs(got[~big] - want[~big]) <= 1e-15 * scale)


def rate_matrix(p):
    """Compartments (depot, central, peripheral): d amounts/dt = A @ amounts."""
    k10, k12 = p["cl"] / p["v"], p.get("q", 0.0) / p["v"]
    k21 = p.get("q", 0.0) / p.get("v2", 1.0)
    ka = p.get("ka", 1.0)
    return np.array([[-ka, 0.0, 0.0], [ka, -k10 - k12, k21], [0.0, k12, -k21]])


def expm_reference(p, times, amounts, durations, route, t_out):
    """One participant, event by event with expm (infusions through the augmented matrix)."""
    a = rate_matrix(p)
    tlag, f = p.get("tlag", 0.0), p.get("f", 1.0)
    events = []
    for t, amt, d in zip(times, amounts, durations):
        if route == "oral":
            events.append((t + tlag, 0, np.array([f * amt, 0.0, 0.0]), 0.0))
        elif d > 0:
            events.append((t, 1, np.zeros(3), amt / d))
            events.append((t + d, 1, np.zeros(3), -amt / d))
        else:
            events.append((t, 0, np.array([0.0, amt, 0.0]), 0.0))
    events += [(t, 2, None, i) for i, t in enumerate(t_out)]
    events.sort(key=lambda e: (e[0], e[1]))
    x, rate, last = np.zeros(3), 0.0, events[0][0]
    out = np.zeros(len(t_out))
    aug = np.zeros((4, 4))
    aug[:3, :3] = a
    aug[1, 3] = 1.0  # constant infusion rate into the central compartment
    for t, kind, jump, val in events:
        dt = t - last
        if dt > 0:
            x = (expm(aug * dt) @ np.append(x, rate))[:3]
        last = t
        if kind == 0:
            x = x + jump
        elif kind == 1:
            rate = max(rate + val, 0.0) if abs(rate + val) > 1e-12 * abs(val) else 0.0
        else:
            out[val] = x[1] / p["v"]
    return out


def ode_reference(p, times, amounts, durations, route, t_out):
    """solve_ivp of the same compartments between events, tight tolerances."""
    a = rate_matrix(p)
    tlag, f = p.get("tlag", 0.0), p.get("f", 1.0)
    infusions = [(t, amt / d, t + d) for t, amt, d in zip(times, amounts, durations)
                 if route == "iv" and d > 0 and amt > 0]
    jumps = {}
    for t, amt, d in zip(times, amounts, durations):
        if route == "oral":
            jumps.setdefault(t + tlag, np.zeros(3))[0] += f * amt
        elif d == 0:
            jumps.setdefault(t, np.zeros(3))[1] += amt
    edges = sorted(set(jumps) | {s for s, _, _ in infusions} | {e for _, _, e in infusions}
                   | {0.0, float(max(t_out))})
    t_out = np.asarray(t_out)
    out = np.full(t_out.size, np.nan)
    y = np.zeros(3)
    for i, lo in enumerate(edges):
        y = y + jumps.get(lo, 0.0)
        if i == len(edges) - 1:
            out[t_out == lo] = y[1] / p["v"]
            break
        hi = edges[i + 1]
        inp = sum(r for s, r, e in infusions if s <= 0.5 * (lo + hi) < e)
        sel = (t_out >= lo) & (t_out < hi)
        sol = solve_ivp(lambda _t, s: a @ s + np.array([0.0, inp, 0.0]), (lo, hi), y, method="DOP853",
                        rtol=1e-13, atol=1e-20, t_eval=np.append(t_out[sel], hi))
        out[sel] = sol.y[1, :-1] / p["v"]
        y = sol.y[:, -1]
    return out


def population(n, rng, two=False):
    p = dict(cl=rng.uniform(2, 8, n), v=rng.uniform(20, 80, n), ka=rng.uniform(0.3, 2.0, n),
             tlag=rng.uniform(0.0, 1.5, n), f=rng.uniform(0.5, 1.0, n))
    if two:
        p.update(q=rng.uniform(2, 10, n), v2=rng.uniform(30, 90, n))
    return p


def one(p, i):
    return {k: float(np.atleast_1d(v)[i] if np.ndim(v) else v) for k, v in p.items()}


T_OUT = np.unique(np.concatenate([np.linspace(0, 200, 201), [0.3, 24.0, 24.2, 48.7, 72.0, 96.05]]))


@pytest.mark.parametrize("two", [False, True])
@pytest.mark.parametrize("regimen_name", ["daily", "twice daily missed", "late doses", "bolus", "infusion"])
def test_matches_matrix_exponential_and_ode(two, regimen_name):
    rng = np.random.default_rng(11 + two)
    n = 4
    p = population(n, rng, two)
    doses = {"daily": regimen(100.0, 24.0, 8),
             "twice daily missed": with_missed(regimen(50.0, 12.0, 16), rng.random((n, 16)) < 0.3),
             "late doses": with_delays(regimen(100.0, 24.0, 8), rng.uniform(0, 6, (n, 8))),
             "bolus": with_missed(regimen(80.0, 12.0, 12, route="iv"), rng.random((n, 12)) < 0.2),
             "infusion": with_missed(regimen(80.0, 24.0, 8, duration_h=2.5, route="iv"),
                                     rng.random((n, 8)) < 0.2)}[regimen_name]
    model = (TwoCompartment if two else OneCompartment)(**p)
    got = concentration(model, doses, T_OUT)
    rec = doses.broadcast(n)
    for i in range(n):
        args = (one(p, i), rec.times[i], rec.amounts[i], rec.durations[i], rec.route, T_OUT)
        assert_rel(got[i], expm_reference(*args))
        assert_rel(got[i], ode_reference(*args), rtol=1e-9)


@pytest.mark.parametrize("two", [False, True])
def test_equals_superposition_for_a_large_cohort(two):
    # the fast shared-grid path (one grid, per-participant lag, outputs inside the lag window)
    # and the per-participant path both against the old superposition
    rng = np.random.default_rng(3)
    n = 100
    p = population(n, rng, two)
    model = (TwoCompartment if two else OneCompartment)(**p)
    t = np.arange(0.0, 24.0 * 30, 1.5) + 0.25
    for doses in (with_missed(regimen(100.0, 24.0, 30), rng.random((n, 30)) < 0.25),
                  with_missed(regimen(50.0, 12.0, 60), rng.random((n, 60)) < 0.1),
                  with_delays(regimen(100.0, 24.0, 30), rng.uniform(0, 3, (n, 30)))):
        assert_rel(concentration(model, doses, t), _superposition_concentration(model, doses, t))


def test_shared_and_per_participant_paths_agree():
    rng = np.random.default_rng(4)
    n = 50
    p = population(n, rng, two=True)
    model = TwoCompartment(**p)
    doses = with_missed(regimen(100.0, 24.0, 20), rng.random((n, 20)) < 0.3)
    t = np.sort(rng.uniform(0, 500, 300))
    coef, rate = zip(*model.disposition())
    args = (coef, rate, model.ka, model.tlag, model.f)
    fast = pk_events._shared_grid(*args, True, doses.times[0], doses.amounts, t)
    slow = pk_events._per_participant(*args, True, doses, np.broadcast_to(t, (n, t.size)))
    assert fast is not None
    assert_rel(fast, slow, rtol=1e-12)


def test_lag_longer_than_dose_interval_falls_back_and_stays_exact():
    p = dict(cl=5.0, v=50.0, ka=1.0, tlag=30.0, f=1.0)
    doses = regimen(100.0, 24.0, 5)
    coef, rate = zip(*OneCompartment(**p).disposition())
    model = OneCompartment(**p)
    assert pk_events._shared_grid(coef, rate, model.ka, model.tlag, model.f, True,
                                  doses.times[0], doses.amounts, T_OUT) is None
    assert_rel(concentration(model, doses, T_OUT)[0],
               expm_reference(p, doses.times[0], doses.amounts[0], doses.durations[0], "oral", T_OUT))


def test_duplicate_dose_times_and_unsorted_doses():
    from inference.dosing import DoseRecord
    p = dict(cl=5.0, v=50.0, ka=1.0, tlag=0.2)
    doses = DoseRecord(times=[48.0, 0.0, 24.0, 24.0], amounts=[100.0, 100.0, 30.0, 70.0])
    model = OneCompartment(**p)
    assert_rel(concentration(model, doses, T_OUT), _superposition_concentration(model, doses, T_OUT))


def test_cost_grows_with_doses_plus_outputs_not_their_product():
    # a structural check, not a timing: the shared path takes one propagation step per dose and
    # reads each output once, so the number of distinct propagation intervals stays 1 for a
    # regular regimen however long it is
    n = 20
    model = OneCompartment(cl=np.full(n, 5.0), v=50.0, ka=1.0)
    doses = regimen(100.0, 24.0, 365)
    t = np.arange(365) * 24.0 + 2.0
    c = concentration(model, doses, t)
    assert c.shape == (n, 365)
    assert np.allclose(c[:, -1], c[:, -2], rtol=1e-12)  # steady state reached


def test_michaelis_menten_jacobian_path_matches_explicit_solver():
    rng = np.random.default_rng(5)
    n = 8
    vmax, km = rng.uniform(5, 20, n), rng.uniform(0.5, 3, n)
    v, ka, tlag, f = rng.uniform(30, 60, n), rng.uniform(0.5, 2, n), rng.uniform(0, 1, n), np.full(n, 0.9)
    doses = with_missed(regimen(200.0, 24.0, 4), rng.random((n, 4)) < 0.2)
    t = np.broadcast_to(T_OUT[T_OUT <= 100], (n, int(np.sum(T_OUT <= 100))))
    implicit = pk_events.michaelis_menten_concentration(vmax, km, v, ka, tlag, f, doses, t, method="Radau")
    explicit = pk_events.michaelis_menten_concentration(vmax, km, v, ka, tlag, f, doses, t,
                                                        method="DOP853", rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(implicit, explicit, rtol=1e-7, atol=1e-10 * explicit.max())
    # a single participant alone gives the same curve as within the stack
    alone = concentration(MichaelisMenten(vmax=vmax[7], km=km[7], v=v[7], ka=ka[7], tlag=tlag[7], f=0.9),
                          doses.broadcast(n).replace(times=doses.broadcast(n).times[7:8],
                                                     amounts=doses.broadcast(n).amounts[7:8],
                                                     durations=doses.broadcast(n).durations[7:8]),
                          t[0])
    np.testing.assert_allclose(alone[0], explicit[7], rtol=1e-7, atol=1e-10 * explicit.max())


def test_michaelis_menten_low_concentration_limit_is_linear():
    # Km >> C: elimination is Vmax/Km * C, i.e. a 1-compartment model with CL = Vmax * V / Km / V
    km = 1e6
    vmax, v = 5.0 * km / 1.0, 50.0  # CL = Vmax / Km = 5 L/h
    doses = regimen(1.0, 24.0, 5)
    lin = concentration(OneCompartment(cl=vmax / km, v=v, ka=1.0), doses, T_OUT)
    mm = concentration(MichaelisMenten(vmax=vmax, km=km, v=v, ka=1.0), doses, T_OUT)
    np.testing.assert_allclose(mm, lin, rtol=1e-6, atol=1e-12)
