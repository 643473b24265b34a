"""The shared-grid PK loop in array-API operations (``TRIALTWIN_PK_KERNEL=cupy`` on a GPU) against the
numpy loop it mirrors.

Run here on ``array_api_strict``, the reference namespace of the array API standard, which refuses
anything outside the standard (numpy-only functions, ``out=``, numpy scalars, implicit conversions):
passing shows the loop needs nothing CuPy lacks. Its float64 arithmetic is numpy's, so the answer must
equal the numpy loop's exactly. No GPU runs in CI; docs/engine.md says what was and was not measured.
"""
import numpy as np
import pytest

from inference import pk_events, pk_kernel
from inference.dosing import regimen, with_missed
from inference.pk import concentration
from tests.inference.test_pk_kernel import population

pytest.importorskip("array_api_strict")
pytestmark = pytest.mark.unit
STRICT = "array-api:array_api_strict"


@pytest.fixture
def propagations(monkeypatch):
    """Counts the array-API loop's runs, so a test knows the shared grid did not fall back."""
    calls = []
    real = pk_events._propagate

    def counted(xp, *args):
        calls.append(xp.__name__)
        return real(xp, *args)

    monkeypatch.setattr(pk_events, "_propagate", counted)
    return calls


def on_both(monkeypatch, model, doses, t):
    monkeypatch.setenv("TRIALTWIN_PK_KERNEL", "numpy")
    reference = concentration(model, doses, t)
    monkeypatch.setenv("TRIALTWIN_PK_KERNEL", STRICT)
    return concentration(model, doses, t), reference


@pytest.mark.parametrize("n_cmt", [1, 2, 3])
@pytest.mark.parametrize("route", ["oral", "iv"])
def test_array_api_loop_equals_the_numpy_loop(monkeypatch, propagations, n_cmt, route):
    rng = np.random.default_rng(7 * n_cmt + (route == "iv"))
    n, interval, n_doses = 300, 12.0, 20
    doses = with_missed(regimen(rng.uniform(10.0, 200.0, n), interval, n_doses, start_h=1.5, route=route),
                        rng.random((n, n_doses)) < 0.25)
    # before the first dose, inside lag windows, on dose times and after the last dose
    t = np.sort(np.concatenate([rng.uniform(0.0, interval * (n_doses + 2), 40),
                                doses.times[0, :4] + rng.uniform(0, 3.0, 4), doses.times[0, :3], [0.0]]))
    got, want = on_both(monkeypatch, population(n, rng, n_cmt, route == "oral"), doses, t)
    assert propagations == ["array_api_strict"]
    assert isinstance(got, np.ndarray) and got.shape == (n, t.size)
    assert np.array_equal(got, want)


def test_array_api_loop_on_the_bench_regimens(monkeypatch, propagations):
    rng = np.random.default_rng(20261203)
    n, days = 200, 30
    t = np.arange(days) * 24.0 + 2.0
    cases = ((1, regimen(100.0, 24.0, days)), (2, regimen(100.0, 24.0, days)),
             (1, with_missed(regimen(50.0, 12.0, 2 * days), rng.random((n, 2 * days)) < 0.2)),
             (3, regimen(100.0, 24.0, 1)))  # a single dose: no dose interval at all
    for n_cmt, doses in cases:
        got, want = on_both(monkeypatch, population(n, rng, n_cmt, True), doses, t)
        assert np.array_equal(got, want)
    assert len(propagations) == len(cases)


def test_an_array_namespace_that_cannot_be_used_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv("TRIALTWIN_PK_KERNEL", "array-api:no_such_array_library")
    with pytest.raises(RuntimeError, match="no_such_array_library"):
        pk_kernel.array_namespace_wanted()
    monkeypatch.setenv("TRIALTWIN_PK_KERNEL", "numpy")
    assert pk_kernel.array_namespace_wanted() is None
    monkeypatch.setenv("TRIALTWIN_PK_KERNEL", STRICT)
    assert pk_kernel.kernel_wanted() is False  # the compiled kernel stands aside
