"""Bulk load of 10^6 NDJSON lines, killed with SIGKILL at three points and resumed: exactly the unique resources.

Runs ``trialtwin load --workers N`` on a generated corpus (half the lines without an id, ~5 % exact
repeats), kills the whole process group after K stored batches three times, then lets a fourth run
finish; checks the store (count = unique resources, no duplicates, PRAGMA integrity_check) and
reports the load rate against a single-worker run of the first batches measured in the same run.
Writes bench/results/load_resume_bench.json with the machine description.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import describe  # noqa: E402
from tests.fhir_ops.load_crash import check_store, run_load, write_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kill-after", type=int, default=None,
                    help="stored batches per killed run (default: a quarter of the batches)")
    ap.add_argument("--baseline-lines", type=int, default=50_000,
                    help="lines loaded by one worker, the same-run baseline of the parallel rate")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load_resume_bench.json"))
    args = ap.parse_args()
    batches = -(-args.lines // args.batch_size)
    kill_after = args.kill_after or max(1, batches // 4)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        corpus = write_corpus(tmp / "bulk.ndjson", args.lines)
        print(f"{corpus.lines} lines, {corpus.unique} unique resources ({time.perf_counter() - t0:.0f} s to write)",
              flush=True)

        base = write_corpus(tmp / "base.ndjson", args.baseline_lines, seed=5)
        t0 = time.perf_counter()
        one = run_load(base.path, tmp / "base", workers=1, batch_size=args.batch_size, kill_after=None)
        one_s = time.perf_counter() - t0
        assert one["returncode"] == 0, one["stderr_tail"]
        t0 = time.perf_counter()
        par = run_load(base.path, tmp / "base-par", workers=args.workers, batch_size=args.batch_size,
                       kill_after=None)
        par_s = time.perf_counter() - t0
        assert par["returncode"] == 0, par["stderr_tail"]
        print(f"baseline {args.baseline_lines} lines: 1 worker {args.baseline_lines / one_s:,.0f} lines/s, "
              f"{args.workers} workers {args.baseline_lines / par_s:,.0f} lines/s", flush=True)

        runs = []
        t0 = time.perf_counter()
        for k in range(4):
            started = time.perf_counter()
            r = run_load(corpus.path, tmp / "data", workers=args.workers, batch_size=args.batch_size,
                         kill_after=None if k == 3 else kill_after, timeout_s=7200)
            r["seconds"] = round(time.perf_counter() - started, 1)
            runs.append({key: r[key] for key in ("returncode", "killed", "stored_batches", "skipped", "seconds")})
            print(runs[-1], flush=True)
        total_s = time.perf_counter() - t0
        check = check_store(tmp / "data" / "trialtwin.sqlite", corpus)
        print(check, flush=True)

    ok = (all(r["killed"] for r in runs[:3]) and runs[3]["returncode"] == 0 and check["integrity_check"] == "ok"
          and check["resources"] == corpus.unique and check["duplicate_keys"] == 0
          and check["explicit_ids_missing"] == 0 and check["idless_stored"] == check["idless_expected"])
    result = {
        "benchmark": "load_resume_bench",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": describe(("orjson", "fhir.resources", "pydantic")),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "setup": {"lines": args.lines, "unique_resources": corpus.unique, "batch_size": args.batch_size,
                  "workers": args.workers, "kill_after_stored_batches": kill_after},
        "runs": runs,
        "store": check,
        "all_checks_pass": ok,
        "wall_s_four_runs": round(total_s, 1),
        "lines_per_s_four_runs": round(args.lines / total_s, 1),
        "baseline": {"lines": args.baseline_lines, "one_worker_lines_per_s": round(args.baseline_lines / one_s, 1),
                     "parallel_lines_per_s": round(args.baseline_lines / par_s, 1),
                     "ratio_parallel_to_one_worker": round(one_s / par_s, 3)},
        "notes": ("Each run is `trialtwin load` as a process group (start-up included); a killed run is SIGKILLed "
                  "(workers too) after the given number of its progress lines. Rates include validation, "
                  "harmonization and indexing."),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}; all checks pass: {ok}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
