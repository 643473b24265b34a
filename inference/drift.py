"""Population stability index (PSI) of model inputs and scores against the training distribution.

A model version carries a :func:`drift_reference` (bin cut points and proportions of each feature and of
the score on its training rows); :class:`DriftMonitor` bins every prediction batch against it.
"""
from __future__ import annotations

import threading
from collections import deque

import numpy as np

__all__ = ["PSI_WARNING", "PSI_ALARM", "MIN_ROWS", "WINDOW_ROWS", "PROPORTION_FLOOR", "MAX_BINNED_ROWS", "drift_reference",
           "bin_counts", "psi", "psi_level", "DriftMonitor"]

#: PSI above this is worth a look (the usual rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift,
#: > 0.25 a significant shift; Siddiqi 2006, "Credit Risk Scorecards", ch. 8; Yurdakul 2018)
PSI_WARNING = 0.1
#: PSI above this raises the alarm
PSI_ALARM = 0.25
#: a window with fewer rows is not judged: with k bins the PSI of a sample from the reference itself
#: is about (k - 1) / n, so 10 bins need some hundred rows before 0.1 means anything
MIN_ROWS = 200
#: a batch's PSI is computed over the newest whole batches that hold at least this many rows
WINDOW_ROWS = 1000
#: an empty bin counts as this proportion, so ln(a / e) stays finite
PROPORTION_FLOOR = 1e-4
#: a larger batch is binned on this many evenly spaced rows: PSI needs hundreds of rows, not millions,
#: and binning every row of a bulk batch would cost more than the model (bench/drift_bench.py)
MAX_BINNED_ROWS = 2000


def _cuts(values: np.ndarray, n_bins: int) -> list[float]:
    # interior cut points at the deciles; ties (binary or count features) collapse into fewer bins
    qs = np.quantile(np.asarray(values, dtype=float), np.linspace(0, 1, n_bins + 1)[1:-1])
    return [float(c) for c in np.unique(qs)]


def _proportions(cuts, values) -> np.ndarray:
    counts = bin_counts(cuts, values)
    return counts / max(counts.sum(), 1)


def bin_counts(cuts, values) -> np.ndarray:
    """Counts of ``values`` in the bins ``(-inf, c0], (c0, c1], ..., (c_last, inf)``.

    Examples
    --------
    >>> bin_counts([0.0, 1.0], [-1, 0, 0.5, 1, 2, 3]).tolist()
    [2, 2, 2]
    """
    which = np.searchsorted(np.asarray(cuts, dtype=float), np.asarray(values, dtype=float), side="left")
    return np.bincount(which, minlength=len(cuts) + 1)


def drift_reference(X, scores, feature_names, n_bins: int = 10) -> dict:
    """Bin cut points and reference proportions of each feature column and of the score.

    Parameters
    ----------
    X : array_like, shape (n, k)
        Training feature rows.
    scores : array_like, shape (n,)
        The model's predicted probabilities on those rows.
    feature_names : sequence of str
        Column names.
    n_bins : int
        Quantile bins per column (fewer when values tie).

    Returns
    -------
    dict
        ``{"rows": n, "bins": n_bins, "features": {name: {"cuts": [...], "proportions": [...]}},
        "score": {...}}``, JSON-able; stored in the model version's metadata.
    """
    X = np.asarray(X, dtype=float)
    scores = np.asarray(scores, dtype=float)
    if X.ndim != 2 or X.shape[1] != len(feature_names) or X.shape[0] != scores.shape[0] or X.shape[0] == 0:
        raise ValueError(f"drift reference needs (n, {len(feature_names)}) rows and n scores, got {X.shape} "
                         f"and {scores.shape}")

    def entry(values):
        cuts = _cuts(values, n_bins)
        return {"cuts": cuts, "proportions": [float(p) for p in _proportions(cuts, values)]}

    return {"rows": int(X.shape[0]), "bins": int(n_bins),
            "features": {name: entry(X[:, j]) for j, name in enumerate(feature_names)},
            "score": entry(scores)}


def psi(expected, actual, floor: float = PROPORTION_FLOOR) -> float:
    """Population stability index ``sum (a - e) ln(a / e)`` over bins (proportions or counts).

    Examples
    --------
    >>> round(psi([0.5, 0.5], [0.5, 0.5]), 12)
    0.0
    >>> round(psi([0.5, 0.5], [0.25, 0.75]), 6)   # 0.25 ln 1.5 - 0.25 ln 0.5
    0.274653
    """
    e = np.asarray(expected, dtype=float)
    a = np.asarray(actual, dtype=float)
    if e.shape != a.shape:
        raise ValueError(f"{e.size} expected bins, {a.size} actual")
    e = np.maximum(e / max(e.sum(), np.finfo(float).tiny), floor)
    a = np.maximum(a / max(a.sum(), np.finfo(float).tiny), floor)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_level(value: float) -> str:
    """``"ok"``, ``"warning"`` (> 0.1) or ``"alarm"`` (> 0.25)."""
    return "alarm" if value > PSI_ALARM else "warning" if value > PSI_WARNING else "ok"


class _Track:
    """One model version's reference, flattened (every feature's bins, then the score's), its window of
    recent batches (per-batch bin counts) with their running sum, and its latest judgement."""

    def __init__(self, reference: dict) -> None:
        self.reference = reference
        self.names = list(reference["features"])
        columns = [reference["features"][n] for n in self.names] + [reference["score"]]
        self.cuts = [np.asarray(c["cuts"], dtype=float) for c in columns]
        sizes = np.array([len(c) + 1 for c in self.cuts])
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.expected = np.maximum(np.concatenate([np.asarray(c["proportions"], dtype=float) for c in columns]),
                                   PROPORTION_FLOOR)
        self.window_counts = np.zeros(int(sizes.sum()))
        self.batches: deque[tuple[int, np.ndarray]] = deque()
        self.window_rows = 0
        self.batches_seen = 0
        self.rows_seen = 0
        self.alarms_raised = 0
        self.last: dict | None = None

    def counts(self, X: np.ndarray, scores: np.ndarray) -> np.ndarray:
        # one contiguous copy, then one searchsorted per column: the same bins as bin_counts
        columns = np.ascontiguousarray(np.column_stack([X, scores]).T, dtype=float)
        return np.concatenate([np.bincount(np.searchsorted(c, col, side="left"), minlength=c.size + 1)
                               for c, col in zip(self.cuts, columns)])

    def psi(self) -> np.ndarray:
        """PSI of every column over the window (as :func:`psi`, all columns at once)."""
        actual = np.maximum(self.window_counts / self.window_rows, PROPORTION_FLOOR)
        return np.add.reduceat((actual - self.expected) * np.log(actual / self.expected), self.offsets)


class DriftMonitor:
    """PSI of every prediction batch, per model version, over a window of the latest rows.

    Each batch is binned against the version's reference (at most :data:`MAX_BINNED_ROWS` evenly
    spaced rows of it) and added to a window of the newest batches: the fewest whole batches, newest
    first, that hold at least :data:`WINDOW_ROWS` binned rows; the PSI of every feature and of the
    score is recomputed over that window, so a single batch of a handful of rows neither raises nor
    clears an alarm. Windows below :data:`MIN_ROWS` rows are reported as ``"insufficient"``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(5000, 2)); s = rng.random(5000)
    >>> mon = DriftMonitor()
    >>> ref = drift_reference(X, s, ["a", "b"])
    >>> mon.observe("m-1", ref, rng.normal(size=(800, 2)), rng.random(800))["status"]
    'ok'
    >>> shifted = rng.normal(size=(800, 2)) + [0, 1.5]
    >>> mon.observe("m-1", ref, shifted, rng.random(800))["alarms"]
    ['b']
    """

    def __init__(self, window_rows: int = WINDOW_ROWS, min_rows: int = MIN_ROWS) -> None:
        self.window_rows = int(window_rows)
        self.min_rows = int(min_rows)
        self._lock = threading.Lock()
        self._tracks: dict[str, _Track] = {}

    def observe(self, key: str, reference: dict, X, scores) -> dict:
        """Add one batch (rows and their scores) of model version ``key``; return the window's judgement."""
        with self._lock:
            track = self._tracks.get(key)
            if track is None:  # the key names a model version, whose reference never changes
                track = self._tracks[key] = _Track(reference)
        X = np.asarray(X)
        scores = np.asarray(scores).reshape(-1)
        predicted = int(X.shape[0])
        if predicted > MAX_BINNED_ROWS:  # evenly spaced rows: deterministic, and spread over the whole batch
            keep = np.linspace(0, X.shape[0] - 1, MAX_BINNED_ROWS).round().astype(int)
            X, scores = X[keep], scores[keep]
        n = int(X.shape[0])
        counts = track.counts(X, scores)
        with self._lock:
            track.batches.append((n, counts))
            track.window_counts += counts
            track.window_rows += n
            track.batches_seen += 1
            track.rows_seen += predicted
            while len(track.batches) > 1 and track.window_rows - track.batches[0][0] >= self.window_rows:
                old_n, old_counts = track.batches.popleft()
                track.window_rows -= old_n
                track.window_counts -= old_counts
            result = self._judge(track)
            if result["status"] == "alarm":
                track.alarms_raised += 1
            track.last = result
            return result

    def _judge(self, track: _Track) -> dict:
        rows = track.window_rows
        result = {"windowRows": rows, "windowBatches": len(track.batches)}
        if rows < self.min_rows:
            return result | {"status": "insufficient", "psi": {}, "scorePsi": None, "alarms": [], "warnings": []}
        all_psi = track.psi()
        values = {name: round(float(v), 6) for name, v in zip(track.names, all_psi[:-1])}
        score_psi = round(float(all_psi[-1]), 6)
        alarms = [n for n, v in values.items() if psi_level(v) == "alarm"]
        warnings = [n for n, v in values.items() if psi_level(v) == "warning"]
        levels = [psi_level(v) for v in (*values.values(), score_psi)]
        status = "alarm" if "alarm" in levels else "warning" if "warning" in levels else "ok"
        return result | {"status": status, "psi": values, "scorePsi": score_psi,
                         "scoreLevel": psi_level(score_psi), "alarms": alarms, "warnings": warnings}

    def snapshot(self) -> dict:
        """What ``/inference/metrics`` shows under ``drift``: thresholds and each version's latest window."""
        with self._lock:
            models = {key: {"batches": t.batches_seen, "rows": t.rows_seen, "referenceRows": t.reference["rows"],
                            "alarmsRaised": t.alarms_raised, "alarm": bool(t.last and t.last["status"] == "alarm"),
                            **(t.last or {})}
                      for key, t in self._tracks.items()}
        return {"thresholds": {"warning": PSI_WARNING, "alarm": PSI_ALARM}, "minRows": self.min_rows,
                "windowRows": self.window_rows, "models": models}
