"""Population stability index: the closed form it approaches, binning, and the per-batch monitor's alarms."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from inference.drift import (MIN_ROWS, PSI_ALARM, PSI_WARNING, DriftMonitor, bin_counts, drift_reference, psi,
                             psi_level)

pytestmark = pytest.mark.unit
NAMES = ["a", "b", "c"]


@pytest.mark.parametrize("mu", [0.1, 0.3, 0.5, 1.0])
def test_psi_of_fine_bins_approaches_the_jeffreys_divergence_of_two_normals(mu):
    # With fine bins PSI is the symmetric Kullback-Leibler (Jeffreys) divergence; for N(0, 1) against
    # N(mu, 1) that is mu^2 in closed form (Kullback 1959). Bin probabilities are exact (normal CDF).
    edges = np.linspace(-10, 10, 4001)
    expected = np.diff(norm.cdf(edges))
    actual = np.diff(norm.cdf(edges, loc=mu))
    assert psi(expected, actual, floor=1e-300) == pytest.approx(mu ** 2, rel=1e-4)


def test_psi_by_hand_and_its_levels():
    # 3 bins: (0.2-0.3) ln(0.2/0.3) + (0.3-0.3) ln 1 + (0.5-0.4) ln(0.5/0.4)
    want = (0.2 - 0.3) * np.log(0.2 / 0.3) + (0.5 - 0.4) * np.log(0.5 / 0.4)
    assert psi([0.3, 0.3, 0.4], [0.2, 0.3, 0.5]) == pytest.approx(want, abs=1e-15)
    assert psi([30, 30, 40], [2, 3, 5]) == pytest.approx(want, abs=1e-15)  # counts work as well
    assert psi([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]) == 0.0  # an empty bin on both sides adds nothing
    assert np.isfinite(psi([0.5, 0.5, 0.0], [0.4, 0.4, 0.2]))  # the floor keeps an empty reference bin finite
    assert (psi_level(0.05), psi_level(PSI_WARNING + 1e-9), psi_level(PSI_ALARM + 1e-9)) == ("ok", "warning", "alarm")
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [1.0])


def test_reference_bins_are_deciles_and_collapse_on_ties():
    rng = np.random.default_rng(1)
    X = np.column_stack([rng.normal(size=10000), rng.integers(0, 2, 10000), np.zeros(10000)])
    ref = drift_reference(X, rng.random(10000), NAMES)
    a, b, c = (ref["features"][n] for n in NAMES)
    assert len(a["cuts"]) == 9 and np.allclose(a["proportions"], 0.1, atol=1e-3)
    assert len(b["cuts"]) <= 2 and sum(b["proportions"]) == pytest.approx(1.0)
    assert c["cuts"] == [0.0] and c["proportions"] == [1.0, 0.0]
    assert bin_counts(a["cuts"], X[:, 0]).sum() == 10000
    with pytest.raises(ValueError):
        drift_reference(X[:, :2], rng.random(10000), NAMES)


def _batch(rng, n, shift_b=0.0):
    X = np.column_stack([rng.normal(size=n), rng.normal(size=n) + shift_b, rng.gamma(2.0, 30.0, n)])
    return X, 1 / (1 + np.exp(-X[:, 0]))


def test_a_stable_period_stays_quiet_and_a_shift_of_one_feature_raises_its_alarm():
    rng = np.random.default_rng(20261203)
    X, s = _batch(rng, 20000)
    ref = drift_reference(X, s, NAMES)
    mon = DriftMonitor()
    for _ in range(5):  # a stable period: batches from the training distribution
        quiet = mon.observe("m-1.1.0", ref, *_batch(rng, 300))
        assert quiet["status"] == "ok", quiet
        assert max(quiet["psi"].values()) < PSI_WARNING and quiet["scorePsi"] < PSI_WARNING
    shifted = mon.observe("m-1.1.0", ref, *_batch(rng, 1000, shift_b=1.0))
    assert shifted["status"] == "alarm" and shifted["alarms"] == ["b"], shifted
    assert shifted["psi"]["b"] > PSI_ALARM and shifted["psi"]["a"] < PSI_WARNING and shifted["scorePsi"] < PSI_WARNING
    snap = mon.snapshot()["models"]["m-1.1.0"]
    assert snap["alarm"] is True and snap["alarmsRaised"] == 1 and snap["batches"] == 6
    # back to normal: once the shifted batch has left the window the alarm clears
    for _ in range(4):
        last = mon.observe("m-1.1.0", ref, *_batch(rng, 300))
    assert last["status"] == "ok" and mon.snapshot()["models"]["m-1.1.0"]["alarm"] is False


def test_too_few_rows_are_not_judged():
    rng = np.random.default_rng(3)
    ref = drift_reference(*_batch(rng, 5000), NAMES)
    small = DriftMonitor().observe("m", ref, *_batch(rng, MIN_ROWS - 1, shift_b=3.0))
    assert small["status"] == "insufficient" and small["alarms"] == []


def test_the_monitor_computes_the_same_psi_as_the_plain_formula():
    rng = np.random.default_rng(7)
    X, s = _batch(rng, 4000)
    ref = drift_reference(X, s, NAMES)
    mon = DriftMonitor(window_rows=600)
    batches = [_batch(rng, n, shift_b=0.3) for n in (400, 350, 300)]
    for b in batches:
        out = mon.observe("m", ref, *b)
    window = batches[1:]  # without the oldest batch the window still holds 650 >= 600 rows: it left
    assert out["windowRows"] == 650 and out["windowBatches"] == 2
    for j, name in enumerate(NAMES):
        counts = bin_counts(ref["features"][name]["cuts"], np.concatenate([b[0][:, j] for b in window]))
        assert out["psi"][name] == pytest.approx(psi(ref["features"][name]["proportions"], counts), abs=1e-6)
    score_counts = bin_counts(ref["score"]["cuts"], np.concatenate([b[1] for b in window]))
    assert out["scorePsi"] == pytest.approx(psi(ref["score"]["proportions"], score_counts), abs=1e-6)


def test_a_large_batch_is_binned_on_evenly_spaced_rows():
    rng = np.random.default_rng(8)
    ref = drift_reference(*_batch(rng, 5000), NAMES)
    X, s = _batch(rng, 50_000, shift_b=1.0)
    out = DriftMonitor().observe("m", ref, X, s)
    assert out["windowRows"] == 2000 and out["alarms"] == ["b"]
    snap = DriftMonitor()
    snap.observe("m", ref, X, s)
    assert snap.snapshot()["models"]["m"]["rows"] == 50_000  # rows predicted; windowRows: rows binned
