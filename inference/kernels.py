"""Compile the engine's Numba kernels ahead of the first request.

The PK core's daily-update kernel (:mod:`inference.pk_kernel`) and the population fit's mode-search
and gradient kernels (:mod:`inference.estimation_kernel`) compile on first use: ~7 s and ~16 s of CPU
with an empty cache (much longer on a busy machine), then load from Numba's on-disk cache in about a
second. Compiling on first use would spend that inside someone's request (a first ``$calibrate``
could run past the server's request time budget), so ``make setup`` / ``trialtwin compile-kernels``
fill the cache once and ``trialtwin serve`` compiles in the background at start-up.
"""
from __future__ import annotations

import logging
import threading

__all__ = ["compile_all", "compile_in_background"]

log = logging.getLogger(__name__)


def compile_all() -> dict:
    """Compile (or load from the cache) every kernel the settings ask for; returns each one's info.

    A kernel switched off (``TRIALTWIN_PK_KERNEL=numpy``, ``TRIALTWIN_FOCE_KERNEL=numpy``) or
    without Numba is reported as ``{"kernel": "numpy"}`` and not compiled.

    Examples
    --------
    >>> import os
    >>> os.environ["TRIALTWIN_PK_KERNEL"] = os.environ["TRIALTWIN_FOCE_KERNEL"] = "numpy"
    >>> compile_all()
    {'pk': {'kernel': 'numpy'}, 'estimation': {'kernel': 'numpy'}}
    >>> del os.environ["TRIALTWIN_PK_KERNEL"], os.environ["TRIALTWIN_FOCE_KERNEL"]
    """
    from inference import estimation_kernel, pk_kernel

    report = {}
    for name, module in (("pk", pk_kernel), ("estimation", estimation_kernel)):
        if module.kernel_wanted():
            module._compile()
            report[name] = module.kernel_info()
        else:
            report[name] = {"kernel": "numpy"}
    return report


def compile_in_background() -> threading.Thread:
    """Start :func:`compile_all` in a daemon thread (the kernels compile with ``nogil``; a request
    that needs a kernel meanwhile waits for Numba's compile lock instead of compiling twice)."""
    def work():
        try:
            report = compile_all()
        except Exception:  # a broken Numba install: the numpy paths still serve
            log.exception("compiling the engine kernels failed; the numpy paths will be used where they can")
            return
        log.info("engine kernels ready: %s", ", ".join(
            f"{name} {info.get('kernel')} ({info.get('compile_seconds') or 0:.1f} s)" for name, info in report.items()))

    thread = threading.Thread(target=work, name="compile-kernels", daemon=True)
    thread.start()
    return thread
