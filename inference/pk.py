"""Pharmacokinetic models: closed-form 1-, 2- and 3-compartment superposition and a Michaelis-Menten ODE path.

Parameters are in clearance terms (CL, V, Q, V2, Q3, V3 in L/h and L; ka in 1/h; tlag in h; F unitless),
doses in mg, so concentrations are in mg/L. Every parameter is an array of shape ``(n,)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy.integrate import solve_ivp

from inference import pk_events
from inference.dosing import DoseRecord

__all__ = [
    "OneCompartment",
    "TwoCompartment",
    "ThreeCompartment",
    "MichaelisMenten",
    "DailyOneCompartmentOral",
    "concentration",
]


def _params(obj, names, positive=(), nonneg=(), unit_interval=()):
    """Validate and broadcast the named parameters of a frozen dataclass to one ``(n,)`` shape."""
    arrays = {}
    for name in names:
        arr = np.atleast_1d(np.asarray(getattr(obj, name), dtype=float))
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a scalar or an array of shape (n,), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite")
        if name in positive and np.any(arr <= 0):
            raise ValueError(f"{name} must be > 0")
        if name in nonneg and np.any(arr < 0):
            raise ValueError(f"{name} must be >= 0")
        if name in unit_interval and np.any((arr <= 0) | (arr > 1)):
            raise ValueError(f"{name} must lie in (0, 1]")
        arrays[name] = arr
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrays.values()))
    except ValueError:
        raise ValueError(f"parameters do not share one length: "
                         f"{ {k: v.shape for k, v in arrays.items()} }") from None
    for name, arr in arrays.items():
        arr = np.array(np.broadcast_to(arr, shape))
        arr.setflags(write=False)
        object.__setattr__(obj, name, arr)


class _Model:
    def replace(self, **changes):
        """Return a validated copy with some parameters replaced."""
        return dataclasses.replace(self, **changes)

    @property
    def n(self) -> int:
        """Number of participants."""
        return int(self.v.shape[0])


@dataclass(frozen=True, eq=False)
class OneCompartment(_Model):
    """One-compartment model with linear elimination.

    Parameters
    ----------
    cl, v : array_like
        Clearance (L/h) and volume (L).
    ka, tlag, f : array_like, optional
        First-order absorption rate (1/h), lag time (h) and bioavailability of oral doses.

    Examples
    --------
    >>> m = OneCompartment(cl=[5.0, 10.0], v=50.0, ka=1.0)
    >>> m.n, m.v
    (2, array([50., 50.]))
    """

    cl: np.ndarray
    v: np.ndarray
    ka: np.ndarray = 1.0
    tlag: np.ndarray = 0.0
    f: np.ndarray = 1.0

    def __post_init__(self):
        _params(self, ("cl", "v", "ka", "tlag", "f"), positive=("cl", "v", "ka"),
                nonneg=("tlag",), unit_interval=("f",))

    def disposition(self):
        """Unit-impulse response of the central concentration as ``[(coefficient, rate), ...]``."""
        return [(1.0 / self.v, self.cl / self.v)]


@dataclass(frozen=True, eq=False)
class TwoCompartment(_Model):
    """Two-compartment model with linear elimination from the central compartment.

    Parameters
    ----------
    cl, v, q, v2 : array_like
        Clearance, central volume, inter-compartmental clearance, peripheral volume.
    ka, tlag, f : array_like, optional
        Oral absorption rate (1/h), lag time (h), bioavailability.

    Examples
    --------
    >>> m = TwoCompartment(cl=5.0, v=30.0, q=10.0, v2=60.0)
    >>> (a, alpha), (b, beta) = m.disposition()
    >>> round(float(alpha[0] * beta[0]), 6) == round(5.0 / 30.0 * 10.0 / 60.0, 6)  # = k10 * k21
    True
    >>> round(float((a + b)[0] * 30.0), 12)  # C(0) of a unit bolus is 1 / V
    1.0
    """

    cl: np.ndarray
    v: np.ndarray
    q: np.ndarray
    v2: np.ndarray
    ka: np.ndarray = 1.0
    tlag: np.ndarray = 0.0
    f: np.ndarray = 1.0

    def __post_init__(self):
        _params(self, ("cl", "v", "q", "v2", "ka", "tlag", "f"),
                positive=("cl", "v", "q", "v2", "ka"), nonneg=("tlag",), unit_interval=("f",))

    def disposition(self):
        """Unit-impulse response of the central concentration as ``[(coefficient, rate), ...]``."""
        k10, k12, k21 = self.cl / self.v, self.q / self.v, self.q / self.v2
        s, p = k10 + k12 + k21, k10 * k21
        alpha = 0.5 * (s + np.sqrt(s * s - 4.0 * p))
        beta = p / alpha  # product of the roots; avoids cancellation in s - sqrt(...)
        a = (alpha - k21) / (alpha - beta) / self.v
        b = (k21 - beta) / (alpha - beta) / self.v
        return [(a, alpha), (b, beta)]


@dataclass(frozen=True, eq=False)
class ThreeCompartment(_Model):
    """Three-compartment mammillary model: two peripheral compartments, elimination from the central one.

    Parameters
    ----------
    cl, v : array_like
        Clearance and central volume.
    q, v2 : array_like
        Inter-compartmental clearance and volume of the first peripheral compartment.
    q3, v3 : array_like
        The same for the second peripheral compartment (NONMEM ADVAN11 TRANS4: CL, V1, Q2, V2, Q3, V3).
    ka, tlag, f : array_like, optional
        Oral absorption rate (1/h), lag time (h), bioavailability.

    Examples
    --------
    >>> m = ThreeCompartment(cl=5.0, v=10.0, q=20.0, v2=40.0, q3=1.0, v3=100.0)
    >>> terms = m.disposition()
    >>> round(float(sum(c[0] for c, _ in terms) * 10.0), 12)  # C(0) of a unit bolus is 1 / V
    1.0
    >>> k10, k21, k31 = 5.0 / 10.0, 20.0 / 40.0, 1.0 / 100.0
    >>> round(float(np.prod([lam[0] for _, lam in terms]) / (k10 * k21 * k31)), 12)  # det of the rate matrix
    1.0
    """

    cl: np.ndarray
    v: np.ndarray
    q: np.ndarray
    v2: np.ndarray
    q3: np.ndarray
    v3: np.ndarray
    ka: np.ndarray = 1.0
    tlag: np.ndarray = 0.0
    f: np.ndarray = 1.0

    def __post_init__(self):
        _params(self, ("cl", "v", "q", "v2", "q3", "v3", "ka", "tlag", "f"),
                positive=("cl", "v", "q", "v2", "q3", "v3", "ka"), nonneg=("tlag",), unit_interval=("f",))

    def disposition(self):
        """Unit-impulse response of the central concentration as ``[(coefficient, rate), ...]`` (three modes).

        The rate matrix of the concentrations is symmetric once scaled by the square roots of the
        volumes (flows between compartments are symmetric in concentration), so its eigenvalues
        and orthonormal eigenvectors come from a batched ``eigh``: rate ``lambda_r`` with central
        coefficient ``u_{0r}^2 / V``. Unlike the cubic's trigonometric roots with divided
        differences of them, this stays accurate when two rates nearly coincide, and every
        coefficient is non-negative by construction.
        """
        n = self.n
        v = np.stack([self.v, self.v2, self.v3], axis=1)
        k = np.zeros((n, 3, 3))
        k[:, 0, 0] = self.cl + self.q + self.q3
        k[:, 1, 1] = self.q
        k[:, 2, 2] = self.q3
        k[:, 0, 1] = k[:, 1, 0] = -self.q
        k[:, 0, 2] = k[:, 2, 0] = -self.q3
        root = np.sqrt(v)
        # S = V^-1/2 K V^-1/2 with K the symmetric clearance matrix: dC/dt = -V^-1 K C
        s = k / (root[:, :, None] * root[:, None, :])
        rates, vectors = np.linalg.eigh(s)
        coef = vectors[:, 0, :] ** 2 / self.v[:, None]
        # slowest mode last, as the other models list theirs (alpha > beta)
        return [(coef[:, r], rates[:, r]) for r in (2, 1, 0)]


@dataclass(frozen=True, eq=False)
class MichaelisMenten(_Model):
    """One-compartment model with saturable (Michaelis-Menten) elimination, solved as an ODE.

    Parameters
    ----------
    vmax : array_like
        Maximal elimination rate (mg/h).
    km : array_like
        Concentration at half-maximal elimination (mg/L).
    v, ka, tlag, f : array_like
        Volume (L), oral absorption rate (1/h), lag (h), bioavailability.

    Examples
    --------
    >>> from inference.dosing import regimen
    >>> m = MichaelisMenten(vmax=10.0, km=2.0, v=50.0, ka=1.0)
    >>> c = concentration(m, regimen(100.0, 24.0, 1), [0.0, 2.0])
    >>> c.shape, float(c[0, 0])
    ((1, 2), 0.0)
    """

    vmax: np.ndarray
    km: np.ndarray
    v: np.ndarray
    ka: np.ndarray = 1.0
    tlag: np.ndarray = 0.0
    f: np.ndarray = 1.0

    def __post_init__(self):
        _params(self, ("vmax", "km", "v", "ka", "tlag", "f"), positive=("vmax", "km", "v", "ka"),
                nonneg=("tlag",), unit_interval=("f",))


_h1 = pk_events.h1
_phi = pk_events.phi


def _int_phi(a, b, s):
    """Integral of ``_phi(a, b, t)`` over t in [0, s], robust for a ~ b."""
    x, y = a * s, b * s
    delta = x - y
    close = np.abs(delta) < 1e-3
    # far apart: divided difference of h1; close: its derivative at the midpoint (error ~ delta^2/24)
    safe = np.where(close, 1.0, delta)
    far = (_h1(y) - _h1(x)) / safe
    m = 0.5 * (x + y)
    tiny = m < 1e-2
    m_safe = np.where(tiny, 1.0, m)
    # -h1'(m) = (1 - exp(-m)(1 + m)) / m^2, series near 0
    dh = np.where(tiny, 0.5 - m / 3.0 + m * m / 8.0 - m ** 3 / 30.0 + m ** 4 / 144.0,
                  -(np.expm1(-m_safe) + m_safe * np.exp(-m_safe)) / (m_safe * m_safe))
    return s * s * np.where(close, dh, far)


def _as_2d_times(times, n):
    t = np.asarray(times, dtype=float)
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2 or t.shape[0] not in (1, n):
        raise ValueError(f"times must have shape (n_times,) or ({n}, n_times), got {np.shape(times)}")
    if not np.all(np.isfinite(t)):
        raise ValueError("times must be finite")
    return t


def concentration(model, doses: DoseRecord, times) -> np.ndarray:
    """Central concentration (mg/L) of ``n`` participants at ``times`` (h) after ``doses``.

    Linear models (:class:`OneCompartment`, :class:`TwoCompartment`, :class:`ThreeCompartment`) use exact
    superposition of closed-form single-dose responses; :class:`MichaelisMenten` integrates the stacked ODE of all
    participants with ``scipy.integrate.solve_ivp``. A dose given at time ``t`` is included in
    the concentration at ``t`` (IV bolus).

    Parameters
    ----------
    model : OneCompartment, TwoCompartment, ThreeCompartment or MichaelisMenten
        Parameters of shape ``(n,)`` (or ``(1,)``, shared).
    doses : DoseRecord
        Doses of one or ``n`` participants.
    times : array_like
        Shape ``(n_times,)`` or ``(n, n_times)``, hours.

    Returns
    -------
    numpy.ndarray
        Shape ``(n, n_times)``.

    Examples
    --------
    >>> from inference.dosing import regimen
    >>> m = OneCompartment(cl=5.0, v=50.0)
    >>> c = concentration(m, regimen(100.0, 24.0, 1, route="iv"), [0.0, np.log(2) / 0.1])
    >>> np.round(c, 6)
    array([[2., 1.]])
    """
    if not isinstance(doses, DoseRecord):
        raise ValueError("doses must be a DoseRecord")
    n = max(model.n, doses.n)
    if model.n not in (1, n) or doses.n not in (1, n):
        raise ValueError(f"model has {model.n} participants and doses {doses.n}; they must match")
    t = _as_2d_times(times, n)
    if isinstance(model, MichaelisMenten):
        vmax, km, v, ka, tlag, f = (np.broadcast_to(p, (n,)) for p in
                                    (model.vmax, model.km, model.v, model.ka, model.tlag, model.f))
        return pk_events.michaelis_menten_concentration(vmax, km, v, ka, tlag, f, doses, t)
    if not isinstance(model, (OneCompartment, TwoCompartment, ThreeCompartment)):
        raise ValueError(f"unsupported model type {type(model).__name__}")
    coef, rate = zip(*((np.broadcast_to(c, (n,)), np.broadcast_to(lam, (n,)))
                       for c, lam in model.disposition()))
    ka, tlag, f = (np.broadcast_to(p, (n,)) for p in (model.ka, model.tlag, model.f))
    return pk_events.linear_concentration(coef, rate, ka, tlag, f, doses, t)


def _superposition_concentration(model, doses: DoseRecord, times) -> np.ndarray:
    """Previous linear path, kept as a reference: every dose superposed at every output time.

    Costs participants x doses x output times; :func:`concentration` propagates event by event
    instead (``inference.pk_events``) and must agree with this to rounding.
    """
    n = max(model.n, doses.n)
    t = _as_2d_times(times, n)
    terms = [(c[:, None], lam[:, None]) for c, lam in model.disposition()]
    out = np.zeros((n, t.shape[1]))
    oral = doses.route == "oral"
    ka, tlag, f = model.ka[:, None], model.tlag[:, None], model.f[:, None]
    for j in range(doses.n_doses):
        amt = doses.amounts[:, j:j + 1]
        if not np.any(amt):
            continue
        if oral:
            tau = np.maximum(t - doses.times[:, j:j + 1] - tlag, 0.0)
            for c, lam in terms:
                out += (f * amt * ka * c) * _phi(ka, lam, tau)
            continue
        tau_raw = t - doses.times[:, j:j + 1]
        tau = np.maximum(tau_raw, 0.0)
        dur = doses.durations[:, j:j + 1]
        infusion = dur > 0
        rate = amt / np.where(infusion, dur, 1.0)
        given = np.minimum(tau, dur)
        for c, lam in terms:
            bolus = amt * c * np.exp(-lam * tau) * (tau_raw >= 0)
            # infused amount so far decays from the end of the infusion: no overflow for long gaps
            inf = rate * c * np.exp(-lam * (tau - given)) * given * _h1(lam * given)
            out += np.where(infusion, inf, bolus)
    return out


def _mm_concentration(model: MichaelisMenten, doses: DoseRecord, t: np.ndarray) -> np.ndarray:
    """Stacked-ODE path: one ``solve_ivp`` system for all participants, split at every jump.

    The oral depot is linear, so its output rate is closed-form and only the central amount is
    integrated; segments end at every bolus and at every start or end of an input so that the
    adaptive solver never steps across a discontinuity.
    """
    n = doses.n
    vmax, km, v = model.vmax, model.km, model.v
    ka, tlag, f = (np.broadcast_to(p, (n,)) for p in (model.ka, model.tlag, model.f))
    vmax, km, v = (np.broadcast_to(p, (n,)) for p in (vmax, km, v))
    amounts, dtimes, dur = doses.amounts, doses.times, doses.durations
    oral = doses.route == "oral"
    if oral:
        arrival = dtimes + tlag[:, None]
        breaks = arrival[amounts > 0]
        bolus_mask = np.zeros_like(amounts, dtype=bool)
    else:
        arrival = dtimes
        bolus_mask = (dur == 0) & (amounts > 0)
        inf = (dur > 0) & (amounts > 0)
        breaks = np.concatenate([dtimes[amounts > 0], (dtimes + dur)[inf]])
        rate = np.where(inf, amounts / np.where(dur > 0, dur, 1.0), 0.0)

    def input_rate(time):
        if oral:
            tau = time - arrival
            return np.sum(np.where(tau >= 0, f[:, None] * amounts * ka[:, None]
                                   * np.exp(-ka[:, None] * np.maximum(tau, 0.0)), 0.0), axis=1)
        on = (time >= dtimes) & (time < dtimes + dur)
        return np.sum(np.where(on, rate, 0.0), axis=1)

    def rhs(time, a):
        c = a / v
        return input_rate(time) - vmax * c / (km + c)

    t_all = np.unique(t)
    t_end = t_all[-1]
    t0 = min(t_all[0], breaks.min() if breaks.size else t_all[0])
    edges = np.unique(np.concatenate([[t0, t_end], breaks[(breaks > t0) & (breaks < t_end)]]))
    a = np.zeros(n)
    result = np.empty((n, t_all.size))
    for k, lo in enumerate(edges):
        a = a + np.sum(np.where(bolus_mask & (dtimes == lo), amounts, 0.0), axis=1)
        if k == edges.size - 1:
            result[:, t_all == lo] = a[:, None]
            break
        hi = edges[k + 1]
        sel = (t_all >= lo) & (t_all < hi)
        t_eval = np.append(t_all[sel], hi)
        sol = solve_ivp(rhs, (lo, hi), a, method="DOP853", rtol=1e-10, atol=1e-12, t_eval=t_eval)
        if not sol.success:
            raise ValueError(f"Michaelis-Menten ODE failed: {sol.message}")
        result[:, sel] = sol.y[:, :-1]
        a = sol.y[:, -1]
    idx = np.searchsorted(t_all, t)
    return np.take_along_axis(result, idx, axis=1) / v[:, None]


@dataclass(frozen=True, eq=False)
class DailyOneCompartmentOral(_Model):
    """Exact day-by-day propagation of a 1-compartment oral model with doses at the start of each day.

    Used by the behaviour day loop (it satisfies :class:`inference.behaviour.ExposureStepper`):
    the state is the (depot, central) amount at the start of a day; ``step`` adds the day's dose,
    which reaches the depot after ``tlag``, and returns the new state and the exact average
    concentration over the day (mg/L). All per-participant exponentials are computed once here,
    so a step is a handful of multiply-adds.

    Examples
    --------
    >>> pk = DailyOneCompartmentOral(cl=5.0, v=50.0, ka=1.0, tlag=0.5, f=0.8)
    >>> state = pk.start(1)
    >>> for _ in range(60):
    ...     state, cavg = pk.step(state, np.array([100.0]))
    >>> round(float(cavg[0]), 6)   # steady state: F * dose / (CL * 24 h)
    0.666667
    """

    cl: np.ndarray
    v: np.ndarray
    ka: np.ndarray = 1.0
    tlag: np.ndarray = 0.0
    f: np.ndarray = 1.0
    interval_h: float = 24.0
    _coef: tuple = field(init=False, repr=False)

    def __post_init__(self):
        _params(self, ("cl", "v", "ka", "tlag", "f"), positive=("cl", "v", "ka"),
                nonneg=("tlag",), unit_interval=("f",))
        big_t = float(self.interval_h)
        if not big_t > 0:
            raise ValueError("interval_h must be > 0")
        if np.any(self.tlag >= big_t):
            raise ValueError("tlag must be shorter than the dosing interval")
        k, ka, f = self.cl / self.v, self.ka, self.f
        s = big_t - self.tlag
        scale = 1.0 / (big_t * self.v)
        coef = (
            np.exp(-k * big_t),                     # central -> central
            ka * _phi(ka, k, big_t),                # depot -> central
            f * ka * _phi(ka, k, s),                # dose -> central
            np.exp(-ka * big_t),                    # depot -> depot
            f * np.exp(-ka * s),                    # dose -> depot
            scale * big_t * _h1(k * big_t),         # central -> average concentration
            scale * ka * _int_phi(ka, k, big_t),    # depot -> average concentration
            scale * f * ka * _int_phi(ka, k, s),    # dose -> average concentration
        )
        object.__setattr__(self, "_coef", coef)

    def start(self, n: int) -> np.ndarray:
        """Drug-free state of ``n`` participants: rows (depot, central) amounts in mg, plus scratch rows."""
        if n != self.n:
            raise ValueError(f"stepper has {self.n} participants, not {n}")
        return np.zeros((4, n))

    def step(self, state: np.ndarray, dose_mg: np.ndarray):
        """Advance one interval with ``dose_mg`` given at its start; return (state, average conc).

        The state is updated in place and the returned average is a view into it, overwritten by
        the next step: copy it to keep it. In-place updates avoid allocating on every simulated day.
        """
        depot, central, avg, tmp = state
        cc, dc, xc, dd, xd, ca, da, xa = self._coef
        np.multiply(ca, central, out=avg)
        np.multiply(da, depot, out=tmp)
        avg += tmp
        np.multiply(xa, dose_mg, out=tmp)
        avg += tmp
        central *= cc
        np.multiply(dc, depot, out=tmp)
        central += tmp
        np.multiply(xc, dose_mg, out=tmp)
        central += tmp
        depot *= dd
        np.multiply(xd, dose_mg, out=tmp)
        depot += tmp
        return state, avg

    def trough(self, state) -> np.ndarray:
        """Concentration at the end of the last interval (just before the next dose)."""
        return state[1] / self.v
