"""An acknowledged write survives ``kill -9`` of the server process (WAL, synchronous=NORMAL)."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_ops.store.sqlite import SQLiteStore

pytestmark = pytest.mark.api

ROOT = Path(__file__).resolve().parents[3]
SERVER = ("import sys; from waitress import serve; from fhir_ops.app import create_app; "
          "serve(create_app({'DATA_DIR': sys.argv[1], 'AUTH_MODE': 'open'}), host='127.0.0.1', "
          "port=int(sys.argv[2]), threads=4, _quiet=True)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(data_dir: Path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(data_dir), str(port)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    base = f"http://127.0.0.1:{port}/fhir"
    deadline = time.monotonic() + 180  # a busy 2-core machine may need long to import everything
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            if requests.get(f"{base}/Patient?_count=0", timeout=30).status_code == 200:
                return proc, base
        except requests.RequestException:
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("server did not start within 180 s")


def _kill9(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_acknowledged_writes_survive_kill_9(tmp_path):
    data = tmp_path / "data"
    proc, base = _start(data)
    acknowledged: dict[tuple[str, str], str] = {}
    try:
        http = requests.Session()
        for k in range(5):
            entries = [{"resource": {"resourceType": "Patient", "id": f"k{k}-{i}", "gender": "female"},
                        "request": {"method": "PUT", "url": f"Patient/k{k}-{i}"}} for i in range(200)]
            r = http.post(base, json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                          headers={"Content-Type": "application/fhir+json"}, timeout=120)
            assert r.status_code == 200
            for e in r.json()["entry"]:
                rtype, rid, _, vid = e["response"]["location"].split("/")[-4:]
                acknowledged[(rtype, rid)] = vid
        r = http.put(f"{base}/Patient/k0-0", json={"resourceType": "Patient", "id": "k0-0", "gender": "male"},
                     headers={"Content-Type": "application/fhir+json"}, timeout=60)
        assert r.status_code == 200
        acknowledged[("Patient", "k0-0")] = r.json()["meta"]["versionId"]
    finally:
        _kill9(proc)  # right after the last acknowledgement: no clean shutdown, no checkpoint

    db = data / "trialtwin.sqlite"
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    store = SQLiteStore(db)
    try:
        for (rtype, rid), vid in acknowledged.items():
            assert store.read(rtype, rid)["meta"]["versionId"] == vid
        assert store.read("Patient", "k0-0")["gender"] == "male"
        assert store.search("Patient", [("gender", "female"), ("_summary", "count")]).total == 999
    finally:
        store.close()
