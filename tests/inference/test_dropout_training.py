"""Missed-next-visit model: acceptance metrics (stored and recomputed), ONNX fidelity, reproducible retraining."""
import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from scipy.stats import mannwhitneyu
from scipy.special import expit, logit

from inference.features import FEATURE_NAMES, N_FEATURES
from inference.registry import default_registry, sha256_file
from inference.training.dropout import (DEFAULT_SEED, REPRODUCTION_ATOL, TrainingDesign, _libraries,
                                        calibration_slope_intercept, export_onnx, fit_model, simulate_dataset,
                                        train_dropout, validation_metrics)

pytestmark = pytest.mark.unit

FRESH_SEED = 987_654  # not a stream used by the committed training run


@pytest.fixture(scope="module")
def committed():
    return default_registry().latest("dropout").verify()


@pytest.fixture(scope="module")
def fresh_holdout():
    return simulate_dataset(1500, FRESH_SEED)


def test_stored_metadata_meets_acceptance(committed):
    v = committed.metadata["validation"]
    assert v["auc"] >= 0.75
    assert 0.8 <= v["calibration_slope"] <= 1.2
    assert v["onnx_max_abs_diff"] <= 1e-5
    assert 0 < v["brier"] < v["brier_reference_prevalence"]  # better than predicting the prevalence
    assert [f["name"] for f in committed.metadata["feature_schema"]] == list(FEATURE_NAMES)
    t = committed.metadata["training"]
    assert t["seed"] == DEFAULT_SEED and t["n_train_rows"] > 10_000 and t["n_valid_rows"] > 5_000
    assert committed.onnx_path.stat().st_size < 10_000  # small enough to commit


def test_metrics_recomputed_on_fresh_simulated_holdout(committed, fresh_holdout):
    X, y = fresh_holdout
    p = committed.load(force_cpu=True).predict_proba(X)
    m = validation_metrics(y, p)
    assert m["auc"] >= 0.75, m
    assert 0.8 <= m["calibration_slope"] <= 1.2, m
    assert abs(m["calibration_intercept"]) < 0.2, m
    assert m["brier"] < m["brier_reference_prevalence"]
    # calibration-in-the-large: mean prediction within 2 percentage points of the observed rate
    assert abs(p.mean() - y.mean()) < 0.02


def test_auc_agrees_with_mann_whitney(fresh_holdout, committed):
    # AUC = U / (n1 * n0) (Hanley & McNeil 1982), computed by scipy independently of scikit-learn.
    X, y = fresh_holdout
    p = committed.load(force_cpu=True).predict_proba(X).astype(float)
    u = mannwhitneyu(p[y == 1], p[y == 0]).statistic
    assert validation_metrics(y, p)["auc"] == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), abs=1e-9)


def test_calibration_slope_recovers_a_known_miscalibration():
    # Outcomes drawn from logit P = 0.3 + 0.5 * logit(p): the recalibration fit (Cox 1958) must give
    # slope 0.5 and intercept 0.3 up to sampling error (n = 200k: SE about 0.01).
    rng = np.random.default_rng(3)
    p = expit(rng.normal(-1, 1.5, 200_000))
    y = rng.random(p.size) < expit(0.3 + 0.5 * logit(p))
    slope, intercept = calibration_slope_intercept(y, p)
    assert slope == pytest.approx(0.5, abs=0.03)
    assert intercept == pytest.approx(0.3, abs=0.03)


def test_onnx_matches_sklearn_within_1e5(tmp_path):
    X, y = simulate_dataset(400, seed=5)
    pipe = fit_model(X, y)
    export_onnx(pipe, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = sess.get_outputs()
    assert [o.name for o in out] == ["label", "probabilities"] and out[1].type == "tensor(float)"  # no ZipMap
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_inputs()[0].shape[1] == N_FEATURES
    X_eval, _ = simulate_dataset(300, seed=6)
    onnx_p = sess.run(["probabilities"], {"features": X_eval})[0]
    np.testing.assert_allclose(onnx_p, pipe.predict_proba(X_eval), atol=1e-5, rtol=0)


def test_fit_reaches_the_optimum_of_the_penalized_likelihood():
    # Independent of scikit-learn's stopping rule: at the optimum of
    #   sum_i logloss(y_i, w.z_i + b) + ||w||^2 / (2C)    (C = 1, intercept unpenalized)
    # the gradient, computed here with numpy in float64, vanishes.
    X, y = simulate_dataset(800, seed=21)
    pipe = fit_model(X, y)
    scaler, logreg = pipe[0], pipe[-1]
    z = (X.astype(float) - scaler.mean_) / scaler.scale_
    w, b = logreg.coef_[0], logreg.intercept_[0]
    residual = expit(z @ w + b) - y
    grad_w, grad_b = z.T @ residual + w, residual.sum()
    scale = np.abs(z.T @ y.astype(float)).max()  # size of the gradient's terms
    assert np.abs(grad_w).max() / scale < 1e-9 and abs(grad_b) / y.size < 1e-9


def test_fit_does_not_depend_on_the_order_of_floating_point_sums():
    # Permuting the rows changes the order of every sum the solver and BLAS compute, as another
    # machine's BLAS (or thread count) does; the predictions must not move at the 1e-6 scale.
    X, y = simulate_dataset(800, seed=22)
    order = np.random.default_rng(0).permutation(len(y))
    a = fit_model(X, y).predict_proba(X)[:, 1]
    b = fit_model(X[order], y[order]).predict_proba(X)[:, 1]
    np.testing.assert_allclose(a, b, atol=1e-9, rtol=0)


def test_committed_model_is_the_logistic_model_its_metadata_describes(committed, fresh_holdout):
    # Independent numpy evaluation of StandardScaler -> LogisticRegression from the stored coefficients.
    est = committed.metadata["estimator"]
    X = fresh_holdout[0][:2000].astype(float)
    z = (X - np.array(est["scaler_mean"])) / np.array(est["scaler_scale"])
    coef = np.array([est["coefficients"][n] for n in FEATURE_NAMES])
    expected = expit(z @ coef + est["intercept"])
    np.testing.assert_allclose(committed.load(force_cpu=True).predict_proba(X), expected, atol=1e-5)


def test_retraining_reproduces_the_committed_model(tmp_path, committed):
    meta = train_dropout(tmp_path, seed=committed.metadata["training"]["seed"],
                         design=TrainingDesign(**committed.metadata["training"]["design"]),
                         version=committed.version)
    probe = np.load(committed.onnx_path.with_suffix(".probe.npz"))
    sess = ort.InferenceSession(str(tmp_path / committed.onnx_path.name), providers=["CPUExecutionProvider"])
    retrained = sess.run(["probabilities"], {"features": probe["x"]})[0][:, 1]
    np.testing.assert_allclose(retrained, probe["p"], atol=REPRODUCTION_ATOL, rtol=0)
    assert meta["training"]["n_train_rows"] == committed.metadata["training"]["n_train_rows"]
    if _libraries() == committed.metadata["libraries"]:
        # Same library versions: the ONNX file must be byte-identical.
        assert sha256_file(tmp_path / committed.onnx_path.name) == committed.metadata["sha256"]
    for name in meta["files"].values():
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / f"dropout-{committed.version}.json").read_text())["sha256"] == meta["sha256"]


def test_committed_model_was_trained_from_the_current_sources(committed):
    # A change to the behaviour simulator or the features silently invalidates the committed model.
    root = Path(__file__).resolve().parents[2]
    stale = [name for name, digest in committed.metadata["code"]["source_sha256"].items()
             if hashlib.sha256((root / name).read_bytes()).hexdigest() != digest]
    assert not stale, f"{stale} changed since dropout-{committed.version} was trained: run `trialtwin train dropout`"


def test_simulated_data_is_seeded():
    a, b, c = simulate_dataset(60, 11), simulate_dataset(60, 11), simulate_dataset(60, 12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])
    assert np.isfinite(a[0]).all()
