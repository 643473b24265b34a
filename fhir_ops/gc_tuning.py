"""Garbage-collector settings for a long-running server or bulk-load worker process.

Called once a process has built its app: what start-up made (R4 definitions, models, routes) is frozen
out of every later collection, and young collections run less often.
"""
from __future__ import annotations

import gc

#: Allocations between young-generation collections (CPython's default is 700). A 1,000-resource
#: transaction Bundle makes ~100k containers that all live until its response is sent, so at 700
#: the collector re-scans them hundreds of times per request; at 20,000 a request triggers a few
#: collections, for at most ~20k extra uncollected young objects (a few MB).
GEN0_THRESHOLD = 20_000


def tune_for_serving() -> None:
    """Freeze the objects alive now and raise the young-generation threshold (process-wide).

    A full collection otherwise walks every object start-up made, ~0.2 s per collection on the
    FHIR app, and one came every ~10k resources written; young collections took another ~15 % of
    the write path's CPU (bench/write_profile.py). Objects created later are collected as before:
    cyclic garbage is still found, only less often. Not for test processes that build many apps:
    whatever is alive at the freeze stays for the process's life.

    Examples
    --------
    >>> import gc
    >>> saved = gc.get_threshold()
    >>> tune_for_serving()
    >>> gc.get_threshold()[0] == GEN0_THRESHOLD and gc.get_freeze_count() > 0
    True
    >>> gc.unfreeze(); gc.set_threshold(*saved)
    """
    gc.collect()  # garbage made during start-up is freed, not frozen
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
