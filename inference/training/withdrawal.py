"""Withdrawal model: simulated landmark data, person-period logistic hazard, ONNX export, held-out report.

``train_withdrawal(output_dir, seed)`` reproduces the committed ``inference/models/withdrawal-<version>``
files, including the real-data transfer validation (:mod:`inference.training.withdrawal_transfer`).

Rows: for each simulated participant, landmark (as-of) days every 14 days from a random start
(0-13) while on study; for each landmark, 7-day periods after it up to 84 days while fully inside
the simulated 24 weeks and the participant is still on study at the period's start. Label: the
participant's simulated dropout day falls in the period.
"""
from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from inference.behaviour import BehaviourModel, VisitSchedule, simulate_behaviour
from inference.outreach import OutreachTarget, choose_threshold, operating_points
from inference.registry import sha256_file
from inference.training.dropout import (ARM_DOSE_MG, ARMS, TrainingDesign, _code_identity, _covariates,
                                        _exposure, _histories, _libraries, fit_model, validation_metrics)
from inference.withdrawal import (DEFAULT_HORIZON_DAYS, MAX_HORIZON_DAYS, MODEL_NAME, N_WITHDRAWAL_FEATURES,
                                  PERIOD_DAYS, WITHDRAWAL_SCHEMA, horizon_probability, landmark_feature_matrix,
                                  period_rows)

__all__ = ["MODEL_VERSION", "DEFAULT_SEED", "simulate_landmarks", "person_period_data", "concordance_index",
           "export_onnx", "train_withdrawal"]

MODEL_VERSION = "1.0.0"
DEFAULT_SEED = 20261203
LANDMARK_EVERY_DAYS = 14
ONNX_OPSET = 15
REPRODUCTION_ATOL = 1e-6
#: Without a study policy, flag where at least a quarter of flagged participants withdraw within the
#: horizon (about 4.5 times the held-out base rate): a study sets its own target (docs/LEARNED_MODELS.md).
DEFAULT_TARGET = OutreachTarget("precision", 0.25)


def simulate_landmarks(n: int, seed: int, design: TrainingDesign = TrainingDesign()) -> dict:
    """Simulate ``n`` participants and return their landmarks.

    Returns a dict of arrays, one entry per landmark: ``L`` (landmark features), ``as_of``,
    ``dropout_day`` (``n_days`` when the participant completed), ``participant`` and ``n_days``.
    """
    rng = np.random.default_rng(seed)
    cov = _covariates(n, rng, design)
    arms = [ARMS[k] for k in rng.integers(0, len(ARMS), n)]
    on_two_weekly = rng.random(n) < 0.5
    p_remote = rng.random(n)
    pairs, as_of, dropout, who = [], [], [], []
    for two_weekly in (False, True):
        idx = np.flatnonzero(on_two_weekly == two_weekly)
        interval = 14 if two_weekly else 28
        n_visits = (design.n_days - 1) // interval
        remote = rng.random((idx.size, n_visits)) < p_remote[idx, None]
        sub = cov.take(idx)
        dose = np.array([ARM_DOSE_MG[arms[i]] for i in idx])
        res = simulate_behaviour(BehaviourModel(), sub, VisitSchedule.every(interval, n_visits, remote=remote),
                                 design.n_days, rng, dose_mg=dose, exposure=_exposure(sub, rng))
        histories = _histories(sub, res, [arms[i] for i in idx], rng, int(idx[0]))
        start = rng.integers(0, LANDMARK_EVERY_DAYS, idx.size)
        for k, i in enumerate(idx):
            for day in range(int(start[k]), design.n_days - PERIOD_DAYS, LANDMARK_EVERY_DAYS):
                if res.dropout_day[k] <= day:
                    break
                pairs.append((histories[k], float(day)))
                as_of.append(day)
                dropout.append(int(res.dropout_day[k]))
                who.append(int(i))
    return {"L": landmark_feature_matrix(pairs), "as_of": np.asarray(as_of), "dropout_day": np.asarray(dropout),
            "participant": np.asarray(who), "n_days": design.n_days}


def person_period_data(lm: dict, max_horizon: int = MAX_HORIZON_DAYS) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` person-period rows: landmark features + period start; 1 if the dropout day is in the period."""
    K = max_horizon // PERIOD_DAYS
    rows, fraction = period_rows(lm["L"], max_horizon)
    start = lm["as_of"][:, None] + PERIOD_DAYS * np.arange(K)[None, :]
    d = lm["dropout_day"][:, None]
    observed = (start + PERIOD_DAYS <= lm["n_days"]) & (d > start)
    y = (d <= start + PERIOD_DAYS) & observed
    keep = observed.reshape(-1)
    return rows[keep], y.reshape(-1)[keep].astype(np.int8)


def horizon_outcome(lm: dict, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, y)``: landmarks whose horizon lies inside the simulated study, and whether they withdrew in it."""
    mask = lm["as_of"] + horizon <= lm["n_days"]
    return mask, (lm["dropout_day"] <= lm["as_of"] + horizon)[mask].astype(np.int8)


def concordance_index(time, event, risk) -> float:
    """Harrell's C: among usable pairs (the shorter time is an event), the share ordered by risk (ties 1/2).

    Checked against R ``survival::concordance`` in the tests.

    Examples
    --------
    >>> concordance_index([1, 2, 3], [1, 1, 0], [0.9, 0.5, 0.1])
    1.0
    """
    t, e, r = (np.asarray(a, dtype=float) for a in (time, event, risk))
    earlier = (t[:, None] < t[None, :]) & (e[:, None] == 1)
    concordant = (r[:, None] > r[None, :]) & earlier
    tied = (r[:, None] == r[None, :]) & earlier
    return float((concordant.sum() + 0.5 * tied.sum()) / earlier.sum())


def export_onnx(pipeline, path) -> bytes:
    """ONNX with float32 input ``features`` (``N_WITHDRAWAL_FEATURES`` wide) and a plain ``probabilities`` output."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(pipeline, initial_types=[("features", FloatTensorType([None, N_WITHDRAWAL_FEATURES]))],
                  options={id(pipeline): {"zipmap": False}}, target_opset=ONNX_OPSET)
    data = onx.SerializeToString()
    Path(path).write_bytes(data)
    return data


def _onnx_hazard(path, X) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"features": np.asarray(X, dtype=np.float32)})[0][:, 1]


def held_out_validation(onnx_path, lm: dict, horizon: int = DEFAULT_HORIZON_DAYS) -> tuple[dict, np.ndarray, np.ndarray]:
    """C-index and calibration of P(withdraw within ``horizon``) on held-out landmarks."""
    mask, y = horizon_outcome(lm, horizon)
    rows, fraction = period_rows(lm["L"][mask], horizon)
    p = horizon_probability(_onnx_hazard(onnx_path, rows), fraction)
    m = validation_metrics(y, p, threshold=0.5)
    # C-index: one landmark per participant (the first), time to withdrawal censored at the study end.
    first = np.unique(lm["participant"], return_index=True)[1]
    rows1, frac1 = period_rows(lm["L"][first], horizon)
    risk = horizon_probability(_onnx_hazard(onnx_path, rows1), frac1)
    time = (lm["dropout_day"] - lm["as_of"])[first]
    event = (lm["dropout_day"] < lm["n_days"])[first]
    m.update({"horizon_days": horizon, "c_index": concordance_index(time, event, risk),
              "c_index_n": int(first.size), "c_index_events": int(event.sum()),
              "c_index_note": "Harrell's C of P(withdraw within horizon) at each held-out participant's first "
                              "landmark against time to withdrawal, censored at the end of the simulated study"})
    return m, y, p


def train_withdrawal(output_dir, seed: int = DEFAULT_SEED, design: TrainingDesign = TrainingDesign(),
                     version: str = MODEL_VERSION, transfer: bool = True) -> dict:
    """Simulate, fit, export and validate the withdrawal model; write it to ``output_dir``.

    Writes ``withdrawal-<version>.onnx``, ``.json`` (metadata: the registry entry), ``.report.md``,
    ``.calibration.png`` and ``.probe.npz``; with ``transfer`` also the real-data validation
    (:func:`inference.training.withdrawal_transfer.transfer_validation`) into the metadata and its
    calibration plot ``.transfer.png``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_seed, valid_seed, transfer_seed = (int(s.generate_state(1)[0])
                                             for s in np.random.SeedSequence(seed).spawn(3))
    lm_train = simulate_landmarks(design.n_train, train_seed, design)
    lm_valid = simulate_landmarks(design.n_valid, valid_seed, design)
    X, y = person_period_data(lm_train)
    pipeline = fit_model(X, y)
    stem = f"{MODEL_NAME}-{version}"
    onnx_path = out / f"{stem}.onnx"
    export_onnx(pipeline, onnx_path)

    Xv, _ = person_period_data(lm_valid)
    max_diff = float(np.max(np.abs(_onnx_hazard(onnx_path, Xv) - pipeline.predict_proba(Xv)[:, 1])))
    if max_diff > 1e-5:
        raise ValueError(f"ONNX export differs from scikit-learn by {max_diff:.3g} (> 1e-5)")
    validation, yv, pv = held_out_validation(onnx_path, lm_valid)
    validation["onnx_max_abs_diff"] = max_diff
    validation["operating_points"] = operating_points(yv, pv)
    validation["default_outreach"] = choose_threshold(validation["operating_points"], DEFAULT_TARGET)
    files = {"onnx": onnx_path.name, "report": f"{stem}.report.md", "calibration_plot": f"{stem}.calibration.png",
             "probe": f"{stem}.probe.npz"}
    probe = np.random.default_rng(seed).choice(len(Xv), size=min(512, len(Xv)), replace=False)
    np.savez_compressed(out / files["probe"], x=Xv[probe], p=_onnx_hazard(onnx_path, Xv[probe]).astype(np.float32))
    from inference.training.withdrawal_transfer import calibration_figure

    validation["reliability_bins"] = calibration_figure(
        {"held_out": (yv, pv)}, out / files["calibration_plot"], n_bins=10,
        title=f"{stem}: held-out P(withdraw within {DEFAULT_HORIZON_DAYS} d) (C-index {validation['c_index']:.3f}, "
              f"slope {validation['calibration_slope']:.2f})",
        xlabel=f"predicted probability of withdrawing within {DEFAULT_HORIZON_DAYS} days")
    real = None
    if transfer:
        from inference.training.withdrawal_transfer import calibration_figure, transfer_validation

        real, curves = transfer_validation(transfer_seed)
        files["transfer_plot"] = f"{stem}.transfer.png"
        calibration_figure(curves, out / files["transfer_plot"])
    scaler, logreg = pipeline[0], pipeline[-1]
    meta = {
        "name": MODEL_NAME, "version": version, "onnx_file": onnx_path.name, "sha256": sha256_file(onnx_path),
        "size_bytes": onnx_path.stat().st_size, "files": files, "family": "withdrawal",
        "feature_schema": [asdict(f) for f in WITHDRAWAL_SCHEMA],
        "input": {"name": "features", "dtype": "float32", "shape": [None, N_WITHDRAWAL_FEATURES]},
        "output": {"name": "probabilities", "dtype": "float32", "shape": [None, 2], "positive_column": 1,
                   "meaning": f"discrete-time hazard: probability of withdrawing within the {PERIOD_DAYS}-day period "
                              "starting period_start_days after the as-of day, given on study at its start; "
                              "P(withdraw within h) = 1 - prod (1 - q_k) over the periods (inference.withdrawal)",
                   "period_days": PERIOD_DAYS, "max_horizon_days": MAX_HORIZON_DAYS,
                   "default_horizon_days": DEFAULT_HORIZON_DAYS,
                   "product_threshold": validation["default_outreach"]["threshold"],
                   "product_threshold_target": validation["default_outreach"]["target"]},
        "estimator": {"pipeline": "StandardScaler -> LogisticRegression(C=1.0, newton-cholesky, tol=1e-10)",
                      "coefficients": dict(zip((f.name for f in WITHDRAWAL_SCHEMA),
                                               (float(c) for c in logreg.coef_[0]))),
                      "intercept": float(logreg.intercept_[0]),
                      "scaler_mean": [float(m) for m in scaler.mean_],
                      "scaler_scale": [float(s) for s in scaler.scale_]},
        "training": {
            "description": "virtual participants of the missed-visit model's 24-week decentralized study design "
                           "(inference.behaviour, default BehaviourModel); landmarks every 14 days from a random "
                           f"start while on study; {PERIOD_DAYS}-day periods up to {MAX_HORIZON_DAYS} days after "
                           "each landmark while observed; label = simulated dropout day in the period",
            "seed": seed, "train_seed": train_seed, "valid_seed": valid_seed, "design": asdict(design),
            "behaviour_model": asdict(BehaviourModel()), "n_train_participants": design.n_train,
            "n_valid_participants": design.n_valid, "n_train_rows": int(len(y)),
            "n_train_landmarks": int(len(lm_train["as_of"])), "train_event_rate": float(y.mean()),
        },
        "validation": validation,
        "real_data_validation": real,
        "gpu": {"cuda_path": "not measured", "reason": "no GPU was lent to the session that trained this version"},
        "reproduction": {"atol_probability": REPRODUCTION_ATOL,
                         "note": "byte-identical ONNX expected with the same library versions and platform"},
        "libraries": _libraries(), "platform": platform.platform(),
        "code": _withdrawal_code_identity(),
        "command": f"python -m inference.training.withdrawal inference/models  (seed {seed})",
    }
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / files["report"]).write_text(_report(meta))
    return meta


def _withdrawal_code_identity() -> dict:
    """The missed-visit model's code identity plus this model's own sources and the shipped real data."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    ident = _code_identity()
    extra = ["inference/training/withdrawal.py", "inference/training/withdrawal_transfer.py", "inference/withdrawal.py",
             "inference/outreach.py", "inference/data/pbcseq_visits.csv"]
    ident["source_sha256"].update({name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in extra})
    ident.update(module="inference.training.withdrawal", function="train_withdrawal")
    return ident


def _fmt_ci(m: dict, key: str, digits: int = 3) -> str:
    lo, hi = m[f"{key}_ci95"]
    return f"{m[key]:.{digits}f} ({lo:.{digits}f} to {hi:.{digits}f})"


def _report(meta: dict) -> str:
    v, t = meta["validation"], meta["training"]
    lines = [f"# {meta['name']} {meta['version']}: validation report", "", f"Output: {meta['output']['meaning']}", "",
             f"Training data: {t['description']}", "",
             f"Seed {t['seed']}; {t['n_train_participants']} training participants ({t['n_train_rows']} person-period "
             f"rows), {t['n_valid_participants']} held-out participants (separate random stream).", "",
             f"## Held-out: P(withdraw within {v['horizon_days']} days)", "",
             "| metric | value |", "|---|---|",
             f"| C-index (Harrell, first landmark, n={v['c_index_n']}, {v['c_index_events']} withdrawals) "
             f"| {v['c_index']:.4f} |",
             f"| AUC (landmarks with the horizon inside the study) | {v['auc']:.4f} |",
             f"| Brier score | {v['brier']:.4f} (prevalence only: {v['brier_reference_prevalence']:.4f}) |",
             f"| calibration slope | {v['calibration_slope']:.3f} |",
             f"| calibration intercept | {v['calibration_intercept']:.3f} |",
             f"| observed / mean predicted | {v['prevalence']:.4f} / {v['mean_predicted']:.4f} |", "",
             f"![calibration]({meta['files']['calibration_plot']})", "",
             "### Operating points (held-out, same horizon)", "",
             "| threshold | flagged | precision | recall |", "|---|---|---|---|",
             *[f"| {q['threshold']:.2f} | {q['flagged_fraction']:.4f} | "
               + (f"{q['precision']:.3f}" if q["precision"] is not None else "-") + f" | {q['recall']:.3f} |"
               for q in v["operating_points"] if q["flagged_fraction"] > 0 and round(q["threshold"] * 100) % 5 == 0],
             "", f"Default outreach threshold {meta['output']['product_threshold']:.2f}: the lowest threshold with "
                 f"held-out precision >= {v['default_outreach']['target']['value']:g} (precision "
                 f"{v['default_outreach']['precision']:.3f}, recall {v['default_outreach']['recall']:.3f}, "
                 f"flags {v['default_outreach']['flagged_fraction']:.2%} of landmarks).", ""]
    real = meta.get("real_data_validation")
    if real:
        lines += ["## Real trial data (Mayo PBC, R survival::pbcseq)", "", real["definition"] + ".", "",
                  "| setting | rows (events) | AUC (95 % CI) | Brier (95 % CI) | calibration slope (95 % CI) | "
                  "calibration intercept (95 % CI) |", "|---|---|---|---|---|---|"]
        for name, m in real["settings"].items():
            lines.append(f"| {name} | {m['n_rows']} ({m['n_events']}) | {_fmt_ci(m, 'auc')} | {_fmt_ci(m, 'brier', 4)} "
                         f"| {_fmt_ci(m, 'calibration_slope', 2)} | {_fmt_ci(m, 'calibration_intercept', 2)} |")
        lines += ["", f"![transfer]({meta['files']['transfer_plot']})", "",
                  "What this shows and does not show: see docs/LEARNED_MODELS.md (withdrawal model).", ""]
    lines += [f"GPU: {meta['gpu']['cuda_path']}.", "", f"Reproduce: `{meta['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - the committed model is produced by this
    meta = train_withdrawal(sys.argv[1] if len(sys.argv) > 1 else "inference/models")
    print(json.dumps({k: meta["validation"][k] for k in ("c_index", "auc", "brier", "calibration_slope",
                                                          "calibration_intercept")}, indent=2))
