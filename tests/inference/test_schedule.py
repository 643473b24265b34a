"""Visit-schedule optimisation: replay on 200 simulated participants with common random numbers, hard
constraints under a binding capacity, plan errors, and the miss probability against the simulator."""
from __future__ import annotations

import numpy as np
import pytest

from inference.behaviour import BehaviourModel, VisitSchedule, simulate_behaviour
from inference.covariates import Covariates
from inference.schedule import (IN_PERSON, MODALITIES, REMOTE, Participants, PlanError, PlannedVisit, Schedule,
                                VisitPlan, check_schedule, default_schedule, greedy_schedule, information_weights,
                                miss_probability, optimize_schedule, replay_schedules)

pytestmark = pytest.mark.unit


def monthly_plan(n_visits: int = 6, window: int = 7, capacity: float = 6.0, spacing: int = 14) -> VisitPlan:
    """Monthly visits; every third is on site; the protocol default alternates in person and remote."""
    visits = []
    for i in range(n_visits):
        day = 28 * (i + 1)
        on_site = i % 3 == 2
        visits.append(PlannedVisit(f"v{i + 1}", day, day - window, day + window, MODALITIES,
                                   IN_PERSON if on_site or i % 2 == 0 else REMOTE, on_site, 1.5, 0.5))
    return VisitPlan(tuple(visits), spacing, capacity)


def simulated_people(n: int = 200, seed: int = 11, sites: int = 3, spread: int = 120) -> Participants:
    rng = np.random.default_rng(seed)
    return Participants(distance_km=rng.gamma(2.0, 12.0, n), age_y=rng.normal(55, 10, n),
                        site=rng.integers(0, sites, n), start_day=rng.integers(0, spread, n),
                        first_visit=np.zeros(n, dtype=int), previous_day=np.full(n, -1), as_of_day=np.zeros(n, dtype=int))


@pytest.fixture(scope="module")
def cohort():
    plan, people = monthly_plan(), simulated_people()
    info = information_weights(plan, 0.12, 0.2 / np.sqrt(365.25))
    solution = optimize_schedule(plan, people, information=info)
    return plan, people, solution


def test_proposal_lowers_missed_visits_on_200_participants(cohort):
    plan, people, solution = cohort
    replay = replay_schedules(plan, people, default_schedule(plan, people), solution.schedule, reps=200, seed=1)
    gain, se, low, high = replay.gain()
    default, proposal, _, _ = replay.expected()
    print(f"\n{people.n} participants x {plan.n_visits} visits, {replay.reps} CRN replicates: missed {default:.1f} "
          f"(default) vs {proposal:.1f} (proposal), gain {gain:.2f} (SE {se:.2f}, 95 % {low:.2f} to {high:.2f})")
    assert low > 0, (gain, se)
    assert gain == pytest.approx(default - proposal)


def test_reported_gain_agrees_with_an_independent_replay(cohort):
    plan, people, solution = cohort
    default = default_schedule(plan, people)
    reported = replay_schedules(plan, people, default, solution.schedule, reps=200, seed=0)
    again = replay_schedules(plan, people, default, solution.schedule, reps=200, seed=987)
    (g1, s1, _, _), (g2, s2, _, _) = reported.gain(), again.gain()
    print(f"\nreported gain {g1:.2f} (SE {s1:.2f}) vs independent replay {g2:.2f} (SE {s2:.2f}): "
          f"{abs(g1 - g2) / np.hypot(s1, s2):.2f} combined SE apart")
    assert abs(g1 - g2) < 3.5 * np.hypot(s1, s2)
    # common random numbers make the difference far more precise than the two totals it comes from
    _, _, se_default, se_proposal = reported.expected()
    assert s1 < 0.5 * np.hypot(se_default, se_proposal)


def test_proposal_never_violates_a_hard_constraint(cohort):
    plan, people, solution = cohort
    s = solution.schedule
    assert check_schedule(plan, people, s) == []
    # the same facts, checked directly rather than through check_schedule
    for v, visit in enumerate(plan.visits):
        assert np.all((s.day[:, v] >= visit.earliest_day) & (s.day[:, v] <= visit.latest_day))
        if visit.on_site:
            assert not s.remote[:, v].any()
    assert np.all(np.diff(s.day, axis=1) >= plan.min_spacing_days)
    hours = np.where(s.remote, [v.hours_remote for v in plan.visits], [v.hours_in_person for v in plan.visits])
    load: dict = {}
    for p in range(people.n):
        for v in range(plan.n_visits):
            key = (people.site[p], people.start_day[p] + s.day[p, v])
            load[key] = load.get(key, 0.0) + hours[p, v]
    assert max(load.values()) <= plan.capacity_hours_per_day + 1e-9


def test_binding_capacity_is_kept_where_the_protocol_default_breaks_it():
    # 60 participants of one site randomized within 5 days: the default puts up to ~20 visits on one day
    plan = monthly_plan(capacity=6.0)
    people = simulated_people(n=60, seed=3, sites=1, spread=5)
    default = default_schedule(plan, people)
    assert any(m.startswith("site ") for m in check_schedule(plan, people, default))
    solution = optimize_schedule(plan, people)
    assert check_schedule(plan, people, solution.schedule) == []
    assert check_schedule(plan, people, greedy_schedule(plan, people)) == []


def test_check_schedule_reports_each_kind_of_violation(cohort):
    plan, people, solution = cohort
    day, remote = solution.schedule.day.copy(), solution.schedule.remote.copy()
    day[0, 0] = plan.visits[0].latest_day + 1
    on_site = next(v for v, visit in enumerate(plan.visits) if visit.on_site)
    remote[1, on_site] = True
    day[2, 1] = day[2, 0] + 1
    problems = check_schedule(plan, people, Schedule(day, remote))
    assert any("outside its window" in m for m in problems)
    assert any("modality virtual not allowed" in m for m in problems)
    assert any("days after the previous visit" in m for m in problems)


def test_existing_bookings_reduce_the_capacity():
    plan = monthly_plan(n_visits=2, window=0, capacity=3.0)
    people = simulated_people(n=2, seed=5, sites=1, spread=1)
    people = Participants(people.distance_km, people.age_y, people.site, np.zeros(2, dtype=int),
                          people.first_visit, people.previous_day, people.as_of_day)
    # day 28 already holds 1.5 h elsewhere: two in-person v1 visits (3 h) no longer fit, so v1 goes remote
    solution = optimize_schedule(plan, people, capacity_used={(0, 28): 2.0})
    assert check_schedule(plan, people, solution.schedule, {(0, 28): 2.0}) == []
    with pytest.raises(PlanError) as err:
        optimize_schedule(monthly_plan(n_visits=3, window=0, capacity=3.0), people, capacity_used={(0, 84): 2.0})
    assert err.value.kind == "capacity-infeasible"


def test_unsatisfiable_windows_name_the_visit():
    with pytest.raises(PlanError) as err:
        monthly_plan(window=3, spacing=40)
    assert err.value.kind == "window-unsatisfiable" and err.value.visit == "v2"
    with pytest.raises(PlanError) as err:
        monthly_plan(capacity=0.0)
    assert err.value.kind == "capacity-invalid"
    plan = monthly_plan(window=2)
    late = Participants([5.0], [50.0], [0], [0], [1], [28], [60])  # data cut on day 60: v2 (54..58) is gone
    with pytest.raises(PlanError) as err:
        optimize_schedule(plan, late)
    assert err.value.kind == "window-unsatisfiable" and err.value.visit == "v2"


def test_miss_probability_matches_the_simulator_for_a_first_visit():
    # no adverse events and no dropout: the first visit's miss rate is the attendance logistic itself
    model = BehaviourModel(ae_background=0.0, ae_max=0.0, dropout_log_hazard=-60.0)
    plan = VisitPlan((PlannedVisit("v1", 28, 28, 28, MODALITIES, IN_PERSON),), 1, 10.0)
    people = Participants([40.0], [60.0], [0], [0], [0], [-1], [0])
    q = miss_probability(model, people, plan)[0, 0]
    closed = 1.0 / (1.0 + np.exp(-(model.attend_intercept + model.attend_in_person
                                   + model.attend_distance_per_10km * 4.0 + model.attend_visits_last_30d)))
    assert q[0] == pytest.approx(1.0 - closed, rel=1e-12)
    n = 200_000
    cov = Covariates(weight_kg=np.full(n, 80.0), age_y=np.full(n, 60.0), egfr=np.full(n, 90.0),
                     sex_female=np.zeros(n), distance_km=np.full(n, 40.0), site=np.zeros(n, dtype=int))
    for remote, expected in ((False, q[0]), (True, q[1])):
        res = simulate_behaviour(model, cov, VisitSchedule([28], [remote]), 29, np.random.default_rng(4))
        rate = 1.0 - res.attended[:, 0].mean()
        assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / n)


def test_solution_is_deterministic(cohort):
    plan, people, solution = cohort
    info = information_weights(plan, 0.12, 0.2 / np.sqrt(365.25))
    again = optimize_schedule(plan, people, information=info)
    assert np.array_equal(again.schedule.day, solution.schedule.day)
    assert np.array_equal(again.schedule.remote, solution.schedule.remote)
