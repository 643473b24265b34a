"""Asynchronous ``$simulate`` jobs shared by two real ``trialtwin serve`` processes on one data directory,
and kept across a restart (finished results readable, a job whose process died failed with an
OperationOutcome).

Server A sends cohort work to a Dask scheduler that has no workers, so its job stays running for
as long as the test needs (no timing involved); server B simulates in process.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_ops.mapping import model_definition as fm
from inference.model_definition import shipped_definition
from tests.fhir_ops.operations.twin_client import HEADERS, entries, params

pytestmark = [pytest.mark.api, pytest.mark.slow]

distributed = pytest.importorskip("distributed", reason="the 'dask' extra is part of the test install")

ROOT = Path(__file__).resolve().parents[2]
ASYNC = {**HEADERS, "Prefer": "respond-async"}
MODEL = fm.compile_definition(shipped_definition("tt201"))
LIBRARY = fm.definition_library(MODEL)
STUDY = fm.with_study_model({"resourceType": "ResearchStudy", "id": "shared", "status": "active",
         "arm": [{"name": "placebo"}, {"name": "100 mg"}]}, MODEL.canonical)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interruptible() -> None:
    """In the child before exec: Ctrl+C (SIGINT) back to its default. A test run started in the background
    of a script inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler, so the
    server would rightly ignore the Ctrl+C this test sends (it hung a fresh-clone CI run that way)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Serve:
    """``trialtwin serve --auth open`` as its own operating-system process."""

    def __init__(self, data_dir: Path, log: Path, *extra: str) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fhir_ops.cli", "serve", "--auth", "open", "--port", str(self.port),
             "--data-dir", str(data_dir), *extra], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=log.open("a"), text=True, preexec_fn=_interruptible)
        self.banner = []
        for line in self.proc.stdout:  # the banner ends once the socket listens
            self.banner.append(line)
            if line.startswith("Press Ctrl+C"):
                break
        else:
            raise RuntimeError(f"trialtwin serve did not start: {log.read_text()[-2000:]}")
        self.base = f"http://127.0.0.1:{self.port}/fhir"

    def poll(self, job_url: str) -> requests.Response:
        return requests.get(job_url.replace(job_url.split("/fhir")[0], f"http://127.0.0.1:{self.port}"), timeout=30)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=60)  # reaped: a zombie would still look alive to the other process
        self.proc.stdout.close()


def until(predicate, timeout=120.0, last=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"condition not reached in time{'' if last is None else f': {last()}'}")


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(*extra: str) -> Serve:
        server = Serve(tmp_path / "data", tmp_path / "serve.log", *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


def _simulate(server: Serve, body: dict, headers=ASYNC) -> requests.Response:
    return requests.post(f"{server.base}/ResearchStudy/shared/$simulate", json=body, headers=headers, timeout=60)


def test_two_serve_processes_share_jobs_and_a_restart_keeps_results(servers):
    with distributed.LocalCluster(n_workers=0, processes=False, protocol="tcp://",
                                  dashboard_address=None) as idle:
        a = servers("--dask-scheduler", idle.scheduler_address)
        b = servers()
        assert any("Dask scheduler " + idle.scheduler_address in line and "0 workers" in line for line in a.banner)
        assert any("cohort simulations run" in line and "in process" in line for line in b.banner)
        assert requests.put(f"{b.base}/Library/{LIBRARY['id']}", json=LIBRARY, headers=HEADERS,
                            timeout=30).status_code in (200, 201)
        assert requests.put(f"{b.base}/ResearchStudy/shared", json=STUDY, headers=HEADERS,
                            timeout=30).status_code in (200, 201)
        small = params(virtualParticipants=300, horizonDays=28, seed=3)

        # a job finished by B is read through A (A's first job request is this poll: its job manager is
        # made while answering it, and must still run A's own jobs below)
        accepted = _simulate(b, small)
        assert accepted.status_code == 202, accepted.text
        done_url = accepted.headers["Content-Location"]
        finished = until(lambda: (r := a.poll(done_url)).status_code == 200 and r)
        expected = _simulate(b, small, HEADERS).json()
        assert finished.json() == expected
        assert sum(x["participants"] for x in entries(finished.json(), "armSummary")
                   if x["output"] == "hba1c" and x["day"] == 0) == 300

        # a job running in A (its chunks wait for a worker) shows its progress through B
        accepted = _simulate(a, params(virtualParticipants=2000, horizonDays=28, seed=4))
        assert accepted.status_code == 202, accepted.text
        running_url = accepted.headers["Content-Location"]
        progress = until(lambda: (r := b.poll(running_url)).status_code == 202
                         and "simulating 2000 participants" in r.headers.get("X-Progress", "") and r,
                         last=lambda: (r := b.poll(running_url), r.headers, r.text))
        assert progress.status_code == 202

        a.stop(signal.SIGKILL)  # a crash: nothing is written on the way out
        # (a tuple: a Response with an error status is falsy)
        lost, = until(lambda: (r := b.poll(running_url)).status_code != 202 and (r,))
        assert lost.status_code == 500
        assert lost.headers["Content-Type"].startswith("application/fhir+json")
        issue = lost.json()["issue"][0]
        assert issue["code"] == "incomplete" and issue["details"]["coding"][0]["code"] == "job-lost"
        assert "$simulate did not finish" in issue["diagnostics"]

    # both gone, one restarted on the same directory: the finished result and the failure remain
    b.stop()
    again = servers()
    assert again.poll(done_url).json() == expected
    assert again.poll(running_url).status_code == 500


def test_serve_connects_at_start_up_and_closes_its_client_on_ctrl_c(servers):
    with distributed.LocalCluster(n_workers=0, processes=False, protocol="tcp://",
                                  dashboard_address=None) as idle:
        before = set(idle.scheduler.clients)
        server = servers("--dask-scheduler", idle.scheduler_address)
        assert len(set(idle.scheduler.clients) - before) == 1  # connected before the port was announced
        server.proc.send_signal(signal.SIGINT)
        # 130 (KeyboardInterrupt reached the CLI) or 0 (waitress took it first): no traceback, no hang
        assert server.proc.wait(timeout=180) in (0, 130)  # generous: CI machines are busy
        until(lambda: set(idle.scheduler.clients) == before, timeout=30)
