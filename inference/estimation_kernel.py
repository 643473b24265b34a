"""Compiled (Numba) kernels for the population fit's small per-subject linear algebra.

A FOCE(I) fit of a small data set (Theoph: 12 subjects, Indometh: 6) spends its time in the fixed cost
of numpy calls, not in arithmetic: each Newton iteration of the mode search made ~110 numpy calls on
arrays of a few hundred numbers (finite-difference stencils, per-subject sums, batched ``solve`` and
``eigvalsh`` on 2x2 or 3x3 blocks), each analytical gradient ~90. These kernels do the same work in
one call each, taking the stacked structural outputs (the finite-difference grid the numpy
structural model computed, shape ``(points, rows)``) and returning what the numpy code in
``inference.estimation`` returns:

* :func:`mode_search_step` — one Newton iteration of every subject's mode search: the terms at the
  evaluated point (data and prior terms, half-gradient, expected / Laplace / step Hessians), the
  acceptance test and damping update, the convergence test (including the last step taken without
  an evaluation), and the next damped Newton step; it writes the next point's finite-difference
  grid of ``phi`` for the structural model.
* :func:`objective_gradient_terms` — the analytical gradient of ``-2 log L`` and the modes'
  sensitivity from the modes and the grid of predictions in every column of ``phi``.

The numpy path in ``inference.estimation`` stays the reference (tests compare the two to 1e-10).
Linear algebra on the blocks: LU with partial pivoting for solves and inverses (as LAPACK's
``gesv``), Cholesky for "positive definite?" (``eigvalsh(...)[0] > 0`` in the numpy path) and for
the log-determinants. ``TRIALTWIN_FOCE_KERNEL=numpy`` forces the numpy path; without Numba the numpy
path is used. Compiled with ``cache=True`` (when the cache directory is writable), no fastmath.
"""
from __future__ import annotations

import os
import time

import numpy as np

from inference.pk_kernel import _cache_writable

__all__ = ["kernel_info", "kernel_wanted", "mode_search_step", "objective_gradient_terms"]

_info = {"kernel": None, "compile_seconds": None, "cache": None, "mode_calls": 0, "gradient_calls": 0}
_kernels: dict = {}

# mode_search_step's return values
CONTINUE, DONE, SINGULAR = 0, 1, 2


def kernel_wanted() -> bool:
    """True when the compiled kernels should run: Numba imports and ``TRIALTWIN_FOCE_KERNEL`` is not numpy."""
    choice = os.environ.get("TRIALTWIN_FOCE_KERNEL", "auto").strip().lower()
    if choice == "numpy":
        return False
    if _numba_imports is None:
        _check_numba()
    if not _numba_imports and choice == "numba":
        import numba  # noqa: F401  (raises the ImportError)
    return bool(_numba_imports)


_numba_imports: bool | None = None  # asked once: a fit asks kernel_wanted() ~50 times


def _check_numba() -> None:
    global _numba_imports
    try:
        import numba  # noqa: F401
    except ImportError:
        _numba_imports = False
    else:
        _numba_imports = True


def kernel_info() -> dict:
    """Whether the kernels compiled, how long compiling (or loading from the cache) took, and how
    many times each ran in this process."""
    return dict(_info)


# ---------------------------------------------------------------------------------------------
# small dense linear algebra (q x q blocks), written out so that it compiles into the kernels


def _lu_factor(a, lu, piv):
    """LU with partial pivoting of ``a`` into ``lu`` (row swaps in ``piv``); False when a pivot is
    exactly zero (LAPACK's ``info > 0``: numpy's "Singular matrix")."""
    q = a.shape[0]
    for i in range(q):
        for j in range(q):
            lu[i, j] = a[i, j]
    for k in range(q):
        best, arg = abs(lu[k, k]), k
        for i in range(k + 1, q):
            if abs(lu[i, k]) > best:
                best, arg = abs(lu[i, k]), i
        piv[k] = arg
        if arg != k:
            for j in range(q):
                tmp = lu[k, j]
                lu[k, j] = lu[arg, j]
                lu[arg, j] = tmp
        pivot = lu[k, k]
        if pivot == 0.0:
            return False
        for i in range(k + 1, q):
            lu[i, k] = lu[i, k] / pivot
            factor = lu[i, k]
            for j in range(k + 1, q):
                lu[i, j] = lu[i, j] - factor * lu[k, j]
    return True


def _lu_solve(lu, piv, b, x):
    """Solve with a factor from ``_lu_factor``: ``x = A^-1 b`` (``x`` may be ``b``)."""
    q = lu.shape[0]
    for i in range(q):
        x[i] = b[i]
    for k in range(q):
        if piv[k] != k:
            tmp = x[k]
            x[k] = x[piv[k]]
            x[piv[k]] = tmp
    for i in range(q):
        s = x[i]
        for j in range(i):
            s -= lu[i, j] * x[j]
        x[i] = s
    for i in range(q - 1, -1, -1):
        s = x[i]
        for j in range(i + 1, q):
            s -= lu[i, j] * x[j]
        x[i] = s / lu[i, i]


def _cholesky(a, low):
    """Cholesky factor of the lower triangle of ``a`` into ``low``; False unless positive definite
    (every pivot > 0; a nan pivot fails too)."""
    q = a.shape[0]
    for j in range(q):
        s = a[j, j]
        for k in range(j):
            s -= low[j, k] * low[j, k]
        if not s > 0.0:
            return False
        d = np.sqrt(s)
        low[j, j] = d
        for i in range(j + 1, q):
            t = a[i, j]
            for k in range(j):
                t -= low[i, k] * low[j, k]
            low[i, j] = t / d
    return True


# ---------------------------------------------------------------------------------------------
# the mode search


def _terms(values, h, pair_a, pair_b, y, mask, subject, rows_of, a_out, b_out, proportional, min_variance,
           eta, m, precision, data_term, prior_term, grad, expected, laplace, step_hess, jac, curv, w_rows, dw_rows):
    """``evaluate`` of ``inference.estimation._find_modes`` from the grid ``values``: per-subject terms
    and per-row derivatives (first and second differences, weights), in its order of operations."""
    n, q = eta.shape
    rows = values.shape[1]
    n_pairs = pair_a.shape[0]
    for i in range(n):
        data_term[i] = 0.0
        for a in range(q):
            grad[i, a] = 0.0
            for b in range(q):
                expected[i, a, b] = 0.0
                laplace[i, a, b] = 0.0
                step_hess[i, a, b] = 0.0
    h2 = h * h
    for r in range(rows):
        i = subject[r]
        f = values[0, r]
        for a in range(q):
            up, down = values[1 + a, r], values[1 + q + a, r]
            jac[r, a] = (up - down) / (2 * h)
            curv[r, a, a] = (up - 2 * f + down) / h2
        for k in range(n_pairs):
            a, b = pair_a[k], pair_b[k]
            corners = values[2 * q + 1 + 2 * k, r] + values[2 * q + 2 + 2 * k, r]
            c = (corners - values[1 + a, r] - values[1 + q + a, r] - values[1 + b, r] - values[1 + q + b, r]
                 + 2 * f) / (2 * h2)
            curv[r, a, b] = c
            curv[r, b, a] = c
        o = rows_of[r]
        ar, br = a_out[o], b_out[o]
        v = max(ar**2 + (br * f) ** 2, min_variance)
        res = y[r] - f
        wm = mask[r]
        data_term[i] += wm * (res**2 / v + np.log(2 * np.pi * v))
        if proportional:
            dv = 2.0 * br**2 * f
            d2v = 2.0 * br**2
            dl = wm * (-res / v + 0.5 * dv / v * (1.0 - res**2 / v))
            w = wm * (1.0 / v + 0.5 * (dv / v) ** 2)
            w_extra = wm * (2 * res * dv / v**2 - 0.5 * res**2 * d2v / v**2 + res**2 * dv**2 / v**3
                            + 0.5 * d2v / v - dv**2 / v**2)
            dw_rows[r] = wm * (-dv / v**2 + (dv / v) * (d2v / v - dv**2 / v**2))
        else:
            dl = wm * (-res / v)
            w = wm / v
            w_extra = 0.0
        w_rows[r] = w
        for a in range(q):
            grad[i, a] += dl * jac[r, a]
            for b in range(q):
                jj = jac[r, a] * jac[r, b]
                expected[i, a, b] += w * jj
                laplace[i, a, b] += dl * curv[r, a, b]
                if proportional:
                    step_hess[i, a, b] += w_extra * jj
    for i in range(n):
        d_prior = 0.0
        for a in range(q):
            pd = 0.0
            for b in range(q):
                pd += precision[i, a, b] * (eta[i, b] - m[i, b])
            grad[i, a] += pd
            d_prior += (eta[i, a] - m[i, a]) * pd
        prior_term[i] = d_prior
        for a in range(q):
            for b in range(q):
                e = expected[i, a, b] + precision[i, a, b]
                expected[i, a, b] = e
                lap = e + laplace[i, a, b]
                laplace[i, a, b] = lap
                step_hess[i, a, b] = lap + step_hess[i, a, b] if proportional else lap


def _write_points(typical, ridx, offsets, eta, points):
    """``points[k] = (typical with eta added to the random-effect columns) + offsets[k]``, as
    ``_Stacked.grid`` builds them."""
    n, p = typical.shape
    q = ridx.shape[0]
    phi = typical.copy()
    for i in range(n):
        for a in range(q):
            phi[i, ridx[a]] += eta[i, a]
    for k in range(offsets.shape[0]):
        for i in range(n):
            for j in range(p):
                points[k, i, j] = phi[i, j] + offsets[k, j]


def _mode_search_step(values, points, typical, ridx, offsets, pair_a, pair_b, y, mask, subject, rows_of,
                      a_out, b_out, proportional, min_variance, m, precision, h, tol, last_step, max_step,
                      max_iter, state, eta, trial, step_limit, damping, converged,
                      data_term, prior_term, grad, expected, laplace, step_hess, jac, curv, w_rows, dw_rows,
                      c_data, c_prior, c_grad, c_expected, c_laplace, c_step, c_jac, c_curv, c_w, c_dw):
    """One call per structural evaluation; see mode_search_step. ``state = [phase, iteration]``."""
    n, q = eta.shape
    rows = values.shape[1]
    lu = np.empty((q, q))
    low = np.empty((q, q))
    piv = np.empty(q, np.int64)
    vec = np.empty(q)
    inv = np.empty((q, q))
    unit = np.empty(q)
    phase = state[0]
    if phase == 0:
        # start: prior SDs bound the trusted step; the first point is the start
        for i in range(n):
            if not _lu_factor(precision[i], lu, piv):
                return SINGULAR
            for c in range(q):
                for a in range(q):
                    unit[a] = 1.0 if a == c else 0.0
                _lu_solve(lu, piv, unit, vec)
                for a in range(q):
                    inv[a, c] = vec[a]
            for a in range(q):
                step_limit[i, a] = max_step * max(np.sqrt(inv[a, a]), 1.0)
            converged[i] = False
        state[0] = 1
        state[1] = 0
        _write_points(typical, ridx, offsets, eta, points)
        return CONTINUE
    # the terms at the point just evaluated: the start (phase 1) into the current terms, a candidate
    # eta + step into the candidate's (one call site, so the kernel compiles one copy of _terms)
    if phase == 1:
        at, t_data, t_prior, t_grad, t_expected, t_laplace, t_step = (eta, data_term, prior_term, grad, expected,
                                                                     laplace, step_hess)
        t_jac, t_curv, t_w, t_dw = jac, curv, w_rows, dw_rows
    else:
        at, t_data, t_prior, t_grad, t_expected, t_laplace, t_step = (trial, c_data, c_prior, c_grad, c_expected,
                                                                     c_laplace, c_step)
        t_jac, t_curv, t_w, t_dw = c_jac, c_curv, c_w, c_dw
    _terms(values, h, pair_a, pair_b, y, mask, subject, rows_of, a_out, b_out, proportional, min_variance,
           at, m, precision, t_data, t_prior, t_grad, t_expected, t_laplace, t_step, t_jac, t_curv, t_w, t_dw)
    if phase == 1:
        state[0] = 2
    else:
        # accept the candidate per subject where it does not increase the objective
        better = np.zeros(n, np.bool_)
        for i in range(n):
            total = data_term[i] + prior_term[i]
            cand_total = c_data[i] + c_prior[i]
            better[i] = (np.isfinite(cand_total) and cand_total <= total + 1e-12 * (1 + abs(total))
                         and not converged[i])
            if better[i]:
                data_term[i], prior_term[i] = c_data[i], c_prior[i]
                for a in range(q):
                    eta[i, a] = trial[i, a]
                    grad[i, a] = c_grad[i, a]
                    for b in range(q):
                        expected[i, a, b] = c_expected[i, a, b]
                        laplace[i, a, b] = c_laplace[i, a, b]
                        step_hess[i, a, b] = c_step[i, a, b]
                damping[i] = max(damping[i] / 10, 1e-12)
            else:
                damping[i] = damping[i] * 10
        for r in range(rows):
            if better[subject[r]]:
                w_rows[r], dw_rows[r] = c_w[r], c_dw[r]
                for a in range(q):
                    jac[r, a] = c_jac[r, a]
                    for b in range(q):
                        curv[r, a, b] = c_curv[r, a, b]
        stop = True
        for i in range(n):
            if not (converged[i] or damping[i] > 1e12):
                stop = False
        if stop or state[1] >= max_iter:
            return DONE
    # top of the next iteration: convergence (undamped Newton step below tol on a positive definite
    # Hessian), the last step without an evaluation, or the next damped step
    state[1] += 1
    newton = np.empty((n, q))
    positive = np.empty(n, np.bool_)
    singular = False
    all_converged, all_positive, all_small = True, True, True
    for i in range(n):
        if _lu_factor(laplace[i], lu, piv):
            _lu_solve(lu, piv, grad[i], newton[i])
        else:
            singular = True
        positive[i] = _cholesky(laplace[i], low)
    for i in range(n):
        size = 0.0
        for a in range(q):
            if singular:
                newton[i, a] = np.inf
            ax = abs(newton[i, a])
            if size == size and not ax <= size:  # np.max: a nan wins
                size = ax
        if singular:
            size = np.inf
        converged[i] = size < tol and positive[i]
        all_converged = all_converged and converged[i]
        all_positive = all_positive and positive[i]
        all_small = all_small and size < last_step
    if not all_converged and tol <= last_step and all_positive and all_small:
        final = np.empty((n, q))
        small = True
        for i in range(n):
            if proportional:
                if not _lu_factor(step_hess[i], lu, piv):
                    return SINGULAR
                _lu_solve(lu, piv, grad[i], final[i])
            else:
                for a in range(q):
                    final[i, a] = newton[i, a]
            for a in range(q):
                final[i, a] = -final[i, a]
                small = small and abs(final[i, a]) < last_step
        if small:
            # Q(eta + s) = Q + g's, and the expected information moved to first order along s
            shift = np.zeros((n, q, q))
            moved = np.empty(q)
            for r in range(rows):
                i = subject[r]
                js = 0.0
                for a in range(q):
                    s = 0.0
                    for k in range(q):
                        s += curv[r, a, k] * final[i, k]
                    moved[a] = s
                    js += jac[r, a] * final[i, a]
                for a in range(q):
                    for b in range(q):
                        change = w_rows[r] * (moved[a] * jac[r, b] + jac[r, a] * moved[b])
                        if proportional:
                            change += (dw_rows[r] * js) * (jac[r, a] * jac[r, b])
                        shift[i, a, b] += change
            for i in range(n):
                gs = 0.0
                for a in range(q):
                    gs += grad[i, a] * final[i, a]
                    eta[i, a] = eta[i, a] + final[i, a]
                total = (data_term[i] + prior_term[i]) + gs
                pt = 0.0
                for a in range(q):
                    pd = 0.0
                    for b in range(q):
                        pd += precision[i, a, b] * (eta[i, b] - m[i, b])
                    pt += (eta[i, a] - m[i, a]) * pd
                prior_term[i] = pt
                data_term[i] = total - pt
                for a in range(q):
                    for b in range(q):
                        expected[i, a, b] += shift[i, a, b]
                        laplace[i, a, b] += shift[i, a, b]
                converged[i] = positive[i]
            return DONE
    if all_converged:
        return DONE
    damped = np.empty((q, q))
    for i in range(n):
        for a in range(q):
            for b in range(q):
                damped[a, b] = step_hess[i, a, b]
            damped[a, a] += damping[i] * expected[i, a, a]
        if not _cholesky(damped, low):
            # where the exact Hessian is not positive definite, fall back to the expected information
            for a in range(q):
                for b in range(q):
                    damped[a, b] = expected[i, a, b]
                damped[a, a] += damping[i] * expected[i, a, a]
        if not _lu_factor(damped, lu, piv):
            return SINGULAR
        _lu_solve(lu, piv, grad[i], vec)
        overshoot = 0.0
        for a in range(q):
            vec[a] = 0.0 if converged[i] else -vec[a]
            overshoot = max(overshoot, abs(vec[a]) / step_limit[i, a])
        scale = min(1.0, 1.0 / max(overshoot, 1e-300))
        for a in range(q):
            trial[i, a] = eta[i, a] + vec[a] * scale
    _write_points(typical, ridx, offsets, trial, points)
    return CONTINUE


# ---------------------------------------------------------------------------------------------
# the analytical gradient


def _gradient(values, h, pair_index, ridx, y, mask, subject, rows_of, a_out, b_out, interaction, min_variance,
              slots, eta, hessian, omega, d_omegas, effect_columns, effect_slopes, n_x, grad, sensitivity):
    """``inference.estimation._objective_gradient`` from the grid ``values`` of ``_phi_difference_points``."""
    n, q = eta.shape
    rows = values.shape[1]
    p = pair_index.shape[0]
    m_res = slots.shape[0]
    n_eff = effect_columns.shape[0]
    lu = np.empty((q, q))
    piv = np.empty(q, np.int64)
    unit = np.empty(q)
    col = np.empty(q)
    # Omega^-1 and every subject's H^-1 (M)
    precision = np.empty((q, q))
    if not _lu_factor(omega, lu, piv):
        return False
    for c in range(q):
        for a in range(q):
            unit[a] = 1.0 if a == c else 0.0
        _lu_solve(lu, piv, unit, col)
        for a in range(q):
            precision[a, c] = col[a]
    M = np.empty((n, q, q))
    for i in range(n):
        if not _lu_factor(hessian[i], lu, piv):
            return False
        for c in range(q):
            for a in range(q):
                unit[a] = 1.0 if a == c else 0.0
            _lu_solve(lu, piv, unit, col)
            for a in range(q):
                M[i, a, c] = col[a]
    direct_phi = np.zeros((n, p))
    u = np.zeros((n, q))
    cross_phi = np.zeros((n, q, p))
    res_direct = np.zeros((n, m_res))
    res_cross = np.zeros((n, q, m_res))
    F = np.empty(p)
    S = np.empty((q, p))
    J = np.empty(q)
    MJ = np.empty(q)
    trace_dh = np.empty(p)
    h2 = h * h
    for r in range(rows):
        i = subject[r]
        f = values[0, r]
        for j in range(p):
            F[j] = (values[1 + j, r] - values[1 + p + j, r]) / (2 * h)
        for a in range(q):
            ca = ridx[a]
            for j in range(p):
                if j == ca:
                    S[a, j] = (values[1 + j, r] - 2 * f + values[1 + p + j, r]) / h2
                else:
                    k = pair_index[ca, j]
                    lo, hi = min(ca, j), max(ca, j)
                    corners = values[2 * p + 1 + 2 * k, r] + values[2 * p + 2 + 2 * k, r]
                    S[a, j] = (corners - values[1 + lo, r] - values[1 + p + lo, r] - values[1 + hi, r]
                               - values[1 + p + hi, r] + 2 * f) / (2 * h2)
            J[a] = F[ca]
        o = rows_of[r]
        ar, br = a_out[o], b_out[o]
        v = max(ar**2 + (br * f) ** 2, min_variance)
        res = y[r] - f
        wm = mask[r]
        if interaction:
            dv = 2.0 * br**2 * f
            d2v = 2.0 * br**2
            dl = wm * (-res / v + 0.5 * dv / v * (1.0 - res**2 / v))
            w = 1.0 / v + 0.5 * (dv / v) ** 2
            w_obs = (1.0 / v + 2 * res * dv / v**2 - 0.5 * res**2 * d2v / v**2 + res**2 * dv**2 / v**3
                     + 0.5 * d2v / v - 0.5 * dv**2 / v**2)
            dw = -dv / v**2 + (dv / v) * (d2v / v - dv**2 / v**2)
        else:
            dv = 0.0
            dl = wm * (-res / v)
            w = 1.0 / v
            w_obs = w
            dw = 0.0
        jmj = 0.0
        for a in range(q):
            s = 0.0
            for b in range(q):
                s += M[i, a, b] * J[b]
            MJ[a] = s
            jmj += J[a] * s
        for j in range(p):
            t = 0.0
            for a in range(q):
                t += MJ[a] * S[a, j]
            t = 2 * (wm * w) * t
            if interaction:
                t += (wm * dw * jmj) * F[j]
            trace_dh[j] = t
            direct_phi[i, j] += 2 * dl * F[j] + t
        for a in range(q):
            u[i, a] += trace_dh[ridx[a]]
            for j in range(p):
                cross_phi[i, a, j] += (wm * w_obs) * J[a] * F[j] + dl * S[a, j]
        live = wm * (1.0 if v > min_variance else 0.0)
        for s_ in range(m_res):
            on = live * (1.0 if rows_of[r] == int(slots[s_, 0]) else 0.0)
            if slots[s_, 1] == 0.0:  # additive: d V / d log a = 2 a^2
                d_v = 2 * slots[s_, 2] ** 2
                d_dv = 0.0
            else:  # proportional: d V / d log b = 2 b^2 f^2
                d_v = 2 * slots[s_, 2] ** 2 * f**2
                d_dv = 2 * dv
            dq = (1.0 / v - res**2 / v**2) * d_v
            d_w = -d_v / v**2 + (dv / v) * (d_dv / v - dv * d_v / v**2)
            d_dl = (res * d_v / v**2 + 0.5 * (d_dv / v - dv * d_v / v**2) * (1.0 - res**2 / v)
                    + 0.5 * (dv / v) * res**2 * d_v / v**2)
            res_direct[i, s_] += on * (dq + d_w * jmj)
            for a in range(q):
                res_cross[i, a, s_] += (on * d_dl) * J[a]
    # K (half the exact Hessian of Q in eta), the mode's move and the parameters' direct terms
    K = np.empty((q, q))
    vvec = np.empty((n, q))
    for i in range(n):
        for a in range(q):
            for b in range(q):
                K[a, b] = cross_phi[i, a, ridx[b]] + precision[a, b]
        if not _lu_factor(K, lu, piv):
            return False
        _lu_solve(lu, piv, u[i], vvec[i])
    direct = np.zeros(n_x)
    cross = np.zeros((n, q, n_x))
    for j in range(p):
        s = 0.0
        for i in range(n):
            s += direct_phi[i, j]
        direct[j] = s
    for i in range(n):
        for a in range(q):
            for j in range(p):
                cross[i, a, j] = cross_phi[i, a, j]
    k = p
    for e in range(n_eff):
        column = effect_columns[e]
        s = 0.0
        for i in range(n):
            s += direct_phi[i, column] * effect_slopes[e, i]
            for a in range(q):
                cross[i, a, k] = cross_phi[i, a, column] * effect_slopes[e, i]
        direct[k] = s
        k += 1
    G = np.zeros((q, q))
    m_sum = np.zeros((q, q))
    for i in range(n):
        for a in range(q):
            for b in range(q):
                G[a, b] += eta[i, a] * eta[i, b]
                m_sum[a, b] += M[i, a, b]
    for a in range(q):
        for b in range(q):
            G[a, b] += m_sum[a, b]
    d_prec = np.empty((q, q))
    tmp = np.empty((q, q))
    for d in range(d_omegas.shape[0]):
        d_omega = d_omegas[d]
        # d Omega^-1 = -P dOmega P
        for a in range(q):
            for b in range(q):
                s = 0.0
                for c in range(q):
                    s += precision[a, c] * d_omega[c, b]
                tmp[a, b] = s
        trace = 0.0
        for a in range(q):
            trace += tmp[a, a]
        total = 0.0
        for a in range(q):
            for b in range(q):
                s = 0.0
                for c in range(q):
                    s += tmp[a, c] * precision[c, b]
                d_prec[a, b] = -s
                total += G[a, b] * d_prec[a, b]
        direct[k] = total + n * trace
        for i in range(n):
            for b in range(q):
                s = 0.0
                for a in range(q):
                    s += eta[i, a] * d_prec[a, b]
                cross[i, b, k] = s
        k += 1
    for s_ in range(m_res):
        s = 0.0
        for i in range(n):
            s += res_direct[i, s_]
            for a in range(q):
                cross[i, a, k] = res_cross[i, a, s_]
        direct[k] = s
        k += 1
    for kk in range(n_x):
        s = 0.0
        for i in range(n):
            for a in range(q):
                s += vvec[i, a] * cross[i, a, kk]
        grad[kk] = direct[kk] - s
    # sensitivity d eta_i / dx = -K_i^-1 cross_i
    for i in range(n):
        for a in range(q):
            for b in range(q):
                K[a, b] = cross_phi[i, a, ridx[b]] + precision[a, b]
        _lu_factor(K, lu, piv)
        for kk in range(n_x):
            for a in range(q):
                unit[a] = cross[i, a, kk]
            _lu_solve(lu, piv, unit, col)
            for a in range(q):
                sensitivity[i, a, kk] = -col[a]
    return True


def _log_det_cholesky(hessian, out):
    """``log det`` of each block by Cholesky; nan where a block is not positive definite (the caller
    then falls back to ``slogdet``)."""
    n, q = hessian.shape[0], hessian.shape[1]
    low = np.empty((q, q))
    for i in range(n):
        if _cholesky(hessian[i], low):
            s = 0.0
            for a in range(q):
                s += np.log(low[a, a])
            out[i] = 2.0 * s
        else:
            out[i] = np.nan


def _compile() -> dict:
    if not _kernels:
        from numba import njit
        cache = _cache_writable()
        start = time.perf_counter()
        jit = njit(cache=cache, nogil=True, error_model="numpy")
        # the helpers are bound as module globals before the kernels that call them compile
        g = globals()
        for name in ("_lu_factor", "_lu_solve", "_cholesky", "_terms", "_write_points"):
            g[name] = jit(g[name])
        _kernels["mode"] = jit(_mode_search_step)
        _kernels["gradient"] = jit(_gradient)
        _kernels["log_det"] = jit(_log_det_cholesky)
        _warm_up()
        _info.update(kernel="numba", compile_seconds=time.perf_counter() - start, cache=cache)
    return _kernels


def _warm_up() -> None:
    """Compile (or load from the cache) on a one-subject, one-effect problem with the argument types
    the fit passes (the finite-difference offsets are a read-only cached table), so that the first
    real call is not timed with the compilation."""
    ws = ModeWorkspace(n=1, q=1, rows=1, points=3, p=1)
    values = np.ones((3, 1))
    offsets = np.zeros((3, 1))
    offsets.flags.writeable = False
    i64 = np.zeros(1, np.int64)
    none = np.zeros(0, np.int64)
    one = np.ones(1)
    _kernels["mode"](values, ws.points, np.zeros((1, 1)), i64, offsets, none, none, one, one, i64, i64, one,
                     np.zeros(1), False, 1e-12, np.zeros((1, 1)), np.ones((1, 1, 1)), 1e-4, 1e-9, 1e-6, 2.0, 1,
                     *ws.arrays(np.zeros((1, 1))))
    _kernels["gradient"](values, 1e-4, np.zeros((1, 1), np.int64), i64, one, one, i64, i64, one, np.zeros(1), False,
                         1e-12, np.zeros((0, 3)), np.zeros((1, 1)), np.ones((1, 1, 1)), np.ones((1, 1)),
                         np.ones((1, 1, 1)), none, np.zeros((0, 1)), 3, np.empty(3), np.empty((1, 1, 3)))
    _kernels["log_det"](np.ones((1, 1, 1)), np.empty(1))


class ModeWorkspace:
    """The mode search's state between kernel calls: current and candidate terms, per-row derivatives."""

    def __init__(self, n: int, q: int, rows: int, points: int, p: int):
        self.points = np.empty((points, n, p))
        self.state = np.zeros(2, np.int64)
        self.trial = np.empty((n, q))
        self.step_limit = np.empty((n, q))
        self.damping = np.empty(n)
        self.converged = np.zeros(n, np.bool_)
        self.current = self._terms(n, q, rows)
        self.candidate = self._terms(n, q, rows)

    @staticmethod
    def _terms(n: int, q: int, rows: int) -> tuple:
        # data and prior terms, half-gradient, expected / Laplace / step Hessians; per row the
        # prediction derivatives, their second derivatives, W and dW/df
        return (np.empty(n), np.empty(n), np.empty((n, q)), np.empty((n, q, q)), np.empty((n, q, q)),
                np.empty((n, q, q)), np.empty((rows, q)), np.zeros((rows, q, q)), np.empty(rows), np.zeros(rows))

    def arrays(self, eta: np.ndarray) -> tuple:
        return (self.state, eta, self.trial, self.step_limit, self.damping, self.converged, *self.current,
                *self.candidate)


def mode_search_step(values, workspace: ModeWorkspace, eta, typical, ridx, offsets, pair_a, pair_b, y, mask, subject,
                     rows_of, a_out, b_out, proportional, min_variance, m, precision, h, tol, last_step, max_step,
                     max_iter) -> int:
    """Advance every subject's mode search by one structural evaluation (``values``, the grid at the
    points the previous call wrote to ``workspace.points``; ignored on the first call).

    Returns CONTINUE (evaluate ``workspace.points`` and call again), DONE (``eta`` and
    ``workspace.current`` hold the result, ``workspace.state[1]`` the iterations) or SINGULAR (a
    Newton system was exactly singular: numpy's ``solve`` raises ``LinAlgError`` there).
    """
    kernel = _compile()["mode"]
    _info["mode_calls"] += 1
    return kernel(values, workspace.points, typical, ridx, offsets, pair_a, pair_b, y, mask, subject, rows_of,
                  a_out, b_out, proportional, min_variance, m, precision, h, tol, last_step, max_step, max_iter,
                  *workspace.arrays(eta))


def log_det(hessian: np.ndarray) -> np.ndarray:
    """Per-block ``log det`` by Cholesky (nan where not positive definite)."""
    out = np.empty(hessian.shape[0])
    _compile()["log_det"](hessian, out)
    return out


def objective_gradient_terms(values, h, pair_index, ridx, y, mask, subject, rows_of, a_out, b_out, interaction,
                             min_variance, slots, eta, hessian, omega, d_omegas, effect_columns, effect_slopes,
                             n_x) -> tuple[np.ndarray, np.ndarray] | None:
    """The gradient of ``-2 log L`` (``n_x``,) and the modes' sensitivity ``(n, q, n_x)``; None where a
    block (Omega, a subject's H or K) is exactly singular (numpy raises ``LinAlgError`` there)."""
    kernel = _compile()["gradient"]
    _info["gradient_calls"] += 1
    n, q = eta.shape
    grad = np.empty(n_x)
    sensitivity = np.empty((n, q, n_x))
    ok = kernel(values, h, pair_index, ridx, y, mask, subject, rows_of, a_out, b_out, interaction, min_variance,
                slots, eta, hessian, omega, d_omegas, effect_columns, effect_slopes, n_x, grad, sensitivity)
    return (grad, sensitivity) if ok else None
