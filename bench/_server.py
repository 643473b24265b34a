"""Start-up of the server processes the benchmarks measure, shared so every script waits alike.

A server that exits early is reported at once instead of after the whole timeout.
"""
from __future__ import annotations

import subprocess
import time

import requests


def wait_until_serving(proc: subprocess.Popen, url: str, what: str, timeout_s: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; kill ``proc`` and raise if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=30).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not answer within {timeout_s:.0f} s")
