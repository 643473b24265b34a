"""Benchmark: what the audit trail costs per request (issue #19), over real HTTP.

Baseline: the same FHIR app and demo data with ``AUDIT=off``, measured in the same run, the two servers
taking turns in rounds so that drift of a busy machine hits both alike. Open mode on both (no token
check), so the ratio is the audit's share of the cheapest requests the server answers. The journal is
drained into AuditEvent resources after responses (every 64 records), and that work is inside the
timing of the requests that follow it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fhir_ops.app import create_app  # noqa: E402
from fhir_ops.commands.demo import create_demo  # noqa: E402
from tests.live_server import serve  # noqa: E402
from _machine import cpu_model  # noqa: E402

PATIENT = "tt201-p003"
FHIR_JSON = "application/fhir+json"


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _observation(value: float) -> dict:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "subject": {"reference": f"Patient/{PATIENT}"},
            "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}


def cases(base: str, obs_id: str) -> dict:
    """label -> a function making one request (the same requests against either server)."""
    return {
        "read Patient": lambda http: http.get(f"{base}/Patient/{PATIENT}"),
        "search Observation of one patient (_count=20)": lambda http: http.get(
            f"{base}/Observation", params={"subject": f"Patient/{PATIENT}", "_count": 20}),
        "create Observation": lambda http: http.post(f"{base}/Observation", json=_observation(7.0),
                                                     headers={"Content-Type": FHIR_JSON}),
        "update Observation": lambda http: http.put(f"{base}/Observation/{obs_id}",
                                                    json={**_observation(7.2), "id": obs_id},
                                                    headers={"Content-Type": FHIR_JSON}),
        "operation Patient/$validate": lambda http: http.get(f"{base}/Patient/{PATIENT}/$validate"),
        "refused (404 unknown id)": lambda http: http.get(f"{base}/Observation/no-such-id"),
    }


def timed(fn, http, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        response = fn(http)
        out.append((time.perf_counter() - started) * 1000)
        assert response.status_code < 500, response.text[:300]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=15, help="requests per case per round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--participants", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    results: dict = {"machine": machine(), "participants": args.participants, "n_per_round": args.n,
                     "rounds": args.rounds, "baseline": "AUDIT=off, same demo data, same process, alternating rounds"}
    with tempfile.TemporaryDirectory() as tmp:
        seed_dir = Path(tmp) / "seed"
        create_demo({"DATA_DIR": str(seed_dir)}, args.participants, 5)
        servers = {}
        for mode in ("off", "on"):
            shutil.copytree(seed_dir, Path(tmp) / mode)
            servers[mode] = create_app({"DATA_DIR": str(Path(tmp) / mode), "AUTH_MODE": "open", "AUDIT": mode})
        with serve(servers["off"]) as off_base, serve(servers["on"]) as on_base:
            bases = {"off": off_base + "/fhir", "on": on_base + "/fhir"}
            sessions = {mode: requests.Session() for mode in bases}
            plans = {}
            for mode, base in bases.items():
                obs = sessions[mode].post(f"{base}/Observation", json=_observation(7.1),
                                          headers={"Content-Type": FHIR_JSON}).json()["id"]
                plans[mode] = cases(base, obs)
                for fn in plans[mode].values():  # warm-up
                    timed(fn, sessions[mode], 5)
            samples = {label: {"off": [], "on": []} for label in plans["off"]}
            for i in range(args.rounds):
                for label in samples:
                    # alternate which server goes first, so a burst of outside load hits both alike
                    for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                        samples[label][mode] += timed(plans[mode][label], sessions[mode], args.n)
            totals = {"off": 0.0, "on": 0.0}
            for label, by_mode in samples.items():
                row = {mode: {"median_ms": round(statistics.median(v), 3),
                              "mean_ms": round(statistics.fmean(v), 3)} for mode, v in by_mode.items()}
                row["ratio_median"] = round(row["on"]["median_ms"] / row["off"]["median_ms"], 3)
                row["overhead_median_ms"] = round(row["on"]["median_ms"] - row["off"]["median_ms"], 3)
                results[label] = row
                for mode in totals:
                    totals[mode] += statistics.fmean(by_mode[mode])
                print(f"{label}: off {row['off']['median_ms']:.2f} ms, on {row['on']['median_ms']:.2f} ms "
                      f"(x{row['ratio_median']}, +{row['overhead_median_ms']:.2f} ms)")
            results["mix (mean of the cases' means)"] = {
                "off_ms": round(totals["off"] / len(samples), 3), "on_ms": round(totals["on"] / len(samples), 3),
                "ratio": round(totals["on"] / totals["off"], 3)}
            print(f"mix of the cases: x{round(totals['on'] / totals['off'], 3)}")
            recorder = servers["on"].extensions["trialtwin.audit"]
            started = time.perf_counter()
            drained = recorder.drain()
            results["final drain"] = {"records": drained, "ms": round((time.perf_counter() - started) * 1000, 1)}
            records = servers["on"].extensions["trialtwin.store"].audit_journal(0, 10**7)
            results["audit records written"] = len(records)
        for app in servers.values():
            app.extensions["trialtwin.store"].close()
    out = Path(__file__).parent / "results" / "audit_bench.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
