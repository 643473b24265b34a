"""Benchmark: the seeded bad-input run of issue #11 (acceptance 3) on the demo data ``trialtwin demo`` creates.

The CI test (tests/smart_app/test_bad_input_fuzz.py) sends its 5,200 cases to a 6-participant demo, where
the slowest answer is far below the 5 s bound. This script sends the same cases (same generator, same
seed) to that small demo (the baseline, in the same process) and to the default demo of 200 participants
(about 41,000 resources), each served as ``trialtwin serve --auth smart`` with the 4 s request budget of
the test, and records per run: status classes, 5xx answers, answers over 5 s with their routes, and
latency percentiles; the ratio of the default demo's percentiles to the small demo's. The clinician
app's study page, which the run sends signed out only (signed in, its cost is its per-arm simulation
and figures, whatever the input), is timed signed in, three times per demo.

    .venv/bin/python bench/bad_input_bench.py [--cases 5200] [--out bench/results/bad_input_bench.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import describe  # noqa: E402
from fhir_ops.commands.demo import DEFAULT_PARTICIPANTS, DEFAULT_SEED  # noqa: E402
from tests.smart_app.conftest import DEMO_PARTICIPANTS, combined_server  # noqa: E402
from tests.smart_app.test_bad_input_fuzz import CASES, MAX_SECONDS, SEED, _app_session, run_bad_input  # noqa: E402


class _TmpDirs:
    """The one method of pytest's tmp_path_factory that combined_server uses."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=name, dir=self.root))


def _route_of(label: str) -> str:
    """``POST /fhir/ResearchStudy/tt-201/$stratify?...`` -> ``POST /fhir/ResearchStudy/tt-201/$stratify``."""
    return label.split("?", 1)[0]


def one_run(root: Path, participants: int, seed: int, cases: int) -> dict:
    server = combined_server(_TmpDirs(root), participants, seed, REQUEST_TIME_BUDGET=4.0)
    combined = next(server)
    try:
        run = run_bad_input(combined, cases, SEED)
        # the one page the run sends signed out only: its cost does not depend on the input, so timed apart
        session, _ = _app_session(combined)
        study_page = []
        for _ in range(3):
            started = time.perf_counter()
            assert session.get(f"{combined.base}/app/study/tt-201", timeout=300).status_code == 200
            study_page.append(round(time.perf_counter() - started, 2))
    finally:
        next(server, None)  # past the yield: the server stops and its store closes
    seconds = sorted(t for t, _, _ in run["timings"])
    over = [(round(t, 2), _route_of(label), status) for t, label, status in run["timings"] if t > MAX_SECONDS]
    fives = [(round(t, 2), _route_of(label), status) for t, label, status in run["timings"] if status >= 500]
    by_route: dict[str, int] = {}
    for _, route, _ in over + fives:
        by_route[route] = by_route.get(route, 0) + 1
    pct = {f"p{q}": round(seconds[min(len(seconds) - 1, int(q / 100 * len(seconds)))], 4) for q in (50, 90, 99)}
    return {"participants": participants, "demo_seed": seed, "cases": cases, "statuses": run["statuses"],
            "answers_5xx": len(fives), "answers_over_5s": len(over), "max_s": round(seconds[-1], 3), **pct,
            "slowest": [(round(t, 2), label[:140], status) for t, label, status in run["timings"][:10]],
            "over_5s_or_5xx_by_route": dict(sorted(by_route.items(), key=lambda kv: -kv[1])),
            "signed_in_study_page_s": study_page,
            "routes_reached": f"{len(run['reached'] & run['routes'])}/{len(run['routes'])}",
            "operations_reached": f"{len(run['operations'] & run['registered'])}/{len(run['registered'])}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=CASES)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bad_input_bench.json"))
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bad-input-bench-") as tmp:
        small = one_run(Path(tmp), DEMO_PARTICIPANTS, 5, args.cases)
        print(json.dumps(small, indent=1), flush=True)
        demo = one_run(Path(tmp), DEFAULT_PARTICIPANTS, DEFAULT_SEED, args.cases)
        print(json.dumps(demo, indent=1), flush=True)
    ratios = {k: round(demo[k] / small[k], 2) if small[k] else None for k in ("p50", "p90", "p99", "max_s")}
    result = {"benchmark": "bad_input_bench", "seed": SEED, "bound_s": MAX_SECONDS, "request_budget_s": 4.0,
              "baseline_small_demo": small, "default_demo": demo, "ratio_default_to_small": ratios,
              "machine": describe(("flask", "werkzeug", "requests", "numpy", "scipy"))}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"ratios default/small demo: {ratios}; written to {args.out}")


if __name__ == "__main__":
    main()
