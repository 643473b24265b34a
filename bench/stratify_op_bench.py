"""``ResearchStudy/tt-201/$stratify`` on the default demo (200 participants): where the time goes, before/after.

    .venv/bin/python bench/stratify_op_bench.py [--data-dir DIR] [--rounds 2]

Builds the default demo (``trialtwin demo``: 200 participants, seed 7) in ``--data-dir`` (reused when the
study is already there) and calls the operation in-process through the Flask test client, open mode, with
the defaults of the CLI (``persist=false`` so every call does the same work; a persisted call is timed once
at the end). One warm-up call first (imports, the Numba kernels' cache) is reported apart.

* baseline: the operation as it was: every fit (the participants' calibrations, the engine's mixtures)
  with the process's default BLAS/OpenMP threads (``inference.stratify.single_threaded_blas`` patched
  to a no-op for these calls);
* product: the operation as shipped (one BLAS thread while it calibrates and stratifies).
Baseline and product alternate, ``--rounds`` times each, in the same process. One cProfile run of each gives
the breakdown: the participants' twins (store reads, calibration, the rest), the engine (model choice,
bootstrap, rules) and the remainder, plus the top functions by own time. Writes
bench/results/stratify_op_bench.json and bench/results/stratify_op_profile-{before,after}.json.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import describe  # noqa: E402

from fhir_ops.commands.demo import DEFAULT_PARTICIPANTS, DEFAULT_SEED  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BODY = {"resourceType": "Parameters", "parameter": [{"name": "persist", "valueBoolean": False}]}
URL = "/fhir/ResearchStudy/tt-201/$stratify"
#: functions whose cumulative time makes the breakdown (file suffix, function name)
PARTS = {
    "handle": ("fhir_ops/operations/stratify.py", "handle"),
    "participant_twins": ("fhir_ops/operations/twin_common.py", "participant_twin"),
    "twins.load_participant": ("fhir_ops/mapping/participant.py", "load_participant"),
    "twins.calibrate_participant": ("inference/twin.py", "calibrate_participant"),
    "twins.read_state": ("fhir_ops/operations/twin_common.py", "read_state"),
    "engine.stratify": ("inference/stratify.py", "stratify"),
    "engine.select_strata": ("inference/stratify.py", "select_strata"),
    "engine.bootstrap_stability": ("inference/stratify.py", "bootstrap_stability"),
    "engine.stratum_rules": ("inference/stratify.py", "stratum_rules"),
    "persist": ("fhir_ops/operations/stratify.py", "_persist"),
}


@contextlib.contextmanager
def baseline():
    """The operation as before: every fit (calibrations, mixtures) with the process's default BLAS threads."""
    import inference.stratify as engine

    shipped = engine.single_threaded_blas
    engine.single_threaded_blas = contextlib.nullcontext
    try:
        yield
    finally:
        engine.single_threaded_blas = shipped


def call(client, body=BODY) -> tuple[float, int, dict]:
    started = time.perf_counter()
    r = client.post(URL, json=body, headers={"Content-Type": "application/fhir+json"})
    return time.perf_counter() - started, r.status_code, r.get_json()


def summary(body: dict) -> dict:
    """What both paths must agree on: strata, participants, BIC values."""
    p = {q["name"]: q for q in body.get("parameter", [])}
    return {"strata": p["strata"]["valueInteger"], "participants": p["participants"]["valueInteger"],
            "bic": [[x["valueInteger"] if "valueInteger" in x else x.get("valueDecimal") for x in q["part"]]
                    for q in body["parameter"] if q["name"] == "bic"]}


def profile(client, label: str) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    seconds, status, _ = call(client)
    prof.disable()
    stats = pstats.Stats(prof).stats
    cumulative = {}
    for key, (suffix, name) in PARTS.items():
        cumulative[key] = round(sum(v[3] for (f, _, n), v in stats.items() if f.endswith(suffix) and n == name), 3)
    twins = cumulative["participant_twins"]
    cumulative["twins.other"] = round(twins - cumulative["twins.load_participant"]
                                      - cumulative["twins.calibrate_participant"] - cumulative["twins.read_state"], 3)
    cumulative["rest_of_handle"] = round(cumulative["handle"] - twins - cumulative["engine.stratify"], 3)
    own = sorted(((v[2], f"{Path(f).name}:{line}({n})", v[1]) for (f, line, n), v in stats.items()), reverse=True)
    return {"label": label, "status": status, "wall_s_under_profiler": round(seconds, 3),
            "cumulative_s": cumulative,
            "share_of_handle": {k: round(v / cumulative["handle"], 3) for k, v in cumulative.items()
                                if cumulative["handle"]},
            "top_own_time": [{"function": name, "own_s": round(t, 3), "calls": calls} for t, name, calls in own[:15]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="where the demo store lives (default: a new temporary directory)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from fhir_ops.app import create_app, get_store
    from fhir_ops.demo import ensure_demo_study

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="stratify-op-")
    # a generous request budget: the baseline must finish to be measured (the server's default is 30 s)
    app = create_app({"DATA_DIR": data_dir, "AUTH_MODE": "open", "SUBSCRIPTIONS": False, "CLOSED_LOOP": False,
                      "REQUEST_TIME_BUDGET": 600})
    with app.app_context():
        started = time.perf_counter()
        loaded = ensure_demo_study(get_store(), participants=DEFAULT_PARTICIPANTS, seed=DEFAULT_SEED)
        load_s = time.perf_counter() - started
    client = app.test_client()
    warm_s, status, _ = call(client)
    assert status == 200, status
    runs = {"before": [], "after": []}
    answers = {}
    for _ in range(args.rounds):
        for label in ("before", "after"):
            with baseline() if label == "before" else contextlib.nullcontext():
                seconds, status, body = call(client)
            assert status == 200, (label, status)
            runs[label].append(round(seconds, 3))
            answers[label] = summary(body)
            print(f"{label}: {seconds:.2f} s", flush=True)
    assert answers["before"] == answers["after"], answers  # the same strata either way
    with baseline():
        before_profile = profile(client, "before")
    after_profile = profile(client, "after")
    persisted_s, status, body = call(client, {"resourceType": "Parameters"})
    assert status == 200, status
    best = {k: min(v) for k, v in runs.items()}
    result = {
        "benchmark": "ResearchStudy/tt-201/$stratify on the default demo, in-process (Flask test client)",
        "machine": describe(("numpy", "scipy", "scikit-learn", "threadpoolctl", "numba")),
        "demo": {"participants": DEFAULT_PARTICIPANTS, "seed": DEFAULT_SEED, "resources_loaded_now": loaded,
                 "load_s": round(load_s, 2)},
        "warm_up_call_s": round(warm_s, 3),
        "seconds": runs, "best_s": best, "speedup_best": round(best["before"] / best["after"], 2),
        "answer": answers["after"],
        "persisted_call_s": round(persisted_s, 3),
        "persisted_created": next((p["valueInteger"] for p in body["parameter"] if p["name"] == "created"), None),
        "profiles": ["stratify_op_profile-before.json", "stratify_op_profile-after.json"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stratify_op_profile-before.json").write_text(json.dumps(before_profile, indent=1) + "\n")
    (RESULTS / "stratify_op_profile-after.json").write_text(json.dumps(after_profile, indent=1) + "\n")
    (RESULTS / "stratify_op_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("best_s", "speedup_best", "warm_up_call_s", "persisted_call_s")}))
    print("before:", before_profile["cumulative_s"])
    print("after:", after_profile["cumulative_s"])


if __name__ == "__main__":
    main()
