"""Where one transaction's time goes: JSON parsing, harmonization, validation, index extraction, SQL, response.

Runs store_bench's transaction Bundles through the real Flask app in-process (werkzeug test client, so the
same request path as over HTTP minus the socket) with timers wrapped around each stage, then the same
Bundles over real loopback HTTP against a waitress server to get the transport's share. Times are CPU
seconds (so a busy shared machine does not inflate them). Writes
bench/results/write_profile[-LABEL].json with the machine description.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402
from _machine import describe  # noqa: E402
from store_bench import cpu_seconds, make_bundles, start_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPENT: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
_ACTIVE: list[str] = []


def _timed(stage: str, fn):
    """Wrap ``fn`` so its time is added to ``stage`` (exclusive of nested timed stages)."""

    def wrapper(*args, **kwargs):
        t0 = time.process_time()
        _ACTIVE.append(stage)
        nested_before = SPENT["_nested_" + stage]
        try:
            return fn(*args, **kwargs)
        finally:
            _ACTIVE.pop()
            dt = time.process_time() - t0
            inner = SPENT["_nested_" + stage] - nested_before
            SPENT[stage] += dt - inner
            CALLS[stage] += 1
            if _ACTIVE:  # the caller's stage excludes this time
                SPENT["_nested_" + _ACTIVE[-1]] += dt
    return wrapper


# (stage, module, attribute): every name the write path calls through a module global, so wrapping the
# global times every call. Missing attributes are skipped: the script runs on the code before and after.
HOOKS = [
    ("json parse (request body)", "fhir_ops.rest", "_json_body"),
    ("harmonization", "fhir_ops.rest", "harmonize_bundle"),
    ("store transaction (rest: bookkeeping, SQL outside flush)", "fhir_ops.store.sqlite.SQLiteStore",
     "transaction"),
    ("bundle entry parsing", "fhir_ops.store.sqlite", "parse_entries"),
    ("validation", "fhir_ops.store.sqlite", "validate_resource"),
    ("validation", "fhir_ops.store.sqlite", "validate_resources"),
    ("search-index extraction", "fhir_ops.store.sqlite", "index_rows"),
    ("search-index extraction", "fhir_ops.store.sqlite", "index_rows_many"),
    ("json serialize (stored resource)", "fhir_ops.store.sqlite", "_dumps"),
    ("reference rewriting (urn:uuid)", "fhir_ops.store.sqlite", "rewrite_references"),
    ("stored form (meta) + response entries", "fhir_ops.store.sqlite", "_stored"),
    ("stored form (meta) + response entries", "fhir_ops.store.sqlite", "response_entry"),
    ("SQL (executemany at flush)", "fhir_ops.store.sqlite._Tx", "flush"),
    ("response building (JSON)", "fhir_ops.rest", "fhir_response"),
]


_ORIGINALS: list[tuple] = []


def remove_hooks() -> None:
    """Put the original functions back (the cProfile pass must not time the timers)."""
    while _ORIGINALS:
        owner, attr, fn = _ORIGINALS.pop()
        setattr(owner, attr, fn)


def install_hooks() -> list[str]:
    import importlib

    installed = []
    for stage, module, attr in HOOKS:
        mod_name, _, cls = module.rpartition(".") if module.endswith(("Store", "_Tx")) else (module, "", "")
        owner = importlib.import_module(mod_name)
        if cls:
            owner = getattr(owner, cls)
        if hasattr(owner, attr):
            _ORIGINALS.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, _timed(stage, getattr(owner, attr)))
            installed.append(f"{module}.{attr}")
    return installed


def _commit(code_root: Path) -> str:
    """The commit of the profiled code: a `git archive` records it in its pax header, a checkout in git."""
    import subprocess

    marker = code_root / ".commit"
    if marker.exists():
        return marker.read_text().strip()
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code_root, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _tune_gc() -> None:
    """The server process's GC settings (fhir_ops.gc_tuning), where the profiled code has them."""
    try:
        from fhir_ops.gc_tuning import tune_for_serving
    except ImportError:
        return
    tune_for_serving()


def _cprofile(create_app, bundles, data_dir: str, n: int, top: int = 40) -> list[dict]:
    """The same in-process requests under cProfile: the functions with the most own (exclusive) time.

    Timed in CPU seconds of the process (a wall-clock profile charges preemption to whatever function runs).
    cProfile roughly doubles the cost of Python calls, so these shares overstate call-heavy code against
    C calls (SQLite, JSON); the stage timers above are the unbiased split, this list says which functions
    inside a stage to attack.
    """
    import cProfile
    import pstats

    app = create_app({"DATA_DIR": data_dir, "AUTH_MODE": "open"})
    client = app.test_client()
    with contextlib.suppress(Exception):
        client.get("/fhir/Patient?_count=0")
    prof = cProfile.Profile(time.process_time)  # CPU time: preemption on a shared machine is not charged
    prof.enable()
    for body, _ in bundles:
        r = client.post("/fhir", data=body, headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 200, r.get_data(as_text=True)[:500]
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values())
    rows = []
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]:
        where = filename
        for marker in ("/fhir_ops/", "/terminology/", "/smart_app/", "/site-packages/", "/lib/python3"):
            if marker in filename:
                where = filename[filename.index(marker) + 1:]
                break
        rows.append({"function": f"{where}:{line}({name})", "calls": ncalls,
                     "own_us_per_resource": round(tottime / n * 1e6, 2), "own_share": round(tottime / total, 4),
                     "cumulative_us_per_resource": round(cumtime / n * 1e6, 2)})
    print("cProfile, most own time:")
    for r in rows[:15]:
        print(f"  {r['own_us_per_resource']:7.1f} us/resource  {r['function']}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--observations", type=int, default=20_000)
    ap.add_argument("--per-patient", type=int, default=50)
    ap.add_argument("--bundle-patients", type=int, default=20)
    ap.add_argument("--label", default="", help="suffix of the result file, e.g. 'before'")
    ap.add_argument("--cprofile", action="store_true",
                    help="also run the in-process requests under cProfile (a third pass, fresh store) and record "
                         "the functions with the most own time")
    ap.add_argument("--code", default=None,
                    help="profile the code in this directory (e.g. a `git archive` of an earlier commit)")
    args = ap.parse_args()
    code_root = Path(args.code).resolve() if args.code else ROOT
    sys.path.insert(0, str(code_root))

    bundles = make_bundles(args.observations, args.per_patient, args.bundle_patients)
    n = sum(len(entries) for _, entries in bundles)
    print(f"{len(bundles)} bundles, {n} resources")

    with tempfile.TemporaryDirectory() as tmp:
        # 1. over real HTTP (waitress subprocess, as store_bench): the end-to-end time per resource
        proc, base = start_server(os.path.join(tmp, "http"), code_root)
        try:
            http = requests.Session()
            t0, c0, s0 = time.perf_counter(), time.process_time(), cpu_seconds(proc.pid)
            for body, _ in bundles:
                http.post(base, data=body, headers={"Content-Type": "application/fhir+json"},
                          timeout=600).raise_for_status()
            http_s = time.perf_counter() - t0
            client_cpu_s, server_cpu_s = time.process_time() - c0, cpu_seconds(proc.pid) - s0
        finally:
            proc.terminate()
            proc.wait(timeout=30)

        # 2. in-process with stage timers: the same requests through the WSGI app without a socket
        installed = install_hooks()
        import fhir_ops
        from fhir_ops.app import create_app

        print(f"profiling the code in {Path(fhir_ops.__file__).parent.parent}")

        app = create_app({"DATA_DIR": os.path.join(tmp, "inproc"), "AUTH_MODE": "open"})
        client = app.test_client()
        with contextlib.suppress(Exception):
            client.get("/fhir/Patient?_count=0")  # store and harmonizer created outside the timing
        _tune_gc()  # as the server process does
        SPENT.clear()
        CALLS.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        for body, _ in bundles:
            r = client.post("/fhir", data=body, headers={"Content-Type": "application/fhir+json"})
            assert r.status_code == 200, r.get_data(as_text=True)[:500]
        inproc_s, inproc_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        stages = {k: v for k, v in SPENT.items() if not k.startswith("_nested_")}
        remove_hooks()
        functions = _cprofile(create_app, bundles, os.path.join(tmp, "cprofile"), n) if args.cprofile else None

    accounted = sum(stages.values())
    stages["flask/werkzeug request handling (rest)"] = inproc_cpu_s - accounted
    stages["HTTP server side (socket, waitress)"] = max(0.0, server_cpu_s - inproc_cpu_s)
    stages["HTTP client (requests, in the client process)"] = client_cpu_s
    total = sum(stages.values())
    rows = {k: {"seconds": round(v, 3), "us_per_resource": round(v / n * 1e6, 2), "share": round(v / total, 4)}
            for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}
    for k, v in rows.items():
        print(f"{k:45s} {v['us_per_resource']:8.1f} us/resource  {100 * v['share']:5.1f} %")
    print(f"over HTTP: {n / http_s:,.0f} resources/s wall, {n / server_cpu_s:,.0f} per server CPU second; "
          f"in-process: {n / inproc_s:,.0f} resources/s wall, {n / inproc_cpu_s:,.0f} per CPU second")

    result = {
        "benchmark": "write_profile",
        "label": args.label,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": describe(("flask", "werkzeug", "waitress", "fhir.resources", "pydantic", "orjson")),
        "setup": {"resources": n, "bundles": len(bundles), "observations_per_patient": args.per_patient,
                  "timed_functions": installed, "code": args.code or "this tree",
                  "commit": _commit(code_root), "fhir_ops_from": str(Path(sys.modules["fhir_ops"].__file__).parent)},
        "http_resources_per_s": round(n / http_s, 1),
        "http_resources_per_server_cpu_s": round(n / server_cpu_s, 1),
        "in_process_resources_per_s": round(n / inproc_s, 1),
        "in_process_resources_per_cpu_s": round(n / inproc_cpu_s, 1),
        "stages": rows,
        **({"cprofile_top_functions": functions} if functions is not None else {}),
        "notes": ("Stage times are CPU seconds of the process (time.process_time: user + system), so other jobs "
                  "on a shared machine do not inflate them; they are exclusive (a stage nested inside another is "
                  "subtracted from its caller). 'store transaction' is what remains of SQLiteStore.transaction "
                  "after the nested stages (Python bookkeeping, BEGIN/COMMIT, per-entry reads); before the "
                  "batched flush existed, it also holds the per-resource SQL. 'HTTP server side' = the "
                  "waitress server's CPU time (/proc) in the HTTP run minus the in-process run's CPU time for the "
                  "same requests; 'HTTP client' = the requests client's CPU time. Timer overhead is included in "
                  "the in-process stages."),
    }
    name = "write_profile" + (f"-{args.label}" if args.label else "") + ".json"
    out = ROOT / "bench" / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
