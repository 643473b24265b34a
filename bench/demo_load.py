"""Benchmark: generating and loading the TT-201 demo study into the embedded store.

Measures simulation, FHIR building and loading in transactions of 2000 PUTs (what ``trialtwin demo``
does) against a baseline of one ``store.update`` per resource, in the same run; writes
bench/results/demo_load.json with the machine description.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fhir_ops import demo  # noqa: E402
from fhir_ops.store.sqlite import SQLiteStore  # noqa: E402
from _machine import cpu_model


def machine() -> dict:
    cpu = cpu_model()
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(),
            "libraries": {name: version(name) for name in ("numpy", "fhir.resources", "flask")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--participants", type=int, default=200)
    parser.add_argument("--baseline-participants", type=int, default=40,
                        help="participants loaded one resource at a time (the slow baseline)")
    args = parser.parse_args()

    started = time.perf_counter()
    records = demo.simulate_demo_records(seed=7, n=args.participants)
    simulated = time.perf_counter()
    resources = demo.build_demo_resources(records)
    built = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(os.path.join(tmp, "tx.sqlite"))
        t0 = time.perf_counter()
        for bundle in demo.demo_transactions(resources, 2000):
            store.transaction(bundle)
        tx_s = time.perf_counter() - t0
        store.close()

        few = demo.build_demo_resources(demo.simulate_demo_records(seed=7, n=args.baseline_participants))
        store = SQLiteStore(os.path.join(tmp, "one.sqlite"))
        t0 = time.perf_counter()
        for resource in few:
            store.update(resource["resourceType"], resource["id"], resource)
        one_s = time.perf_counter() - t0
        store.close()

    tx_rate = len(resources) / tx_s
    one_rate = len(few) / one_s
    result = {
        "benchmark": "demo_load",
        "participants": args.participants,
        "resources": len(resources),
        "simulate_s": round(simulated - started, 3),
        "build_fhir_s": round(built - simulated, 3),
        "transaction_load_s": round(tx_s, 3),
        "transaction_resources_per_s": round(tx_rate),
        "baseline": {"what": "one store.update per resource", "resources": len(few),
                     "seconds": round(one_s, 3), "resources_per_s": round(one_rate)},
        "ratio_transaction_vs_baseline": round(tx_rate / one_rate, 2),
        "machine": machine(),
    }
    print(f"simulate {result['simulate_s']} s, build {result['build_fhir_s']} s, "
          f"load {len(resources)} resources in {tx_s:.2f} s = {tx_rate:.0f}/s in transactions; "
          f"baseline one-by-one {one_rate:.0f}/s; ratio {tx_rate / one_rate:.1f}x")
    out = Path(__file__).resolve().parent / "results" / "demo_load.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
