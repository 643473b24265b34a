"""Drift over real HTTP (issue 18 acceptance 5): a model version trained by the learning loop carries its
training distribution; ``/predict`` batches from that distribution keep ``/metrics`` quiet, a batch with one
feature shifted raises the PSI alarm for that feature (and only that one)."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from fhir_ops.inference_api import create_app
from inference import model_loop
from inference.features import FEATURE_NAMES
from inference.model_loop import LoopRegistry, TrainingRows, train_candidate
from inference.training.dropout import simulate_dataset
from tests.live_server import serve

pytestmark = pytest.mark.api


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    X, y = simulate_dataset(300, seed=11)
    times = np.random.default_rng(11).permutation(len(y)).astype(float)
    directory = tmp_path_factory.mktemp("models")
    cand = train_candidate(LoopRegistry(directory), model_loop.family("dropout"),
                           TrainingRows(X, y, times, times, tuple("p" for _ in y)))
    return directory, cand.entry.version


@pytest.fixture
def base_url(models_dir):
    app = create_app({"MODELS_DIR": str(models_dir[0]), "FORCE_CPU": True, "AUTH_MODE": "open", "MAX_WAIT_MS": 1})
    with serve(app) as url:
        yield url
    app.extensions["trialtwin_inference"].close()


def _post(url, rows) -> None:
    r = requests.post(f"{url}/predict/dropout", json={"rows": np.asarray(rows, dtype=float).tolist()}, timeout=30)
    assert r.status_code == 200, r.text


def _drift(url, key) -> dict:
    return requests.get(f"{url}/metrics", timeout=10).json()["drift"]["models"][key]


def test_a_stable_period_stays_quiet_and_one_shifted_feature_raises_its_alarm(base_url, models_dir):
    key = f"dropout-{models_dir[1]}"
    X_new, _ = simulate_dataset(500, seed=12)  # the same world, participants the model never saw
    # rows come out ordered by schedule and visit; a period's batches mix participants at every stage, mostly
    # one row each (as a study-wide $predict-dropout batch: rows of one participant share their covariates)
    X_new = X_new[np.random.default_rng(12).permutation(len(X_new))]
    for batch in np.array_split(X_new[:1050], 3):
        _post(base_url, batch)
        quiet = _drift(base_url, key)
        assert quiet["status"] == "ok" and quiet["alarm"] is False, {k: v for k, v in quiet["psi"].items() if v > 0.05}
        assert max(quiet["psi"].values()) < 0.1 and quiet["scorePsi"] < 0.1
    heavier = X_new[:1000].copy()
    heavier[:, FEATURE_NAMES.index("weight_kg")] *= 1.3  # a heavier population enrols
    _post(base_url, heavier)
    alarm = _drift(base_url, key)
    assert alarm["alarm"] is True and alarm["alarms"] == ["weight_kg"], alarm
    assert alarm["psi"]["weight_kg"] > 0.25 and alarm["windowRows"] == 1000
    metrics = requests.get(f"{base_url}/metrics", timeout=10).json()
    assert metrics["drift"]["thresholds"] == {"warning": 0.1, "alarm": 0.25}
    print(f"\ndrift: stable max feature PSI {max(quiet['psi'].values()):.4f}, score PSI {quiet['scorePsi']:.4f}; "
          f"weight x1.3: PSI {alarm['psi']['weight_kg']:.3f}, score PSI {alarm['scorePsi']:.4f}")
