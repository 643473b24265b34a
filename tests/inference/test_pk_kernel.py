"""The compiled (Numba) shared-grid kernel against the numpy path it replaces (rel. 1e-12).

The numpy loop in ``inference.pk_events`` is the reference (itself checked against expm, solve_ivp
and superposition in test_pk_events.py); the kernel must reproduce it on random regimens for every
case the shared grid handles: 1-, 2- and 3-compartment, oral (lag, bioavailability, missed doses,
outputs inside the lag window, per-participant and shared amounts) and IV bolus.
"""
import numpy as np
import pytest

from inference import pk_kernel
from inference.dosing import regimen, with_missed
from inference.pk import OneCompartment, ThreeCompartment, TwoCompartment, concentration

pytest.importorskip("numba")
pytestmark = pytest.mark.unit


def population(n, rng, n_cmt, oral):
    def ln(typical, cv):
        return typical * np.exp(cv * rng.standard_normal(n))
    p = dict(cl=ln(5.0, 0.3), v=ln(50.0, 0.2))
    if oral:
        p.update(ka=ln(1.0, 0.5), tlag=rng.uniform(0.0, 3.0, n), f=rng.uniform(0.3, 1.0, n))
    if n_cmt >= 2:
        p.update(q=ln(8.0, 0.3), v2=ln(80.0, 0.2))
    if n_cmt == 3:
        p.update(q3=ln(1.0, 0.3), v3=ln(200.0, 0.2))
    return (OneCompartment, TwoCompartment, ThreeCompartment)[n_cmt - 1](**p)


def both_paths(monkeypatch, model, doses, t):
    monkeypatch.setenv("TRIALTWIN_PK_KERNEL", "numpy")
    calls = pk_kernel.kernel_info()["calls"]
    reference = concentration(model, doses, t)
    assert pk_kernel.kernel_info()["calls"] == calls  # the env var forces the numpy path
    monkeypatch.setenv("TRIALTWIN_PK_KERNEL", "auto")
    compiled = concentration(model, doses, t)
    assert pk_kernel.kernel_info()["calls"] == calls + 1  # the shared grid ran the kernel
    return compiled, reference


def assert_rel(got, want, rtol=1e-12):
    scale = np.max(np.abs(want))
    big = np.abs(want) > 1e-12 * scale
    assert np.max(np.abs(got[big] - want[big]) / np.abs(want[big])) <= rtol
    assert np.all(np.abs(got[~big] - want[~big]) <= 1e-15 * scale)


@pytest.mark.parametrize("n_cmt", [1, 2, 3])
@pytest.mark.parametrize("route", ["oral", "iv"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_matches_numpy_path_on_random_regimens(monkeypatch, n_cmt, route, seed):
    rng = np.random.default_rng(100 * seed + 10 * n_cmt + (route == "iv"))
    n = int(rng.integers(1, 1200))  # crosses the kernel's block of participants
    oral = route == "oral"
    interval = float(rng.choice([8.0, 12.0, 24.0]))
    n_doses = int(rng.integers(1, 40))
    per_participant = rng.uniform(10.0, 200.0, n) if seed == 1 else 100.0
    doses = with_missed(regimen(per_participant, interval, n_doses, start_h=float(rng.uniform(0, 5)),
                                route=route), rng.random((n, n_doses)) < 0.25)
    # outputs before the first dose, inside participants' lag windows, on dose times and after the last
    t = np.sort(np.concatenate([rng.uniform(0.0, interval * (n_doses + 2), 60),
                                doses.times[0, :5] + rng.uniform(0, 3.0, doses.times[0, :5].size),
                                doses.times[0, :3], [0.0]]))
    model = population(n, rng, n_cmt, oral)
    compiled, reference = both_paths(monkeypatch, model, doses, t)
    assert compiled.shape == (n, t.size)
    assert np.all(np.isfinite(compiled))
    assert_rel(compiled, reference)


def test_kernel_matches_on_the_bench_regimens(monkeypatch):
    # once daily and twice daily with missed doses, one reading a day (what the benchmark measures)
    rng = np.random.default_rng(20261203)
    n, days = 700, 60
    t = np.arange(days) * 24.0 + 2.0
    for n_cmt, doses in ((1, regimen(100.0, 24.0, days)), (2, regimen(100.0, 24.0, days)),
                         (1, with_missed(regimen(50.0, 12.0, 2 * days), rng.random((n, 2 * days)) < 0.2)),
                         (3, regimen(100.0, 24.0, 1))):  # a single dose: no dose interval at all
        compiled, reference = both_paths(monkeypatch, population(n, rng, n_cmt, True), doses, t)
        assert_rel(compiled, reference)


def test_kernel_is_deterministic_and_reports_its_compilation(monkeypatch):
    monkeypatch.setenv("TRIALTWIN_PK_KERNEL", "auto")
    rng = np.random.default_rng(7)
    model = population(300, rng, 2, True)
    doses = with_missed(regimen(100.0, 24.0, 30), rng.random((300, 30)) < 0.3)
    t = np.arange(30) * 24.0 + 1.0
    first = concentration(model, doses, t)
    assert np.array_equal(first, concentration(model, doses, t))
    info = pk_kernel.kernel_info()
    assert info["kernel"] == "numba" and info["compile_seconds"] > 0 and info["cache"] in (True, False)


def test_env_var_can_insist_on_numba(monkeypatch):
    monkeypatch.setenv("TRIALTWIN_PK_KERNEL", "numba")
    assert pk_kernel.kernel_wanted()
    monkeypatch.setenv("TRIALTWIN_PK_KERNEL", "NumPy")
    assert not pk_kernel.kernel_wanted()
