"""Visit-schedule optimisation: choose each upcoming visit's day (inside its window) and modality.

Pure numerics: a protocol visit plan, participants' covariates and a behaviour model go in; an
assignment from ``scipy.optimize.milp`` and a common-random-numbers replay through
:func:`inference.behaviour.simulate_behaviour` come out. See docs/schedule.md for the model.

Overview
--------
For participant ``p``, upcoming visit ``v``, day ``d`` in the window and modality ``m`` the linear
cost is ``w_v * q[p, v, m] + k_hours * hours[v, m] + dropout[p, v, m]`` where

* ``q`` is the probability of missing the visit from the behaviour model's attendance equation at
  the protocol's visit count in the last 30 days, averaged over the chances of a recent adverse
  event and of a missed previous visit (:func:`miss_probability`);
* ``dropout`` is the first-order change in later missed visits through the dropout hazard's
  30-day visit burden (a remote visit weighs ``remote_burden`` instead of ``1 + distance/25``);
* ``w_v`` is the information value of the visit: the share of the twin's forecast variance the
  visit resolves, ``1 + (tau^2 gap_v) / sigma^2`` normalised to mean 1 (:func:`information_weights`).

Visits closer than 30 days to the previous one raise the attendance equation's 30-day visit count;
a hinge ``max(0, 30 - gap)`` with a continuous slack per visit carries that into the program. Hard
constraints: one (day, modality) per visit, modality among the allowed ones (in-person when an
on-site assessment is due), windows, minimum spacing, and per site and calendar day the site hours
of all participants' visits at most the capacity.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from inference.behaviour import BehaviourModel, VisitSchedule, draw_random_bits, n_uniforms, simulate_behaviour
from inference.covariates import Covariates

__all__ = [
    "IN_PERSON", "REMOTE", "MODALITIES", "PlannedVisit", "VisitPlan", "PlanError", "Participants",
    "Schedule", "ScheduleSolution", "Replay", "default_schedule", "miss_probability", "information_weights",
    "optimize_schedule", "greedy_schedule", "check_schedule", "replay_schedules",
]

IN_PERSON, REMOTE = "in-person", "virtual"
MODALITIES = (IN_PERSON, REMOTE)
#: the attendance equation counts the visits in the last 30 days (inference.behaviour)
ATTENDANCE_WINDOW_DAYS = 30


class PlanError(ValueError):
    """A visit plan or request that cannot be scheduled; ``visit`` names the visit at fault (or None)."""

    def __init__(self, message: str, visit: str | None = None, kind: str = "invalid-plan"):
        super().__init__(message)
        self.visit = visit
        self.kind = kind


@dataclass(frozen=True)
class PlannedVisit:
    """One protocol visit: target study day, window, allowed modalities and site hours.

    Examples
    --------
    >>> v = PlannedVisit("v1", 28, 25, 31, (IN_PERSON, REMOTE), REMOTE)
    >>> v.allows(IN_PERSON), v.on_site
    (True, False)
    """

    name: str
    target_day: int
    earliest_day: int
    latest_day: int
    modalities: tuple = MODALITIES
    default_modality: str = IN_PERSON
    on_site: bool = False  # an assessment that must be done at the site is due: in-person only
    hours_in_person: float = 1.5
    hours_remote: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(dict.fromkeys(self.modalities)))
        if not self.earliest_day <= self.target_day <= self.latest_day:
            raise PlanError(f"visit {self.name}: the window {self.earliest_day}..{self.latest_day} does not "
                            f"contain the target day {self.target_day}", self.name, "window-invalid")
        if self.earliest_day < 0:
            raise PlanError(f"visit {self.name}: the window starts before day 0", self.name, "window-invalid")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities:
            raise PlanError(f"visit {self.name}: modalities must be among {MODALITIES}, got {self.modalities}",
                            self.name, "modality-invalid")
        if self.on_site and IN_PERSON not in self.modalities:
            raise PlanError(f"visit {self.name} has an on-site assessment but does not allow an in-person visit",
                            self.name, "modality-invalid")
        if self.default_modality not in self.modalities or (self.on_site and self.default_modality != IN_PERSON):
            raise PlanError(f"visit {self.name}: the default modality {self.default_modality} is not allowed",
                            self.name, "modality-invalid")
        for h in (self.hours_in_person, self.hours_remote):
            if not (np.isfinite(h) and h >= 0):
                raise PlanError(f"visit {self.name}: site hours must be finite and >= 0", self.name, "hours-invalid")

    def allows(self, modality: str) -> bool:
        """Whether the visit may be done in ``modality`` (on-site assessments force in-person)."""
        return modality in self.modalities and not (self.on_site and modality != IN_PERSON)

    def hours(self, modality: str) -> float:
        """Site staff hours of the visit in ``modality``."""
        return self.hours_in_person if modality == IN_PERSON else self.hours_remote


@dataclass(frozen=True)
class VisitPlan:
    """The protocol's visit plan: visits in order, minimum spacing and site capacity per day.

    Examples
    --------
    >>> plan = VisitPlan((PlannedVisit("a", 28, 21, 35), PlannedVisit("b", 56, 49, 63)), 14, 6.0)
    >>> plan.n_visits
    2
    >>> VisitPlan((PlannedVisit("a", 28, 21, 35), PlannedVisit("b", 30, 28, 32)), 14, 6.0)
    Traceback (most recent call last):
    ...
    inference.schedule.PlanError: visit b cannot be scheduled: its window ends on day 32, but with 14 days' minimum spacing after visit a it cannot come before day 35
    """

    visits: tuple
    min_spacing_days: int
    capacity_hours_per_day: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "visits", tuple(self.visits))
        if not self.visits:
            raise PlanError("the visit plan has no visits")
        if len({v.name for v in self.visits}) != len(self.visits):
            raise PlanError("visit names must be unique")
        if int(self.min_spacing_days) != self.min_spacing_days or self.min_spacing_days < 1:
            raise PlanError(f"the minimum spacing must be a whole number of days >= 1, got {self.min_spacing_days}",
                            kind="spacing-invalid")
        if not (np.isfinite(self.capacity_hours_per_day) and self.capacity_hours_per_day > 0):
            raise PlanError(f"the site capacity must be > 0 hours per day, got {self.capacity_hours_per_day}",
                            kind="capacity-invalid")
        self.earliest_feasible(0, None, None)

    @property
    def n_visits(self) -> int:
        return len(self.visits)

    def earliest_feasible(self, first: int, previous_day: int | None, after_day: int | None) -> list[int]:
        """Earliest feasible day of visits ``first..`` given the previous visit's day and a lower bound.

        Raises :class:`PlanError` naming the first visit whose window cannot be met.
        """
        days = []
        prev = previous_day
        prev_name = self.visits[first - 1].name if first > 0 else None
        for v in self.visits[first:]:
            lo = v.earliest_day
            why = ""
            if prev is not None and prev + self.min_spacing_days > lo:
                lo = prev + self.min_spacing_days
                why = f"with {self.min_spacing_days} days' minimum spacing after visit {prev_name}"
            if after_day is not None and after_day + 1 > lo:
                lo = after_day + 1
                why = f"the data cut is study day {after_day}"
            if lo > v.latest_day:
                raise PlanError(f"visit {v.name} cannot be scheduled: its window ends on day {v.latest_day}, "
                                f"but {why} it cannot come before day {lo}", v.name, "window-unsatisfiable")
            days.append(lo)
            prev, prev_name = lo, v.name
        return days

    def replace(self, **changes) -> "VisitPlan":
        """Return a validated copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class Participants:
    """Participants to schedule: covariates, calendar offset, and where each one stands in the plan.

    ``start_day[p]`` is the calendar day (days since a common origin) of the participant's study day 0,
    ``first_visit[p]`` the index of the first visit still to schedule, ``previous_day[p]`` the study day
    of the visit before it (-1: none) and ``as_of_day[p]`` the study day of the data cut (visits go after it).
    """

    distance_km: np.ndarray
    age_y: np.ndarray
    site: np.ndarray
    start_day: np.ndarray
    first_visit: np.ndarray
    previous_day: np.ndarray
    as_of_day: np.ndarray

    def __post_init__(self) -> None:
        n = np.asarray(self.distance_km).size
        for f in dataclasses.fields(self):
            a = np.asarray(getattr(self, f.name), dtype=float if f.name in ("distance_km", "age_y") else np.int64)
            a = np.broadcast_to(a, (n,)).copy() if a.ndim == 0 else a
            if a.shape != (n,):
                raise ValueError(f"{f.name} must have shape ({n},), got {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{f.name} must be finite")
            a.setflags(write=False)
            object.__setattr__(self, f.name, a)
        if np.any(self.distance_km < 0) or np.any(self.site < 0):
            raise ValueError("distance_km and site must be >= 0")

    @property
    def n(self) -> int:
        return int(self.distance_km.size)

    def take(self, index) -> "Participants":
        """The participants at ``index`` (an integer array)."""
        return Participants(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def covariates(self, index=slice(None), repeat: int = 1) -> Covariates:
        """Covariates for the behaviour simulator (weight, eGFR and sex do not enter attendance or dropout)."""
        dist = np.repeat(np.atleast_1d(self.distance_km[index]), repeat)
        k = dist.size
        return Covariates(weight_kg=np.full(k, 80.0), age_y=np.repeat(np.atleast_1d(self.age_y[index]), repeat),
                          egfr=np.full(k, 90.0), sex_female=np.zeros(k), distance_km=dist,
                          site=np.repeat(np.atleast_1d(self.site[index]), repeat))


@dataclass(frozen=True, eq=False)
class Schedule:
    """Study day and modality (True = remote) of every visit of every participant; -1 = not scheduled."""

    day: np.ndarray  # (n, n_visits) int
    remote: np.ndarray  # (n, n_visits) bool


@dataclass(frozen=True, eq=False)
class ScheduleSolution:
    """The optimised schedule and what the solver reported."""

    schedule: Schedule
    objective: float
    status: str
    mip_gap: float
    n_variables: int


def _logistic(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float)))


def default_schedule(plan: VisitPlan, people: Participants) -> Schedule:
    """The protocol default: every visit on its target day in its default modality (done visits too)."""
    day = np.tile([v.target_day for v in plan.visits], (people.n, 1)).astype(np.int64)
    remote = np.tile([v.default_modality == REMOTE for v in plan.visits], (people.n, 1))
    return Schedule(day, remote)


def _visits_last_30d(plan: VisitPlan) -> np.ndarray:
    """Visits in (t-30, t] at each visit's target day, the visit itself included (protocol default)."""
    t = np.array([v.target_day for v in plan.visits])
    return np.array([np.sum((t > ti - ATTENDANCE_WINDOW_DAYS) & (t <= ti)) for ti in t])


def miss_probability(model: BehaviourModel, people: Participants, plan: VisitPlan,
                     visits_last_30d: np.ndarray | None = None) -> np.ndarray:
    """``(n, n_visits, 2)`` probability of missing each visit in person / remotely (alive at the visit).

    The attendance logit of :mod:`inference.behaviour` with the protocol's 30-day visit count,
    averaged over a recent adverse event (probability ``1 - (1 - ae_background)^ae_window_days``)
    and a missed previous visit (the previous visit's miss rate in its default modality; none before the
    first visit).

    Examples
    --------
    >>> plan = VisitPlan((PlannedVisit("a", 28, 21, 35),), 14, 6.0)
    >>> people = Participants([5.0, 80.0], [55.0, 55.0], [0, 0], [0, 0], [0, 0], [-1, -1], [0, 0])
    >>> q = miss_probability(BehaviourModel(), people, plan)
    >>> bool(q[1, 0, 0] > q[0, 0, 0] > q[0, 0, 1])   # far in person > near in person > remote
    True
    """
    m = model
    count = _visits_last_30d(plan) if visits_last_30d is None else np.asarray(visits_last_30d)
    offsets = np.zeros(int(people.site.max(initial=0)) + 1)
    known = min(len(m.attend_site_offsets), offsets.size)
    offsets[:known] = m.attend_site_offsets[:known]
    base = (m.attend_intercept + offsets[people.site])[:, None] + m.attend_visits_last_30d * count[None, :]
    in_person = base + m.attend_in_person + m.attend_distance_per_10km * people.distance_km[:, None] / 10.0
    logits = np.stack([in_person, np.broadcast_to(base, in_person.shape)], axis=-1)
    p_ae = 1.0 - (1.0 - m.ae_background) ** m.ae_window_days
    # a missed previous visit: the previous visit's miss rate in its default modality (one pass); none before the first
    default_remote = np.array([v.default_modality == REMOTE for v in plan.visits])
    prev_logit = np.where(default_remote, logits[..., 1], logits[..., 0])
    q_prev = np.zeros(logits.shape[:2] + (1,))
    q_prev[:, 1:, 0] = 1.0 - _logistic(prev_logit[:, :-1])
    attend = 0.0
    for ae, w_ae in ((0.0, 1.0 - p_ae), (1.0, p_ae)):
        for missed, w_m in ((0.0, 1.0 - q_prev), (1.0, q_prev)):
            attend = attend + w_ae * w_m * _logistic(logits + m.attend_recent_ae * ae
                                                     + m.attend_previous_missed * missed)
    return 1.0 - attend


def information_weights(plan: VisitPlan, sigma: float, tau_per_day: float) -> np.ndarray:
    """Information value of each visit, mean 1: ``1 + tau^2 gap / sigma^2`` (share of forecast variance resolved).

    The twin's forecast variance of the primary outcome grows by ``tau^2`` per day since the last
    measurement on top of the measurement variance ``sigma^2``; a visit after a long gap resolves more.

    Examples
    --------
    >>> plan = VisitPlan((PlannedVisit("a", 28, 21, 35), PlannedVisit("b", 84, 77, 91)), 14, 6.0)
    >>> [round(float(w), 3) for w in information_weights(plan, 0.12, 0.01)]
    [0.925, 1.075]
    """
    if not (sigma > 0 and tau_per_day >= 0):
        raise ValueError("sigma must be > 0 and tau_per_day >= 0")
    t = np.array([v.target_day for v in plan.visits], dtype=float)
    gap = np.diff(np.concatenate([[0.0], t]))
    w = 1.0 + tau_per_day ** 2 * gap / sigma ** 2
    return w / w.mean()


def _dropout_cost(model: BehaviourModel, people: Participants, plan: VisitPlan) -> np.ndarray:
    """``(n, n_visits, 2)`` first-order change in later missed visits through the dropout hazard.

    A visit's burden stays in the hazard's 30-day window: ``30 h(t) (exp(b * burden) - 1)`` is the
    added probability of dropping out, each dropout loses the visits after this one.
    """
    m = model
    t = np.array([v.target_day for v in plan.visits], dtype=float)
    h = np.exp(m.dropout_log_hazard + m.dropout_time_per_100d * (t + 15.0) / 100.0)
    later = plan.n_visits - 1 - np.arange(plan.n_visits)
    burden_ip = 1.0 + people.distance_km[:, None] / 25.0
    extra = np.stack([np.broadcast_to(np.expm1(m.dropout_burden * burden_ip), (people.n, plan.n_visits)),
                      np.full((people.n, plan.n_visits), np.expm1(m.dropout_burden * m.remote_burden))], axis=-1)
    return ATTENDANCE_WINDOW_DAYS * h[None, :, None] * extra * later[None, :, None]


@dataclass
class _Program:
    """Column bookkeeping of the assignment program."""

    p: np.ndarray
    v: np.ndarray
    d: np.ndarray
    remote: np.ndarray
    cost: np.ndarray
    hours: np.ndarray


def _columns(plan: VisitPlan, people: Participants, model: BehaviourModel, info: np.ndarray,
             hour_cost: float, closeness: bool = True) -> tuple[_Program, list[tuple[int, int, int, int]]]:
    """Every allowed (participant, visit, day, modality) with its linear cost; raises PlanError when a window is lost."""
    q = miss_probability(model, people, plan)
    drop = _dropout_cost(model, people, plan)
    cols: dict[str, list] = {k: [] for k in ("p", "v", "d", "remote", "cost", "hours")}
    blocks = []  # (participant, visit, first column, end column)
    start = 0
    for p in range(people.n):
        first = int(people.first_visit[p])
        if first >= plan.n_visits:
            continue
        prev = int(people.previous_day[p]) if people.previous_day[p] >= 0 else None
        try:
            earliest = plan.earliest_feasible(first, prev, int(people.as_of_day[p]))
        except PlanError as exc:
            raise PlanError(f"participant {p}: {exc}", exc.visit, exc.kind) from None
        for k, v in enumerate(range(first, plan.n_visits)):
            visit = plan.visits[v]
            days = np.arange(earliest[k], visit.latest_day + 1)
            for mi, modality in enumerate(MODALITIES):
                if not visit.allows(modality):
                    continue
                cols["p"].append(np.full(days.size, p))
                cols["v"].append(np.full(days.size, v))
                cols["d"].append(days)
                cols["remote"].append(np.full(days.size, mi == 1))
                c = info[v] * q[p, v, mi] + drop[p, v, mi] + hour_cost * visit.hours(modality)
                # a later day leaves a little more time to drop out before the visit
                h = np.exp(model.dropout_log_hazard + model.dropout_time_per_100d * days / 100.0)
                cols["cost"].append(c + info[v] * h * (days - visit.target_day))
                cols["hours"].append(np.full(days.size, visit.hours(modality)))
            end = start + days.size * sum(visit.allows(m) for m in MODALITIES)
            blocks.append((p, v, start, end))
            start = end
    prog = _Program(*(np.concatenate(cols[k]) if cols[k] else np.zeros(0) for k in
                      ("p", "v", "d", "remote", "cost", "hours")))
    return prog, blocks


def optimize_schedule(plan: VisitPlan, people: Participants, model: BehaviourModel | None = None, *,
                      information: np.ndarray | None = None, hour_cost: float = 0.01,
                      capacity_used: dict | None = None, time_limit: float = 60.0,
                      mip_rel_gap: float = 1e-3) -> ScheduleSolution:
    """Choose day and modality of every upcoming visit with ``scipy.optimize.milp`` (HiGHS).

    Parameters
    ----------
    plan : VisitPlan
    people : Participants
    model : BehaviourModel, optional
        Behaviour model whose attendance and dropout equations give the costs (default parameters).
    information : array_like, optional
        Information value per visit (mean about 1; default all 1).
    hour_cost : float
        Cost of one site hour in missed-visit units (the site-burden term).
    capacity_used : dict, optional
        ``{(site, calendar_day): hours}`` already booked by others; the capacity left is what remains.
    time_limit, mip_rel_gap : float
        HiGHS limits; a solution found within the time limit is returned with its gap.

    Returns
    -------
    ScheduleSolution

    Raises
    ------
    PlanError
        A window cannot be met (``kind='window-unsatisfiable'``, ``visit`` names it) or the capacity
        cannot hold the required visits (``kind='capacity-infeasible'``).
    """
    model = model or BehaviourModel()
    info = np.ones(plan.n_visits) if information is None else np.asarray(information, dtype=float)
    if info.shape != (plan.n_visits,) or np.any(info < 0):
        raise ValueError("information must give one value >= 0 per visit")
    if not hour_cost >= 0:
        raise ValueError("hour_cost must be >= 0")
    sites = np.unique(people.site)
    if sites.size > 1:
        # capacity couples participants of one site only: one smaller program per site solves faster
        day = np.zeros((people.n, plan.n_visits), dtype=np.int64)
        remote = np.zeros((people.n, plan.n_visits), dtype=bool)
        total, gap, nvar, status = 0.0, 0.0, 0, "optimal"
        for s in sites:
            idx = np.flatnonzero(people.site == s)
            sol = optimize_schedule(plan, people.take(idx), model, information=info, hour_cost=hour_cost,
                                    capacity_used=capacity_used, time_limit=time_limit, mip_rel_gap=mip_rel_gap)
            day[idx], remote[idx] = sol.schedule.day, sol.schedule.remote
            total += sol.objective
            gap, nvar = max(gap, sol.mip_gap), nvar + sol.n_variables
            status = status if sol.status in ("optimal", "nothing to schedule") else sol.status
        return ScheduleSolution(Schedule(day, remote), total, status, gap, nvar)
    prog, blocks = _columns(plan, people, model, info, hour_cost)
    day = np.tile([v.target_day for v in plan.visits], (people.n, 1)).astype(np.int64)
    remote = np.tile([v.default_modality == REMOTE for v in plan.visits], (people.n, 1))
    nx = prog.d.size
    if nx == 0:
        return ScheduleSolution(Schedule(day, remote), 0.0, "nothing to schedule", 0.0, 0)
    # closeness slacks s_b >= 30 - (day_v - day_prev), one per scheduled visit with a predecessor
    q_close = _closeness_cost(model, people, plan)
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0
    slack_cost = []
    block_of = {(p, v): (a, b) for p, v, a, b in blocks}
    for p, v, a, b in blocks:  # one (day, modality) per visit
        rows.append(np.full(b - a, r)); cols.append(np.arange(a, b)); vals.append(np.ones(b - a))
        lo.append(1.0); hi.append(1.0); r += 1
    n_slack = 0
    for p, v, a, b in blocks:  # spacing (hard) and the closeness hinge (soft)
        if (p, v - 1) in block_of:
            a0, b0 = block_of[(p, v - 1)]
            idx = np.concatenate([np.arange(a, b), np.arange(a0, b0)])
            coef = np.concatenate([prog.d[a:b], -prog.d[a0:b0]]).astype(float)
            rows.append(np.full(idx.size, r)); cols.append(idx); vals.append(coef)
            lo.append(float(plan.min_spacing_days)); hi.append(np.inf); r += 1
            prev_fixed = None
        elif people.previous_day[p] >= 0:
            prev_fixed = int(people.previous_day[p])
            idx = np.arange(a, b)
            coef = prog.d[a:b].astype(float)
        else:
            continue
        if q_close[p, v] <= 0:
            continue
        # s + day_v - day_prev >= 30  (s >= 0): s is the shortfall below 30 days
        rows.append(np.full(idx.size + 1, r)); cols.append(np.append(idx, nx + n_slack))
        vals.append(np.append(coef, 1.0))
        lo.append(ATTENDANCE_WINDOW_DAYS + (prev_fixed or 0)); hi.append(np.inf); r += 1
        slack_cost.append(info[v] * q_close[p, v] / 7.0)  # hinge slope: the full step over one week
        n_slack += 1
    # capacity per site and calendar day
    cal = people.start_day[prog.p] + prog.d
    key = people.site[prog.p].astype(np.int64) * (cal.max() + 1) + cal
    uniq, inv = np.unique(key, return_inverse=True)
    cap = np.full(uniq.size, float(plan.capacity_hours_per_day))
    for i, k in enumerate(uniq):
        s, c = divmod(int(k), int(cal.max() + 1))
        cap[i] -= (capacity_used or {}).get((s, c), 0.0)
    rows.append(r + inv); cols.append(np.arange(nx)); vals.append(prog.hours)
    lo += [-np.inf] * uniq.size; hi += list(cap); r += uniq.size
    A = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(r, nx + n_slack))
    c = np.concatenate([prog.cost, np.asarray(slack_cost)])
    integrality = np.concatenate([np.ones(nx), np.zeros(n_slack)])
    bounds = Bounds(np.zeros(nx + n_slack), np.concatenate([np.ones(nx), np.full(n_slack, float(ATTENDANCE_WINDOW_DAYS))]))
    res = milp(c, constraints=LinearConstraint(A, np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)),
               integrality=integrality, bounds=bounds,
               options={"time_limit": float(time_limit), "mip_rel_gap": float(mip_rel_gap), "presolve": True})
    if res.x is None:
        if res.status == 2:
            raise PlanError("the site capacity cannot hold the visits that must be done in person within their "
                            "windows (raise the capacity or widen the windows)", None, "capacity-infeasible")
        raise PlanError(f"the solver found no schedule: {res.message}", None, "solver-failed")
    x = res.x[:nx] > 0.5
    day[prog.p[x], prog.v[x]] = prog.d[x]
    remote[prog.p[x], prog.v[x]] = prog.remote[x]
    gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    return ScheduleSolution(Schedule(day, remote), float(res.fun), "optimal" if res.status == 0 else res.message,
                            gap, nx + n_slack)


def _closeness_cost(model: BehaviourModel, people: Participants, plan: VisitPlan) -> np.ndarray:
    """``(n, n_visits)`` added miss probability when the previous visit lies within 30 days (in person, worst case)."""
    count = _visits_last_30d(plan)
    far = miss_probability(model, people, plan, np.maximum(count - 1, 1))
    near = miss_probability(model, people, plan, np.maximum(count, 2))
    return np.max(near - far, axis=-1)


def greedy_schedule(plan: VisitPlan, people: Participants, model: BehaviourModel | None = None, *,
                    information: np.ndarray | None = None, hour_cost: float = 0.01) -> Schedule:
    """Naive baseline: participant by participant, visit by visit, the cheapest feasible (day, modality).

    Same costs and hard constraints as :func:`optimize_schedule`, no look-ahead; it may fail where the
    program succeeds (then it raises :class:`PlanError`).
    """
    model = model or BehaviourModel()
    info = np.ones(plan.n_visits) if information is None else np.asarray(information, dtype=float)
    prog, blocks = _columns(plan, people, model, info, hour_cost)
    q_close = _closeness_cost(model, people, plan)
    day = np.tile([v.target_day for v in plan.visits], (people.n, 1)).astype(np.int64)
    remote = np.tile([v.default_modality == REMOTE for v in plan.visits], (people.n, 1))
    used: dict[tuple[int, int], float] = {}
    last = {p: int(people.previous_day[p]) for p in range(people.n)}
    for p, v, a, b in blocks:
        d = prog.d[a:b]
        prev = last[p]
        cost = prog.cost[a:b] + (info[v] * q_close[p, v] / 7.0 * np.maximum(0, 30 - (d - prev)) if prev >= 0 else 0)
        ok = (d >= prev + plan.min_spacing_days) if prev >= 0 else np.ones(d.size, bool)
        cal = people.start_day[p] + d
        room = np.array([plan.capacity_hours_per_day - used.get((int(people.site[p]), int(c)), 0.0) for c in cal])
        ok &= room >= prog.hours[a:b] - 1e-9
        if not ok.any():
            raise PlanError(f"greedy: no feasible day for participant {p}, visit {plan.visits[v].name}",
                            plan.visits[v].name, "capacity-infeasible")
        j = int(np.flatnonzero(ok)[np.argmin(cost[ok])])
        day[p, v], remote[p, v] = d[j], prog.remote[a + j]
        key = (int(people.site[p]), int(cal[j]))
        used[key] = used.get(key, 0.0) + float(prog.hours[a + j])
        last[p] = int(d[j])
    return Schedule(day, remote)


def check_schedule(plan: VisitPlan, people: Participants, schedule: Schedule,
                   capacity_used: dict | None = None) -> list[str]:
    """Every hard-constraint violation of the upcoming visits of ``schedule``, in words (empty: none)."""
    problems = []
    load: dict[tuple[int, int], float] = dict(capacity_used or {})
    for p in range(people.n):
        prev = int(people.previous_day[p])
        for v in range(int(people.first_visit[p]), plan.n_visits):
            visit, d, rem = plan.visits[v], int(schedule.day[p, v]), bool(schedule.remote[p, v])
            modality = REMOTE if rem else IN_PERSON
            if not visit.earliest_day <= d <= visit.latest_day:
                problems.append(f"participant {p} visit {visit.name}: day {d} outside its window")
            if d <= people.as_of_day[p]:
                problems.append(f"participant {p} visit {visit.name}: day {d} not after the data cut")
            if not visit.allows(modality):
                problems.append(f"participant {p} visit {visit.name}: modality {modality} not allowed")
            if prev >= 0 and d - prev < plan.min_spacing_days:
                problems.append(f"participant {p} visit {visit.name}: {d - prev} days after the previous visit")
            key = (int(people.site[p]), int(people.start_day[p] + d))
            load[key] = load.get(key, 0.0) + visit.hours(modality)
            prev = d
    for (s, c), h in sorted(load.items()):
        if h > plan.capacity_hours_per_day + 1e-9:
            problems.append(f"site {s} day {c}: {h:g} site hours over the capacity {plan.capacity_hours_per_day:g}")
    return problems


@dataclass(frozen=True, eq=False)
class Replay:
    """Missed upcoming visits per participant and replicate under two schedules with common random numbers."""

    missed_a: np.ndarray  # (n, reps)
    missed_b: np.ndarray

    @property
    def reps(self) -> int:
        return int(self.missed_a.shape[1])

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """Total missed visits over participants, per replicate."""
        return self.missed_a.sum(axis=0), self.missed_b.sum(axis=0)

    def gain(self, level: float = 0.95) -> tuple[float, float, float, float]:
        """Mean missed-visit reduction (a - b) over the cohort, its standard error and normal interval."""
        from scipy.stats import norm

        a, b = self.totals()
        diff = (a - b).astype(float)
        se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
        z = float(norm.ppf(0.5 + level / 2))
        mean = float(diff.mean())
        return mean, se, mean - z * se, mean + z * se

    def expected(self) -> tuple[float, float, float, float]:
        """Expected missed visits under a and b and their Monte Carlo standard errors."""
        a, b = self.totals()
        k = max(a.size, 2)
        return (float(a.mean()), float(b.mean()), float(a.std(ddof=1) / np.sqrt(k)) if a.size > 1 else 0.0,
                float(b.std(ddof=1) / np.sqrt(k)) if b.size > 1 else 0.0)


def replay_schedules(plan: VisitPlan, people: Participants, a: Schedule, b: Schedule,
                     model: BehaviourModel | None = None, reps: int = 200, seed: int = 0) -> Replay:
    """Replay two schedules through :func:`simulate_behaviour` with common random numbers.

    Each participant is simulated ``reps`` times from study day 0 under each schedule with the same
    random bits (seeded by ``(seed, participant)``); a missed visit is an upcoming visit not attended,
    dropping out included (a participant who leaves misses what was still planned).
    """
    model = model or BehaviourModel()
    if reps < 2:
        raise ValueError("reps must be at least 2")
    missed_a = np.zeros((people.n, reps), dtype=np.int64)
    missed_b = np.zeros_like(missed_a)
    seeds = np.random.SeedSequence(seed).spawn(people.n)
    for p in range(people.n):
        first = int(people.first_visit[p])
        if first >= plan.n_visits:
            continue
        cov = people.covariates(p, reps)
        sa = VisitSchedule(a.day[p], np.broadcast_to(a.remote[p], (reps, plan.n_visits)))
        sb = VisitSchedule(b.day[p], np.broadcast_to(b.remote[p], (reps, plan.n_visits)))
        n_days = int(max(a.day[p].max(), b.day[p].max())) + 1
        bits = draw_random_bits(np.random.default_rng(seeds[p]), reps, n_uniforms(sa, n_days))
        for sched, out in ((sa, missed_a), (sb, missed_b)):
            res = simulate_behaviour(model, cov, sched, n_days, random_bits=bits)
            out[p] = (~res.attended[:, first:]).sum(axis=1)
    return Replay(missed_a, missed_b)
