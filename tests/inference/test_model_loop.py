"""The learning loop's numeric side: time-based split, promotion rule, the server's registry of trained versions
(active vs shadow), and reproducible candidates."""
from __future__ import annotations

import json

import numpy as np
import pytest

from inference import model_loop
from inference.model_loop import LoopRegistry, PromotionRule, TrainingRows, time_split, train_candidate
from inference.registry import default_registry
from inference.training.dropout import simulate_dataset

pytestmark = pytest.mark.unit
COMMITTED = default_registry().latest("dropout").version


@pytest.fixture(scope="module")
def rows() -> TrainingRows:
    """Rows of the simulator's own world, with event times in random order (so the split is not by schedule)."""
    X, y = simulate_dataset(300, seed=11)
    times = np.random.default_rng(11).permutation(len(y)).astype(float)
    return TrainingRows(X, y, times, times - 7, tuple(f"sim-{i % 300}" for i in range(len(y))))


def test_time_split_holds_out_the_latest_rows(rows):
    train, held, cut = time_split(rows, 0.3)
    assert len(train.y) + len(held.y) == len(rows.y)
    assert train.times.max() == cut < held.times.min()
    assert len(held.y) == pytest.approx(0.3 * len(rows.y), abs=1)
    with pytest.raises(ValueError):
        time_split(rows, 1.0)


def test_time_split_keeps_ties_on_the_training_side():
    r = TrainingRows(np.zeros((6, 2), np.float32), np.array([0, 1, 0, 1, 0, 1]), np.array([1., 1, 2, 2, 2, 3]),
                     np.zeros(6), tuple("abcdef"))
    train, held, cut = time_split(r, 0.5)
    assert cut == 2.0 and held.times.tolist() == [3.0] and len(train.y) == 5


@pytest.mark.parametrize("cand, active, events, promote", [
    ({"auc": 0.80, "brier": 0.150}, {"auc": 0.80, "brier": 0.150}, 20, True),    # ties pass
    ({"auc": 0.791, "brier": 0.149}, {"auc": 0.80, "brier": 0.150}, 50, True),   # AUC within 0.01
    ({"auc": 0.789, "brier": 0.149}, {"auc": 0.80, "brier": 0.150}, 50, False),  # AUC 0.011 lower
    ({"auc": 0.85, "brier": 0.1501}, {"auc": 0.80, "brier": 0.150}, 50, False),  # Brier worse
    ({"auc": 0.85, "brier": 0.10}, {"auc": 0.80, "brier": 0.150}, 19, False),    # too few events
    (None, {"auc": 0.80, "brier": 0.150}, 50, False),
])
def test_promotion_rule(cand, active, events, promote):
    ok, reason = PromotionRule().decide(cand, active, events, 200)
    assert ok is promote and reason.startswith("promoted" if promote else "not promoted")


def test_a_candidate_is_registered_in_shadow_and_served_only_once_promoted(tmp_path, rows):
    registry = LoopRegistry(tmp_path)
    assert registry.get("dropout").version == COMMITTED and registry.next_version("dropout") == "1.1.0"
    said = []
    cand = train_candidate(registry, model_loop.family("dropout"), rows, training={"study": "sim"},
                           progress=lambda f, m: said.append((f, m)))
    assert [f for f, _ in said] == sorted(f for f, _ in said) and "shadow" in said[-1][1]
    entry = cand.entry
    assert entry.version == "1.1.0" and registry.status("dropout", "1.1.0") == "shadow"
    assert registry.get("dropout").version == COMMITTED  # a shadow version is not served
    meta = json.loads(entry.metadata_path.read_text())
    assert set(meta["drift_reference"]["features"]) == set(entry.feature_names)
    assert meta["training"]["split"] == "time" and meta["validation"]["active_version"] == COMMITTED
    # the simulator's own world: the committed model (27k rows) and a 2,000-row candidate are close
    assert abs(cand.metrics["auc"] - cand.active_metrics["auc"]) < 0.03
    registry.record("dropout", "1.1.0", "active", {"decision": cand.reason})
    assert registry.get("dropout").version == "1.1.0" and registry.status("dropout", "1.1.0") == "active"
    second = train_candidate(registry, model_loop.family("dropout"), rows)
    assert second.entry.version == "1.2.0" and second.active_version == "1.1.0"
    registry.record("dropout", "1.2.0", "active", {"decision": second.reason})
    assert registry.status("dropout", "1.1.0") == "retired" and registry.get("dropout").version == "1.2.0"
    assert [e.version for e in registry.entries() if e.name == "dropout"] == [COMMITTED, "1.1.0", "1.2.0"]
    assert not list(default_registry().directory.glob("dropout-1.1.0*"))  # the package's models are untouched


def test_retraining_on_the_same_rows_reproduces_the_candidate(tmp_path, rows):
    a = train_candidate(LoopRegistry(tmp_path / "a"), model_loop.family("dropout"), rows)
    b = train_candidate(LoopRegistry(tmp_path / "b"), model_loop.family("dropout"), rows)
    x = rows.X[:500]
    np.testing.assert_allclose(a.entry.load(force_cpu=True).predict_proba(x), b.entry.load(force_cpu=True).predict_proba(x),
                               atol=1e-6)
    assert a.metrics == b.metrics


def test_shuffled_labels_give_a_candidate_the_rule_refuses(tmp_path, rows):
    cand = train_candidate(LoopRegistry(tmp_path), model_loop.family("dropout"), rows, shuffle_labels_seed=0)
    assert cand.promoted is False and cand.extra["status"] == "rejected"
    assert cand.metrics["auc"] < 0.6 < cand.active_metrics["auc"]


def test_too_little_data_is_refused(tmp_path, rows):
    with pytest.raises(ValueError, match="at least 20 rows"):
        train_candidate(LoopRegistry(tmp_path), model_loop.family("dropout"), rows.take(np.arange(len(rows.y)) < 15))
    with pytest.raises(KeyError, match="no trainable model family"):
        model_loop.family("nope")
