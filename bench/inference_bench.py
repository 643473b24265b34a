"""Benchmark of the dropout model's serving path: ONNX Runtime batch throughput and HTTP request latency.

Baselines in the same run: scikit-learn predict_proba on the same rows; the model-only latency in process.
Writes bench/results/inference_bench.json. Usage: python bench/inference_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.predictor import load_predictor  # noqa: E402
from inference.registry import default_registry  # noqa: E402
from _machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "inference_bench.json"


def machine() -> dict:
    import onnxruntime
    import sklearn

    cpu = cpu_model()
    return {"platform": platform.platform(), "cpu_model": cpu, "logical_cores": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "scikit-learn": sklearn.__version__, "ort_available_providers": onnxruntime.get_available_providers(),
            "note": "shared development VM: other jobs ran concurrently, so absolute figures are noisy"}


def best_rate(fn, n_rows: int, min_time: float = 0.3, max_reps: int = 200) -> float:
    """Rows per second from the fastest of repeated calls (the least disturbed by other load)."""
    fn()  # warm-up
    times, spent = [], 0.0
    while (spent < min_time or len(times) < 3) and len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return n_rows / min(times)


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def throughput(rows: np.ndarray, sizes: list[int]) -> list[dict]:
    from inference.training.dropout import DEFAULT_SEED, fit_model, simulate_dataset

    entry = default_registry().latest("dropout").verify()
    predictor = entry.load(force_cpu=True)
    # The sklearn pipeline the ONNX file was exported from (same seed, same data: same coefficients).
    train_seed = entry.metadata["training"]["train_seed"]
    X, y = simulate_dataset(entry.metadata["training"]["n_train_participants"], train_seed)
    pipeline = fit_model(X, y)
    assert np.allclose(pipeline.predict_proba(rows[:1000])[:, 1], predictor.predict_proba(rows[:1000]), atol=1e-5)
    assert entry.metadata["training"]["seed"] == DEFAULT_SEED
    out = []
    for n in sizes:
        batch = rows[:n]
        ort_rate = best_rate(lambda: predictor.predict_proba(batch), n)
        skl_rate = best_rate(lambda: pipeline.predict_proba(batch), n)
        out.append({"batch_rows": n, "onnxruntime_rows_per_s": ort_rate, "sklearn_rows_per_s": skl_rate,
                    "ratio_onnx_over_sklearn": ort_rate / skl_rate})
        print(f"batch {n:>8}: ORT {ort_rate:12.0f} rows/s   sklearn {skl_rate:12.0f} rows/s   "
              f"ratio {ort_rate / skl_rate:6.2f}")
    return out


def model_only_latency(rows: np.ndarray, n: int) -> dict:
    from inference.service import InferenceService

    predictor = default_registry().latest("dropout").load(force_cpu=True)
    direct = []
    for i in range(n):
        t0 = time.perf_counter()
        predictor.predict_proba(rows[i % len(rows)][None, :])
        direct.append((time.perf_counter() - t0) * 1000)
    svc = InferenceService(micro_batching=False, force_cpu=True)
    service = []
    for i in range(n):
        t0 = time.perf_counter()
        svc.predict("dropout", rows[i % len(rows)][None, :])
        service.append((time.perf_counter() - t0) * 1000)
    svc.close()
    return {"predictor_single_row": percentiles(direct), "service_single_row_no_batching": percentiles(service)}


def http_latency(rows: np.ndarray, micro_batching: bool, clients: int, per_client: int,
                 max_wait_ms: float = 2.0) -> dict:
    import requests
    from waitress.server import create_server

    from fhir_ops.inference_api import create_app

    app = create_app({"MICRO_BATCHING": micro_batching, "MAX_WAIT_MS": max_wait_ms, "FORCE_CPU": True,
                      "AUTH_MODE": "open"})
    server = create_server(app, host="127.0.0.1", port=0, threads=clients)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.effective_port}/predict/dropout"
    try:
        with requests.Session() as s:  # warm the model and the connection
            s.post(url, json={"rows": rows[:1].tolist()}, timeout=30).raise_for_status()
            sequential = []
            for i in range(per_client * 2):
                t0 = time.perf_counter()
                s.post(url, json={"rows": rows[i:i + 1].tolist()}, timeout=30).raise_for_status()
                sequential.append((time.perf_counter() - t0) * 1000)
        latencies: list[list[float]] = [[] for _ in range(clients)]
        barrier = threading.Barrier(clients + 1)

        def client(k: int) -> None:
            with requests.Session() as s:
                payloads = [{"rows": rows[(k * per_client + i) % len(rows)][None, :].tolist()}
                            for i in range(per_client)]
                barrier.wait()
                for body in payloads:
                    t0 = time.perf_counter()
                    s.post(url, json=body, timeout=30).raise_for_status()
                    latencies[k].append((time.perf_counter() - t0) * 1000)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        metrics = requests.get(url.replace("/predict/dropout", "/metrics"), timeout=30).json()
    finally:
        time.sleep(0.2)  # let waitress finish closing the clients' connections before its sockets go
        server.task_dispatcher.shutdown()
        server.close()
        app.extensions["trialtwin_inference"].close()
    flat = [x for lat in latencies for x in lat]
    return {"micro_batching": micro_batching, "max_wait_ms": max_wait_ms if micro_batching else None,
            "server": f"waitress, {clients} threads", "clients": clients,
            "requests_per_client": per_client, "sequential_single_client": percentiles(sequential),
            "concurrent": percentiles(flat) | {"requests_per_s": len(flat) / wall},
            "server_metrics": {k: metrics[k] for k in ("batches", "mean_batch_requests", "max_batch_requests",
                                                         "batch_size_requests", "providers_in_use")}
            | {"server_side_latency_ms": {k: v for k, v in metrics["latency_ms"].items() if k != "histogram"}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = parser.parse_args()
    from inference.training.dropout import simulate_dataset

    entry = default_registry().latest("dropout")
    provider_probe = load_predictor(entry.onnx_path, force_cpu=False, feature_names=entry.feature_names)
    base, _ = simulate_dataset(400 if args.quick else 2000, seed=4242)
    max_rows = 10**4 if args.quick else 10**6
    rows = np.ascontiguousarray(np.resize(base, (max_rows, base.shape[1])), dtype=np.float32)
    sizes = [n for n in (1, 10, 100, 1000, 10**4, 10**5, 10**6) if n <= max_rows]

    print("== batch throughput, ONNX Runtime CPU vs scikit-learn (same rows) ==")
    batch = throughput(rows, sizes)
    if provider_probe.provider == "CUDAExecutionProvider":
        print("== batch throughput, ONNX Runtime CUDA ==")
        gpu = {"measured": True, "provider": provider_probe.provider,
               "batch_throughput": [{"batch_rows": n, "onnxruntime_rows_per_s":
                                     best_rate(lambda: provider_probe.predict_proba(rows[:n]), n)} for n in sizes]}
        print(json.dumps(gpu, indent=1))
    else:
        gpu = {"measured": False,
               "reason": "no usable GPU in this run: onnxruntime-gpu lists CUDAExecutionProvider, but a session "
                         f"asking for it ran on {provider_probe.provider}; GPU throughput was not measured"}
    print("== model-only latency in process ==")
    model_only = model_only_latency(rows, 300 if args.quick else 3000)
    print(json.dumps(model_only, indent=1))
    clients, per_client = (4, 10) if args.quick else (16, 60)
    print(f"== HTTP single-request latency, {clients} concurrent clients ==")
    http = [http_latency(rows, mb, clients, per_client, wait) for mb, wait in ((False, 0.0), (True, 2.0), (True, 0.0))]
    for h in http:
        print(f"micro_batching={h['micro_batching']} wait={h['max_wait_ms']}: concurrent p50 {h['concurrent']['p50_ms']:.2f} ms, "
              f"p99 {h['concurrent']['p99_ms']:.2f} ms, {h['concurrent']['requests_per_s']:.0f} req/s, "
              f"mean batch {h['server_metrics']['mean_batch_requests']:.2f} requests; "
              f"sequential p50 {h['sequential_single_client']['p50_ms']:.2f} ms")
    model_p50 = model_only["predictor_single_row"]["p50_ms"]
    http_p50 = http[0]["sequential_single_client"]["p50_ms"]
    summary = {
        "onnx_rows_per_s_at_1e6": next((b["onnxruntime_rows_per_s"] for b in batch if b["batch_rows"] == 10**6), None),
        "onnx_over_sklearn_ratio_by_batch": {str(b["batch_rows"]): round(b["ratio_onnx_over_sklearn"], 2)
                                             for b in batch},
        "http_p50_over_model_only_p50": http_p50 / model_p50,
        "model_share_of_http_latency": model_p50 / http_p50,
        "microbatching_2ms_p99_ratio_on_over_off": http[1]["concurrent"]["p99_ms"] / http[0]["concurrent"]["p99_ms"],
        "microbatching_2ms_throughput_ratio_on_over_off":
            http[1]["concurrent"]["requests_per_s"] / http[0]["concurrent"]["requests_per_s"],
        "microbatching_greedy_p99_ratio_on_over_off": http[2]["concurrent"]["p99_ms"] / http[0]["concurrent"]["p99_ms"],
        "microbatching_greedy_throughput_ratio_on_over_off":
            http[2]["concurrent"]["requests_per_s"] / http[0]["concurrent"]["requests_per_s"],
    }
    print(json.dumps(summary, indent=1))
    result = {
        "benchmark": "inference_bench", "quick": args.quick,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "model": {"name": entry.name, "version": entry.version, "sha256": entry.metadata["sha256"]},
        "provider": {"requested_default": list(provider_probe.requested), "actually_used_default": provider_probe.provider,
                     "cuda_fell_back_to_cpu": provider_probe.fell_back, "measured_with": "CPUExecutionProvider"},
        "gpu": gpu,
        "batch_throughput": batch, "model_only_latency": model_only, "http": http, "summary": summary,
    }
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
