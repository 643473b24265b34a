"""In-process inference service: registry-backed predictors behind a thread-based micro-batching queue.

Concurrent requests for one model are gathered for up to a few ms (or N rows) and run as one ONNX batch.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from inference.drift import DriftMonitor
from inference.features import check_feature_matrix
from inference.registry import ModelEntry, ModelRegistry, default_registry

__all__ = ["InferenceService", "Prediction", "UnknownModel", "get_service", "reset_service",
           "LATENCY_BUCKETS_MS"]

#: Upper bounds (ms) of the request-latency histogram buckets; the last bucket is open.
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 1000)


class UnknownModel(KeyError):
    """No registered model of that name (and version)."""

    def __str__(self) -> str:  # KeyError quotes its message; callers show it to people
        return str(self.args[0])


@dataclass(frozen=True)
class Prediction:
    """Probabilities for the submitted rows and the model that produced them."""

    probabilities: np.ndarray
    model: str
    version: str
    provider: str
    batch_rows: int


@dataclass(eq=False)
class _Pending:
    rows: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    batch_rows: int = 0
    error: BaseException | None = None


class _Metrics:
    """Thread-safe counters; percentiles from a bounded window of recent latencies."""

    def __init__(self, window: int = 20000) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.rows = 0
        self.errors = 0
        self.batches = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.recent_ms: deque[float] = deque(maxlen=window)
        self.batch_requests: dict[int, int] = {}
        self.max_batch_requests = 0
        self.max_batch_rows = 0
        self.per_model: dict[str, dict] = {}

    def record_request(self, key: str, rows: int, latency_ms: float) -> None:
        with self.lock:
            self.requests += 1
            self.rows += rows
            self.recent_ms.append(latency_ms)
            self.latency_counts[int(np.searchsorted(LATENCY_BUCKETS_MS, latency_ms))] += 1
            model = self.per_model.setdefault(key, {"requests": 0, "rows": 0, "batches": 0})
            model["requests"] += 1
            model["rows"] += rows

    def record_error(self) -> None:
        with self.lock:
            self.errors += 1

    def record_batch(self, key: str, n_requests: int, n_rows: int) -> None:
        with self.lock:
            self.batches += 1
            self.batch_requests[n_requests] = self.batch_requests.get(n_requests, 0) + 1
            self.max_batch_requests = max(self.max_batch_requests, n_requests)
            self.max_batch_rows = max(self.max_batch_rows, n_rows)
            self.per_model.setdefault(key, {"requests": 0, "rows": 0, "batches": 0})["batches"] += 1

    def snapshot(self) -> dict:
        with self.lock:
            recent = np.asarray(self.recent_ms, dtype=float)
            pct = ({f"p{q}": float(np.percentile(recent, q)) for q in (50, 90, 99)}
                   | {"mean": float(recent.mean()), "max": float(recent.max())}) if recent.size else {}
            edges = [f"le_{b:g}" for b in LATENCY_BUCKETS_MS] + ["inf"]
            return {
                "requests": self.requests, "rows": self.rows, "errors": self.errors, "batches": self.batches,
                "latency_ms": {"window": int(recent.size), **pct,
                               "histogram": dict(zip(edges, self.latency_counts))},
                "batch_size_requests": {str(k): v for k, v in sorted(self.batch_requests.items())},
                "max_batch_requests": self.max_batch_requests,
                "max_batch_rows": self.max_batch_rows,
                "mean_batch_requests": (sum(k * v for k, v in self.batch_requests.items()) / self.batches
                                        if self.batches else 0.0),
                "models": {k: dict(v) for k, v in self.per_model.items()},
            }


class _Batcher:
    """One worker thread per model version: drain the queue into batches and run them."""

    def __init__(self, predictor, key: str, metrics: _Metrics, max_wait_s: float, max_rows: int) -> None:
        self.predictor = predictor
        self.key = key
        self.metrics = metrics
        self.max_wait_s = max_wait_s
        self.max_rows = max_rows
        self.queue: queue.Queue[_Pending | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"microbatch-{key}", daemon=True)
        self.thread.start()

    def submit(self, pending: _Pending) -> None:
        self.queue.put(pending)

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, n_rows, stop = [first], len(first.rows), False
            deadline = time.perf_counter() + self.max_wait_s
            while n_rows < self.max_rows:
                remaining = deadline - time.perf_counter()
                try:
                    item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                n_rows += len(item.rows)
            self._run(batch, n_rows)
            if stop:
                return

    def _run(self, batch: list[_Pending], n_rows: int) -> None:
        try:
            probs = self.predictor.predict_proba(np.concatenate([p.rows for p in batch]))
        except BaseException as exc:  # handed back to every waiting caller, never lost in this thread
            for p in batch:
                p.error = exc
                p.done.set()
            return
        self.metrics.record_batch(self.key, len(batch), n_rows)
        start = 0
        for p in batch:
            p.result = probs[start:start + len(p.rows)]
            p.batch_rows = n_rows
            start += len(p.rows)
            p.done.set()


class InferenceService:
    """Serve registered models with optional micro-batching and metrics.

    Parameters
    ----------
    registry : ModelRegistry, optional
        Where models come from (default: the committed ``inference/models``).
    micro_batching : bool
        Gather concurrent requests into one batch (default) or run each request on its own.
    max_wait_ms : float
        How long the first request of a batch waits for company.
    max_batch_rows : int
        A batch is run as soon as it holds this many rows.
    force_cpu : bool, optional
        Keep ONNX Runtime on the CPU (default: ``TRIALTWIN_INFERENCE_CPU`` environment variable).

    Examples
    --------
    >>> import numpy as np
    >>> from inference.features import N_FEATURES
    >>> svc = InferenceService(max_wait_ms=1)
    >>> entry = svc.registry.latest("dropout")
    >>> x = np.load(entry.metadata_path.with_suffix(".probe.npz"))["x"]
    >>> out = svc.predict("dropout", x)
    >>> out.probabilities.shape == (len(x),), out.model
    (True, 'dropout')
    >>> svc.close()
    """

    def __init__(self, registry: ModelRegistry | None = None, *, micro_batching: bool = True,
                 max_wait_ms: float = 2.0, max_batch_rows: int = 8192, force_cpu: bool | None = None) -> None:
        if max_wait_ms < 0 or max_batch_rows < 1:
            raise ValueError("max_wait_ms must be >= 0 and max_batch_rows >= 1")
        self.registry = registry or default_registry()
        self.micro_batching = micro_batching
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_batch_rows = int(max_batch_rows)
        self.force_cpu = force_cpu
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str], tuple[ModelEntry, object]] = {}
        self._entries: dict[tuple[str, str | None], ModelEntry] = {}
        self._batchers: dict[tuple[str, str], _Batcher] = {}
        self._metrics = _Metrics()
        #: PSI of every batch of a model version whose metadata carries a ``drift_reference``
        self.drift = DriftMonitor()
        self._closed = False

    def _entry(self, name: str, version: str | None) -> ModelEntry:
        # Resolved once: scanning and parsing the registry per request would cost more than the model.
        entry = self._entries.get((name, version))
        if entry is None:
            try:
                entry = self.registry.get(name, version)
            except KeyError as exc:
                raise UnknownModel(exc.args[0]) from None
            self._entries[(name, version)] = entry
        return entry

    def reload(self) -> None:
        """Forget resolved model names so newly registered versions are picked up (loaded sessions stay)."""
        self._entries.clear()

    def _resolve(self, name: str, version: str | None):
        entry = self._entry(name, version)
        key = (entry.name, entry.version)
        with self._lock:
            if self._closed:
                raise RuntimeError("inference service is closed")
            if key not in self._loaded:
                self._loaded[key] = (entry, entry.load(force_cpu=self.force_cpu))
            loaded = self._loaded[key]
            if self.micro_batching and key not in self._batchers:
                self._batchers[key] = _Batcher(loaded[1], f"{entry.name}-{entry.version}", self._metrics,
                                               self.max_wait_s, self.max_batch_rows)
        return loaded[0], loaded[1], self._batchers.get(key)

    def feature_names(self, name: str, version: str | None = None) -> tuple[str, ...]:
        """Input column names of a model (raises :class:`UnknownModel`)."""
        return self._entry(name, version).feature_names

    def predict(self, name: str, rows, version: str | None = None, timeout_s: float = 30.0) -> Prediction:
        """Probabilities for ``rows`` from model ``name`` (latest version unless ``version``).

        Raises
        ------
        UnknownModel
            No such model.
        ValueError
            Invalid rows (wrong width, dtype, NaN/inf), checked before queueing so one bad request
            never spoils a shared batch.
        """
        start = time.perf_counter()
        try:
            entry, predictor, batcher = self._resolve(name, version)
            arr = check_feature_matrix(rows, predictor.n_features, predictor.feature_names)
            if batcher is None or arr.shape[0] == 0:
                probs, batch_rows = predictor.predict_proba(arr), arr.shape[0]
                if arr.shape[0]:
                    self._metrics.record_batch(f"{entry.name}-{entry.version}", 1, batch_rows)
            else:
                pending = _Pending(arr)
                batcher.submit(pending)
                if not pending.done.wait(timeout_s):
                    raise TimeoutError(f"prediction not answered within {timeout_s} s")
                if pending.error is not None:
                    raise pending.error
                probs, batch_rows = pending.result, pending.batch_rows
        except BaseException:
            self._metrics.record_error()
            raise
        self._metrics.record_request(f"{entry.name}-{entry.version}", arr.shape[0],
                                     (time.perf_counter() - start) * 1000.0)
        reference = entry.metadata.get("drift_reference")
        if reference is not None and arr.shape[0]:
            self.drift.observe(f"{entry.name}-{entry.version}", reference, arr, probs)
        return Prediction(probs, entry.name, entry.version, predictor.provider, batch_rows)

    def models(self) -> list[dict]:
        """Registered models with their metadata summary and, once loaded, the provider in use."""
        out = []
        for entry in self.registry.entries():
            item = entry.summary()
            loaded = self._loaded.get((entry.name, entry.version))
            item["provider"] = loaded[1].provider if loaded else None
            out.append(item)
        return out

    def metrics(self) -> dict:
        """Counts, latency percentiles and histogram, batch sizes, providers and loaded model versions."""
        with self._lock:
            loaded = {f"{e.name}-{e.version}": {"provider": p.provider, "providers": list(p.providers),
                                                "sha256": e.metadata["sha256"]}
                      for e, p in self._loaded.values()}
        return {"micro_batching": self.micro_batching, "max_wait_ms": self.max_wait_s * 1000.0,
                "max_batch_rows": self.max_batch_rows, "loaded_models": loaded,
                "providers_in_use": sorted({v["provider"] for v in loaded.values()}),
                **self._metrics.snapshot(), "drift": self.drift.snapshot()}

    def close(self) -> None:
        """Stop the batching threads (pending requests are answered first)."""
        with self._lock:
            self._closed = True
            batchers, self._batchers = list(self._batchers.values()), {}
        for b in batchers:
            b.stop()


_SERVICE: InferenceService | None = None
_SERVICE_LOCK = threading.Lock()


def get_service() -> InferenceService:
    """The process-wide service used by FHIR operations and the HTTP face.

    Configured from the environment: ``TRIALTWIN_MODELS_DIR``, ``TRIALTWIN_MICROBATCH`` (``0`` to
    disable), ``TRIALTWIN_MICROBATCH_WAIT_MS``, ``TRIALTWIN_MICROBATCH_ROWS``, ``TRIALTWIN_INFERENCE_CPU``.
    """
    global _SERVICE
    with _SERVICE_LOCK:
        if _SERVICE is None:
            models_dir = os.environ.get("TRIALTWIN_MODELS_DIR")
            _SERVICE = InferenceService(
                ModelRegistry(models_dir) if models_dir else None,
                micro_batching=os.environ.get("TRIALTWIN_MICROBATCH", "1") not in ("0", "false", "no", "off"),
                max_wait_ms=float(os.environ.get("TRIALTWIN_MICROBATCH_WAIT_MS", "2")),
                max_batch_rows=int(os.environ.get("TRIALTWIN_MICROBATCH_ROWS", "8192")))
        return _SERVICE


def reset_service() -> None:
    """Close and forget the process-wide service (tests, configuration changes)."""
    global _SERVICE
    with _SERVICE_LOCK:
        if _SERVICE is not None:
            _SERVICE.close()
        _SERVICE = None
