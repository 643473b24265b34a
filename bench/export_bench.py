"""Bulk Data ``$export`` throughput (resources/s) against a plain scan of the same store in the same run.

Loads the demo study (``--participants``) into a fresh embedded store, then, ``--repeats`` times each:
the baseline reads every resource of every exported type through ``Store.search`` pages and serializes
it (what an export cannot do with less work); a system ``$export`` over HTTP from kick-off to manifest
(polling every 50 ms); and the same export de-identified with date shifting. Reports the median rate
of each and its ratio to the scan. Writes bench/results/export_bench.json with the machine description.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import requests  # noqa: E402

from _machine import describe  # noqa: E402
from fhir_ops import jobs  # noqa: E402
from fhir_ops.app import create_app, get_store  # noqa: E402
from fhir_ops.demo import ensure_demo_study  # noqa: E402
from tests.live_server import serve  # noqa: E402


def scan(store, types) -> int:
    n = 0
    for rtype in types:
        offset = 0
        while True:
            page = store.search(rtype, [("_count", "1000"), ("_offset", str(offset))])
            for resource in page.matches:
                orjson.dumps(resource)
            n += len(page.matches)
            offset += len(page.matches)
            if len(page.matches) < 1000:
                break
    return n


def export(base: str, query: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    resp = requests.get(f"{base}/$export{query}", headers={"Prefer": "respond-async"}, timeout=60)
    assert resp.status_code == 202, resp.text
    location = resp.headers["Content-Location"]
    while True:
        poll = requests.get(location, timeout=60)
        if poll.status_code != 202:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    assert poll.status_code == 200, poll.text
    count = sum(o["count"] for o in poll.json()["output"])
    requests.delete(location, timeout=60)  # removes the files
    return count, elapsed


def main() -> None:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per poll would swamp the output
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--participants", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "export_bench.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app({"AUTH_MODE": "open", "DATA_DIR": tmp,
                          "DEIDENTIFY_KEYS": {"default": "bench-key-0123456789abcdef"}})
        with app.app_context():
            store = get_store()
            loaded = ensure_demo_study(store, participants=args.participants, seed=7)
            types = sorted({t for t in ("Patient", "ResearchSubject", "ResearchStudy", "Consent", "Observation",
                                        "MedicationAdministration", "Appointment", "Encounter", "AdverseEvent",
                                        "Organization", "Location")})
        print(f"demo study: {args.participants} participants, {loaded} resources", flush=True)
        rates: dict[str, list[float]] = {"scan": [], "export": [], "export_deidentified_shift": []}
        counts: dict[str, int] = {}
        with serve(app) as root:
            base = root + "/fhir"
            export(base, "?_type=Patient")  # warm: routes, registry, job pool
            for r in range(args.repeats):
                with app.app_context():
                    t0 = time.perf_counter()
                    n = scan(get_store(), types)
                    rates["scan"].append(n / (time.perf_counter() - t0))
                    counts["scan"] = n
                n, s = export(base, "")
                rates["export"].append(n / s)
                counts["export"] = n
                n, s = export(base, "?_deidentify=shift")
                rates["export_deidentified_shift"].append(n / s)
                counts["export_deidentified_shift"] = n
                print(f"run {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()), flush=True)
        jobs.manager(app).shutdown()
        app.extensions["trialtwin.store"].close()
    median = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "benchmark": "export_bench", "participants": args.participants, "resources_in_store": loaded,
        "resources": counts, "repeats": args.repeats,
        "resources_per_s_median": {k: round(v) for k, v in median.items()},
        "ratio_to_scan": {k: round(v / median["scan"], 3) for k, v in median.items() if k != "scan"},
        "machine": describe(("numpy", "flask", "waitress", "orjson")),
        "notes": "scan = Store.search pages + orjson.dumps of every resource of the exported types, in-process; "
                 "export = HTTP kick-off to manifest (NDJSON files written, consent lookup, visibility check per "
                 "resource); the de-identified export walks every resource (Safe Harbor, date shift).",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("resources_per_s_median", "ratio_to_scan")}, indent=2))


if __name__ == "__main__":
    main()
