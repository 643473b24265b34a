"""Withdrawal model: hazard arithmetic, landmark features, C-index against R survival, committed model, retraining."""
import json
import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.metrics import roc_auc_score

from inference.features import AdverseEventRecord, Dose, ParticipantHistory, Visit
from inference.registry import default_registry, sha256_file
from inference.training.dropout import _libraries, calibration_slope_intercept
from inference.training.withdrawal import (REPRODUCTION_ATOL, TrainingDesign, concordance_index, person_period_data,
                                           simulate_landmarks, train_withdrawal)
from inference.training.withdrawal_transfer import _auc, _recalibration
from inference.withdrawal import (MAX_HORIZON_DAYS, WITHDRAWAL_FEATURES, horizon_probability, landmark_features,
                                  period_rows)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def committed():
    return default_registry().latest("withdrawal").verify()


def _history(**changes):
    base = dict(visits=(Visit(14, True), Visit(28, False, "remote"), Visit(42, False), Visit(56, None)),
                doses=tuple(Dose(d, d % 3 != 0) for d in range(50)),
                adverse_events=(AdverseEventRecord(20, 2), AdverseEventRecord(45, 3)), age_years=61, sex="female",
                weight_kg=70, egfr=80, travel_distance_km=35, site_id="s", arm="placebo")
    return ParticipantHistory(**(base | changes))


def test_landmark_features_use_nothing_after_the_as_of_day():
    h = _history()
    cut = h.replace(visits=h.visits[:2] + (Visit(42, None), Visit(56, None)),
                    doses=tuple(d for d in h.doses if d.day <= 30), adverse_events=h.adverse_events[:1])
    np.testing.assert_array_equal(landmark_features(h, 30), landmark_features(cut, 30))
    x = dict(zip(WITHDRAWAL_FEATURES, landmark_features(h, 44)))
    assert (x["n_past_visits"], x["consecutive_missed"], x["last_visit_missed"]) == (3, 2, 1)
    assert x["missed_visit_rate"] == pytest.approx(3 / 5)
    assert (x["in_person_visits_30d"], x["remote_visits_30d"], x["ae_severity_30d"]) == (1, 1, 2)
    with pytest.raises(ValueError, match="no outcome"):
        landmark_features(h, 60)


def test_horizon_probability_is_the_constant_hazard_closed_form():
    # constant per-period hazard q: P(T <= h) = 1 - (1 - q) ** (h / 7), partial last period included
    q = 0.03
    for h in (1, 7, 10, 28, 30, 84):
        rows, frac = period_rows(np.zeros((1, len(WITHDRAWAL_FEATURES) - 1), np.float32), h)
        assert horizon_probability(np.full(rows.shape[0], q), frac)[0] == pytest.approx(1 - (1 - q) ** (h / 7), rel=1e-12)
    for bad in (0, 0.5, MAX_HORIZON_DAYS + 1, float("nan")):
        with pytest.raises(ValueError, match="horizon"):
            period_rows(np.zeros((1, len(WITHDRAWAL_FEATURES) - 1), np.float32), bad)


def test_c_index_agrees_with_r_survival_concordance(tmp_path):
    if not shutil.which("Rscript") or subprocess.run(["Rscript", "-e", "library(survival)"],
                                                     capture_output=True).returncode:
        pytest.skip("R with survival not installed (Debian: apt-get install r-cran-survival)")
    rng = np.random.default_rng(4)
    n = 300
    risk = np.round(rng.normal(size=n), 1)  # ties in risk on purpose
    time = rng.exponential(np.exp(-0.7 * risk)) + rng.uniform(0, 1e-3, n)  # no ties in time
    event = rng.random(n) < 0.7
    data = tmp_path / "c.csv"
    data.write_text("t,e,r\n" + "\n".join(f"{float(a)!r},{int(b)},{float(c)!r}" for a, b, c in zip(time, event, risk)) + "\n")
    # reverse = TRUE: a higher risk score should go with a shorter time
    script = (f"suppressMessages(library(survival)); d <- read.csv('{data}'); "
              "cat(sprintf('%.12f', concordance(Surv(t, e) ~ r, data = d, reverse = TRUE)$concordance))")
    r_c = float(subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, check=True).stdout)
    assert concordance_index(time, event, risk) == pytest.approx(r_c, abs=1e-9)


def test_fast_metrics_equal_the_reference_implementations():
    rng = np.random.default_rng(5)
    p = 1 / (1 + np.exp(-rng.normal(-2, 1, 5000)))
    y = (rng.random(p.size) < p).astype(int)
    assert _auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert _recalibration(y.astype(float), p) == pytest.approx(calibration_slope_intercept(y, p), abs=1e-6)


def test_person_period_rows_respect_censoring():
    lm = simulate_landmarks(200, seed=3)
    X, y = person_period_data(lm)
    assert X.shape[1] == len(WITHDRAWAL_FEATURES) and set(np.unique(y)) <= {0, 1}
    start = X[:, 0] + X[:, -1]  # as-of day + period start
    assert start.max() + 7 <= lm["n_days"]
    # each participant withdraws at most once per landmark
    assert y.sum() <= len(lm["as_of"])


def test_committed_model_reports_held_out_and_real_data_validation(committed):
    m = committed.metadata
    v = m["validation"]
    assert [f["name"] for f in m["feature_schema"]] == list(WITHDRAWAL_FEATURES)
    assert v["c_index"] > 0.7 and v["auc"] > 0.7
    assert 0.8 <= v["calibration_slope"] <= 1.25 and abs(v["calibration_intercept"]) < 0.5
    assert v["brier"] < v["brier_reference_prevalence"] and v["onnx_max_abs_diff"] <= 1e-5
    real = m["real_data_validation"]
    assert set(real["settings"]) == {"sim_to_real", "real_to_sim", "cv_real", "sim_to_sim"}
    for s in real["settings"].values():
        for key in ("auc", "brier", "calibration_slope", "calibration_intercept"):
            lo, hi = s[f"{key}_ci95"]
            assert lo <= s[key] <= hi
    assert m["gpu"]["cuda_path"] == "not measured"
    assert committed.onnx_path.stat().st_size < 10_000


def test_retraining_reproduces_the_committed_model(tmp_path, committed):
    t = committed.metadata["training"]
    meta = train_withdrawal(tmp_path, seed=t["seed"], design=TrainingDesign(**t["design"]),
                            version=committed.version, transfer=False)
    probe = np.load(committed.onnx_path.with_suffix(".probe.npz"))
    sess = ort.InferenceSession(str(tmp_path / committed.onnx_path.name), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["probabilities"], {"features": probe["x"]})[0][:, 1], probe["p"],
                               atol=REPRODUCTION_ATOL, rtol=0)
    assert meta["training"]["n_train_rows"] == t["n_train_rows"]
    for key in ("c_index", "auc", "brier", "calibration_slope"):
        assert meta["validation"][key] == pytest.approx(committed.metadata["validation"][key], abs=1e-6)
    if _libraries() == committed.metadata["libraries"]:
        assert sha256_file(tmp_path / committed.onnx_path.name) == committed.metadata["sha256"]
    assert json.loads((tmp_path / f"withdrawal-{committed.version}.json").read_text())["sha256"] == meta["sha256"]


def test_committed_model_was_trained_from_the_current_sources(committed):
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    stale = [name for name, digest in committed.metadata["code"]["source_sha256"].items()
             if hashlib.sha256((root / name).read_bytes()).hexdigest() != digest]
    assert not stale, f"{stale} changed since withdrawal-{committed.version} was trained: retrain it"
    assert "inference/withdrawal.py" in committed.metadata["code"]["source_sha256"]
