"""Read and search latency with CPython's default GC settings vs the server's (fhir_ops.gc_tuning), A/B in one process.

store_bench's HTTP latencies on a busy shared machine move by 2x between runs, so this isolates the one
process-wide change: the same app, the same stored data, the same requests, the two settings alternating
in blocks (ABBAAB...), CPU time per request. Writes bench/results/gc_latency_ab.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import describe  # noqa: E402
from store_bench import CODES, LOINC, make_bundles  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--observations", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-block", type=int, default=40)
    args = ap.parse_args()

    from fhir_ops.app import create_app
    from fhir_ops.gc_tuning import tune_for_serving

    bundles = make_bundles(args.observations, 50, 20)
    with tempfile.TemporaryDirectory() as tmp:
        client = create_app({"DATA_DIR": tmp, "AUTH_MODE": "open"}).test_client()
        patients, observations = [], []
        for body, _ in bundles:
            r = client.post("/fhir", data=body, headers={"Content-Type": "application/fhir+json"})
            assert r.status_code == 200, r.get_data(as_text=True)[:300]
            for e in r.get_json()["entry"]:
                rtype, rid = e["response"]["location"].split("/")[:2]
                (patients if rtype == "Patient" else observations).append(rid)
        rng = random.Random(3)
        queries = {
            "read": lambda: f"/fhir/Observation/{rng.choice(observations)}",
            "search_code": lambda: f"/fhir/Observation?code={LOINC}|{rng.choice(CODES)[0]}",
            "search_subject": lambda: f"/fhir/Observation?subject=Patient/{rng.choice(patients)}",
            "search_combined": lambda: (f"/fhir/Observation?patient={rng.choice(patients)}&code={LOINC}|"
                                        f"{rng.choice(CODES)[0]}&date=ge2024-03-01&date=lt2024-09-01"),
        }
        samples = {name: {"default": [], "tuned": []} for name in queries}
        default_threshold = gc.get_threshold()
        for rnd in range(args.rounds):
            for mode in (("default", "tuned") if rnd % 2 == 0 else ("tuned", "default")):
                if mode == "tuned":
                    tune_for_serving()
                else:
                    gc.unfreeze()
                    gc.set_threshold(*default_threshold)
                for name, url in queries.items():
                    for _ in range(args.per_block):
                        u = url()
                        t0 = time.process_time()
                        r = client.get(u)
                        samples[name][mode].append(time.process_time() - t0)
                        assert r.status_code == 200
        gc.unfreeze()
        gc.set_threshold(*default_threshold)

    rows = {}
    for name, by_mode in samples.items():
        rows[name] = {mode: {"n": len(v), "p50_cpu_ms": round(pct(v, 0.5) * 1e3, 3),
                             "p99_cpu_ms": round(pct(v, 0.99) * 1e3, 3),
                             "mean_cpu_ms": round(statistics.fmean(v) * 1e3, 3)} for mode, v in by_mode.items()}
        rows[name]["tuned_over_default_mean"] = round(rows[name]["tuned"]["mean_cpu_ms"]
                                                      / rows[name]["default"]["mean_cpu_ms"], 3)
        print(f"{name:16s} mean CPU ms default {rows[name]['default']['mean_cpu_ms']:.2f}  tuned "
              f"{rows[name]['tuned']['mean_cpu_ms']:.2f}  (tuned/default {rows[name]['tuned_over_default_mean']:.2f}); "
              f"p99 {rows[name]['default']['p99_cpu_ms']:.2f} vs {rows[name]['tuned']['p99_cpu_ms']:.2f}")
    result = {
        "benchmark": "gc_latency_ab",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": describe(("flask", "werkzeug", "orjson")),
        "setup": {"observations": args.observations, "resources": sum(len(e) for _, e in bundles),
                  "rounds": args.rounds, "requests_per_block": args.per_block,
                  "how": "in-process Flask test client; blocks of each query kind alternate between CPython's default "
                         "GC settings and fhir_ops.gc_tuning.tune_for_serving (ABBA order); CPU seconds per request"},
        "latency": rows,
    }
    out = ROOT / "bench" / "results" / "gc_latency_ab.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
