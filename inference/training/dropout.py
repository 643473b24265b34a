"""Missed-next-visit risk model: simulated training data, calibrated logistic fit, ONNX export, validation report.

``train_dropout(output_dir, seed)`` reproduces the committed ``inference/models/dropout-<version>`` files.

Label
-----
One row per participant and scheduled visit, taken ``lead`` days (1 to 14, drawn per row) before the
visit among participants still on study at that day. The label is 1 when that next visit is missed,
whether by a no-show or because the participant withdrew before it; dropout therefore counts as a
miss, and the output is "probability of missing the next visit", the quantity the product flags at
0.8.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inference.behaviour import BehaviourModel, VisitSchedule, simulate_behaviour
from inference.covariates import Covariates
from inference.pk import DailyOneCompartmentOral
from inference.features import (FEATURE_SCHEMA, N_FEATURES, AdverseEventRecord, Dose, ParticipantHistory, Visit,
                                dropout_feature_matrix)
from inference.registry import sha256_file

__all__ = ["TrainingDesign", "DEFAULT_SEED", "MODEL_NAME", "MODEL_VERSION", "simulate_dataset",
           "calibration_slope_intercept", "validation_metrics", "fit_model", "export_onnx", "train_dropout"]

MODEL_NAME = "dropout"
#: 1.0.1: the same model fitted by Newton-Cholesky to the optimum (1.0.0's L-BFGS stopped 2-3e-3
#: short of it, so retraining on another machine moved predictions by up to 2.9e-4).
MODEL_VERSION = "1.0.1"
DEFAULT_SEED = 20261121
ARMS = ("placebo", "50 mg", "100 mg")
ARM_DOSE_MG = {"placebo": 0.0, "50 mg": 50.0, "100 mg": 100.0}
#: Severity of a simulated AE (mild, moderate, severe); the behaviour model does not use severity.
AE_SEVERITY_P = (0.6, 0.3, 0.1)
PRODUCT_THRESHOLD = 0.8
ONNX_OPSET = 15
#: Retraining must reproduce committed predictions this closely (float32 ONNX outputs).
REPRODUCTION_ATOL = 1e-6


@dataclass(frozen=True)
class TrainingDesign:
    """Size and shape of the simulated training population.

    A decentralized 24-week study: half the participants on 4-weekly visits, half on 2-weekly;
    each participant has their own probability of a remote visit (uniform 0-1), travel distances
    are Gamma(2, 30 km) (mean 60 km: a decentralized study recruits far from its sites); default
    :class:`inference.behaviour.BehaviourModel` parameters. Arms placebo / 50 mg / 100 mg once daily
    drive adverse events through a 1-compartment oral exposure (``_exposure``).
    """

    n_train: int = 3000
    n_valid: int = 1500
    n_days: int = 169
    max_lead_days: int = 14
    distance_shape: float = 2.0
    distance_scale_km: float = 30.0


def _covariates(n: int, rng: np.random.Generator, design: TrainingDesign) -> Covariates:
    return Covariates(weight_kg=rng.normal(85, 16, n).clip(45, 160), age_y=rng.normal(58, 10, n).clip(18, 85),
                      egfr=rng.normal(85, 20, n).clip(20, 130), sex_female=rng.integers(0, 2, n),
                      distance_km=rng.gamma(design.distance_shape, design.distance_scale_km, n).clip(0, 250),
                      site=rng.integers(0, 3, n))


def _exposure(cov: Covariates, rng: np.random.Generator) -> DailyOneCompartmentOral:
    """Training-population PK: CL 5 L/h and V 50 L for 70 kg, allometric weight and eGFR effects on
    clearance, 25 % log-normal variability on CL; ka 1/h, lag 0.5 h, F 0.8 (a plausible once-daily oral)."""
    cl = 5.0 * (cov.weight_kg / 70.0) ** 0.75 * (cov.egfr / 90.0) ** 0.5 * np.exp(rng.normal(0, 0.25, cov.n))
    return DailyOneCompartmentOral(cl=cl, v=50.0 * cov.weight_kg / 70.0, ka=1.0, tlag=0.5, f=0.8)


def _histories(cov: Covariates, res, arms, severities_rng: np.random.Generator, offset: int):
    """One ParticipantHistory per simulated participant, with everything that happened on study."""
    out = []
    for i in range(cov.n):
        stop = int(res.dropout_day[i])
        visits = tuple(Visit(float(d), bool(res.attended[i, v]) if d < stop else False,
                             "remote" if res.remote[i, v] else "in-person")
                       for v, d in enumerate(res.visit_days))
        doses = tuple(Dose(float(t), bool(res.taken[i, t])) for t in range(min(stop, res.n_days)))
        ae_days = np.flatnonzero(res.ae[i])
        severity = severities_rng.choice(3, size=ae_days.size, p=AE_SEVERITY_P) + 1
        aes = tuple(AdverseEventRecord(float(d), int(s)) for d, s in zip(ae_days, severity))
        out.append(ParticipantHistory(
            visits=visits, doses=doses, adverse_events=aes, age_years=float(cov.age_y[i]),
            sex="female" if cov.sex_female[i] else "male", weight_kg=float(cov.weight_kg[i]),
            egfr=float(cov.egfr[i]), travel_distance_km=float(cov.distance_km[i]),
            site_id=f"site-{cov.site[i] + 1}", arm=arms[i], participant_id=f"sim-{offset + i}"))
    return out


def simulate_dataset(n: int, seed: int, design: TrainingDesign = TrainingDesign(),
                     model: BehaviourModel = BehaviourModel()) -> tuple[np.ndarray, np.ndarray]:
    """Simulate ``n`` participants and return ``(X, y)`` rows for the missed-next-visit model.

    Parameters
    ----------
    n : int
        Number of virtual participants (rows: about 9 per participant).
    seed : int
        Seed of the ``numpy.random.Generator`` driving everything.
    design : TrainingDesign
        Population and schedule design.
    model : BehaviourModel
        Behaviour parameters.

    Returns
    -------
    X : numpy.ndarray
        ``(rows, N_FEATURES)`` float32 features from :func:`inference.features.dropout_features`.
    y : numpy.ndarray
        ``(rows,)`` int8, 1 if the next visit was missed (no-show or withdrawn before it).

    Examples
    --------
    >>> X, y = simulate_dataset(40, seed=1)
    >>> X.shape[1], set(np.unique(y)) <= {0, 1}
    (21, True)
    """
    rng = np.random.default_rng(seed)
    cov = _covariates(n, rng, design)
    arms = [ARMS[k] for k in rng.integers(0, len(ARMS), n)]
    on_two_weekly = rng.random(n) < 0.5
    p_remote = rng.random(n)
    pairs, labels = [], []
    for two_weekly in (False, True):
        idx = np.flatnonzero(on_two_weekly == two_weekly)
        if idx.size == 0:
            continue
        interval = 14 if two_weekly else 28
        n_visits = (design.n_days - 1) // interval
        remote = rng.random((idx.size, n_visits)) < p_remote[idx, None]
        schedule = VisitSchedule.every(interval, n_visits, remote=remote)
        sub = cov.take(idx)
        dose = np.array([ARM_DOSE_MG[arms[i]] for i in idx])
        res = simulate_behaviour(model, sub, schedule, design.n_days, rng, dose_mg=dose,
                                 exposure=_exposure(sub, rng))
        histories = _histories(sub, res, [arms[i] for i in idx], rng, int(idx[0]))
        prev = np.concatenate([[0], res.visit_days[:-1]])
        for v, day in enumerate(res.visit_days):
            lead = rng.integers(1, min(design.max_lead_days, day - prev[v] - 1) + 1, size=idx.size)
            as_of = day - lead
            for i in np.flatnonzero(res.dropout_day > as_of):
                pairs.append((histories[i], float(as_of[i])))
                labels.append(not (day < res.dropout_day[i] and res.attended[i, v]))
    return dropout_feature_matrix(pairs), np.asarray(labels, dtype=np.int8)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def calibration_slope_intercept(y, p) -> tuple[float, float]:
    """Logistic recalibration ``logit P(y=1) = a + b * logit(p)`` fitted by maximum likelihood.

    ``b`` is the calibration slope (1 ideal; < 1 over-confident) and ``a`` the intercept
    (0 ideal), as in Cox (1958) and Van Calster et al. (2016).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> p = rng.uniform(0.05, 0.95, 20000)
    >>> b, a = calibration_slope_intercept(rng.random(p.size) < p, p)
    >>> abs(b - 1) < 0.1 and abs(a) < 0.1
    True
    """
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(_logit(p).reshape(-1, 1), np.asarray(y))
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def validation_metrics(y, p, threshold: float = PRODUCT_THRESHOLD) -> dict:
    """AUC, Brier score, calibration slope/intercept, prevalence and behaviour at ``threshold``."""
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    slope, intercept = calibration_slope_intercept(y, p)
    flagged = p >= threshold
    return {
        "n": int(y.size), "prevalence": float(y.mean()), "mean_predicted": float(p.mean()),
        "auc": float(roc_auc_score(y, p)), "brier": float(brier_score_loss(y, p)),
        "brier_reference_prevalence": float(y.mean() * (1 - y.mean())),
        "log_loss": float(log_loss(y, p)),
        "calibration_slope": slope, "calibration_intercept": intercept,
        "threshold": threshold, "flagged_fraction": float(flagged.mean()),
        "precision_at_threshold": float(y[flagged].mean()) if flagged.any() else None,
        "recall_at_threshold": float(flagged[y == 1].mean()) if (y == 1).any() else None,
    }


def fit_model(X: np.ndarray, y: np.ndarray):
    """Standardize then L2-penalized logistic regression, solved to the optimum by Newton-Cholesky.

    A logistic model is calibrated by construction on the distribution it was fitted on, exports
    to a handful of ONNX nodes, and on this data discriminates as well as gradient boosting
    (compared in the validation report).

    The penalized log-likelihood is strictly convex, so its optimum is unique; Newton's method
    converges to it quadratically, and a stop at ``tol=1e-10`` leaves the coefficients far closer
    to it than the float32 ONNX output can show. A first-order solver (L-BFGS) stops wherever its
    line searches happen to end, which moves with BLAS rounding and so with the machine.
    The fit runs in float64 (the feature matrix is float32): in float32 the gradient cannot get
    below about 1e-4 and no solver reaches the optimum. Single-threaded BLAS during the fit keeps
    the sums in one order everywhere.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    pipeline = make_pipeline(StandardScaler(),
                             LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-10, max_iter=50))
    # A fit that did not reach the optimum would not reproduce: fail rather than warn.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        return pipeline.fit(np.asarray(X, dtype=np.float64), y)


def _fit_comparator(X: np.ndarray, y: np.ndarray, seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=150, learning_rate=0.08, random_state=seed).fit(X, y)


def export_onnx(pipeline, path) -> bytes:
    """Convert to ONNX (float32 input ``features``, plain ``probabilities`` tensor, no ZipMap) and write it."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(pipeline, initial_types=[("features", FloatTensorType([None, N_FEATURES]))],
                  options={id(pipeline): {"zipmap": False}}, target_opset=ONNX_OPSET)
    data = onx.SerializeToString()
    Path(path).write_bytes(data)
    return data


def _onnx_proba(path, X: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"features": X.astype(np.float32)})[0][:, 1]


def _code_identity() -> dict:
    here = Path(__file__).resolve()
    root = here.parents[2]
    sources = [here, root / "inference" / "features.py", root / "inference" / "behaviour.py",
               root / "inference" / "covariates.py", root / "inference" / "pk.py"]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        # True when the sources used differ from that commit (then source_sha256 is the record).
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--",
                                *(str(p) for p in sources)], timeout=10).returncode != 0 if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"module": "inference.training.dropout", "function": "train_dropout", "git_commit": commit,
            "sources_differ_from_commit": dirty,
            "source_sha256": {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                              for p in sources if p.exists()}}


def _libraries() -> dict:
    import matplotlib
    import onnx
    import onnxruntime
    import skl2onnx
    import sklearn

    return {"python": platform.python_version(), "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "matplotlib": matplotlib.__version__}


def _calibration_plot(y, p, path, title: str, n_bins: int = 10) -> list[dict]:
    """Reliability diagram with quantile bins (most predictions are small) and a histogram; return the bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, edges.size - 2)
    bins = []
    for b in range(edges.size - 1):
        sel = which == b
        if sel.any():
            bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "n": int(sel.sum()),
                         "mean_predicted": float(p[sel].mean()), "observed": float(np.mean(y[sel]))})
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    mp = np.array([b["mean_predicted"] for b in bins])
    ob = np.array([b["observed"] for b in bins])
    nn = np.array([b["n"] for b in bins])
    se = np.sqrt(np.clip(ob * (1 - ob), 1e-9, None) / nn)
    ax.errorbar(mp, ob, yerr=1.96 * se, fmt="o-", capsize=3, label="held-out bins (95% CI)")
    ax.axvline(PRODUCT_THRESHOLD, color="tab:red", lw=1, ls=":", label=f"flag threshold {PRODUCT_THRESHOLD}")
    top = 1.0
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_ylabel("observed frequency of missed visit")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    hx.hist(p, bins=50, range=(0, top), color="tab:blue", alpha=0.7)
    hx.set_xlabel("predicted probability of missing the next visit")
    hx.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return bins


def _report(meta: dict, bins: list[dict]) -> str:
    v, c = meta["validation"], meta["validation"]["comparator"]
    t = meta["training"]
    lines = [
        f"# {meta['name']} {meta['version']}: validation report", "",
        f"Output: {meta['output']['meaning']}", "",
        f"Training data: {t['description']}", "",
        f"Seed {t['seed']}; {t['n_train_participants']} training participants ({t['n_train_rows']} rows), "
        f"{t['n_valid_participants']} held-out participants ({t['n_valid_rows']} rows, separate random stream).", "",
        "## Held-out metrics", "",
        "| metric | logistic regression (exported) | gradient boosting (comparator) |",
        "|---|---|---|",
        f"| AUC | {v['auc']:.4f} | {c['auc']:.4f} |",
        f"| Brier score | {v['brier']:.4f} | {c['brier']:.4f} |",
        f"| log loss | {v['log_loss']:.4f} | {c['log_loss']:.4f} |",
        f"| calibration slope | {v['calibration_slope']:.3f} | {c['calibration_slope']:.3f} |",
        f"| calibration intercept | {v['calibration_intercept']:.3f} | {c['calibration_intercept']:.3f} |",
        f"| flagged at p >= {v['threshold']} | {v['flagged_fraction']:.4f} | {c['flagged_fraction']:.4f} |", "",
        f"Prevalence of a missed next visit: {v['prevalence']:.4f} (Brier of always predicting it: "
        f"{v['brier_reference_prevalence']:.4f}); mean prediction {v['mean_predicted']:.4f}.", "",
        "Calibration slope and intercept come from the logistic recalibration logit P(y) = a + b logit(p) "
        "on the held-out rows. Acceptance: AUC >= 0.75 and slope in [0.8, 1.2].", "",
        f"ONNX vs scikit-learn on the held-out rows: max |difference| = {v['onnx_max_abs_diff']:.2e} "
        "(must be <= 1e-5).", "",
        "## Reliability diagram", "", f"![calibration]({meta['files']['calibration_plot']})", "",
        "| bin | n | mean predicted | observed |", "|---|---|---|---|",
        *[f"| {b['lower']:.3f}-{b['upper']:.3f} | {b['n']} | {b['mean_predicted']:.4f} | {b['observed']:.4f} |"
          for b in bins], "",
        f"Reproduce: `trialtwin train dropout --seed {t['seed']} --out inference/models` "
        f"(or `python -m inference.cli_train --seed {t['seed']} --out inference/models`).", "",
    ]
    return "\n".join(lines)


def train_dropout(output_dir, seed: int = DEFAULT_SEED, design: TrainingDesign = TrainingDesign(),
                  version: str = MODEL_VERSION) -> dict:
    """Simulate, fit, export, validate and register the missed-next-visit model in ``output_dir``.

    Writes ``dropout-<version>.onnx``, ``.json`` (metadata, the registry entry), ``.report.md``,
    ``.calibration.png`` and ``.probe.npz`` (held-out rows with their ONNX probabilities, used to
    check reproductions).

    Parameters
    ----------
    output_dir : str or pathlib.Path
        Directory (created if needed).
    seed : int
        Master seed; training and held-out data use independent child streams of it.
    design : TrainingDesign
        Simulated population.
    version : str
        Semantic version recorded in file names and metadata.

    Returns
    -------
    dict
        The metadata written.

    Raises
    ------
    ValueError
        When the ONNX export disagrees with scikit-learn by more than 1e-5.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_seed, valid_seed = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(2))
    X_train, y_train = simulate_dataset(design.n_train, train_seed, design)
    X_valid, y_valid = simulate_dataset(design.n_valid, valid_seed, design)
    pipeline = fit_model(X_train, y_train)

    stem = f"{MODEL_NAME}-{version}"
    onnx_path = out / f"{stem}.onnx"
    export_onnx(pipeline, onnx_path)
    p_sklearn = pipeline.predict_proba(X_valid)[:, 1]
    p_onnx = _onnx_proba(onnx_path, X_valid)
    max_diff = float(np.max(np.abs(p_onnx - p_sklearn)))
    if max_diff > 1e-5:
        raise ValueError(f"ONNX export differs from scikit-learn by {max_diff:.3g} (> 1e-5)")

    comparator = _fit_comparator(X_train, y_train, seed)
    validation = validation_metrics(y_valid, p_onnx) | {
        "onnx_max_abs_diff": max_diff,
        "comparator": {"model": "HistGradientBoostingClassifier(max_iter=150, learning_rate=0.08)",
                       **validation_metrics(y_valid, comparator.predict_proba(X_valid)[:, 1])},
    }
    scaler, logreg = pipeline[0], pipeline[-1]
    files = {"onnx": onnx_path.name, "report": f"{stem}.report.md", "calibration_plot": f"{stem}.calibration.png",
             "probe": f"{stem}.probe.npz"}
    probe = np.random.default_rng(seed).choice(len(X_valid), size=min(512, len(X_valid)), replace=False)
    np.savez_compressed(out / files["probe"], x=X_valid[probe], p=p_onnx[probe].astype(np.float32))
    bins = _calibration_plot(y_valid, p_onnx, out / files["calibration_plot"],
                             f"{stem}: held-out reliability (AUC {validation['auc']:.3f}, "
                             f"slope {validation['calibration_slope']:.2f})")
    validation["reliability_bins"] = bins
    meta = {
        "name": MODEL_NAME, "version": version, "onnx_file": onnx_path.name, "sha256": sha256_file(onnx_path),
        "size_bytes": onnx_path.stat().st_size, "files": files,
        "feature_schema": [asdict(f) for f in FEATURE_SCHEMA],
        "input": {"name": "features", "dtype": "float32", "shape": [None, N_FEATURES]},
        "output": {"name": "probabilities", "dtype": "float32", "shape": [None, 2], "positive_column": 1,
                   "meaning": "probability that the participant misses the next scheduled visit (no-show or "
                              "withdrawal before it), predicted 1-14 days ahead",
                   "product_threshold": PRODUCT_THRESHOLD},
        "estimator": {"pipeline": "StandardScaler -> LogisticRegression(C=1.0, newton-cholesky, tol=1e-10)",
                      "coefficients": dict(zip((f.name for f in FEATURE_SCHEMA),
                                               (float(c) for c in logreg.coef_[0]))),
                      "intercept": float(logreg.intercept_[0]),
                      "scaler_mean": [float(m) for m in scaler.mean_],
                      "scaler_scale": [float(s) for s in scaler.scale_]},
        "training": {
            "description": "virtual participants of a 24-week decentralized study simulated with "
                           "inference.behaviour.simulate_behaviour (default BehaviourModel; arms placebo/50/100 mg with "
                           "1-compartment oral exposure driving adverse events); "
                           "one row per participant and visit, 1-14 days before it, among those on study; "
                           "label = next visit missed (no-show or withdrawn before it)",
            "seed": seed, "train_seed": train_seed, "valid_seed": valid_seed,
            "design": asdict(design), "behaviour_model": asdict(BehaviourModel()),
            "n_train_participants": design.n_train, "n_valid_participants": design.n_valid,
            "n_train_rows": int(len(y_train)), "n_valid_rows": int(len(y_valid)),
            "train_prevalence": float(y_train.mean()),
        },
        "validation": validation,
        "reproduction": {"atol_probability": REPRODUCTION_ATOL,
                         "note": "byte-identical ONNX expected with the same library versions and platform"},
        "libraries": _libraries(), "platform": platform.platform(), "code": _code_identity(),
        "command": f"trialtwin train dropout --seed {seed} --out <dir>",
    }
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / files["report"]).write_text(_report(meta, bins))
    return meta


if __name__ == "__main__":  # pragma: no cover - convenience; the CLI is inference.cli_train
    print(json.dumps(train_dropout(sys.argv[1] if len(sys.argv) > 1 else "inference/models")["validation"],
                     indent=2)[:2000])
