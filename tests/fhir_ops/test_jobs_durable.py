"""Asynchronous jobs in SQLite beside the store: shared by server processes, kept across a restart.

Each server here is a separate operating-system process (``tests.fhir_ops.job_server``) on the
same data directory, talked to over real HTTP.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.api

ROOT = Path(__file__).resolve().parents[2]
ASYNC = {"Prefer": "respond-async"}


class Server:
    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fhir_ops.job_server", str(data_dir)],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        port = self.proc.stdout.readline().strip()  # blocks until the server listens (generous on CI)
        if not port:
            self.proc.kill()
            raise RuntimeError("job server did not start")
        self.base = f"http://127.0.0.1:{port}/fhir"

    def submit(self, block: bool) -> str:
        r = requests.get(f"{self.base}/$test-wait", params={"block": str(block).lower()}, headers=ASYNC,
                         timeout=30)
        assert r.status_code == 202, r.text
        return r.headers["Content-Location"].rsplit("/", 1)[1]

    def poll(self, job_id: str) -> requests.Response:
        return requests.get(f"{self.base}/_jobs/{job_id}", timeout=30)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


@pytest.fixture
def servers(tmp_path):
    started = []

    def start():
        server = Server(tmp_path)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


def until(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_two_processes_share_jobs_results_progress_and_cancel(servers, tmp_path):
    a, b = servers(), servers()
    done = a.submit(block=False)
    result = until(lambda: (r := b.poll(done)).status_code == 200 and r)
    assert result.json()["parameter"] == [{"name": "pid", "valueInteger": a.proc.pid}]

    running = a.submit(block=True)
    progress = until(lambda: (r := b.poll(running)).headers.get("X-Progress") == "50%: waiting" and r)
    assert progress.status_code == 202
    # cancelled through the other process: the worker in A notices at its next heartbeat
    assert requests.delete(f"{b.base}/_jobs/{running}", timeout=30).status_code == 202
    until(lambda: (tmp_path / "stopped").exists())
    assert a.poll(running).status_code == 404


def test_finished_results_survive_a_restart_and_lost_jobs_fail(servers, tmp_path):
    a = servers()
    done = a.submit(block=False)
    until(lambda: a.poll(done).status_code == 200)
    lost = a.submit(block=True)
    until(lambda: a.poll(lost).headers.get("X-Progress") == "50%: waiting")
    a.stop(signal.SIGKILL)  # a crash: nothing is written on the way out

    again = servers()
    kept = again.poll(done)
    assert kept.status_code == 200
    assert kept.json()["parameter"] == [{"name": "pid", "valueInteger": a.proc.pid}]
    failed = again.poll(lost)
    assert failed.status_code == 500
    assert failed.headers["Content-Type"].startswith("application/fhir+json")
    issue = failed.json()["issue"][0]
    assert issue["code"] == "incomplete"
    assert issue["details"]["coding"][0]["code"] == "job-lost"
    assert "submit it again" in issue["diagnostics"]
    # the lost job is not resumed behind the client's back
    (tmp_path / "release").touch()
    time.sleep(0.5)
    assert again.poll(lost).status_code == 500
    # both are Tasks (JOB_TASKS): the finished one written by the process that ran it, the lost one by
    # the process that found it lost
    finished = requests.get(f"{again.base}/Task/job-{done}", timeout=30).json()
    assert (finished["status"], finished["businessStatus"]["text"]) == ("completed", "HTTP 200")
    gone = requests.get(f"{again.base}/Task/job-{lost}", timeout=30).json()
    assert gone["status"] == "failed" and "did not finish" in gone["statusReason"]["text"], gone
    assert gone["output"][0]["valueUrl"].endswith(f"/_jobs/{lost}")


def test_jobs_database_lives_beside_the_store(servers, tmp_path):
    a = servers()
    a.submit(block=False)
    assert (tmp_path / "trialtwin-jobs.sqlite").exists()
    assert (tmp_path / "trialtwin.sqlite").exists()
