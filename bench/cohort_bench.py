"""Cohort benchmark: vectorized simulation of the shipped daily-regimen definition (the demo study's
PK/PD + disease model) with behaviour, on one CPU core.

Compares, in the same run, a straightforward per-participant scipy.integrate.solve_ivp loop of the
same model on a subset, and writes bench/results/cohort_bench.json with the machine description.
"""
import os

# one core: must be set before numpy is imported
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference import cohort  # noqa: E402
from inference.behaviour import VisitSchedule, draw_random_bits, n_uniforms  # noqa: E402
from inference.cohort import BLOCK_SIZE, Scenario, simulate_cohort  # noqa: E402
from inference.model_definition import example_regimen  # noqa: E402
from _machine import cpu_model, library_versions


def machine() -> dict:
    cpu = cpu_model()
    versions = library_versions(("numpy", "scipy", "SALib"))
    return {"platform": platform.platform(), "cpu_model": cpu, "logical_cores": os.cpu_count(),
            "python": platform.python_version(), "libraries": versions,
            "load_average_at_start": list(os.getloadavg()),
            "threads": {v: os.environ[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "MKL_NUM_THREADS")}}


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def loop_participant(cov, par, bits, scenario: Scenario) -> dict:
    """One participant, day by day, with the PK of each day integrated by solve_ivp.

    The same equations and the same random draws as the vectorized path, written the plain way:
    scalar Python for behaviour and disease, an ODE solve (depot, central, AUC) per day for PK.
    """
    m, sched, n_days = scenario.behaviour, scenario.schedule, scenario.n_days
    cl, v, ka, tlag, f = par["cl"], par["v"], par["ka"], par["tlag"], par["f"]
    k = cl / v

    def rhs(_t, y):
        return [-ka * y[0], ka * y[0] - k * y[1], y[1]]

    visit_days = [int(d) for d in sched.days if d < n_days]
    remote = [bool(r) for r in sched.remote[:len(visit_days)]]
    age_term = m.adherence_age_per_decade * (cov["age_y"] - 50.0) / 10.0
    p_taken = _logistic(m.adherence_after_taken + age_term)
    p_missed = _logistic(m.adherence_after_missed + age_term)
    burden = [m.remote_burden if r else 1.0 + cov["distance_km"] / 25.0 for r in remote]
    scale = 2.0 ** -32
    threshold = -math.log1p(-float(bits[-1]) * scale)
    depot = central = 0.0
    cum_hazard, take, ae_until, prev_missed = 0.0, True, -1, False
    days_on, offset, conc_sum = 0, 0.0, 0.0
    a = 1.0 - math.exp(-par["k_onset"])
    n_ae, attended = 0, 0
    last_values = None
    for t in range(n_days):
        on = cum_hazard <= threshold
        days_on += on
        recent_ae = ae_until >= t
        p = (p_taken if take else p_missed) * (1.0 - m.adherence_recent_ae * recent_ae)
        take = (float(bits[t]) * scale < p) and on
        y = [depot, central, 0.0]
        if take:
            if tlag > 0:
                y = solve_ivp(rhs, (0.0, tlag), y, rtol=1e-8, atol=1e-10).y[:, -1].tolist()
            y[0] += f * scenario.dose_mg
            y = solve_ivp(rhs, (tlag, 24.0), y, rtol=1e-8, atol=1e-10).y[:, -1].tolist()
        else:
            y = solve_ivp(rhs, (0.0, 24.0), y, rtol=1e-8, atol=1e-10).y[:, -1].tolist()
        depot, central = y[0], y[1]
        c = y[2] / (24.0 * v)
        r = (c / m.ae_c50) ** m.ae_hill
        p_ae = m.ae_background + m.ae_max * r / (1.0 + r)
        event = float(bits[n_days + t]) * scale < p_ae
        if event:
            ae_until = max(ae_until, t + m.ae_window_days)
            n_ae += on
        recent_ae = recent_ae or event
        if t in visit_days:
            j = visit_days.index(t)
            n_recent = sum(1 for d in visit_days if t - 30 < d <= t)
            logit = (m.attend_intercept
                     + (0.0 if remote[j] else m.attend_in_person
                        + m.attend_distance_per_10km * cov["distance_km"] / 10.0)
                     + m.attend_visits_last_30d * n_recent + m.attend_recent_ae * recent_ae
                     + m.attend_previous_missed * prev_missed)
            came = float(bits[2 * n_days + j]) * scale < _logistic(logit) and on
            attended += came
            prev_missed = not came
        recent_burden = sum(b for d, b in zip(visit_days, burden) if t - 30 < d <= t)
        hazard = math.exp(m.dropout_log_hazard + m.dropout_burden * recent_burden
                          + m.dropout_recent_ae * recent_ae + m.dropout_time_per_100d * t / 100.0)
        cum_hazard += hazard
        act = c / (par["ec50"] + c)
        offset = offset * (1.0 - a) + a * act
        conc_sum += c
        if on:
            last_values = (t, offset, conc_sum)
    t_last, offset_last, sum_last = last_values if last_values else (0, 0.0, 0.0)
    # the disease marker: baseline + drift, minus the delayed drug offset (EMAX * EFFSCALE, a decrease)
    hba1c_last = par["base"] + par["slope"] * t_last + par["sign"] * par["effscale"] * par["emax"] * offset_last
    return {"dropout_day": days_on, "n_ae": n_ae, "visits_attended": attended,
            "hba1c_last": hba1c_last, "cavg_on_study": sum_last / (t_last + 1)}


def subset_inputs(scenario: Scenario, seed: int, m: int, model):
    """Covariates, parameters and random bits of the first ``m`` participants (block 0), drawn
    exactly as simulate_cohort draws them."""
    rng = cohort._block_generator(seed, 0)
    cov = cohort.sample_covariates(model.covariate_model, BLOCK_SIZE, rng)
    par = model.sample_parameters(cov, rng)
    par.pop("named")
    bits = draw_random_bits(rng, BLOCK_SIZE, n_uniforms(scenario.schedule, scenario.n_days))
    covs = [{k: float(val[i]) for k, val in cov.as_dict().items()} for i in range(m)]
    pars = [{k: float(np.broadcast_to(val, (BLOCK_SIZE,))[i]) for k, val in par.items()} for i in range(m)]
    return covs, pars, bits[:, :m]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--loop-n", type=int, default=50)
    ap.add_argument("--chunk-size", type=int, default=10 * BLOCK_SIZE)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cohort_bench.json"))
    args = ap.parse_args()

    scenario = Scenario(dose_mg=100.0, n_days=365, schedule=VisitSchedule.every(28, 13),
                        name="100 mg once daily, 1 year, 4-weekly in-person visits")
    model = example_regimen()
    years = args.n * scenario.n_days / 365.25

    simulate_cohort(scenario, n=BLOCK_SIZE, seed=args.seed, model=model)  # warm-up (imports, caches)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = simulate_cohort(scenario, n=args.n, seed=args.seed, chunk_size=args.chunk_size, model=model)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    tracemalloc.start()
    simulate_cohort(scenario, n=2 * args.chunk_size, seed=args.seed, chunk_size=args.chunk_size, model=model)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    covs, pars, bits = subset_inputs(scenario, args.seed, args.loop_n, model)
    loop_wall0, loop_cpu0 = time.perf_counter(), time.process_time()
    loop = [loop_participant(covs[i], pars[i], bits[:, i], scenario) for i in range(args.loop_n)]
    loop_wall, loop_cpu = time.perf_counter() - loop_wall0, time.process_time() - loop_cpu0
    loop_years = args.loop_n * scenario.n_days / 365.25

    s = result.summary
    sub = slice(0, args.loop_n)
    same_dropout = float(np.mean(np.array([r["dropout_day"] for r in loop]) == s["dropout_day"][sub]))
    same_visits = float(np.mean(np.array([r["visits_attended"] for r in loop]) == s["visits_attended"][sub]))
    same_ae = float(np.mean(np.array([r["n_ae"] for r in loop]) == s["n_ae"][sub]))
    hba1c_diff = float(np.max(np.abs(np.array([r["hba1c_last"] for r in loop]) - s["hba1c_last"][sub])))
    cavg_rel = float(np.max(np.abs(np.array([r["cavg_on_study"] for r in loop]) / s["cavg_on_study"][sub] - 1)))

    vec_rate_wall, vec_rate_cpu = years / wall, years / cpu
    loop_rate_wall, loop_rate_cpu = loop_years / loop_wall, loop_years / loop_cpu
    out = {
        "benchmark": "cohort_bench",
        "model": f"{model.canonical}: 1-cmt oral PK with lag (allometric weight, eGFR on CL, log-normal IIV) -> "
                 "Emax on FPG -> HbA1c (linear drift, delayed drug offset) + behaviour "
                 "(adherence chain, concentration-driven AEs, attendance, dropout hazard)",
        "scenario": scenario.name,
        "machine": machine(),
        "vectorized": {"participants": args.n, "days": scenario.n_days, "participant_years": years,
                       "chunk_size": args.chunk_size, "wall_s": wall, "cpu_s": cpu,
                       "participant_years_per_s_wall": vec_rate_wall,
                       "participant_years_per_s_cpu": vec_rate_cpu,
                       "peak_rss_mib": rss_after / 1024.0, "rss_growth_mib": (rss_after - rss_before) / 1024.0,
                       "tracemalloc_peak_mib_two_chunks": traced_peak / 2 ** 20},
        "solve_ivp_loop": {"participants": args.loop_n, "participant_years": loop_years,
                           "wall_s": loop_wall, "cpu_s": loop_cpu,
                           "participant_years_per_s_wall": loop_rate_wall,
                           "participant_years_per_s_cpu": loop_rate_cpu,
                           "solver": "solve_ivp RK45 per day (split at the lag), rtol 1e-8, atol 1e-10"},
        "speedup_wall": vec_rate_wall / loop_rate_wall,
        "speedup_cpu": vec_rate_cpu / loop_rate_cpu,
        "agreement_on_loop_subset": {"same_dropout_day": same_dropout, "same_visits_attended": same_visits,
                                     "same_n_ae": same_ae, "max_abs_diff_hba1c_last_pct": hba1c_diff,
                                     "max_rel_diff_cavg": cavg_rel},
        "targets": {"participant_years_per_s": 1e5, "speedup": 100.0},
        "cohort_outcomes": cohort.summarize(result),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"vectorized: {years:,.0f} participant-years in {wall:.2f} s wall / {cpu:.2f} s CPU "
          f"-> {vec_rate_wall:,.0f} py/s wall, {vec_rate_cpu:,.0f} py/s CPU")
    print(f"solve_ivp loop: {loop_years:.1f} participant-years in {loop_wall:.1f} s "
          f"-> {loop_rate_wall:.2f} py/s")
    print(f"speedup: {out['speedup_wall']:,.0f}x wall, {out['speedup_cpu']:,.0f}x CPU")
    print(f"peak RSS {rss_after / 1024:.0f} MiB; tracemalloc peak (2 chunks) {traced_peak / 2**20:.0f} MiB")
    print(f"agreement on {args.loop_n}: dropout day {same_dropout:.0%}, visits {same_visits:.0%}, "
          f"AEs {same_ae:.0%}, max |dHbA1c| {hba1c_diff:.2e}, max rel dCavg {cavg_rel:.2e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
