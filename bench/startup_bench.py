"""Benchmark: what a user waits for at start-up, #12 acceptance 6.

1. The first ``GET /fhir/metadata`` of a freshly started ``trialtwin serve`` process, against the same
   request answered warm (the baseline, same process). Before the CapabilityStatement was built at
   start-up, the first request built it (imports of every resource model and operation); the cost of
   that build, measured cold in a fresh interpreter, is reported for comparison.
2. ``trialtwin --help`` wall time against a bare interpreter start (``python -c pass``, the floor), and
   the modules ``-X importtime`` shows it importing (none of numpy, scipy, flask, onnxruntime).

Writes bench/results/startup_bench.json with the machine description.
"""
from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

RUNS = int(os.environ.get("RUNS", "5"))
HEAVY = ("numpy", "scipy", "flask", "onnxruntime", "sklearn", "fhir", "matplotlib")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_metadata() -> dict:
    """Start ``trialtwin serve``; once it prints that it runs, time the first and later /metadata."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen([sys.executable, "-m", "fhir_ops.cli", "serve", "--auth", "open", "--port", str(port),
                                 "--data-dir", data], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            started = time.perf_counter()
            for line in proc.stdout:  # "Press Ctrl+C to stop." comes after the socket is bound
                if "Press Ctrl+C" in line:
                    break
            else:
                raise RuntimeError("trialtwin serve exited before serving")
            startup_s = time.perf_counter() - started
            url = f"http://127.0.0.1:{port}/fhir/metadata"
            with requests.Session() as http:
                t0 = time.perf_counter()
                first = http.get(url, timeout=120)
                first_ms = (time.perf_counter() - t0) * 1e3
                assert first.status_code == 200 and first.json()["resourceType"] == "CapabilityStatement"
                warm = []
                for _ in range(RUNS):
                    t0 = time.perf_counter()
                    http.get(url, timeout=120).raise_for_status()
                    warm.append((time.perf_counter() - t0) * 1e3)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    # What the first request used to pay: building the statement lazily, in a fresh interpreter.
    lazy = subprocess.run([sys.executable, "-c", "import time\n"
                           "from flask import Flask\n"
                           "from fhir_ops import rest\n"
                           "app = Flask('probe')\n"
                           "app.config.update(AUTH_MODE='open')\n"
                           "t = time.perf_counter()\n"
                           "rest.capability_statement(app)\n"
                           "print((time.perf_counter() - t) * 1e3)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    build_ms = float(lazy.stdout.strip().splitlines()[-1]) if lazy.returncode == 0 else None
    warm_ms = statistics.median(warm)
    return {"serve_startup_s": startup_s, "first_metadata_ms": first_ms, "warm_metadata_ms_median": warm_ms,
            "first_over_warm": first_ms / warm_ms, "cold_build_ms_in_fresh_interpreter": build_ms,
            "acceptance_first_metadata_under_ms": 200, "passes": first_ms < 200}


def cli_help() -> dict:
    def wall(cmd) -> float:
        times = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True, timeout=120)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    floor = wall([sys.executable, "-c", "pass"])
    help_s = wall([sys.executable, "-m", "fhir_ops.cli", "--help"])
    serve_help_s = wall([sys.executable, "-m", "fhir_ops.cli", "serve", "--help"])
    trace = subprocess.run([sys.executable, "-X", "importtime", "-m", "fhir_ops.cli", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120).stderr
    imported = {m.group(1).strip().split(".")[0] for m in re.finditer(r"\|\s*\d+\s*\|\s*(\S+)", trace)}
    # cumulative time of the top-level imports (one space of indent in -X importtime's tree)
    cumulative_us = sum(int(m.group(1)) for m in re.finditer(r"import time:\s+\d+\s*\|\s*(\d+)\s*\| \S", trace))
    return {"help_s_median": help_s, "serve_help_s_median": serve_help_s, "python_floor_s_median": floor,
            "help_over_floor": help_s / floor, "heavy_modules_imported": sorted(imported & set(HEAVY)),
            "top_level_import_time_ms": cumulative_us / 1e3, "acceptance_help_under_s": 1.0,
            "passes": help_s < 1.0 and not (imported & set(HEAVY))}


def main() -> None:
    result = {"runs": RUNS, "metadata": first_metadata(), "cli_help": cli_help(),
              "machine": describe(("flask", "waitress", "numpy", "scipy", "fhir.resources"))}
    m, h = result["metadata"], result["cli_help"]
    print(f"serve start-up {m['serve_startup_s']:.1f} s; first GET /metadata {m['first_metadata_ms']:.1f} ms, "
          f"warm {m['warm_metadata_ms_median']:.1f} ms ({m['first_over_warm']:.1f}x); lazily built it cost "
          f"{m['cold_build_ms_in_fresh_interpreter']:.0f} ms")
    print(f"trialtwin --help {h['help_s_median'] * 1e3:.0f} ms, bare python {h['python_floor_s_median'] * 1e3:.0f} ms "
          f"({h['help_over_floor']:.1f}x); heavy imports: {h['heavy_modules_imported'] or 'none'}")
    out = ROOT / "bench" / "results" / "startup_bench.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
