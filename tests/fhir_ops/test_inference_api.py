"""Inference HTTP face over real loopback HTTP: predictions, micro-batching under load, OperationOutcome errors."""
import json
import threading

import numpy as np
import pytest
import requests

from fhir_ops.inference_api import create_app
from inference.features import FEATURE_NAMES, N_FEATURES
from inference.registry import default_registry
from inference.service import InferenceService
from tests.app_config import open_config
from tests.live_server import serve

pytestmark = pytest.mark.api

FHIR_JSON = "application/fhir+json"


@pytest.fixture(scope="module")
def probe():
    return np.load(default_registry().latest("dropout").onnx_path.with_suffix(".probe.npz"))


@pytest.fixture
def app():
    app = create_app({"MAX_WAIT_MS": 25, "FORCE_CPU": True, "AUTH_MODE": "open"})
    yield app
    app.extensions["trialtwin_inference"].close()


@pytest.fixture
def base_url(app):
    with serve(app) as url:
        yield url


def assert_outcome(response, status, error_id, text=None):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith(FHIR_JSON)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error"
    assert issue["details"]["coding"][0]["code"] == error_id
    if text:
        assert text in issue["diagnostics"], issue["diagnostics"]
    return issue


def test_predictions_equal_in_process_ones(base_url, probe):
    rows = probe["x"][:50]
    r = requests.post(f"{base_url}/predict/dropout", json={"rows": rows.tolist()}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["provider"]) == ("dropout", "1.0.1", "CPUExecutionProvider")
    svc = InferenceService(micro_batching=False, force_cpu=True)
    np.testing.assert_allclose(body["probabilities"], svc.predict("dropout", rows).probabilities, atol=1e-7)
    np.testing.assert_allclose(body["probabilities"], probe["p"][:50], atol=1e-6)
    assert body["features"] == list(FEATURE_NAMES)


def test_rows_may_be_objects_keyed_by_feature(base_url, probe):
    rows = [dict(zip(FEATURE_NAMES, map(float, row))) for row in probe["x"][:3]]
    r = requests.post(f"{base_url}/predict/dropout?version=1.0.1", json={"rows": rows}, timeout=10)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["probabilities"], probe["p"][:3], atol=1e-6)


def test_concurrent_http_requests_are_micro_batched(base_url, probe):
    n = 16
    barrier = threading.Barrier(n)
    answers = [None] * n

    def client(i):
        with requests.Session() as s:
            barrier.wait()
            answers[i] = s.post(f"{base_url}/predict/dropout", json={"rows": probe["x"][i:i + 1].tolist()},
                                timeout=10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [a.status_code for a in answers] == [200] * n
    got = np.array([a.json()["probabilities"][0] for a in answers])
    np.testing.assert_allclose(got, probe["p"][:n], atol=1e-6)
    m = requests.get(f"{base_url}/metrics", timeout=10).json()
    assert m["requests"] == n and m["max_batch_requests"] > 1 and m["batches"] < n
    assert m["providers_in_use"] == ["CPUExecutionProvider"]
    assert "dropout-1.0.1" in m["loaded_models"] and m["latency_ms"]["p99"] > 0


def test_models_endpoint(base_url):
    body = requests.get(f"{base_url}/models", timeout=10).json()
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"dropout", "withdrawal"}
    model = by_name["dropout"]
    assert model["version"] == "1.0.1" and model["n_features"] == N_FEATURES
    assert model["sha256"] == default_registry().latest("dropout").metadata["sha256"]


def test_unknown_model_is_404(base_url):
    r = requests.post(f"{base_url}/predict/nope", json={"rows": [[0.0] * N_FEATURES]}, timeout=10)
    assert_outcome(r, 404, "unknown-model", "no model 'nope'")
    assert_outcome(requests.post(f"{base_url}/predict/dropout?version=9.0.0",
                                 json={"rows": [[0.0] * N_FEATURES]}, timeout=10), 404, "unknown-model")


def test_wrong_feature_count_is_400(base_url):
    r = requests.post(f"{base_url}/predict/dropout", json={"rows": [[0.0] * (N_FEATURES - 2)]}, timeout=10)
    issue = assert_outcome(r, 400, "wrong-feature-count", f"row 0 has {N_FEATURES - 2} features, the model expects 21")
    assert issue["expression"] == ["rows[0]"]


def test_nan_is_400(base_url, probe):
    # JSON has no NaN; Python's json module writes the NaN literal that many clients send anyway.
    row = probe["x"][0].tolist()
    row[5] = float("nan")
    r = requests.post(f"{base_url}/predict/dropout", data=json.dumps({"rows": [row]}),
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert_outcome(r, 400, "invalid-feature-value", f"feature '{FEATURE_NAMES[5]}' is NaN or infinite")
    row[5] = None
    r = requests.post(f"{base_url}/predict/dropout", json={"rows": [row]}, timeout=10)
    assert_outcome(r, 400, "invalid-feature-value", "must be a number, got None")


def test_missing_and_unknown_features_are_400(base_url, probe):
    row = dict(zip(FEATURE_NAMES, map(float, probe["x"][0])))
    del row["egfr"]
    issue = assert_outcome(requests.post(f"{base_url}/predict/dropout", json={"rows": [row]}, timeout=10),
                           400, "missing-feature", "lacks feature(s) ['egfr']")
    assert issue["expression"] == ["rows[0].egfr"]
    row["egfr"], row["shoe_size"] = 80.0, 42
    assert_outcome(requests.post(f"{base_url}/predict/dropout", json={"rows": [row]}, timeout=10),
                   400, "unknown-feature", "shoe_size")


@pytest.mark.parametrize("payload, error_id", [
    ({"data": []}, "invalid-body"),
    ({"rows": []}, "invalid-body"),
    ({"rows": "abc"}, "invalid-body"),
    ({"rows": [7]}, "invalid-body"),
    ({"rows": [[True] * N_FEATURES]}, "invalid-feature-value"),
])
def test_malformed_bodies_are_400(base_url, payload, error_id):
    assert_outcome(requests.post(f"{base_url}/predict/dropout", json=payload, timeout=10), 400, error_id)


def test_transport_errors_are_operation_outcomes(base_url):
    r = requests.post(f"{base_url}/predict/dropout", data="{not json", headers={"Content-Type": "application/json"},
                      timeout=10)
    assert_outcome(r, 400, "invalid-json")
    r = requests.post(f"{base_url}/predict/dropout", data="a,b", headers={"Content-Type": "text/csv"}, timeout=10)
    assert_outcome(r, 415, "unsupported-media-type")
    assert_outcome(requests.get(f"{base_url}/predict/dropout", timeout=10), 405, "method-not-allowed")
    assert_outcome(requests.get(f"{base_url}/nowhere", timeout=10), 404, "unknown-route")


def test_tampered_model_is_a_server_error_not_a_prediction(tmp_path, probe):
    src = default_registry().latest("dropout")
    for path in src.onnx_path.parent.glob("dropout-1.0.1.*"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    onnx = tmp_path / "dropout-1.0.1.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    app = create_app({"MODELS_DIR": str(tmp_path), "FORCE_CPU": True, "AUTH_MODE": "open"})
    try:
        with serve(app) as url:
            r = requests.post(f"{url}/predict/dropout", json={"rows": probe["x"][:1].tolist()}, timeout=10)
            assert_outcome(r, 500, "model-checksum", "sha256")
    finally:
        app.extensions["trialtwin_inference"].close()


def test_mounted_in_the_one_process_wsgi_app(tmp_path, probe):
    from fhir_ops.wsgi import create_wsgi
    from inference.service import reset_service

    reset_service()
    try:
        with serve(create_wsgi(open_config(DATA_DIR=str(tmp_path)))) as url:
            r = requests.post(f"{url}/inference/predict/dropout", json={"rows": probe["x"][:2].tolist()}, timeout=10)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["probabilities"], probe["p"][:2], atol=1e-6)
            assert requests.get(f"{url}/inference/models", timeout=10).json()["models"][0]["name"] == "dropout"
            assert requests.get(f"{url}/fhir/metadata", timeout=10).json()["resourceType"] == "CapabilityStatement"
    finally:
        reset_service()
