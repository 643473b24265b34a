"""``trialtwin serve|demo --store hapi --hapi-url URL`` against the live HAPI FHIR server.

The demo study goes into HAPI, and a served TrialTwin writes through to HAPI (read back from HAPI directly).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from fhir_ops.cli import main
from fhir_ops.store.remote import RemoteStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_demo_loads_the_study_into_hapi_once(hapi, tmp_path, capsys):
    args = ["demo", "--no-serve", "--store", "hapi", "--hapi-url", hapi.base_url, "--participants", "2",
            "--data-dir", str(tmp_path)]
    assert main(args) == 0
    first = capsys.readouterr().out
    # a HAPI kept between runs may hold the study already; either way it is there afterwards
    assert f"into HAPI FHIR at {hapi.base_url}" in first or "already present in HAPI FHIR" in first
    store = RemoteStore(hapi.base_url)
    try:
        assert store.read("ResearchStudy", "tt-201")["id"] == "tt-201"
        assert store.search("ResearchSubject", [("study", "ResearchStudy/tt-201")]).total >= 2
    finally:
        store.close()
    assert main(args) == 0
    assert f"already present in HAPI FHIR at {hapi.base_url}" in capsys.readouterr().out
    assert not (tmp_path / "trialtwin.sqlite").exists()  # nothing went to the embedded store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_writes_through_to_hapi(hapi, tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # --auth open: this is about where resources go, not SMART enforcement (loopback only)
    proc = subprocess.Popen([sys.executable, "-m", "fhir_ops.cli", "serve", "--auth", "open", "--store", "hapi",
                             "--hapi-url", hapi.base_url, "--port", str(port), "--data-dir", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        deadline = time.monotonic() + 300  # generous: a busy CI machine
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(f"{base}/metadata", timeout=30).ok:
                    break
            except requests.RequestException:  # not listening yet, or the first answer is slow under load
                pass
            assert time.monotonic() < deadline, "trialtwin serve did not answer within 300 s"
            time.sleep(0.3)
        tag = uuid.uuid4().hex
        created = requests.post(f"{base}/Patient", json={"resourceType": "Patient", "identifier": [
            {"system": "urn:cli-hapi", "value": tag}]}, headers={"Content-Type": "application/fhir+json"}, timeout=60)
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        direct = requests.get(f"{hapi.base_url}/Patient/{pid}", timeout=30).json()
        assert direct["identifier"][0]["value"] == tag
        found = requests.get(f"{base}/Patient", params={"identifier": f"urn:cli-hapi|{tag}"}, timeout=30).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [pid]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "store: HAPI FHIR" in output and hapi.base_url in output
    assert not (tmp_path / "trialtwin.sqlite").exists()
