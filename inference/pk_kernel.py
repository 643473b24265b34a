"""Compiled (Numba) kernel for the shared-grid daily update of the event-driven PK core.

``inference.pk_events._shared_grid`` computes the propagation and read coefficients once; this
kernel then runs every dose step and output read for all participants in one fused pass (blocks of
participants kept in cache, every mode and the depot updated together, no temporaries). The numpy
loop in ``pk_events`` stays the reference; both do the same floating-point operations in the same
order. ``TRIALTWIN_PK_KERNEL=numpy`` forces the numpy path; without Numba the numpy path is used.
``TRIALTWIN_PK_KERNEL=cupy`` (or ``array-api:MODULE``) runs the same loop in array-API operations on
that namespace instead (``pk_events._propagate``): CuPy on a CUDA GPU.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

__all__ = ["array_namespace_wanted", "kernel_wanted", "kernel_info", "shared_grid_kernel"]

_BLOCK = 512  # participants per block: state, coefficients and outputs of a block stay in L1/L2
_compiled = None
_read_block = None  # the compiled _read_block_py, set by _compile
_info = {"kernel": None, "compile_seconds": None, "cache": None, "calls": 0}


def kernel_wanted() -> bool:
    """True when the compiled kernel should run: Numba imports and the env var does not say numpy or
    an array-API namespace."""
    choice = os.environ.get("TRIALTWIN_PK_KERNEL", "auto").strip().lower()
    if choice == "numpy" or array_namespace_wanted() is not None:
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        if choice == "numba":
            raise
        return False
    return True


#: ``TRIALTWIN_PK_KERNEL`` values that run the shared-grid loop on another array namespace
_ARRAY_API_PREFIX = "array-api:"
_ALIASES = {"cupy": "array-api:cupy"}


def array_namespace_wanted():
    """The array-API namespace ``TRIALTWIN_PK_KERNEL`` asks the shared-grid loop to run on, else None.

    ``cupy`` (or ``array-api:cupy``) runs it on a CUDA GPU through CuPy; ``array-api:MODULE`` on any
    other module with an array-API namespace (``array-api:array_api_strict`` in the tests). A module
    that cannot be imported, or CuPy without a usable CUDA device, is an error that says so rather
    than a silent fallback: the setting was explicit.
    """
    choice = os.environ.get("TRIALTWIN_PK_KERNEL", "auto").strip()
    choice = _ALIASES.get(choice.lower(), choice)
    if not choice.lower().startswith(_ARRAY_API_PREFIX):
        return None
    name = choice[len(_ARRAY_API_PREFIX):].strip()
    import importlib

    try:
        module = importlib.import_module(name)
        from array_api_compat import array_namespace

        xp = array_namespace(module.asarray([0.0]))  # CuPy's own module -> its array-API wrapper
    except Exception as exc:  # noqa: BLE001 - ImportError, CUDA driver errors, no asarray: all say the same
        raise RuntimeError(f"TRIALTWIN_PK_KERNEL={choice}: cannot use the array namespace {name!r} "
                           f"({type(exc).__name__}: {exc})") from exc
    return xp


def kernel_info() -> dict:
    """Which kernel compiled, how long compilation (or loading it from the cache) took, cache on/off,
    and how many times it ran in this process."""
    return dict(_info)


def _cache_writable() -> bool:
    """Numba writes its cache beside this module (or to NUMBA_CACHE_DIR); only cache when it can."""
    target = Path(os.environ.get("NUMBA_CACHE_DIR") or Path(__file__).parent / "__pycache__")
    probe = target if target.exists() else target.parent
    return os.access(probe, os.W_OK)


def _daily_update(oral, coef, e_step, g_step, ea_step, gap_index, amounts, keep_prev,
                  col_ptr, col_out, col_now, col_late, read_e, read_g, read_arrived, out):
    """Propagate every participant from dose to dose and write the outputs; see shared_grid_kernel.

    Participants go in blocks that stay in cache; within a block each operation is one loop over
    contiguous participants (which the compiler vectorizes), in the numpy path's order of operations.
    """
    n_modes, n = coef.shape
    n_doses = gap_index.shape[0] + 1
    shared_amount = amounts.shape[0] == 1
    modes = np.zeros((n_modes, n))
    depot = np.zeros(n)
    prev = np.zeros((n_modes, n))
    prev_depot = np.zeros(n)
    amt = np.empty(_BLOCK)
    for lo in range(0, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        w = hi - lo
        dep = depot[lo:hi]
        pdep = prev_depot[lo:hi]
        for j in range(n_doses):
            if j:
                gi = gap_index[j - 1]
                if keep_prev[j]:
                    pdep[:] = dep
                    for r in range(n_modes):
                        prev[r, lo:hi] = modes[r, lo:hi]
                if oral and n_modes == 1:
                    # the common case in one pass: mode and depot of a participant updated together
                    y, e, g, ea = modes[0, lo:hi], e_step[gi, 0, lo:hi], g_step[gi, 0, lo:hi], ea_step[gi, lo:hi]
                    for i in range(w):
                        d = dep[i]
                        y[i] = y[i] * e[i] + g[i] * d
                        dep[i] = d * ea[i]
                else:
                    for r in range(n_modes):
                        y = modes[r, lo:hi]
                        e = e_step[gi, r, lo:hi]
                        if oral:
                            g = g_step[gi, r, lo:hi]
                            for i in range(w):
                                y[i] = y[i] * e[i] + g[i] * dep[i]
                        else:
                            for i in range(w):
                                y[i] = y[i] * e[i]
                    if oral:
                        ea = ea_step[gi, lo:hi]
                        for i in range(w):
                            dep[i] = dep[i] * ea[i]
            if shared_amount:
                a0 = amounts[0, j]
                for i in range(w):
                    amt[i] = a0
            else:
                for i in range(w):
                    amt[i] = amounts[lo + i, j]
            if oral:
                if shared_amount:
                    for i in range(w):
                        dep[i] = dep[i] + a0
                else:
                    for i in range(w):
                        dep[i] = dep[i] + amt[i]
            else:
                for r in range(n_modes):
                    y = modes[r, lo:hi]
                    c = coef[r, lo:hi]
                    for i in range(w):
                        y[i] = y[i] + c[i] * amt[i]
            for k in range(col_ptr[j], col_ptr[j + 1]):
                row = out[col_out[k], lo:hi]
                _read_block(row, modes, dep, read_e, read_g, col_now[k], lo, hi, oral)
                tl = col_late[k]
                if tl >= -1:
                    # lag not yet elapsed: the state of the dose before, read later (none: zero)
                    arrived = read_arrived[col_now[k], lo:hi]
                    late = amt  # reuse as scratch: the dose amounts are not needed any more this step
                    if tl >= 0:
                        _read_block(late[:w], prev, pdep, read_e, read_g, tl, lo, hi, oral)
                    for i in range(w):
                        if not arrived[i]:
                            row[i] = late[i] if tl >= 0 else 0.0


def _read_block_py(row, modes, dep, read_e, read_g, t, lo, hi, oral):
    """row = sum_r E_r * y_r + sum_r G_r * depot for one block, in the numpy path's order."""
    w = hi - lo
    e = read_e[t, 0, lo:hi]
    y = modes[0, lo:hi]
    for i in range(w):
        row[i] = e[i] * y[i]
    for r in range(1, modes.shape[0]):
        e = read_e[t, r, lo:hi]
        y = modes[r, lo:hi]
        for i in range(w):
            row[i] = row[i] + e[i] * y[i]
    if oral:
        for r in range(modes.shape[0]):
            g = read_g[t, r, lo:hi]
            for i in range(w):
                row[i] = row[i] + g[i] * dep[i]


def _compile():
    global _compiled
    if _compiled is None:
        from numba import njit
        cache = _cache_writable()
        start = time.perf_counter()
        global _read_block  # the name _daily_update calls: bound to the compiled read before compiling it
        _read_block = njit(cache=cache, nogil=True)(_read_block_py)
        fn = njit(cache=cache, nogil=True)(_daily_update)
        # compile (or load from the cache) now, on a tiny problem, so the first real call is not timed with it
        z3 = np.zeros((1, 1, 1))
        fn(True, np.ones((1, 1)), z3, z3, np.zeros((1, 1)), np.zeros(0, np.int64), np.zeros((1, 1)),
           np.zeros(1, np.bool_), np.zeros(2, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
           np.zeros(0, np.int64), z3, z3, np.zeros((1, 1), np.bool_), np.zeros((1, 1)))
        _info.update(kernel="numba", compile_seconds=time.perf_counter() - start, cache=cache)
        _compiled = fn
    return _compiled


def shared_grid_kernel(oral, coef, e_step, g_step, ea_step, gap_index, amounts, keep_prev,
                       col_ptr, col_out, col_now, col_late, read_e, read_g, read_arrived, m):
    """Run the daily update and reads; returns the outputs time-major, shape ``(m, n)``.

    Parameters
    ----------
    oral : bool
        Oral doses go to the depot; otherwise an IV bolus adds ``coef_r * amount`` to each mode.
    coef : numpy.ndarray
        ``(n_modes, n)`` disposition coefficients.
    e_step, g_step : numpy.ndarray
        ``(n_gaps, n_modes, n)`` per distinct dose interval: mode decay and depot-to-mode transfer.
    ea_step : numpy.ndarray
        ``(n_gaps, n)`` depot decay per distinct interval.
    gap_index : numpy.ndarray
        ``(n_doses - 1,)`` which interval precedes dose j + 1.
    amounts : numpy.ndarray
        ``(1 or n, n_doses)`` dose amounts (before bioavailability for oral doses).
    keep_prev : numpy.ndarray
        ``(n_doses,)`` bool: some output of dose j may need the state before dose j arrived.
    col_ptr, col_out, col_now, col_late : numpy.ndarray
        Outputs grouped by the dose they read (CSR: dose j owns ``col_ptr[j]:col_ptr[j + 1]``),
        their column, read-table row, and for a possibly late read the read-table row of the dose
        before (-1: no dose before, reads zero; -2: the read cannot be late).
    read_e, read_g, read_arrived : numpy.ndarray
        ``(n_tab, n_modes, n)``, ``(n_tab, n_modes, n)`` and ``(n_tab, n)`` read coefficients and
        whether the dose has arrived at that offset.
    m : int
        Number of outputs; columns no dose precedes are zero.
    """
    fn = _compile()
    _info["calls"] += 1
    out = np.empty((m, coef.shape[1]))
    unread = np.ones(m, dtype=np.bool_)
    unread[col_out] = False
    out[unread] = 0.0  # outputs before the first dose
    fn(bool(oral), coef, e_step, g_step, ea_step, gap_index, amounts, keep_prev,
       col_ptr, col_out, col_now, col_late, read_e, read_g, read_arrived, out)
    return out
