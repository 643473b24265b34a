"""scripts/hapi.sh and scripts/test.sh around a start that fails: no JVM is left holding the port, and a
port somebody else holds is refused rather than tested against.

A stand-in for ``java`` (first on PATH) takes the real command line, so the script recognises its
process, but never answers HTTP: the start runs out of its wait, as a cold JVM on a busy machine did
when CI failed. Needs the jar the integration tier builds (the script would otherwise build it first).
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JAR = ROOT / "hapi" / "target" / "trialtwin-hapi.jar"
SILENT_JAVA = """#!/usr/bin/env bash
# stands in for the JVM: keeps the real arguments (so the pid file's check recognises it) and never answers
exec python3 -c 'import time; time.sleep(600)' "$@"
"""
# Shows a command line without the jar for its whole life, as the forked child of `start` does for the
# moment before it execs java: the wait must not take that for an exited server.
ANONYMOUS_JAVA = """#!/usr/bin/env bash
exec python3 -c 'import time; time.sleep(600)'
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, port: int, java_script: str = SILENT_JAVA, **extra) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    java = bin_dir / "java"
    java.write_text(java_script)
    java.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TRIALTWIN_HAPI_URL"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", HAPI_PORT=str(port), HAPI_DATA_DIR=str(tmp_path / "hapi"),
               HAPI_DB="mem", **extra)
    return env


@pytest.fixture(autouse=True)
def built_jar():
    if not JAR.is_file():
        pytest.fail(f"{JAR.relative_to(ROOT)} is missing: run `scripts/hapi.sh build` (scripts/test.sh does)",
                    pytrace=False)


def test_a_start_that_does_not_answer_in_time_stops_its_jvm(tmp_path):
    env = _env(tmp_path, _free_port(), HAPI_WAIT_S="3")
    run = subprocess.run(["bash", "scripts/hapi.sh", "start"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "did not answer" in run.stderr and "stopping the HAPI that failed to start" in run.stderr
    started = int(run.stdout.split("started HAPI (pid ")[1].split(")")[0])
    assert not Path(f"/proc/{started}").exists() or "zombie" in Path(f"/proc/{started}/status").read_text()
    assert not (tmp_path / "hapi" / "hapi.pid").exists()


def test_a_live_start_is_waited_for_even_before_its_command_line_shows_java(tmp_path):
    env = _env(tmp_path, _free_port(), ANONYMOUS_JAVA, HAPI_WAIT_S="3")
    run = subprocess.run(["bash", "scripts/hapi.sh", "start"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "exited before answering" not in run.stderr, run.stderr
    assert "did not answer" in run.stderr and "stopping the HAPI that failed to start" in run.stderr
    started = int(run.stdout.split("started HAPI (pid ")[1].split(")")[0])
    assert not Path(f"/proc/{started}").exists() or "zombie" in Path(f"/proc/{started}/status").read_text()


def test_a_port_held_by_another_process_is_refused_not_reused(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        env = _env(tmp_path, port)
        hapi = subprocess.run(["bash", "scripts/hapi.sh", "start"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert hapi.returncode == 1 and "already in use by a process this script did not start" in hapi.stderr
        assert "started HAPI" not in hapi.stdout
        # scripts/test.sh refuses before it installs or runs anything
        suite = subprocess.run(["bash", "scripts/test.sh", "-k", "nothing-at-all"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
        assert suite.returncode == 1 and f"port {port} is already in use" in suite.stderr
        assert "== starting HAPI" not in suite.stdout and "== unit" not in suite.stdout
