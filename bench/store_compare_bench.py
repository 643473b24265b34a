"""The same TrialTwin workload against the embedded store (baseline) and against HAPI FHIR, as ratios.

``trialtwin serve --store embedded|hapi`` runs as a subprocess; over its HTTP API: ingest of a seeded
TT-201 demo study in transaction Bundles, then K ``Patient/{id}/$simulate`` calls, K searches and K
``ConceptMap/$translate`` calls. Needs a running HAPI (scripts/hapi.sh start); writes
bench/results/store_compare_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import requests
from _server import wait_until_serving
from _machine import cpu_model, library_versions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FHIR_JSON = "application/fhir+json"
HEADERS = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
EDC_LAB = "https://trialtwin.org/fhir/CodeSystem/edc-lab"


def machine(hapi: dict) -> dict:
    cpu = cpu_model()
    versions = library_versions(("flask", "werkzeug", "waitress", "fhir.resources", "fhirpy", "requests", "numpy", "scipy"))
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        java = None
    return {"platform": platform.platform(), "cpu_model": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "libraries": versions, "java": java, "hapi": hapi,
            "load_average_at_end": os.getloadavg(),
            "shared": "2-core machine shared with other engineers' jobs and with the HAPI JVM; "
                      "timings include their interference"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_trialtwin(store: str, hapi_url: str, data_dir: str) -> tuple[subprocess.Popen, str]:
    """``trialtwin serve`` exactly as a user runs it (waitress, 8 threads), on a free loopback port."""
    port = free_port()
    # --auth open (loopback): the workload measures the stores, not token checks
    cmd = [sys.executable, "-m", "fhir_ops.cli", "serve", "--auth", "open", "--store", store, "--port", str(port),
           "--data-dir", data_dir]
    if store == "hapi":
        cmd += ["--hapi-url", hapi_url]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/fhir"
    wait_until_serving(proc, f"{base}/metadata", f"trialtwin serve --store {store}")
    return proc, base


def demo_bundles(participants: int, seed: int, tag: str, per_bundle: int) -> tuple[list[dict], list[str], int]:
    """The seeded demo study under ids unique to this run, as transaction Bundles of ~per_bundle entries."""
    from fhir_ops.demo import build_demo_resources, simulate_demo_records

    text = json.dumps(build_demo_resources(simulate_demo_records(seed=seed, n=participants)))
    # the study's model definition (Library tt201-twin) keeps its id and canonical: the server checks
    # that a model Library's url matches the definition it carries; every run PUTs the same one
    text = text.replace("tt201-twin", "\0model\0")
    text = text.replace('"tt201-', f'"{tag}-').replace("/tt201-", f"/{tag}-")
    text = text.replace("\0model\0", "tt201-twin")
    text = text.replace('"id": "tt-201"', f'"id": "{tag}-study"').replace('"ResearchStudy/tt-201"',
                                                                          f'"ResearchStudy/{tag}-study"')
    resources = json.loads(text)
    on_study = [r["individual"]["reference"].split("/")[1] for r in resources
                if r["resourceType"] == "ResearchSubject" and r["status"] == "on-study-intervention"]
    # study-level resources first (Patients are referenced by everything after them)
    order = {"Organization": 0, "Location": 1, "ResearchStudy": 2, "Patient": 3, "ResearchSubject": 4}
    resources.sort(key=lambda r: order.get(r["resourceType"], 9))
    entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]
    bundles = [{"resourceType": "Bundle", "type": "transaction", "entry": entries[i:i + per_bundle]}
               for i in range(0, len(entries), per_bundle)]
    return bundles, on_study, len(resources)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def stats(samples: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples)
    return {"n": len(ms), "p50_ms": round(ms[len(ms) // 2], 2), "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 2),
            "mean_ms": round(statistics.fmean(ms), 2), "total_s": round(sum(samples), 3)}


def run_workload(base: str, bundles: list[dict], on_study: list[str], k: int) -> dict:
    session = requests.Session()
    ingest = []
    for bundle in bundles:
        seconds, answer = timed(lambda: session.post(base, data=json.dumps(bundle), headers=HEADERS, timeout=600))
        if answer.status_code != 200:
            raise RuntimeError(f"ingest failed ({answer.status_code}): {answer.text[:500]}")
        ingest.append(seconds)
    simulate, medians = [], {}
    for i in range(k):
        pid = on_study[i % len(on_study)]
        body = {"resourceType": "Parameters", "parameter": [{"name": "seed", "valueInteger": 11},
                                                            {"name": "horizonDays", "valueInteger": 28}]}
        seconds, answer = timed(lambda: session.post(f"{base}/Patient/{pid}/$simulate", json=body, headers=HEADERS,
                                                     timeout=600))
        if answer.status_code != 200:
            raise RuntimeError(f"$simulate failed ({answer.status_code}): {answer.text[:500]}")
        simulate.append(seconds)
        medians[pid] = [next(q["valueDecimal"] for q in p["part"] if q["name"] == "median")
                        for p in answer.json()["parameter"] if p["name"] == "forecast"]
    search, translate = [], []
    for i in range(k):
        pid = on_study[i % len(on_study)]
        seconds, answer = timed(lambda: session.get(f"{base}/Observation", params={
            "subject": f"Patient/{pid}", "code": "http://loinc.org|4548-4"}, headers=HEADERS, timeout=120))
        assert answer.status_code == 200 and answer.json().get("entry"), answer.text[:300]
        search.append(seconds)
        seconds, answer = timed(lambda: session.get(f"{base}/ConceptMap/$translate", params={
            "system": EDC_LAB, "code": "LAB-HBA1C"}, headers=HEADERS, timeout=120))
        assert answer.status_code == 200, answer.text[:300]
        translate.append(seconds)
    session.close()
    return {"ingest": stats(ingest), "simulate": stats(simulate), "search": stats(search),
            "translate": stats(translate), "_medians": medians}


def main() -> None:
    default_hapi = os.environ.get("TRIALTWIN_HAPI_URL") or f"http://127.0.0.1:{os.environ.get('HAPI_PORT', '8090')}/fhir"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hapi-url", default=default_hapi)
    parser.add_argument("--participants", type=int, default=20, help="demo study size to ingest (default 20)")
    parser.add_argument("--calls", type=int, default=20, help="K: $simulate, search and $translate calls each")
    parser.add_argument("--bundle-size", type=int, default=500, help="entries per transaction Bundle")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "store_compare_bench.json"))
    args = parser.parse_args()

    capability = requests.get(f"{args.hapi_url}/metadata", headers=HEADERS, timeout=30).json()
    hapi = {"url": args.hapi_url, **{k: capability.get("software", {}).get(k) for k in ("name", "version")}}
    results = {}
    for store in ("embedded", "hapi"):
        tag = f"cmp{uuid.uuid4().hex[:8]}"  # fresh ids: HAPI keeps data between runs
        bundles, on_study, n_resources = demo_bundles(args.participants, 7, tag, args.bundle_size)
        with tempfile.TemporaryDirectory(prefix="store-compare-") as data_dir:
            proc, base = start_trialtwin(store, args.hapi_url, data_dir)
            try:
                # untimed warm-up on a separate small study: JIT (HAPI runs C1-only), caches, connections
                warm_bundles, warm_on_study, _ = demo_bundles(2, 3, f"warm{tag}", args.bundle_size)
                run_workload(base, warm_bundles, warm_on_study, 3)
                print(f"{store}: ingesting {n_resources} resources in {len(bundles)} Bundles, then "
                      f"{args.calls} x $simulate, search, $translate ...", flush=True)
                results[store] = run_workload(base, bundles, on_study, args.calls)
                results[store]["ingest"]["resources_per_s"] = round(n_resources / results[store]["ingest"]["total_s"], 1)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    emb, rem = results["embedded"], results["hapi"]
    # the same data and seed must give the same forecasts, or the timings compare different work
    assert list(emb["_medians"].values()) == list(rem["_medians"].values()), "forecasts differ between stores"
    for r in results.values():
        r.pop("_medians")
    ratios = {
        "ingest_time": round(rem["ingest"]["total_s"] / emb["ingest"]["total_s"], 2),
        "simulate_p50": round(rem["simulate"]["p50_ms"] / emb["simulate"]["p50_ms"], 2),
        "simulate_mean": round(rem["simulate"]["mean_ms"] / emb["simulate"]["mean_ms"], 2),
        "search_p50": round(rem["search"]["p50_ms"] / emb["search"]["p50_ms"], 2),
        "translate_p50": round(rem["translate"]["p50_ms"] / emb["translate"]["p50_ms"], 2),
    }
    report = {
        "benchmark": "store_compare_bench",
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(hapi),
        "setup": {"participants": args.participants, "resources": n_resources, "bundle_size": args.bundle_size,
                  "calls": args.calls, "server": "trialtwin serve --auth open (waitress, 8 threads) subprocess, loopback HTTP",
                  "simulate": "Patient/{id}/$simulate seed=11 horizonDays=28 persist=false, cycling over "
                              "on-study participants; identical forecasts on both stores checked",
                  "warm_up": "untimed: a separate 2-participant study ingested and 3 calls of each kind first",
                  "baseline": "the embedded SQLite store, same run, same workload"},
        "results": results,
        "ratios_hapi_over_embedded": ratios,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"ratios_hapi_over_embedded": ratios,
                      "embedded_ingest_per_s": emb["ingest"]["resources_per_s"],
                      "hapi_ingest_per_s": rem["ingest"]["resources_per_s"],
                      "simulate_p50_ms": {"embedded": emb["simulate"]["p50_ms"], "hapi": rem["simulate"]["p50_ms"]}},
                     indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
