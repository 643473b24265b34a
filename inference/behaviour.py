"""Trial behaviour of participants: adherence, adverse events, visit attendance and dropout.

Vectorized over participants, seeded through ``numpy.random.Generator``, one day loop in causal order.

Overview
--------
``simulate_behaviour(model, covariates, schedule, n_days, rng, dose_mg=..., exposure=...)`` runs,
vectorized over participants,
for every study day ``t = 0 .. n_days-1`` (day 0 is randomization), in this order:

1. **adherence** - a 2-state Markov chain of taking / missing the daily dose. The probability of
   taking today's dose depends on whether yesterday's dose was taken and on age (per decade from
   50 years, logit scale); it is multiplied by ``1 - adherence_recent_ae`` after an adverse event
   in the last ``ae_window_days`` days;
2. **dose** - ``dose_mg`` is taken at the start of the day if the dose was taken;
3. **exposure** - an optional exposure stepper (see :class:`inference.pk.DailyOneCompartmentOral`)
   turns today's dose into today's average plasma concentration (mg/L);
4. **adverse event** - daily probability ``ae_background + ae_max * C^h / (ae_c50^h + C^h)``;
5. **attendance** - on a scheduled visit day, logistic in the visit burden: in-person visit,
   travel distance (in-person only), visit frequency (visits in the last 30 days), a recent adverse
   event, a missed previous visit, and an optional per-site offset;
6. **dropout** - a discrete-time hazard per day ``h = exp(log_h0 + b_burden * B(t) + b_ae * AE_recent
   + b_time * t/100)`` where ``B(t)`` is the visit burden of the last 30 days (in-person visit:
   ``1 + distance/25 km``; remote visit: ``remote_burden``). The participant leaves at the end of the
   day with probability ``1 - exp(-h)`` (sampled as an exponential race: one Exp(1) threshold per
   participant against the cumulative hazard). Nothing happens from ``dropout_day`` on: no doses,
   no events, no visits.

The result :class:`BehaviourResult` holds, for ``n`` participants, ``n_days`` days and ``n_visits``
visits:

``taken[n, n_days]`` (bool), ``ae[n, n_days]`` (bool), ``concentration[n, n_days]`` (float, daily
average, 0 without an exposure model), ``attended[n, n_visits]`` (bool), ``remote[n, n_visits]``
(bool modality, True = remote), ``visit_days[n_visits]`` (int), ``dropout_day[n]`` (int; the first
day off study, ``n_days`` for completers), and helpers: ``scheduled`` (visit before dropout),
``missed`` (scheduled and not attended), ``dropped_out``, ``adherence`` (fraction of on-study days
with the dose taken) and ``visit_burden(distance_km)``. Labels for learned models follow directly,
e.g. "missed visit v" is ``missed[:, v]`` among ``scheduled[:, v]`` and "dropout within H days of
day t" is ``(dropout_day > t) & (dropout_day <= t + H)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from inference.covariates import Covariates

__all__ = [
    "BehaviourModel",
    "BehaviourResult",
    "ExposureStepper",
    "VisitSchedule",
    "draw_random_bits",
    "n_uniforms",
    "simulate_behaviour",
]


class ExposureStepper(Protocol):
    """What the day loop needs from a PK model: a state and a daily step."""

    def start(self, n: int):  # pragma: no cover - protocol
        """Return the initial (drug-free) state for ``n`` participants."""

    def step(self, state, dose_mg: np.ndarray):  # pragma: no cover - protocol
        """Advance one day with doses given at the start of the day; return (state, daily average).

        The state may be updated in place and the returned ``(n,)`` average may be a buffer that
        the next step overwrites; the day loop copies it at once.
        """


@dataclass(frozen=True, eq=False)
class VisitSchedule:
    """Scheduled visits: study days and modality (remote or in-person), shared or per participant.

    Parameters
    ----------
    days : array_like of int
        Study days of the visits, strictly increasing, >= 0.
    remote : array_like of bool
        Modality, True for a remote visit; shape ``(n_visits,)`` for all participants or
        ``(n, n_visits)`` per participant.

    Examples
    --------
    >>> s = VisitSchedule.every(28, 6, remote=[False, True, True, False, True, False])
    >>> s.days
    array([ 28,  56,  84, 112, 140, 168])
    >>> s.n_visits
    6
    """

    days: np.ndarray
    remote: np.ndarray

    def __post_init__(self) -> None:
        days = np.atleast_1d(np.asarray(self.days))
        if days.ndim != 1 or days.size == 0:
            raise ValueError("visit days must be a non-empty one-dimensional array")
        if not np.all(np.equal(np.mod(days, 1), 0)) or np.any(days < 0):
            raise ValueError("visit days must be non-negative integers")
        days = days.astype(np.int64)
        if np.any(np.diff(days) <= 0):
            raise ValueError("visit days must be strictly increasing")
        remote = np.asarray(self.remote, dtype=bool)
        if remote.ndim == 0:
            remote = np.full(days.shape, bool(remote))
        if remote.shape[-1] != days.size or remote.ndim > 2:
            raise ValueError(
                f"remote must have shape (n_visits,) or (n, n_visits) with n_visits={days.size}, "
                f"got {remote.shape}")
        days.setflags(write=False)
        remote.setflags(write=False)
        object.__setattr__(self, "days", days)
        object.__setattr__(self, "remote", remote)

    @classmethod
    def every(cls, interval_days: int, n_visits: int, remote=False, first_day: int | None = None):
        """Visits every ``interval_days`` days, the first at ``first_day`` (default one interval)."""
        if interval_days <= 0 or n_visits <= 0:
            raise ValueError("interval_days and n_visits must be positive")
        start = interval_days if first_day is None else first_day
        return cls(days=start + interval_days * np.arange(n_visits), remote=remote)

    @property
    def n_visits(self) -> int:
        """Number of scheduled visits."""
        return int(self.days.size)

    def remote_for(self, n: int) -> np.ndarray:
        """Modality as an ``(n, n_visits)`` boolean array."""
        if self.remote.ndim == 2:
            if self.remote.shape[0] != n:
                raise ValueError(f"schedule has modality for {self.remote.shape[0]} participants, not {n}")
            return self.remote
        return np.broadcast_to(self.remote, (n, self.n_visits))

    def take(self, index) -> "VisitSchedule":
        """Schedule of a subset of participants (only changes per-participant modality)."""
        if self.remote.ndim == 2:
            return VisitSchedule(self.days, self.remote[index])
        return self

    def replace(self, **changes) -> "VisitSchedule":
        """Return a validated copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class BehaviourModel:
    """Parameters of trial behaviour (logits, log-hazards; see the module docstring for the equations).

    Defaults describe a plausible decentralized trial: ~90 % adherence, ~85-90 % attendance of
    nearby in-person visits, ~10-15 % dropout over 24 weeks.

    Examples
    --------
    >>> m = BehaviourModel()
    >>> round(m.replace(adherence_after_taken=3.0).adherence_after_taken, 1)
    3.0
    >>> BehaviourModel(ae_max=1.5)
    Traceback (most recent call last):
    ...
    ValueError: ae_max must lie in [0, 1], got 1.5
    """

    # adherence: logit P(take today | taken yesterday), logit P(take | missed yesterday)
    adherence_after_taken: float = 3.0
    adherence_after_missed: float = 0.5
    adherence_age_per_decade: float = 0.15
    adherence_recent_ae: float = 0.3  # relative reduction of P(take) after a recent AE
    # adverse events: daily probability background + Emax-type rise with concentration
    ae_background: float = 0.002
    ae_max: float = 0.02
    ae_c50: float = 1.0  # mg/L
    ae_hill: float = 2.0
    ae_window_days: int = 14
    # attendance (logit)
    attend_intercept: float = 3.5
    attend_in_person: float = -0.5
    attend_distance_per_10km: float = -0.25
    attend_visits_last_30d: float = -0.3
    attend_recent_ae: float = -1.0
    attend_previous_missed: float = -0.8
    attend_site_offsets: tuple = ()  # logit offset per site index (missing sites: 0)
    # dropout hazard (log per day)
    dropout_log_hazard: float = -8.8
    dropout_burden: float = 0.5
    dropout_recent_ae: float = 1.0
    dropout_time_per_100d: float = 0.3
    remote_burden: float = 0.3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{f.name} must be finite, got {value}")
        object.__setattr__(self, "attend_site_offsets",
                           tuple(float(x) for x in self.attend_site_offsets))
        for name in ("ae_background", "ae_max", "adherence_recent_ae"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.ae_background + self.ae_max > 1.0:
            raise ValueError("ae_background + ae_max must not exceed 1")
        if self.ae_c50 <= 0 or self.ae_hill <= 0:
            raise ValueError("ae_c50 and ae_hill must be > 0")
        if self.ae_window_days < 1 or int(self.ae_window_days) != self.ae_window_days:
            raise ValueError("ae_window_days must be a positive integer")
        if self.remote_burden < 0:
            raise ValueError("remote_burden must be >= 0")

    def replace(self, **changes) -> "BehaviourModel":
        """Return a validated copy with some parameters replaced."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class BehaviourResult:
    """Simulated behaviour of ``n`` participants (see the module docstring for the arrays)."""

    taken: np.ndarray
    ae: np.ndarray
    concentration: np.ndarray
    attended: np.ndarray
    remote: np.ndarray
    visit_days: np.ndarray
    dropout_day: np.ndarray
    n_days: int

    @property
    def n(self) -> int:
        """Number of participants."""
        return int(self.taken.shape[0])

    @property
    def dropped_out(self) -> np.ndarray:
        """True for participants who left before the end of the simulated period."""
        return self.dropout_day < self.n_days

    @property
    def scheduled(self) -> np.ndarray:
        """``(n, n_visits)``: the visit fell while the participant was still on study."""
        return self.visit_days[None, :] < self.dropout_day[:, None]

    @property
    def missed(self) -> np.ndarray:
        """``(n, n_visits)``: scheduled and not attended."""
        return self.scheduled & ~self.attended

    @property
    def adherence(self) -> np.ndarray:
        """Fraction of on-study days with the dose taken (NaN for a participant with no day on study)."""
        days_on = np.minimum(self.dropout_day, self.n_days)
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.taken.sum(axis=1) / np.where(days_on > 0, days_on, np.nan)

    def visit_burden(self, distance_km: np.ndarray, remote_burden: float = 0.3) -> np.ndarray:
        """``(n, n_visits)`` burden of each visit: ``1 + distance/25`` in person, ``remote_burden`` remote."""
        d = np.asarray(distance_km, dtype=float)[:, None]
        return np.where(self.remote, remote_burden, 1.0 + d / 25.0)


def _logistic(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float)))


def n_uniforms(schedule: VisitSchedule, n_days: int) -> int:
    """Number of random draws one participant consumes: ``2 * n_days + n_visits + 1``.

    Rows ``[0, n_days)`` decide adherence, ``[n_days, 2 n_days)`` adverse events, the next
    ``n_visits`` (visits before ``n_days``) attendance, and the last one the dropout threshold.

    Examples
    --------
    >>> n_uniforms(VisitSchedule.every(28, 6), 169)   # 2 * 169 + 6 + 1
    345
    """
    return 2 * int(n_days) + int(np.sum(schedule.days < n_days)) + 1


def draw_random_bits(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Draw ``(k, n)`` uniform 32-bit integers, day-major, from ``rng``'s bit generator.

    Each value ``b`` stands for the uniform ``b / 2**32``. Raw bits are several times cheaper than
    ``Generator.random`` and a day-major layout lets the day loop read contiguous rows.

    Examples
    --------
    >>> bits = draw_random_bits(np.random.default_rng(0), 3, 5)
    >>> bits.shape, bits.dtype
    ((5, 3), dtype('uint32'))
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (use numpy.random.default_rng(seed))")
    half = (int(n) + 1) // 2
    raw = rng.bit_generator.random_raw((int(k), half)).view(np.uint32)
    return raw[:, :n]


def simulate_behaviour(
    model: BehaviourModel,
    covariates: Covariates,
    schedule: VisitSchedule,
    n_days: int,
    rng: np.random.Generator | None = None,
    dose_mg=0.0,
    exposure: ExposureStepper | None = None,
    random_bits: np.ndarray | None = None,
) -> BehaviourResult:
    """Simulate adherence, exposure, adverse events, attendance and dropout day by day.

    Parameters
    ----------
    model : BehaviourModel
        Behaviour parameters.
    covariates : Covariates
        Baseline covariates of ``n`` participants (age and travel distance are used here).
    schedule : VisitSchedule
        Visit days and modality; visits on or after ``n_days`` are ignored.
    n_days : int
        Number of simulated study days.
    rng : numpy.random.Generator
        Source of randomness; the same seed gives the same result
        (``draw_random_bits(rng, n, n_uniforms(schedule, n_days))``).
    dose_mg : float or array_like, optional
        Daily dose per participant (scalar or shape ``(n,)``); 0 for placebo.
    exposure : ExposureStepper, optional
        PK model advanced one day at a time; without it the concentration is 0 and adverse events
        occur at the background rate only.
    random_bits : numpy.ndarray, optional
        Pre-drawn ``uint32`` array of shape ``(n_uniforms(schedule, n_days), n)`` used instead of
        ``rng`` (for example stacked from per-block generators, so that a cohort's result does not
        depend on how its participants are chunked).

    Returns
    -------
    BehaviourResult

    Examples
    --------
    >>> cov = Covariates(weight_kg=[80.0] * 4, age_y=[55.0] * 4, egfr=[90.0] * 4,
    ...                  sex_female=[0, 1, 0, 1], distance_km=[5.0, 10.0, 60.0, 2.0], site=[0, 0, 1, 1])
    >>> res = simulate_behaviour(BehaviourModel(), cov, VisitSchedule.every(28, 6), 169,
    ...                          np.random.default_rng(1), dose_mg=100.0)
    >>> res.taken.shape, res.attended.shape
    ((4, 169), (4, 6))
    >>> bool(np.all(res.taken[np.arange(169)[None, :] >= res.dropout_day[:, None]] == False))
    True
    """
    n_days = int(n_days)
    if n_days <= 0:
        raise ValueError("n_days must be positive")
    n = covariates.n
    k_draws = n_uniforms(schedule, n_days)
    if random_bits is None:
        random_bits = draw_random_bits(rng, n, k_draws)
    elif random_bits.shape != (k_draws, n) or random_bits.dtype != np.uint32:
        raise ValueError(f"random_bits must be uint32 of shape {(k_draws, n)}, "
                         f"got {random_bits.dtype} {random_bits.shape}")
    dose = np.broadcast_to(np.asarray(dose_mg, dtype=float), (n,))
    if np.any(dose < 0) or not np.all(np.isfinite(dose)):
        raise ValueError("dose_mg must be finite and >= 0")
    m = model
    keep = schedule.days < n_days
    visit_days = schedule.days[keep]
    remote = np.ascontiguousarray(schedule.remote_for(n)[:, keep])
    n_visits = visit_days.size
    scale = 2.0 ** -32
    u_visit = random_bits[2 * n_days:2 * n_days + n_visits] * scale
    threshold = -np.log1p(-(random_bits[-1] * scale))

    # Per-participant constants, computed once so that the day loop stays a few in-place operations.
    age_term = m.adherence_age_per_decade * (covariates.age_y - 50.0) / 10.0
    # probabilities are kept in units of 2**-32 so that raw bits compare against them directly
    p_mt = _logistic(m.adherence_after_missed + age_term) * 2.0 ** 32
    d_tt = _logistic(m.adherence_after_taken + age_term) * 2.0 ** 32 - p_mt
    dist = covariates.distance_km
    burden = np.where(remote, m.remote_burden, 1.0 + dist[:, None] / 25.0)
    cum_burden = np.concatenate([np.zeros((n, 1)), np.cumsum(burden, axis=1)], axis=1)
    site_offsets = np.zeros(int(covariates.site.max(initial=0)) + 1)
    known = min(len(m.attend_site_offsets), site_offsets.size)
    site_offsets[:known] = m.attend_site_offsets[:known]
    attend_base = (m.attend_intercept + site_offsets[covariates.site][:, None]
                   + np.where(remote, 0.0, m.attend_in_person
                              + m.attend_distance_per_10km * dist[:, None] / 10.0))
    day_index = np.arange(n_days)
    # visits in (t-30, t] for each day t: index range [lo, hi) into visit_days
    hi = np.searchsorted(visit_days, day_index, side="right")
    lo = np.searchsorted(visit_days, day_index - 30, side="right")
    visit_of_day = np.full(n_days, -1)
    visit_of_day[visit_days] = np.arange(n_visits)
    time_factor = np.exp(m.dropout_log_hazard + m.dropout_time_per_100d * day_index / 100.0)
    ae_extra = (time_factor * (np.exp(m.dropout_recent_ae) - 1.0)).tolist()
    time_factor = time_factor.tolist()
    # plain Python scalars in the loop: numpy scalar indexing costs more than the small array ops
    lo_list, hi_list, visit_list = lo.tolist(), hi.tolist(), visit_of_day.tolist()

    taken = np.zeros((n_days, n), dtype=bool)
    ae = np.zeros((n_days, n), dtype=bool)
    conc = np.zeros((n_days, n))
    attended = np.zeros((n, n_visits), dtype=bool)
    days_on = np.zeros(n)
    cum_hazard = np.zeros(n)
    on = np.ones(n, dtype=bool)
    take = np.ones(n, dtype=bool)  # the first dose follows the "taken" row of the chain
    recent_ae = np.zeros(n, dtype=bool)
    ae_until = np.full(n, -1.0)     # last day still "recent" after the latest adverse event
    prev_missed = np.zeros(n, dtype=bool)
    p = np.empty(n)
    buf = np.empty(n)
    dose_today = np.empty(n)
    state = exposure.start(n) if exposure is not None else None
    hill, inv_c50 = float(m.ae_hill), 1.0 / m.ae_c50
    window = (-1, -1)
    burden_factor = None

    # Dynamics after a participant's dropout are still computed (cheaper than masking every array
    # every day) but never observed: doses stop at dropout, events are masked afterwards, and the
    # dropout day itself comes from the days before it. Every operation writes into a buffer
    # because allocating fresh arrays costs more than the arithmetic at these sizes.
    for t in range(n_days):
        np.less_equal(cum_hazard, threshold, out=on)
        days_on += on
        np.greater_equal(ae_until, t, out=recent_ae)
        # adherence: P(take) = P(take | yesterday) * (1 - reduction if an AE is recent)
        np.multiply(take, d_tt, out=p)
        p += p_mt
        np.multiply(recent_ae, -m.adherence_recent_ae, out=buf)
        buf += 1.0
        p *= buf
        np.less(random_bits[t], p, out=take)
        take &= on
        taken[t] = take
        if exposure is not None:
            np.multiply(take, dose, out=dose_today)
            state, c = exposure.step(state, dose_today)
            conc[t] = c
            np.multiply(c, inv_c50, out=p)
            if hill == 2.0:
                p *= p
            elif hill != 1.0:
                np.power(p, hill, out=p)
            np.add(p, 1.0, out=buf)
            p /= buf
            p *= m.ae_max * 2.0 ** 32
            p += m.ae_background * 2.0 ** 32
            event = ae[t]
            np.less(random_bits[n_days + t], p, out=event)
        else:
            event = ae[t]
            np.less(random_bits[n_days + t], m.ae_background * 2.0 ** 32, out=event)
        # ae_until = max(ae_until, t + window) where an event occurred (cheaper than copyto-where)
        np.multiply(event, t + m.ae_window_days, out=buf)
        np.maximum(ae_until, buf, out=ae_until)
        recent_ae |= event
        v = visit_list[t]
        if v >= 0:
            logit_v = (attend_base[:, v] + m.attend_visits_last_30d * (hi_list[t] - lo_list[t])
                       + m.attend_recent_ae * recent_ae + m.attend_previous_missed * prev_missed)
            came = (u_visit[v] < _logistic(logit_v)) & on
            attended[:, v] = came
            prev_missed = ~came
        if (lo_list[t], hi_list[t]) != window:
            window = (lo_list[t], hi_list[t])
            burden_factor = np.exp(m.dropout_burden * (cum_burden[:, window[1]] - cum_burden[:, window[0]]))
        np.multiply(recent_ae, ae_extra[t], out=buf)
        buf += time_factor[t]
        buf *= burden_factor
        cum_hazard += buf

    dropout_day = days_on.astype(np.int64)
    ae &= day_index[:, None] < dropout_day[None, :]
    return BehaviourResult(taken=taken.T, ae=ae.T, concentration=conc.T, attended=attended,
                           remote=remote, visit_days=visit_days, dropout_day=dropout_day,
                           n_days=n_days)
