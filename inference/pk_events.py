"""Event-driven PK core: closed-form propagation of compartment amounts from event to event.

Linear models (any mammillary disposition given as a sum of exponentials, first-order oral
absorption, IV bolus and zero-order infusion) and a stacked ODE path with an analytical Jacobian
for saturable (Michaelis-Menten) elimination, both vectorized across participants.

Linear models are propagated in *modal* coordinates: the central concentration of a unit bolus
is ``sum_r c_r exp(-lambda_r t)`` (the model's disposition), so the state of a participant is one
concentration per mode plus the oral depot amount (and the current infusion rate). Between two
events every mode decays by ``exp(-lambda_r dt)`` and receives the closed-form convolution of the
depot and infusion input; the result is exactly today's superposition, but the cost grows as
participants x (doses + output times) instead of participants x doses x output times.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.integrate import solve_ivp

from inference.pk_kernel import array_namespace_wanted, kernel_wanted, shared_grid_kernel

__all__ = ["linear_concentration", "michaelis_menten_concentration", "h1", "phi"]


def namespace(*arrays):
    """The array namespace of ``arrays``: numpy for numpy arrays and Python or numpy scalars, else the
    array-API namespace (``array_api_compat``) of the first other array, e.g. CuPy's."""
    for a in arrays:
        if not isinstance(a, (np.ndarray, np.generic, float, int)):
            from array_api_compat import array_namespace

            return array_namespace(a)
    return np


def h1(x):
    """(1 - exp(-x)) / x with its limit 1 at 0, accurate for all x >= 0 (any array namespace)."""
    xp = namespace(x)
    if xp is np:
        x = np.asarray(x, dtype=float)
    small = xp.abs(x) < 1e-8
    safe = xp.where(small, 1.0, x)
    return xp.where(small, 1.0 - 0.5 * x, -xp.expm1(-safe) / safe)


def phi(a, b, t):
    """Convolution of exp(-a t) with exp(-b t): (exp(-b t) - exp(-a t)) / (a - b), robust for a ~ b.

    The expression is symmetric in (a, b), so factoring out the slower exponential keeps it finite
    and turns the equal-rate case into the limit t * exp(-a t). Any array namespace (``a`` and ``b``
    arrays of one namespace, or numpy values).
    """
    xp = namespace(a, b, t)
    lo = xp.minimum(a, b)
    d = xp.abs(a - b)
    return t * xp.exp(-lo * t) * h1(d * t)


def _to_host(x) -> np.ndarray:
    """An array of any namespace as a numpy array (CuPy copies from the GPU; others by DLPack)."""
    return x.get() if hasattr(x, "get") else np.from_dlpack(x)


def _shared_row(arr) -> np.ndarray | None:
    """The one row of a ``(k, m)`` array whose rows are all equal, else None."""
    if arr.shape[0] == 1 or np.all(arr == arr[:1]):
        return arr[0]
    return None


def linear_concentration(coef, rate, ka, tlag, f, doses, times) -> np.ndarray:
    """Central concentration of a linear PK model at ``times`` after ``doses``, event by event.

    Parameters
    ----------
    coef, rate : sequence of numpy.ndarray
        The disposition ``[(c_r, lambda_r), ...]``: central concentration per unit amount of a
        bolus is ``sum_r c_r exp(-lambda_r t)``; each array has shape ``(n,)``.
    ka, tlag, f : numpy.ndarray
        Oral absorption rate, lag time and bioavailability, shape ``(n,)`` (unused for IV doses).
    doses : inference.dosing.DoseRecord
        Doses of one (shared) or ``n`` participants.
    times : numpy.ndarray
        Output times, shape ``(1, m)`` (shared) or ``(n, m)``.

    Returns
    -------
    numpy.ndarray
        Shape ``(n, m)``. A dose given at an output time is included (IV bolus).

    Notes
    -----
    When every participant shares the dose times and the output times and there is no infusion
    (the usual trial regimen, missed doses being 0 mg), the propagation coefficients depend only
    on the few distinct intervals of the grid and are computed once per participant; a dose
    interval then costs a handful of multiply-adds per participant and mode. Otherwise each
    participant's own events are merged and propagated with per-participant intervals.

    Examples
    --------
    >>> from inference.dosing import regimen
    >>> k = np.array([0.1]); one = np.ones(1)
    >>> c = linear_concentration([1 / (50 * one)], [k], one, 0 * one, one,
    ...                          regimen(100.0, 24.0, 1, route="iv"), np.array([[0.0, np.log(2) / 0.1]]))
    >>> np.round(c, 6)
    array([[2., 1.]])
    """
    coef = [np.asarray(c, dtype=float) for c in coef]
    rate = [np.asarray(lam, dtype=float) for lam in rate]
    n = coef[0].shape[0]
    oral = doses.route == "oral"
    infusion = (not oral) and bool(np.any(doses.durations > 0))
    if not oral:
        tlag, f = np.zeros(n), np.ones(n)
    d_shared = _shared_row(doses.times)
    t_shared = _shared_row(times)
    if d_shared is not None and t_shared is not None and not infusion:
        xp = array_namespace_wanted()
        if xp is not None:  # the participants' arrays on that namespace's device, the grid on the host
            out = _shared_grid([xp.asarray(c) for c in coef], [xp.asarray(lam) for lam in rate], xp.asarray(ka),
                               xp.asarray(tlag), xp.asarray(f), oral, d_shared, doses.amounts, t_shared, xp=xp)
            if out is not None:
                return _to_host(out)
        else:
            out = _shared_grid(coef, rate, ka, tlag, f, oral, d_shared, doses.amounts, t_shared)
            if out is not None:
                return out
    return _per_participant(coef, rate, ka, tlag, f, oral, doses.broadcast(n),
                            np.broadcast_to(times, (n, times.shape[1])))


def _shared_grid(coef, rate, ka, tlag, f, oral, d, amounts, t, xp=np):
    """Fast path: one dose grid and one output grid for everybody; None when it does not apply.

    The state just after the arrival of dose j (dose time plus the participant's lag) is
    propagated to the arrival of dose j + 1 with coefficients that depend only on the interval,
    so they are computed once per distinct interval. An output at t_m reads the state of the last
    dose that has arrived: dose j*(m) (the last with d_j <= t_m) unless the participant's lag
    has not yet elapsed, then dose j* - 1. Lags longer than the shortest interval fall back to
    the per-participant path.
    """
    n, n_modes = coef[0].shape[0], len(coef)
    order = np.argsort(d, kind="stable")
    if np.any(order != np.arange(d.size)):
        d, amounts = d[order], amounts[:, order]
    if np.any(d[1:] == d[:-1]):
        # doses at the same time act as one dose: intervals are then all > 0
        d, first = np.unique(d, return_index=True)
        amounts = np.add.reduceat(amounts, first, axis=1)
    n_doses = d.size
    gaps = np.diff(d)
    max_lag = float(xp.max(tlag)) if oral else 0.0
    if gaps.size and max_lag > gaps.min():
        return None
    # the depot holds amounts before bioavailability, so a dose is one add (of a scalar when everybody
    # takes the same amount) and f is folded into the depot's coefficients, computed once
    # propagation coefficients per distinct interval
    gap_values, gap_index = np.unique(gaps, return_inverse=True)
    step = []
    for g in gap_values.tolist():  # Python floats: every array namespace takes them as scalars
        e = [xp.exp(-lam * g) for lam in rate]
        if oral:
            step.append((e, [f * c * ka * phi(ka, lam, g) for c, lam in zip(coef, rate)], xp.exp(-ka * g)))
        else:
            step.append((e, None, None))

    # outputs: dose j* they read, offset since that dose, and the offset from the dose before
    m = t.size
    jstar = np.searchsorted(d, t, side="right") - 1
    offset = np.where(jstar >= 0, t - d[np.maximum(jstar, 0)], 0.0)
    prev_gap = np.where(jstar >= 1, d[np.maximum(jstar, 0)] - d[np.maximum(jstar - 1, 0)], 0.0)
    maybe_late = oral & (jstar >= 0) & (offset < max_lag)

    def read_coefficients(offsets):
        """Per distinct offset o: (E_r, G_r) at tau = o - tlag, zero where the dose has not arrived."""
        table = {}
        for o in np.unique(offsets).tolist():
            tau = o - tlag
            arrived = tau >= 0
            tau = xp.maximum(tau, 0.0)
            e = [xp.where(arrived, xp.exp(-lam * tau), 0.0) for lam in rate]
            g = ([xp.where(arrived, f * c * ka * phi(ka, lam, tau), 0.0) for c, lam in zip(coef, rate)]
                 if oral else None)
            table[o] = (e, g, arrived)
        return table

    now_table = read_coefficients(offset[jstar >= 0])
    late_table = read_coefficients((offset + prev_gap)[maybe_late & (jstar >= 1)])
    # per dose: the outputs that read its state, with their coefficients looked up once here
    # rather than per step (the loop below runs once per dose for every participant at once)
    cols = [[] for _ in range(n_doses)]
    for col in np.flatnonzero(jstar >= 0):
        cols[jstar[col]].append((col, now_table[float(offset[col])], bool(maybe_late[col])))
    keep_prev = [any(late for _, _, late in c) for c in cols]

    if xp is not np:
        return xp.permute_dims(_propagate(xp, coef, oral, step, gap_index, xp.asarray(amounts), keep_prev, cols,
                                          late_table, offset, prev_gap, m, n), (1, 0))
    if kernel_wanted():
        return _run_kernel(coef, oral, step, gap_index, amounts, keep_prev, cols, late_table,
                           offset, prev_gap, m, n).T
    # one dose row per step: per-participant amounts are transposed once, in tiles of rows (a
    # plain transposed copy touches one cache line per element and costs several times more)
    if amounts.shape[0] == 1:
        amt_rows = amounts.T
    else:
        amt_rows = np.empty((n_doses, n))
        for lo in range(0, n, 256):
            amt_rows[:, lo:lo + 256] = amounts[lo:lo + 256].T
    out = np.empty((m, n))  # time-major: each output is one contiguous row
    out[jstar < 0] = 0.0
    modes = [np.zeros(n) for _ in range(n_modes)]
    depot = np.zeros(n)
    prev = None
    tmp = np.empty(n)
    for j in range(n_doses):
        if j:
            e, g, ea = step[gap_index[j - 1]]
            if keep_prev[j]:
                prev = ([y.copy() for y in modes], depot.copy())
            for r in range(n_modes):
                modes[r] *= e[r]
                if oral:
                    np.multiply(g[r], depot, out=tmp)
                    modes[r] += tmp
            if oral:
                depot *= ea
        a_j = amt_rows[j]
        if oral:
            depot += a_j
        else:
            for r in range(n_modes):
                np.multiply(coef[r], a_j, out=tmp)
                modes[r] += tmp
        for col, (e, g, arrived), late_read in cols[j]:
            row = out[col]
            _read(row, modes, depot, e, g, tmp)
            if late_read:
                late = np.zeros(n)
                if j >= 1:
                    el, gl, _ = late_table[float(offset[col] + prev_gap[col])]
                    _read(late, prev[0], prev[1], el, gl, tmp)
                np.copyto(row, late, where=~arrived)
    return out.T


def _run_kernel(coef, oral, step, gap_index, amounts, keep_prev, cols, late_table, offset, prev_gap, m, n):
    """The same loop as the numpy path, compiled: packs the coefficient tables into arrays."""
    n_modes = len(coef)
    e_step = np.array([e for e, _, _ in step]).reshape(len(step), n_modes, n)
    if oral:
        g_step = np.array([g for _, g, _ in step]).reshape(len(step), n_modes, n)
        ea_step = np.array([ea for _, _, ea in step]).reshape(len(step), n)
    else:
        g_step, ea_step = np.zeros((1, 1, 1)), np.zeros((1, 1))
    if not step:  # one dose: no interval
        e_step = np.zeros((1, n_modes, n))
    rows, index = [], {}

    def row_of(entry):
        key = id(entry)
        if key not in index:
            index[key] = len(rows)
            rows.append(entry)
        return index[key]

    col_ptr = np.zeros(len(cols) + 1, dtype=np.int64)
    col_out, col_now, col_late = [], [], []
    for j, group in enumerate(cols):
        col_ptr[j + 1] = col_ptr[j] + len(group)
        for col, entry, late_read in group:
            col_out.append(col)
            col_now.append(row_of(entry))
            if not late_read:
                col_late.append(-2)
            elif j == 0:
                col_late.append(-1)
            else:
                col_late.append(row_of(late_table[float(offset[col] + prev_gap[col])]))
    if rows:
        read_e = np.array([e for e, _, _ in rows]).reshape(len(rows), n_modes, n)
        read_g = (np.array([g for _, g, _ in rows]).reshape(len(rows), n_modes, n) if oral
                  else np.zeros((1, 1, 1)))
        read_arrived = np.array([a for _, _, a in rows], dtype=np.bool_).reshape(len(rows), n)
    else:
        read_e, read_g, read_arrived = np.zeros((1, 1, 1)), np.zeros((1, 1, 1)), np.zeros((1, 1), np.bool_)
    return shared_grid_kernel(
        oral, np.array(coef).reshape(n_modes, n), e_step, g_step, ea_step,
        np.ascontiguousarray(gap_index, dtype=np.int64), np.ascontiguousarray(amounts, dtype=float),
        np.array(keep_prev, dtype=np.bool_), col_ptr, np.array(col_out, dtype=np.int64),
        np.array(col_now, dtype=np.int64), np.array(col_late, dtype=np.int64),
        read_e, read_g, read_arrived, m)


def _propagate(xp, coef, oral, step, gap_index, amounts, keep_prev, cols, late_table, offset, prev_gap, m, n):
    """The numpy loop of :func:`_shared_grid` in array-API operations only (no ``out=``, no in-place
    ufuncs), so any namespace runs it: CuPy on a GPU, or ``array_api_strict`` in the tests. The same
    operations in the same order as the numpy loop, so the same numbers. Returns ``(m, n)``.
    """
    n_modes = len(coef)
    zeros = xp.zeros((n,), dtype=xp.float64)
    modes = [zeros] * n_modes
    depot = zeros
    prev = None
    rows = [zeros] * m
    for j in range(len(cols)):
        if j:
            e, g, ea = step[int(gap_index[j - 1])]
            if keep_prev[j]:
                prev = (list(modes), depot)  # arrays are replaced below, never written in place
            modes = [modes[r] * e[r] + g[r] * depot for r in range(n_modes)] if oral else \
                [modes[r] * e[r] for r in range(n_modes)]
            if oral:
                depot = depot * ea
        a_j = amounts[:, j]
        if oral:
            depot = depot + a_j
        else:
            modes = [modes[r] + coef[r] * a_j for r in range(n_modes)]
        for col, (e, g, arrived), late_read in cols[j]:
            row = _read_xp(modes, depot, e, g)
            if late_read:
                late = zeros
                if j >= 1:
                    el, gl, _ = late_table[float(offset[col] + prev_gap[col])]
                    late = _read_xp(prev[0], prev[1], el, gl)
                row = xp.where(arrived, row, late)
            rows[col] = row
    return xp.stack(rows) if rows else xp.zeros((0, n), dtype=xp.float64)


def _read_xp(modes, depot, e, g):
    """:func:`_read` without ``out=``: sum_r E_r * y_r, then + G_r * depot, in that order."""
    row = e[0] * modes[0]
    for r in range(1, len(modes)):
        row = row + e[r] * modes[r]
    if g is not None:
        for r in range(len(modes)):
            row = row + g[r] * depot
    return row


def _read(row, modes, depot, e, g, tmp):
    """Concentration from a state: sum_r E_r * y_r + G_r * depot, written into ``row``."""
    np.multiply(e[0], modes[0], out=row)
    for r in range(1, len(modes)):
        np.multiply(e[r], modes[r], out=tmp)
        row += tmp
    if g is not None:
        for r in range(len(modes)):
            np.multiply(g[r], depot, out=tmp)
            row += tmp


# event kinds, in the order they act at one time: inputs first, so a bolus at t counts at t
_ARRIVAL, _INFUSION_ON, _INFUSION_OFF, _OUTPUT = 0, 1, 2, 3


def _per_participant(coef, rate, ka, tlag, f, oral, doses, t):
    """General path: each participant's events merged and sorted, then propagated together.

    All participants have the same number of events (dose slots, infusion ends, outputs), so the
    k-th event of everybody is handled in one vectorized step with per-participant intervals.
    """
    n, n_modes = coef[0].shape[0], len(coef)
    m = t.shape[1]
    amt, dur = doses.amounts, doses.durations
    if oral:
        ev_t = [doses.times + tlag[:, None]]
        ev_kind = [np.full(amt.shape, _ARRIVAL)]
        ev_val = [f[:, None] * amt]
    else:
        inf = (dur > 0) & (amt > 0)
        rate_in = np.where(inf, amt / np.where(inf, dur, 1.0), 0.0)
        ev_t = [doses.times, doses.times + dur]
        ev_kind = [np.where(inf, _INFUSION_ON, _ARRIVAL), np.full(amt.shape, _INFUSION_OFF)]
        # a bolus slot has no end event: its "off" entry is an output-free no-op (value 0)
        ev_val = [np.where(inf, rate_in, amt), np.where(inf, rate_in, 0.0)]
    ev_t.append(t)
    ev_kind.append(np.full(t.shape, _OUTPUT))
    ev_val.append(np.broadcast_to(np.arange(m, dtype=float), t.shape))
    times = np.concatenate(ev_t, axis=1)
    kinds = np.concatenate(ev_kind, axis=1)
    vals = np.concatenate(ev_val, axis=1)
    # lexicographic (time, kind) per row from two stable sorts
    by_kind = np.argsort(kinds, axis=1, kind="stable")
    times, kinds, vals = (np.take_along_axis(a, by_kind, 1) for a in (times, kinds, vals))
    by_time = np.argsort(times, axis=1, kind="stable")
    times, kinds, vals = (np.ascontiguousarray(np.take_along_axis(a, by_time, 1).T)
                          for a in (times, kinds, vals))

    out = np.zeros((n, m))
    rows = np.arange(n)
    modes = [np.zeros(n) for _ in range(n_modes)]
    depot = np.zeros(n)
    infusing = np.zeros(n)
    active = np.zeros(n, dtype=int)
    last = times[0].copy()
    for k in range(times.shape[0]):
        dt = times[k] - last
        last = times[k]
        if np.any(dt > 0):
            for r, (c, lam) in enumerate(zip(coef, rate)):
                y = modes[r] * np.exp(-lam * dt)
                if oral:
                    y += c * ka * phi(ka, lam, dt) * depot
                else:
                    y += c * infusing * dt * h1(lam * dt)
                modes[r] = y
            if oral:
                depot = depot * np.exp(-ka * dt)
        kind, val = kinds[k], vals[k]
        arrive = kind == _ARRIVAL
        if oral:
            depot = depot + np.where(arrive, val, 0.0)
        else:
            bolus = np.where(arrive, val, 0.0)
            for r in range(n_modes):
                modes[r] = modes[r] + coef[r] * bolus
            on, off = kind == _INFUSION_ON, kind == _INFUSION_OFF
            active += on.astype(int) - (off & (val > 0)).astype(int)
            infusing = np.where(on, infusing + val, np.where(off, infusing - val, infusing))
            # no infusion running: exactly 0, not the rounding residue of the additions
            infusing = np.where(active > 0, infusing, 0.0)
        emit = kind == _OUTPUT
        if np.any(emit):
            total = modes[0].copy()
            for y in modes[1:]:
                total += y
            out[rows[emit], val[emit].astype(int)] = total[emit]
    return out


def michaelis_menten_concentration(vmax, km, v, ka, tlag, f, doses, times, *,
                                   method: str = "DOP853", rtol: float = 1e-10,
                                   atol: float = 1e-12) -> np.ndarray:
    """Central concentration of a one-compartment model with saturable elimination (stacked ODE).

    All participants form one system ``[depot_1..depot_n, central_1..central_n]`` integrated by
    ``scipy.integrate.solve_ivp`` between events (dose arrivals, infusion starts and ends); the
    right-hand side and its sparse analytical Jacobian cost O(n) per evaluation, independent of
    the number of doses.

    Parameters
    ----------
    vmax, km, v, ka, tlag, f : numpy.ndarray
        Shape ``(n,)``: maximal elimination rate (mg/h), Km (mg/L), volume (L), absorption rate
        (1/h), lag (h), bioavailability.
    doses : inference.dosing.DoseRecord
        Doses of ``n`` participants (broadcast from 1 if shared).
    times : numpy.ndarray
        Output times, shape ``(1, m)`` or ``(n, m)``.
    method, rtol, atol :
        Passed to ``solve_ivp``. The implicit methods (``"Radau"``, ``"BDF"``) receive the sparse
        analytical Jacobian; they pay off only for stiff cases (e.g. absorption far faster than
        elimination), so the default is the explicit DOP853, which was 9-13x faster than either
        on typical oral regimens during development.

    Returns
    -------
    numpy.ndarray
        Shape ``(n, m)``.
    """
    n = v.shape[0]
    doses = doses.broadcast(n)
    t = np.broadcast_to(times, (n, times.shape[1]))
    amounts, dtimes, dur = doses.amounts, doses.times, doses.durations
    oral = doses.route == "oral"
    given = amounts > 0
    if oral:
        arrival = dtimes + tlag[:, None]
        to_depot, to_central = f[:, None] * amounts, np.zeros_like(amounts)
        starts = ends = np.zeros((n, 0))
        rates = np.zeros((n, 0))
        breaks = arrival[given]
    else:
        arrival = dtimes
        inf = (dur > 0) & given
        to_depot = np.zeros_like(amounts)
        to_central = np.where(inf, 0.0, amounts)
        starts, ends = dtimes, dtimes + dur
        rates = np.where(inf, amounts / np.where(inf, dur, 1.0), 0.0)
        breaks = np.concatenate([dtimes[given], ends[inf]])

    t_all = np.unique(t)
    t_end = t_all[-1]
    t0 = min(t_all[0], breaks.min() if breaks.size else t_all[0])
    edges = np.unique(np.concatenate([[t0, t_end], breaks[(breaks > t0) & (breaks < t_end)]]))
    idx = np.arange(n)
    diag_depot = -ka

    def jac_pattern(dc_da):
        # d depot'/d depot = -ka; d central'/d depot = ka; d central'/d central = -Vmax Km / V / (Km + c)^2
        rows = np.concatenate([idx, n + idx, n + idx])
        cols = np.concatenate([idx, idx, n + idx])
        return sparse.csc_matrix((np.concatenate([diag_depot, ka, dc_da]), (rows, cols)),
                                 shape=(2 * n, 2 * n))

    y = np.zeros(2 * n)
    result = np.empty((n, t_all.size))
    for k, lo in enumerate(edges):
        hit = arrival == lo
        y[:n] += np.sum(np.where(hit, to_depot, 0.0), axis=1)
        y[n:] += np.sum(np.where(hit, to_central, 0.0), axis=1)
        if k == edges.size - 1:
            result[:, t_all == lo] = y[n:, None]
            break
        hi = edges[k + 1]
        mid = 0.5 * (lo + hi)
        # the infusion rate is constant on the segment: read it at its midpoint
        r_in = np.sum(np.where((starts <= mid) & (mid < ends), rates, 0.0), axis=1)

        def rhs(_t, s, r_in=r_in):
            depot, central = s[:n], s[n:]
            c = central / v
            return np.concatenate([-ka * depot, ka * depot + r_in - vmax * c / (km + c)])

        def jac(_t, s):
            c = s[n:] / v
            return jac_pattern(-vmax * km / (v * (km + c) ** 2))

        sel = (t_all >= lo) & (t_all < hi)
        kwargs = {"jac": jac} if method in ("Radau", "BDF") else {}
        sol = solve_ivp(rhs, (lo, hi), y, method=method, rtol=rtol, atol=atol,
                        t_eval=np.append(t_all[sel], hi), **kwargs)
        if not sol.success:
            raise ValueError(f"Michaelis-Menten ODE failed: {sol.message}")
        result[:, sel] = sol.y[n:, :-1]
        y = sol.y[:, -1]
    pos = np.searchsorted(t_all, t)
    return np.take_along_axis(result, pos, axis=1) / v[:, None]
