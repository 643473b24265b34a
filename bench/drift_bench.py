"""Cost of drift monitoring on the inference service: the same loop-trained model served with and without
its drift reference (PSI binning of every batch), in the same run, as a throughput ratio.

Writes bench/results/drift_bench.json. Usage: python bench/drift_bench.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import describe  # noqa: E402
from inference import model_loop  # noqa: E402
from inference.model_loop import LoopRegistry, TrainingRows, train_candidate  # noqa: E402
from inference.registry import ModelRegistry  # noqa: E402
from inference.service import InferenceService  # noqa: E402
from inference.training.dropout import simulate_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "drift_bench.json"


def best_rate(fn, n_rows: int, reps: int) -> float:
    fn()  # warm-up (session creation, first window)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_rows / min(times)  # the least disturbed call on a shared machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    reps = 5 if args.quick else 20
    X, y = simulate_dataset(300, seed=11)
    times = np.random.default_rng(11).permutation(len(y)).astype(float)
    with tempfile.TemporaryDirectory() as tmp:
        monitored = Path(tmp) / "monitored"
        cand = train_candidate(LoopRegistry(monitored), model_loop.family("dropout"),
                               TrainingRows(X, y, times, times, tuple("p" for _ in y)))
        plain = Path(tmp) / "plain"
        plain.mkdir()
        stem = f"dropout-{cand.entry.version}"
        shutil.copy(monitored / f"{stem}.onnx", plain / f"{stem}.onnx")
        meta = json.loads((monitored / f"{stem}.json").read_text())
        meta.pop("drift_reference")
        (plain / f"{stem}.json").write_text(json.dumps(meta))
        rows = {}
        rng = np.random.default_rng(0)
        for n in (1, 100, 10_000, 100_000):
            batch = X[rng.integers(0, len(X), n)]
            rates = {}
            for label, directory in (("without_drift", plain), ("with_drift", monitored)):
                svc = InferenceService(ModelRegistry(directory), micro_batching=False, force_cpu=True)
                rates[label] = best_rate(lambda: svc.predict("dropout", batch), n, reps)
                svc.close()
            rows[str(n)] = {"rows_per_s_without_drift": rates["without_drift"],
                            "rows_per_s_with_drift": rates["with_drift"],
                            "ratio_with_to_without": rates["with_drift"] / rates["without_drift"]}
            print(f"batch {n:>6}: {rates['without_drift']:>12,.0f} rows/s without, {rates['with_drift']:>12,.0f} "
                  f"with drift monitoring (ratio {rows[str(n)]['ratio_with_to_without']:.3f})")
    out = {"benchmark": "drift monitoring overhead on InferenceService.predict (no micro-batching, CPU)",
           "baseline": "the same ONNX model registered without a drift reference, same run",
           "repetitions": reps, "batches": rows,
           "machine": describe(("numpy", "onnxruntime", "scikit-learn"),
                               note="shared 2-core development VM; the fastest of the repetitions is reported")}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
