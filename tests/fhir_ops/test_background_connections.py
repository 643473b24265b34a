"""The background watchers (Subscriptions, the closed loop) close their SQLite connections after each poll.

A served process raises the collector's thresholds (fhir_ops.gc_tuning), so a connection left to the
garbage collector stayed open for thousands of polls; `trialtwin demo` passed 1024 descriptors within
a minute and waitress's select() stopped the server. Checked with the cyclic collector off, which is
the worst case of those settings, by counting the descriptors open on each service's database.
"""
from __future__ import annotations

import gc
import os

import pytest

from fhir_ops.app import create_app
from tests.app_config import open_config

pytestmark = pytest.mark.unit

POLLS = 200


def _open_on(path: str) -> int:
    """Descriptors of this process open on ``path`` or its -wal / -shm files."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(path)
    return count


def _subscription_rounds(service) -> None:
    # one round of the watcher and one idle round of a delivery worker (its claim of the next due delivery,
    # ten times a second per worker: what exhausted the demo's descriptors)
    service.poll_once()
    service._claim()


def _closed_loop_rounds(service) -> None:
    service.poll_once()
    service.work_once()


@pytest.mark.parametrize("extension,filename,one_round", [
    ("trialtwin.subscriptions", "trialtwin-subscriptions.sqlite", _subscription_rounds),
    ("trialtwin.closed_loop", "trialtwin-closed-loop.sqlite", _closed_loop_rounds)])
def test_polling_leaves_no_connection_open(tmp_path, extension, filename, one_round):
    app = create_app(open_config(DATA_DIR=str(tmp_path), SUBSCRIPTIONS=True, CLOSED_LOOP=True))
    service = app.extensions[extension]
    service.stop()  # polled by hand below, not by its threads
    path = str(tmp_path / filename)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        before = _open_on(path)
        for _ in range(POLLS):
            one_round(service)
        after = _open_on(path)
    finally:
        if was_enabled:
            gc.enable()
        for name in ("trialtwin.subscriptions", "trialtwin.closed_loop"):
            app.extensions[name].stop()
        app.extensions["trialtwin.store"].close()
    assert after <= before, f"{after - before} descriptors left open on {filename} by {POLLS} polls"
