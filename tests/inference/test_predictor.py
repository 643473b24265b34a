"""ONNX Runtime predictor: one cached session, the provider actually used, strict input validation."""
import numpy as np
import onnxruntime as ort
import pytest

from inference.features import FEATURE_NAMES, N_FEATURES
from inference.predictor import FORCE_CPU_ENV, clear_cache, load_predictor, requested_providers
from inference.registry import default_registry

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def entry():
    return default_registry().latest("dropout")


@pytest.fixture(scope="module")
def probe(entry):
    return np.load(entry.onnx_path.with_suffix(".probe.npz"))


def test_session_is_created_once_per_model(entry):
    a = entry.load(force_cpu=True)
    assert entry.load(force_cpu=True) is a and a.session is load_predictor(entry.onnx_path, force_cpu=True).session


def test_provider_reported_is_the_one_in_use(entry):
    p = entry.load(force_cpu=False)
    actual = p.session.get_providers()
    assert p.provider == actual[0] and p.providers == tuple(actual)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert p.requested[0] == "CUDAExecutionProvider"
        # onnxruntime-gpu lists CUDA even without a usable CUDA runtime; then the session runs on CPU.
        assert p.fell_back == (actual[0] != "CUDAExecutionProvider")
    assert p.provider in ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_cpu_can_be_forced_by_argument_and_environment(entry, monkeypatch):
    assert entry.load(force_cpu=True).providers == ("CPUExecutionProvider",)
    monkeypatch.setenv(FORCE_CPU_ENV, "1")
    assert requested_providers() == ["CPUExecutionProvider"]
    clear_cache()
    assert entry.load().provider == "CPUExecutionProvider" and not entry.load().fell_back
    monkeypatch.setenv(FORCE_CPU_ENV, "0")
    assert requested_providers()[-1] == "CPUExecutionProvider"


def test_batch_equals_row_by_row_and_committed_probe(entry, probe):
    p = entry.load(force_cpu=True)
    batch = p.predict_proba(probe["x"])
    assert batch.dtype == np.float32 and batch.shape == (len(probe["x"]),)
    np.testing.assert_allclose(batch, probe["p"], atol=1e-6)
    singles = np.concatenate([p.predict_proba(row) for row in probe["x"][:20]])
    np.testing.assert_allclose(singles, batch[:20], atol=1e-6)
    assert p.predict_proba(np.zeros((0, N_FEATURES))).shape == (0,)
    assert np.all((batch >= 0) & (batch <= 1))


def test_float64_and_int_inputs_are_cast(entry, probe):
    p = entry.load(force_cpu=True)
    np.testing.assert_allclose(p.predict_proba(probe["x"][:5].astype(np.float64)), probe["p"][:5], atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, N_FEATURES - 1)), f"expected {N_FEATURES} features per row, got {N_FEATURES - 1}"),
    (np.zeros((2, N_FEATURES, 1)), "2-D"),
    (np.array([["x"] * N_FEATURES]), "numeric"),
    (np.array([[None] * N_FEATURES]), "numeric"),
])
def test_invalid_shapes_and_dtypes(entry, bad, message):
    with pytest.raises(ValueError, match=message):
        entry.load(force_cpu=True).predict_proba(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_feature(entry, probe, value):
    x = probe["x"][:3].copy()
    x[1, 4] = value
    with pytest.raises(ValueError, match=f"feature '{FEATURE_NAMES[4]}' \\(column 4\\) is NaN or infinite in row 1"):
        entry.load(force_cpu=True).predict_proba(x)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_predictor("/nonexistent/model.onnx")
