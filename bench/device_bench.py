"""Device readings: 10^5 readings (1 % duplicates, 5 % out of order) through Observation/$ingest-readings.

Checks that exactly the unique readings are stored, and measures per batch the latency from receipt
(the request sent) to searchable (a search finds the batch's last reading), p50 / p99. Baseline in the
same run: the same unique readings POSTed as plain transaction Bundles (no dedupe, no harmonization)
to a second fresh server, i.e. the store's write cost alone.

Run: python bench/device_bench.py [--readings 100000 --batch 1000] -> bench/results/device_bench.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import describe  # noqa: E402

from fhir_ops.app import create_app  # noqa: E402
from tests.app_config import open_config  # noqa: E402
from tests.fhir_ops.conftest import FhirClient  # noqa: E402
from tests.fhir_ops.operations.test_ingest_readings import stream  # noqa: E402
from tests.live_server import serve  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "device_bench.json"


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_ingest(fhir: FhirClient, readings: list[dict], batch: int) -> dict:
    latencies, stored, duplicates = [], 0, 0
    t_all = time.perf_counter()
    for start in range(0, len(readings), batch):
        chunk = readings[start:start + batch]
        body = {"resourceType": "Parameters", "parameter": [{"name": "readings", "resource": {
            "resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in chunk]}}]}
        t0 = time.perf_counter()
        resp = fhir.post("Observation/$ingest-readings", body)
        assert resp.status_code == 200, resp.text[:500]
        last = chunk[-1]
        found = fhir.get(f"Observation?_summary=count&date={last['effectiveDateTime']}"
                         f"&subject={last['subject']['reference']}").json()["total"]
        latencies.append(time.perf_counter() - t0)
        assert found >= 1
        out = {p["name"]: p.get("valueInteger") for p in resp.json()["parameter"]}
        stored += out["stored"]
        duplicates += out["duplicates"]
    elapsed = time.perf_counter() - t_all
    return {"seconds": elapsed, "readings_per_s": len(readings) / elapsed, "stored": stored, "duplicates": duplicates,
            "batch_latency_ms": {"p50": 1e3 * percentile(latencies, 0.5), "p99": 1e3 * percentile(latencies, 0.99),
                                 "max": 1e3 * max(latencies)}}


def run_baseline(fhir: FhirClient, readings: list[dict], batch: int) -> dict:
    t_all = time.perf_counter()
    for start in range(0, len(readings), batch):
        resp = fhir.transaction([{"resource": r, "request": {"method": "POST", "url": "Observation"}}
                                 for r in readings[start:start + batch]])
        assert resp.status_code == 200, resp.text[:500]
    elapsed = time.perf_counter() - t_all
    return {"seconds": elapsed, "readings_per_s": len(readings) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request would dominate the run
    readings, unique = stream(args.readings)
    seen, uniques = set(), []
    for r in readings:
        key = (r["device"]["reference"], r["effectiveDateTime"])
        if key not in seen:
            seen.add(key)
            uniques.append(r)
    results = {}
    for name in ("baseline", "ingest"):
        app = create_app(open_config(DATA_DIR=tempfile.mkdtemp(prefix=f"devbench-{name}-")))
        with serve(app) as base:
            fhir = FhirClient(base + "/fhir")
            if name == "baseline":
                results[name] = run_baseline(fhir, uniques, args.batch)
            else:
                results[name] = run_ingest(fhir, readings, args.batch)
                results[name]["count_in_store"] = fhir.get("Observation?_summary=count").json()["total"]
        app.extensions["trialtwin.store"].close()
    ing = results["ingest"]
    result = {
        "what": f"{len(readings)} device readings ({unique} unique; 1 % duplicates, 5 % out of order) in batches of "
                f"{args.batch} through Observation/$ingest-readings over HTTP, vs the unique readings as plain "
                "transaction Bundles",
        "machine": describe(("orjson",), note="shared development VM (2 cores, ~8 engineers at work)"),
        "readings_sent": len(readings), "unique": unique, **results,
        "exactly_unique_stored": ing["stored"] == unique == ing["count_in_store"],
        "ratio_ingest_to_baseline_throughput": ing["readings_per_s"] / results["baseline"]["readings_per_s"],
    }
    print(f"baseline: {results['baseline']['readings_per_s']:.0f} readings/s as plain transactions")
    print(f"ingest: {ing['readings_per_s']:.0f} readings/s ({result['ratio_ingest_to_baseline_throughput']:.2f}x), "
          f"receipt->searchable per batch of {args.batch}: p50 {ing['batch_latency_ms']['p50']:.0f} ms, "
          f"p99 {ing['batch_latency_ms']['p99']:.0f} ms")
    print(f"stored {ing['stored']} (store holds {ing['count_in_store']}) of {unique} unique: "
          f"exact = {result['exactly_unique_stored']}")
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
