"""In-process inference service: micro-batching of concurrent requests, isolation of bad ones, metrics."""
import threading

import numpy as np
import pytest

from inference.features import N_FEATURES
from inference.registry import default_registry
from inference.service import InferenceService, UnknownModel, get_service, reset_service

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def probe():
    return np.load(default_registry().latest("dropout").onnx_path.with_suffix(".probe.npz"))


@pytest.fixture
def service():
    svc = InferenceService(max_wait_ms=20, force_cpu=True)
    yield svc
    svc.close()


def run_concurrently(fn, n):
    barrier = threading.Barrier(n)
    results, errors = [None] * n, [None] * n

    def work(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # collected and asserted on by the caller
            errors[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results, errors


def test_concurrent_requests_are_batched_and_answered_correctly(service, probe):
    x, expected = probe["x"], probe["p"]
    results, errors = run_concurrently(lambda i: service.predict("dropout", x[4 * i:4 * i + 4]), 16)
    assert errors == [None] * 16
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.probabilities, expected[4 * i:4 * i + 4], atol=1e-6)
        assert (r.model, r.version, r.provider) == ("dropout", "1.0.1", "CPUExecutionProvider")
    m = service.metrics()
    assert m["requests"] == 16 and m["rows"] == 64 and m["errors"] == 0
    assert m["max_batch_requests"] > 1 and m["batches"] < 16
    assert sum(int(k) * v for k, v in m["batch_size_requests"].items()) == 16
    assert m["providers_in_use"] == ["CPUExecutionProvider"]
    assert m["loaded_models"]["dropout-1.0.1"]["sha256"] == default_registry().latest("dropout").metadata["sha256"]
    assert m["latency_ms"]["p50"] <= m["latency_ms"]["p99"] <= m["latency_ms"]["max"]
    assert sum(m["latency_ms"]["histogram"].values()) == 16


def test_a_bad_request_never_spoils_the_batch(service, probe):
    x = probe["x"]

    def call(i):
        rows = x[i:i + 2].copy()
        if i == 3:
            rows[0, 2] = np.nan
        return service.predict("dropout", rows)

    results, errors = run_concurrently(call, 8)
    assert isinstance(errors[3], ValueError) and "NaN" in str(errors[3])
    for i in (0, 1, 2, 4, 5, 6, 7):
        np.testing.assert_allclose(results[i].probabilities, probe["p"][i:i + 2], atol=1e-6)
    assert service.metrics()["errors"] == 1


def test_batch_row_cap_splits_batches(probe):
    svc = InferenceService(max_wait_ms=50, max_batch_rows=8, force_cpu=True)
    try:
        results, errors = run_concurrently(lambda i: svc.predict("dropout", probe["x"][:4]), 6)
        assert errors == [None] * 6 and svc.metrics()["max_batch_rows"] <= 8 + 4
        assert all(r.batch_rows <= 12 for r in results)
    finally:
        svc.close()


def test_without_micro_batching_each_request_runs_alone(probe):
    svc = InferenceService(micro_batching=False, force_cpu=True)
    results, errors = run_concurrently(lambda i: svc.predict("dropout", probe["x"][i:i + 1]), 8)
    assert errors == [None] * 8
    m = svc.metrics()
    assert m["max_batch_requests"] == 1 and m["batches"] == 8 and m["micro_batching"] is False
    np.testing.assert_allclose(np.concatenate([r.probabilities for r in results]), probe["p"][:8], atol=1e-6)


def test_unknown_model_and_bad_widths(service):
    with pytest.raises(UnknownModel, match="no model 'nope'"):
        service.predict("nope", np.zeros((1, N_FEATURES)))
    with pytest.raises(UnknownModel, match="dropout-0.0.1"):
        service.predict("dropout", np.zeros((1, N_FEATURES)), version="0.0.1")
    with pytest.raises(ValueError, match="expected 21 features per row, got 3"):
        service.predict("dropout", np.zeros((1, 3)))
    assert service.metrics()["errors"] == 3


def test_models_lists_registry_and_provider(service, probe):
    assert service.models()[0]["provider"] is None  # not loaded yet
    service.predict("dropout", probe["x"][:1])
    by_name = {m["name"]: m for m in service.models()}
    assert set(by_name) == {"dropout", "withdrawal"} and by_name["withdrawal"]["provider"] is None
    item = by_name["dropout"]
    assert item["n_features"] == N_FEATURES
    assert item["provider"] == "CPUExecutionProvider" and item["validation"]["auc"] >= 0.75


def test_closed_service_refuses(probe):
    svc = InferenceService(force_cpu=True)
    svc.close()
    with pytest.raises(RuntimeError, match="closed"):
        svc.predict("dropout", probe["x"][:1])


def test_process_wide_service_is_shared(monkeypatch):
    reset_service()
    monkeypatch.setenv("TRIALTWIN_MICROBATCH", "0")
    try:
        assert get_service() is get_service() and get_service().micro_batching is False
    finally:
        reset_service()
