"""Poisson–gamma recruitment (Anisimov & Fedorov 2007): parameter recovery and forecast coverage over
seeded known-truth replicates, and the closed-form negative-binomial predictive against Monte Carlo."""
from __future__ import annotations

import numpy as np
import pytest

from inference.enrollment import (fit_poisson_gamma, forecast_enrollment, negative_binomial_predictive,
                                  simulate_recruitment)

pytestmark = pytest.mark.unit
ALPHA, BETA = 2.0, 40.0  # mean 0.05 screened per site per day, between-site CV 71 %


def _cut(times, activation, cut):
    k = np.array([np.sum(t <= cut) for t in times])
    return k, np.clip(cut - activation, 1e-9, None)


@pytest.mark.slow
def test_mle_intervals_and_interim_forecasts_cover_at_their_nominal_levels_over_200_replicates():
    reps, sites, cut, more = 200, 60, 300.0, 400
    cov_a = cov_b = cov80 = cov95 = 0
    for r in range(reps):
        rng = np.random.default_rng(r)
        act = rng.uniform(0, 120, sites)
        times, _ = simulate_recruitment(ALPHA, BETA, sites, activation=act, until=1200, seed=r)
        k, tau = _cut(times, act, cut)
        fit = fit_poisson_gamma(k, tau)
        cov_a += fit.alpha_ci[0] <= ALPHA <= fit.alpha_ci[1]
        cov_b += fit.beta_ci[0] <= BETA <= fit.beta_ci[1]
        allt = np.sort(np.concatenate(times))
        target = int(np.sum(allt <= cut)) + more
        actual = allt[target - 1] - cut
        fc = forecast_enrollment(fit, k, tau, more, horizon_days=800, samples=500, seed=r, band=False)
        cov80 += fc.quantile(0.10) <= actual <= fc.quantile(0.90)
        cov95 += fc.quantile(0.025) <= actual <= fc.quantile(0.975)
    print(f"\n{reps} replicates: 95 % interval coverage alpha {cov_a / reps:.1%}, beta {cov_b / reps:.1%}; "
          f"time to target covered by the 80 % interval {cov80 / reps:.1%}, by the 95 % interval {cov95 / reps:.1%}")
    assert abs(cov_a / reps - 0.95) <= 0.05 and abs(cov_b / reps - 0.95) <= 0.05
    assert abs(cov80 / reps - 0.80) <= 0.05
    assert abs(cov95 / reps - 0.95) <= 0.05


def test_closed_form_negative_binomial_predictive_matches_monte_carlo():
    rng = np.random.default_rng(4)
    a_post, b_post, horizon = 2.0 + 7, 40.0 + 150.0, 90.0
    lam = rng.gamma(a_post, 1 / b_post, 400_000)
    draws = rng.poisson(lam * horizon)
    k = np.arange(25)
    mc = np.bincount(draws, minlength=25)[:25] / draws.size
    np.testing.assert_allclose(negative_binomial_predictive(a_post, b_post, horizon, k), mc, atol=3e-3)


def test_forecast_is_the_closed_form_negative_binomial_for_one_site_with_known_hyperparameters():
    # With (alpha, beta) known, one site's count over the next t days is negative binomial with size
    # alpha + k and success probability (beta + tau) / (beta + tau + t), so P(target reached by t) =
    # P(NB >= remaining). The forecast gets it by averaging the exact Poisson tail over drawn rates:
    # the two must agree within the Monte Carlo error of those draws.
    from inference.enrollment import GammaFit
    fit = GammaFit(alpha=3.0, beta=60.0, alpha_ci=(0, 0), beta_ci=(0, 0), log_likelihood=0.0, converged=True)
    k, tau, remaining, samples = 5, 100.0, 6, 40_000
    fc = forecast_enrollment(fit, [k], [tau], remaining, horizon_days=400, samples=samples, seed=3, band=False)
    closed = np.array([1.0 - negative_binomial_predictive(3.0 + k, 60.0 + tau, t, np.arange(remaining)).sum()
                       for t in fc.days])
    assert closed[-1] > 0.9 and closed[20] < 0.1  # the horizon spans the whole distribution
    np.testing.assert_allclose(fc.cdf, closed, atol=4 * 0.5 / np.sqrt(samples))
    # screened and randomized totals thin the stream: with 1,000 screened and 500 randomized, p ~ 0.5 and
    # the count is NB with success probability (beta + tau) / (beta + tau + p t)
    thinned = forecast_enrollment(fit, [k], [tau], remaining, horizon_days=400, samples=samples, seed=3,
                                  band=False, screened=1000, randomized=500)
    p = thinned.p_randomized
    closed = np.array([1.0 - negative_binomial_predictive(3.0 + k, 60.0 + tau, p * t, np.arange(remaining)).sum()
                       for t in thinned.days])
    np.testing.assert_allclose(thinned.cdf, closed, atol=0.01)


def test_forecast_cdf_equals_the_gamma_waiting_time_for_one_known_rate():
    # One site with a (nearly) known rate: the time to the r-th arrival of a Poisson process is
    # Gamma(r, rate) — a closed form the forecast must reproduce.
    from scipy import stats

    from inference.enrollment import GammaFit
    fit = GammaFit(alpha=1e6, beta=1e6 / 0.2, alpha_ci=(0, 0), beta_ci=(0, 0), log_likelihood=0.0, converged=True)
    fc = forecast_enrollment(fit, [0], [1e-9], 10, horizon_days=150, samples=200, band=False)
    np.testing.assert_allclose(fc.cdf, stats.gamma.cdf(fc.days, 10, scale=1 / 0.2), atol=2e-3)


def test_new_sites_and_screen_failures_move_the_forecast_the_right_way():
    act = np.zeros(20)
    times, _ = simulate_recruitment(ALPHA, BETA, 20, activation=act, until=200, seed=9)
    k, tau = _cut(times, act, 200.0)
    fit = fit_poisson_gamma(k, tau)
    base = forecast_enrollment(fit, k, tau, 150, horizon_days=900, samples=800)
    more_sites = forecast_enrollment(fit, k, tau, 150, horizon_days=900, samples=800, new_site_offsets=[30] * 10)
    failing = forecast_enrollment(fit, k, tau, 150, horizon_days=900, samples=800, screened=200, randomized=100)
    assert more_sites.quantile(0.5) < base.quantile(0.5) < failing.quantile(0.5)
    assert base.band.shape == (5, base.days.size) and np.all(np.diff(base.band[2]) >= 0)
    assert base.probability_by(base.quantile(0.5)) >= 0.5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="two sites"):
        fit_poisson_gamma([3], [10])
    with pytest.raises(ValueError, match="no site has recruited"):
        fit_poisson_gamma([0, 0], [10, 10])
    fit = fit_poisson_gamma([3, 5], [30, 40])
    with pytest.raises(ValueError, match="already reached"):
        forecast_enrollment(fit, [3, 5], [30, 40], 0)
