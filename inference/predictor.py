"""The one predictor interface around ONNX Runtime: one cached session per model file, honest provider report.

Sessions ask for CUDA then CPU and report what ONNX Runtime actually uses (``get_providers()``).
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.features import check_feature_matrix

__all__ = ["Predictor", "load_predictor", "requested_providers", "clear_cache", "FORCE_CPU_ENV"]

#: Set to ``1``/``true`` to keep ONNX Runtime off the GPU even where CUDA works.
FORCE_CPU_ENV = "TRIALTWIN_INFERENCE_CPU"

_log = logging.getLogger(__name__)
_CACHE: dict[tuple[str, bool], "Predictor"] = {}
_CACHE_LOCK = threading.Lock()


def _force_cpu_from_env() -> bool:
    return os.environ.get(FORCE_CPU_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def requested_providers(force_cpu: bool | None = None) -> list[str]:
    """Execution providers to ask ONNX Runtime for, best first.

    ``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as *available* even on machines without a
    usable CUDA runtime, so this is only the request; the truth is ``Predictor.provider``.

    Examples
    --------
    >>> requested_providers(force_cpu=True)
    ['CPUExecutionProvider']
    """
    import onnxruntime as ort

    if force_cpu is None:
        force_cpu = _force_cpu_from_env()
    available = ort.get_available_providers()
    wanted = [] if force_cpu else [p for p in ("CUDAExecutionProvider",) if p in available]
    return wanted + ["CPUExecutionProvider"]


@dataclass(frozen=True, eq=False)
class Predictor:
    """A ready ONNX Runtime session for one binary-probability model.

    Use :func:`load_predictor` (cached) rather than building one directly.

    Attributes
    ----------
    path : pathlib.Path
        The ``.onnx`` file.
    n_features : int
        Width of the float32 input.
    feature_names : tuple of str or None
        Column names, for error messages.
    provider : str
        Execution provider actually in use (first of ``session.get_providers()``).
    """

    path: Path
    session: object
    input_name: str
    output_name: str
    n_features: int
    feature_names: tuple[str, ...] | None
    provider: str
    providers: tuple[str, ...]
    requested: tuple[str, ...] = ()

    @property
    def fell_back(self) -> bool:
        """True when CUDA was asked for but ONNX Runtime could not use it (CPU fallback)."""
        return bool(self.requested) and self.requested[0] != self.provider

    def predict_proba(self, x) -> np.ndarray:
        """Probability of the positive class for each row.

        Parameters
        ----------
        x : array_like, shape (n, n_features)
            Numeric features; validated (dtype, width, NaN/inf) and cast to float32.

        Returns
        -------
        numpy.ndarray
            Shape ``(n,)``, float32, in [0, 1].

        Raises
        ------
        ValueError
            On invalid input (see :func:`inference.features.check_feature_matrix`).
        """
        arr = check_feature_matrix(x, self.n_features, self.feature_names)
        if arr.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        (out,) = self.session.run([self.output_name], {self.input_name: arr})
        out = np.asarray(out)
        # A 2-column output is [P(0), P(1)]; the positive class is what callers want.
        return (out[:, 1] if out.ndim == 2 and out.shape[1] == 2 else out.reshape(-1)).astype(np.float32)


def _build(path: Path, force_cpu: bool, feature_names: tuple[str, ...] | None) -> Predictor:
    import onnxruntime as ort

    requested = tuple(requested_providers(force_cpu))
    # A missing CUDA runtime makes ORT print errors on its default logger; the fallback is reported
    # through .provider / .fell_back (and a log line below) instead.
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(requested))
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ValueError(f"{path.name}: expected one input tensor, found {len(inputs)}")
    if inputs[0].type != "tensor(float)":
        raise ValueError(f"{path.name}: expected a float32 input, found {inputs[0].type}")
    width = inputs[0].shape[-1]
    if not isinstance(width, int):
        raise ValueError(f"{path.name}: input width is not fixed ({width!r})")
    prob_outputs = [o for o in outputs if "prob" in o.name.lower()] or outputs[-1:]
    if prob_outputs[0].type != "tensor(float)":
        raise ValueError(f"{path.name}: probability output {prob_outputs[0].name} is {prob_outputs[0].type}, "
                         "not a plain float tensor (export with zipmap disabled)")
    if feature_names is not None and len(feature_names) != width:
        raise ValueError(f"{path.name}: {len(feature_names)} feature names for an input of width {width}")
    providers = tuple(session.get_providers())
    if providers[0] != requested[0]:
        _log.warning("%s: asked ONNX Runtime for %s, running on %s (provider unavailable here)",
                     path.name, requested[0], providers[0])
    return Predictor(path=path, session=session, input_name=inputs[0].name, output_name=prob_outputs[0].name,
                     n_features=width, feature_names=feature_names, provider=providers[0], providers=providers,
                     requested=requested)


def load_predictor(path, *, force_cpu: bool | None = None,
                   feature_names: tuple[str, ...] | None = None) -> Predictor:
    """Return the process-wide predictor for ``path``, creating its session on first use.

    Parameters
    ----------
    path : str or pathlib.Path
        ONNX model file.
    force_cpu : bool, optional
        Skip CUDA; default reads the ``TRIALTWIN_INFERENCE_CPU`` environment variable.
    feature_names : tuple of str, optional
        Column names used in validation messages.

    Examples
    --------
    >>> from inference.registry import default_registry
    >>> entry = default_registry().latest("dropout")
    >>> p = load_predictor(entry.onnx_path, force_cpu=True)
    >>> p.provider, p is load_predictor(entry.onnx_path, force_cpu=True)
    ('CPUExecutionProvider', True)
    """
    path = Path(path).resolve()
    if force_cpu is None:
        force_cpu = _force_cpu_from_env()
    key = (str(path), bool(force_cpu))
    with _CACHE_LOCK:
        predictor = _CACHE.get(key)
        if predictor is None:
            if not path.is_file():
                raise FileNotFoundError(f"model file not found: {path}")
            predictor = _CACHE[key] = _build(path, bool(force_cpu), feature_names)
    return predictor


def clear_cache() -> None:
    """Drop all cached sessions (tests, or after replacing model files)."""
    with _CACHE_LOCK:
        _CACHE.clear()
