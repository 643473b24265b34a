"""The learning loop's numeric side: model families, candidate training with a time-based split, shadow
evaluation against the active version, the promotion rule, and the per-server registry of trained versions.

No FHIR here: the FHIR side gathers the rows (``fhir_ops.mapping.training_data``) and records the result.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from inference.drift import drift_reference
from inference.registry import DEFAULT_MODELS_DIR, ModelEntry, ModelRegistry, sha256_file

__all__ = ["ModelFamily", "FAMILIES", "family", "PromotionRule", "TrainingRows", "time_split", "LoopRegistry",
           "Candidate", "train_candidate", "evaluate_entry", "loop_service", "LOOP_DIR_NAME", "STATUSES"]

#: where a server keeps the versions it trained, under its data directory
LOOP_DIR_NAME = "models"
#: lifecycle of a trained version: evaluated beside the active one, then promoted (active), rejected,
#: or retired when a later version is promoted
STATUSES = ("shadow", "active", "rejected", "retired")


@dataclass(frozen=True)
class ModelFamily:
    """What the loop needs to know to train one kind of learned model.

    Attributes
    ----------
    name : str
        Registry name (``dropout``); trained versions keep it and raise the minor version.
    feature_schema : tuple
        ``inference.features.FeatureSpec``-like objects (``name``, ``unit``, ``meaning``) in column order.
    fit : callable
        ``fit(X, y) -> pipeline`` (deterministic; a scikit-learn pipeline ending in a classifier).
    export : callable
        ``export(pipeline, path)`` writes the ONNX file.
    meaning : str
        What the probability means (metadata ``output.meaning``).
    threshold : float
        Product threshold recorded in the metadata.
    """

    name: str
    feature_schema: tuple
    fit: Callable
    export: Callable
    meaning: str
    threshold: float

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.feature_schema)


def _dropout_family() -> ModelFamily:
    from inference.features import FEATURE_SCHEMA
    from inference.training import dropout as training

    return ModelFamily(name=training.MODEL_NAME, feature_schema=tuple(FEATURE_SCHEMA), fit=training.fit_model,
                       export=training.export_onnx, threshold=training.PRODUCT_THRESHOLD,
                       meaning="probability that the participant misses the next scheduled visit (a recorded "
                               "no-show), predicted 1-14 days ahead; retrained on the study's own data")


#: family name -> factory; another learned-model family registers itself here
FAMILIES: dict[str, Callable[[], ModelFamily]] = {"dropout": _dropout_family}


def family(name: str) -> ModelFamily:
    """The family ``name`` (``KeyError`` naming the known ones)."""
    try:
        return FAMILIES[name]()
    except KeyError:
        raise KeyError(f"no trainable model family {name!r} (known: {', '.join(sorted(FAMILIES))})") from None


@dataclass(frozen=True)
class PromotionRule:
    """When a candidate replaces the active version, judged on the same held-out (later) rows.

    Promote iff the held-out period has at least ``min_events`` positive rows (and ``min_non_events``
    negative ones), the candidate's AUC is at most ``max_auc_loss`` below the active version's, and
    its Brier score is not worse (not above the active one's).

    Examples
    --------
    >>> rule = PromotionRule()
    >>> rule.decide({"auc": 0.74, "brier": 0.10}, {"auc": 0.745, "brier": 0.11}, events=40, non_events=200)[0]
    True
    >>> rule.decide({"auc": 0.70, "brier": 0.10}, {"auc": 0.745, "brier": 0.11}, events=40, non_events=200)[0]
    False
    """

    max_auc_loss: float = 0.01
    min_events: int = 20
    min_non_events: int = 20

    def decide(self, candidate: dict | None, active: dict | None, events: int, non_events: int) -> tuple[bool, str]:
        """``(promote, reason)`` in words a reviewer can check against the numbers."""
        if events < self.min_events or non_events < self.min_non_events:
            return False, (f"not promoted: the held-out period has {events} events and {non_events} non-events; the "
                           f"rule needs at least {self.min_events} and {self.min_non_events}")
        if candidate is None or active is None:
            return False, "not promoted: the held-out period could not be scored"
        auc_ok = candidate["auc"] >= active["auc"] - self.max_auc_loss
        brier_ok = candidate["brier"] <= active["brier"]
        verdict = "promoted" if auc_ok and brier_ok else "not promoted"
        return auc_ok and brier_ok, (
            f"{verdict}: AUC {candidate['auc']:.4f} vs active {active['auc']:.4f} (may be at most "
            f"{self.max_auc_loss:g} lower: {'yes' if auc_ok else 'no'}); Brier {candidate['brier']:.4f} vs active "
            f"{active['brier']:.4f} (must not be higher: {'yes' if brier_ok else 'no'}); {events} events held out")

    def describe(self) -> str:
        return (f"AUC not worse by more than {self.max_auc_loss:g} AND Brier score not worse, on the same held-out "
                f"later period, with at least {self.min_events} events and {self.min_non_events} non-events")


@dataclass(frozen=True)
class TrainingRows:
    """Feature rows of one study with labels and the time each label became known.

    ``times`` are days (any origin, e.g. days since 1970) of the labelled event (the visit);
    ``as_of`` the days the features were taken. ``participants`` name each row's participant.
    """

    X: np.ndarray
    y: np.ndarray
    times: np.ndarray
    as_of: np.ndarray
    participants: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.y)
        if self.X.ndim != 2 or self.X.shape[0] != n or len(self.times) != n or len(self.participants) != n:
            raise ValueError("TrainingRows: X, y, times and participants must have one entry per row")

    def take(self, mask) -> "TrainingRows":
        idx = np.flatnonzero(mask)
        return TrainingRows(self.X[idx], self.y[idx], self.times[idx], self.as_of[idx],
                            tuple(self.participants[i] for i in idx))


def time_split(rows: TrainingRows, holdout_fraction: float = 0.3) -> tuple[TrainingRows, TrainingRows, float]:
    """Earlier rows for training, the latest ``holdout_fraction`` of them (by event time) held out.

    Every held-out label became known after every training label (ties stay on the training side),
    so the candidate is judged on a period it has not seen, as it will be used.

    Returns
    -------
    train, held_out : TrainingRows
    cut : float
        The last training event time.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    if len(rows.y) < 2:
        raise ValueError("at least 2 rows are needed for a time-based split")
    order = np.sort(rows.times)
    cut = float(order[min(len(order) - 1, max(0, int(np.floor(len(order) * (1.0 - holdout_fraction))) - 1))])
    return rows.take(rows.times <= cut), rows.take(rows.times > cut), cut


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


class LoopRegistry(ModelRegistry):
    """The committed models plus the versions this server trained, and which version is active.

    Versions trained by the loop live in ``directory`` (the server's ``<data>/models``) beside
    ``lifecycle.json``; the committed ones in ``base``. ``get(name)`` without a version returns the
    active version: the last promoted one, else the newest committed one; shadow candidates are
    reachable only by their version.
    """

    LIFECYCLE = "lifecycle.json"

    def __init__(self, directory, base: ModelRegistry | None = None) -> None:
        super().__init__(directory)
        self.base = base or ModelRegistry(DEFAULT_MODELS_DIR)
        self._lock = threading.Lock()
        #: held by a caller across a whole change (train + register + record, or a promotion), so that two
        #: concurrent trainings do not take the same version number (one registry per data directory:
        #: ``loop_service``)
        self.update_lock = threading.RLock()

    def own_entries(self) -> list[ModelEntry]:
        return super().entries() if self.directory.is_dir() else []

    def entries(self) -> list[ModelEntry]:
        found = {(e.name, e.version): e for e in self.base.entries()}
        found.update({(e.name, e.version): e for e in self.own_entries()})
        return sorted(found.values(), key=lambda e: (e.name, _version_tuple(e.version)))

    def lifecycle(self) -> dict:
        path = self.directory / self.LIFECYCLE
        return json.loads(path.read_text()) if path.is_file() else {"models": {}}

    def _write_lifecycle(self, state: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{self.LIFECYCLE}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.directory / self.LIFECYCLE)  # readers see the old or the new file, never half

    def active_version(self, name: str) -> str | None:
        """The promoted version of ``name`` (None: the newest committed one serves)."""
        return self.lifecycle()["models"].get(name, {}).get("active")

    def status(self, name: str, version: str) -> str:
        """``active``, ``shadow``, ``rejected``, ``retired``, or ``committed`` for a packaged version."""
        info = self.lifecycle()["models"].get(name, {}).get("versions", {}).get(version)
        if info is None:
            active = self.get(name)
            return "active" if active.version == version else "committed"
        return info["status"]

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        if version is not None:
            return super().get(name, version)
        active = self.active_version(name)
        if active is not None:
            return super().get(name, active)
        committed = [e for e in self.base.entries() if e.name == name]
        return committed[-1] if committed else super().get(name, None)

    def next_version(self, name: str) -> str:
        """The next minor version after every version of ``name`` known here (``1.0.1`` -> ``1.1.0``)."""
        known = [_version_tuple(e.version) for e in self.entries() if e.name == name]
        known += [_version_tuple(v) for v in self.lifecycle()["models"].get(name, {}).get("versions", {})]
        major, minor = max(known)[:2] if known else (1, -1)
        return f"{major}.{minor + 1}.0"

    def record(self, name: str, version: str, status: str, decision: dict) -> dict:
        """Set ``version``'s status (``active`` promotes it and retires the version it replaces)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        with self._lock:
            state = self.lifecycle()
            model = state["models"].setdefault(name, {"active": None, "versions": {}})
            when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            if status == "active":
                previous = model.get("active")
                if previous and previous in model["versions"] and previous != version:
                    model["versions"][previous].update(status="retired", retired=when)
                model["active"] = version
            model["versions"][version] = {**model["versions"].get(version, {}), "status": status, "at": when,
                                          **decision}
            self._write_lifecycle(state)
            return model["versions"][version]


@dataclass(frozen=True)
class Candidate:
    """A trained, registered version and what it was judged on."""

    entry: ModelEntry
    metrics: dict
    active_version: str
    active_metrics: dict | None
    promoted: bool
    reason: str
    held_out_events: int
    held_out_rows: int
    training_rows: int
    cut: float
    extra: dict = field(default_factory=dict)


def _metrics(y, p, threshold) -> dict | None:
    from inference.training.dropout import validation_metrics

    y = np.asarray(y).astype(int)
    if y.size == 0 or y.min() == y.max():
        return None  # AUC and calibration need both outcomes
    m = validation_metrics(y, p, threshold)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}


def evaluate_entry(entry: ModelEntry, X, y, threshold: float) -> dict | None:
    """Metrics of a registered version on rows ``X`` with labels ``y`` (None when ``y`` has one class)."""
    p = entry.load(force_cpu=True).predict_proba(np.asarray(X, dtype=np.float32))
    return _metrics(y, p, threshold)


def train_candidate(registry: LoopRegistry, fam: ModelFamily, rows: TrainingRows, *, holdout_fraction: float = 0.3,
                    rule: PromotionRule = PromotionRule(), training: dict | None = None,
                    shuffle_labels_seed: int | None = None, auto_promote: bool = True,
                    progress: Callable[[float, str], None] | None = None) -> Candidate:
    """Train a new version of ``fam`` on the earlier rows, shadow-score it beside the active version on
    the later rows, register it, and promote it when ``rule`` says so (and ``auto_promote``).

    Parameters
    ----------
    registry : LoopRegistry
        Where the version is written and whose active version it is compared with.
    fam : ModelFamily
        What to train.
    rows : TrainingRows
        The study's labelled rows (gathered in one place on the FHIR side).
    holdout_fraction : float
        Share of the latest rows held out (default 0.3).
    rule : PromotionRule
        The promotion rule.
    training : dict, optional
        Description of the data (study, window, participants left out, input digest) for the metadata.
    shuffle_labels_seed : int, optional
        Development only: permute the training labels with this seed (a deliberately useless candidate).
    auto_promote : bool
        Apply the rule; False leaves the candidate in shadow whatever it scores.

    Raises
    ------
    ValueError
        Too few rows, or a training period with a single outcome.
    """
    note = progress or (lambda f, m: None)
    train, held, cut = time_split(rows, holdout_fraction)
    if len(train.y) < 20 or train.y.min() == train.y.max():
        raise ValueError(f"the training period has {len(train.y)} rows with {int(train.y.sum())} events; a model needs "
                         "at least 20 rows and both outcomes")
    y_fit = train.y
    if shuffle_labels_seed is not None:
        y_fit = np.random.default_rng(shuffle_labels_seed).permutation(train.y)
    note(0.1, f"fitting on {len(train.y)} rows up to the cut, {len(held.y)} held out")
    pipeline = fam.fit(train.X, y_fit)
    version = registry.next_version(fam.name)
    registry.directory.mkdir(parents=True, exist_ok=True)
    stem = f"{fam.name}-{version}"
    onnx_path = registry.directory / f"{stem}.onnx"
    fam.export(pipeline, onnx_path)
    from inference.predictor import load_predictor

    predictor = load_predictor(onnx_path, force_cpu=True, feature_names=fam.feature_names)
    p_train = predictor.predict_proba(train.X.astype(np.float32))
    p_held = predictor.predict_proba(held.X.astype(np.float32)) if len(held.y) else np.zeros(0)
    note(0.6, "shadow evaluation on the held-out period")
    metrics = _metrics(held.y, p_held, fam.threshold)
    active_entry = registry.get(fam.name)
    active_metrics = evaluate_entry(active_entry, held.X, held.y, fam.threshold) if len(held.y) else None
    events = int(held.y.sum())
    promote, reason = rule.decide(metrics, active_metrics, events, int(len(held.y) - events))
    if shuffle_labels_seed is not None:
        reason += "; trained on shuffled labels (development check)"
    scaler, clf = pipeline[0], pipeline[-1]
    meta = {
        "name": fam.name, "version": version, "onnx_file": onnx_path.name, "sha256": sha256_file(onnx_path),
        "size_bytes": onnx_path.stat().st_size, "files": {"onnx": onnx_path.name},
        "feature_schema": [asdict(f) for f in fam.feature_schema],
        "input": {"name": "features", "dtype": "float32", "shape": [None, len(fam.feature_schema)]},
        "output": {"name": "probabilities", "dtype": "float32", "shape": [None, 2], "positive_column": 1,
                   "meaning": fam.meaning, "product_threshold": fam.threshold},
        "estimator": {"pipeline": f"{type(scaler).__name__} -> {type(clf).__name__}",
                      "coefficients": dict(zip(fam.feature_names, (float(c) for c in clf.coef_[0]))),
                      "intercept": float(clf.intercept_[0]),
                      "scaler_mean": [float(m) for m in scaler.mean_],
                      "scaler_scale": [float(s) for s in scaler.scale_]},
        "training": {**(training or {}), "n_train_rows": int(len(train.y)), "n_valid_rows": int(len(held.y)),
                     "train_prevalence": float(train.y.mean()), "split": "time",
                     "holdout_fraction": holdout_fraction, "cut_day": cut,
                     "labels_shuffled": shuffle_labels_seed is not None},
        "validation": {**(metrics or {}), "period": "held-out later rows", "active_version": active_entry.version,
                       "active": active_metrics},
        "promotion": {"rule": rule.describe(), **asdict(rule), "decision": reason},
        "drift_reference": drift_reference(train.X, p_train, fam.feature_names),
        "libraries": _libraries(), "platform": platform.platform(),
        "code": {"module": "inference.model_loop", "function": "train_candidate"},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (registry.directory / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    entry = registry.get(fam.name, version)
    # registered in shadow; the caller records the decided status once the result is stored elsewhere too
    registry.record(fam.name, version, "shadow", {"decision": reason, "metrics": metrics,
                                                  "activeVersion": active_entry.version, "activeMetrics": active_metrics})
    status = "active" if (promote and auto_promote) else ("shadow" if promote or not auto_promote else "rejected")
    note(0.9, f"{stem} in shadow; decided: {status}")
    return Candidate(entry, metrics or {}, active_entry.version, active_metrics, status == "active", reason,
                     events, int(len(held.y)), int(len(train.y)), cut, {"status": status})


def _libraries() -> dict:
    import onnxruntime
    import sklearn

    return {"python": platform.python_version(), "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "onnxruntime": onnxruntime.__version__}


_SERVICES: dict[str, object] = {}
_SERVICES_LOCK = threading.Lock()


def loop_service(data_dir):
    """The process-wide inference service of a server's data directory: committed models plus the
    versions trained there, answering with the active version (one per data directory).

    Configured like :func:`inference.service.get_service` (``TRIALTWIN_MODELS_DIR`` is the base of
    committed models; the micro-batching variables).
    """
    from inference.service import InferenceService

    key = str(Path(data_dir).resolve() / LOOP_DIR_NAME)
    with _SERVICES_LOCK:
        service = _SERVICES.get(key)
        if service is None:
            base_dir = os.environ.get("TRIALTWIN_MODELS_DIR")
            service = _SERVICES[key] = InferenceService(
                LoopRegistry(key, ModelRegistry(base_dir) if base_dir else None),
                micro_batching=os.environ.get("TRIALTWIN_MICROBATCH", "1") not in ("0", "false", "no", "off"),
                max_wait_ms=float(os.environ.get("TRIALTWIN_MICROBATCH_WAIT_MS", "2")),
                max_batch_rows=int(os.environ.get("TRIALTWIN_MICROBATCH_ROWS", "8192")))
        return service
