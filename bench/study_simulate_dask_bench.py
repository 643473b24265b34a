"""Study-level ``$simulate`` throughput over real HTTP: in process, and on a Dask LocalCluster of 1 and 2 workers.

Each configuration is a real ``trialtwin serve`` process (``--dask-scheduler`` for the cluster
runs) answering ``POST ResearchStudy/{id}/$simulate`` with ``virtualParticipants`` (default 20,000
virtual participants x 365 days, three arms). Baseline: the in-process server in the same run.
Wall time of the whole HTTP call, best of 2 (seeds 1 and 2: Dask keeps results of identical tasks
while their futures live), cluster and server start-up excluded; the seed-1 answers of every
configuration must be identical. Writes bench/results/study_simulate_dask_bench.json.
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import requests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import describe  # noqa: E402
from _server import wait_until_serving  # noqa: E402

HEADERS = {"Content-Type": "application/fhir+json"}
STUDY = {"resourceType": "ResearchStudy", "id": "bench-study", "status": "active",
         "arm": [{"name": "placebo"}, {"name": "50 mg"}, {"name": "100 mg"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(n: int, days: int, seed: int) -> dict:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "virtualParticipants", "valueInteger": n}, {"name": "horizonDays", "valueInteger": days},
        {"name": "stepHours", "valueInteger": 168}, {"name": "seed", "valueInteger": seed}]}


def run_server(data_dir: str, scheduler: str | None, n: int, days: int) -> tuple[list[float], dict]:
    """Start ``trialtwin serve``, time two study simulations, stop it; (seconds per run, seed-1 answer)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "fhir_ops.cli", "serve", "--auth", "open", "--port", str(port),
           "--data-dir", data_dir] + (["--dask-scheduler", scheduler] if scheduler else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        wait_until_serving(proc, f"{base}/metadata", "trialtwin serve")
        requests.put(f"{base}/ResearchStudy/{STUDY['id']}", json=STUDY, headers=HEADERS, timeout=60).raise_for_status()
        url = f"{base}/ResearchStudy/{STUDY['id']}/$simulate"
        requests.post(url, json=_body(3000, 28, 99), headers=HEADERS, timeout=600).raise_for_status()  # warm-up
        seconds, first = [], None
        for seed in (1, 2):
            start = time.perf_counter()
            resp = requests.post(url, json=_body(n, days, seed), headers=HEADERS, timeout=1800)
            seconds.append(time.perf_counter() - start)
            resp.raise_for_status()
            first = first or resp.json()
        return seconds, first
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl+C: the server closes its Dask client on the way out
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    from distributed import LocalCluster

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "study_simulate_dask_bench.json"))
    args = ap.parse_args()
    years = args.n * args.days / 365.0
    with tempfile.TemporaryDirectory() as tmp:
        local_runs, local = run_server(os.path.join(tmp, "in-process"), None, args.n, args.days)
        local_s = min(local_runs)
        results = {"machine": describe(("numpy", "dask", "distributed", "waitress")),
                   "operation": "POST ResearchStudy/{id}/$simulate (virtualParticipants, 3 arms, stepHours 168)",
                   "participants": args.n, "days": args.days,
                   "baseline": "the same call on a trialtwin serve process without --dask-scheduler, same run",
                   "timing": "wall time of the HTTP call, best of 2 (seeds 1 and 2); server and cluster start-up "
                             "excluded; one warm-up call first",
                   "in_process": {"seconds": local_s, "participant_years_per_s": years / local_s}, "dask": {}}
        print(f"in process: {years / local_s:,.0f} participant-years/s ({local_s:.2f} s)")
        for workers in args.workers:
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster:
                cluster.wait_for_workers(workers)
                runs, remote = run_server(os.path.join(tmp, f"dask-{workers}"), cluster.scheduler_address,
                                          args.n, args.days)
            seconds = min(runs)
            same = remote == local
            results["dask"][f"{workers}_workers"] = {
                "seconds": seconds, "participant_years_per_s": years / seconds,
                "ratio_to_in_process": local_s / seconds, "identical_to_in_process": same}
            print(f"{workers} worker(s): {years / seconds:,.0f} participant-years/s ({seconds:.2f} s, "
                  f"x{local_s / seconds:.2f} in-process), identical: {same}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
