"""Enrollment forecasting with the Poisson–gamma recruitment model (Anisimov & Fedorov 2007).

Each site i recruits as a Poisson process with rate λᵢ ~ Gamma(α, β) (shape α, rate β, per day).
Given kᵢ screened participants in τᵢ active days, the counts are negative binomial; (α, β) are
fitted by maximum likelihood and each site's rate has the posterior Gamma(α + kᵢ, β + τᵢ). A
screened participant is randomized with probability p (binomial thinning, Beta posterior).
Pure numerics: numpy + scipy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

__all__ = ["GammaFit", "fit_poisson_gamma", "EnrollmentForecast", "forecast_enrollment",
           "negative_binomial_predictive", "simulate_recruitment"]


@dataclass(frozen=True)
class GammaFit:
    """The fitted rate distribution Gamma(α, β) across sites, with 95 % Wald intervals on log scale."""

    alpha: float
    beta: float
    alpha_ci: tuple[float, float]
    beta_ci: tuple[float, float]
    log_likelihood: float
    converged: bool
    cov_log: np.ndarray | None = None  # covariance of (log α, log β): parameter uncertainty for forecasts

    @property
    def mean_rate(self) -> float:
        """Mean recruitment rate per site per day, α / β."""
        return self.alpha / self.beta


def _nb_loglik(log_ab: np.ndarray, k: np.ndarray, tau: np.ndarray) -> float:
    a, b = np.exp(log_ab)
    return float(np.sum(special.gammaln(a + k) - special.gammaln(a) - special.gammaln(k + 1)
                        + a * np.log(b / (b + tau)) + k * np.log(tau / (b + tau))))


def fit_poisson_gamma(counts, durations) -> GammaFit:
    """Maximum-likelihood (α, β) from each site's count and active duration (days).

    The marginal of a count is negative binomial with size α and success probability β/(β + τ).
    Intervals come from the observed information in (log α, log β), so they stay positive.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> tau = np.full(400, 200.0); lam = rng.gamma(2.0, 1 / 40.0, 400)
    >>> fit = fit_poisson_gamma(rng.poisson(lam * tau), tau)
    >>> round(fit.mean_rate, 2)
    0.05
    """
    k = np.asarray(counts, dtype=float)
    tau = np.asarray(durations, dtype=float)
    if k.ndim != 1 or k.shape != tau.shape or k.size < 2:
        raise ValueError("need the counts and active durations of at least two sites")
    if np.any(k < 0) or np.any(tau <= 0):
        raise ValueError("counts must be >= 0 and active durations > 0 days")
    if k.sum() == 0:
        raise ValueError("no site has recruited anyone yet: the rates cannot be estimated from the data")
    # Start from the method of moments on the per-day rates.
    r = k / tau
    m, v = r.mean(), max(r.var(ddof=1) - np.mean(r / tau), 1e-4 * r.mean() ** 2 + 1e-12)
    start = np.log([max(m * m / v, 1e-2), max(m / v, 1e-4)])
    res = optimize.minimize(lambda x: -_nb_loglik(x, k, tau), start, method="BFGS")
    x = res.x
    # Observed information by central differences of the analytic log-likelihood.
    h = 1e-4
    hess = np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            ei, ej = np.eye(2)[i] * h, np.eye(2)[j] * h
            hess[i, j] = (_nb_loglik(x + ei + ej, k, tau) - _nb_loglik(x + ei - ej, k, tau)
                          - _nb_loglik(x - ei + ej, k, tau) + _nb_loglik(x - ei - ej, k, tau)) / (4 * h * h)
    try:
        cov = np.linalg.inv(-hess)
        se = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        cov, se = None, np.full(2, np.inf)
    z = stats.norm.ppf(0.975)
    a, b = np.exp(x)
    return GammaFit(alpha=float(a), beta=float(b),
                    alpha_ci=(float(a * np.exp(-z * se[0])), float(a * np.exp(z * se[0]))),
                    beta_ci=(float(b * np.exp(-z * se[1])), float(b * np.exp(z * se[1]))),
                    log_likelihood=-float(res.fun), converged=bool(res.success),
                    cov_log=cov if np.all(np.isfinite(se)) else None)


def negative_binomial_predictive(alpha_post: float, beta_post: float, horizon_days: float, k) -> np.ndarray:
    """P(k new participants in the next ``horizon_days``) for a site with posterior Gamma(α', β').

    The Poisson count mixed over the gamma rate is negative binomial with size α' and success
    probability β'/(β' + horizon).

    >>> float(negative_binomial_predictive(2.0, 40.0, 0.0, 0))
    1.0
    """
    return stats.nbinom.pmf(np.asarray(k), alpha_post, beta_post / (beta_post + horizon_days))


@dataclass(frozen=True)
class EnrollmentForecast:
    """The predictive distribution of the time to reach the target, and expected counts by day.

    ``days`` are days after the cut; ``cdf[j]`` = P(target reached by ``days[j]``); ``expected``
    is the expected cumulative number randomized by day (all sites), ``expected_by_site`` per
    site (rows), ``band`` the 2.5/10/50/90/97.5 % quantiles of the cumulative count by day.
    """

    remaining: int
    days: np.ndarray
    cdf: np.ndarray
    expected: np.ndarray
    expected_by_site: np.ndarray
    band: np.ndarray
    p_randomized: float

    def quantile(self, q: float) -> float:
        """Day (after the cut) by which the target is reached with probability ``q`` (inf if beyond)."""
        idx = np.searchsorted(self.cdf, q, side="left")
        return float(self.days[idx]) if idx < self.days.size else float("inf")

    def probability_by(self, day: float) -> float:
        """P(target reached within ``day`` days of the cut)."""
        idx = np.searchsorted(self.days, day, side="right") - 1
        return float(self.cdf[idx]) if idx >= 0 else 0.0


def forecast_enrollment(fit: GammaFit, counts, durations, remaining: int, *, horizon_days: int = 730,
                        start_offsets=None, new_site_offsets=(), screened: int | None = None,
                        randomized: int | None = None, samples: int = 4000, seed: int = 0,
                        band: bool = True) -> EnrollmentForecast:
    """Forecast recruitment from the cut: existing sites from their posteriors, new sites from the prior.

    Parameters
    ----------
    fit : GammaFit
        The fitted Gamma(α, β) of screening rates.
    counts, durations : array_like
        Each existing site's screened count and active days up to the cut.
    remaining : int
        Participants still to randomize (target − randomized so far), >= 1.
    horizon_days : int
        How far ahead to look (days after the cut).
    start_offsets : array_like, optional
        Days after the cut at which each existing site (re)starts recruiting (default 0: active).
    new_site_offsets : sequence of float
        Planned new sites: the day after the cut each one opens (rates from the prior).
    screened, randomized : int, optional
        Study totals for the screen-failure thinning; p ~ Beta(1 + randomized, 1 + failures).
        Without them, every screened participant counts (p = 1).
    samples, seed : int
        Monte Carlo draws of (α, β) from their asymptotic distribution (so the forecast carries the
        uncertainty of the fit), of the site rates given them, and of p; the count given the rates
        is handled exactly: P(T ≤ t | λ) = P(Poisson(m(t)) ≥ remaining) = P(remaining, m(t)), the
        regularized lower incomplete gamma function, m(t) the cumulative intensity.
    """
    if remaining < 1:
        raise ValueError("the target is already reached: nothing left to forecast")
    k = np.asarray(counts, dtype=float)
    tau = np.asarray(durations, dtype=float)
    starts = np.zeros_like(k) if start_offsets is None else np.asarray(start_offsets, dtype=float)
    new = np.asarray(new_site_offsets, dtype=float)
    rng = np.random.default_rng(seed)
    if fit.cov_log is not None:
        log_ab = rng.multivariate_normal(np.log([fit.alpha, fit.beta]), fit.cov_log, size=samples)
        a, b = np.exp(log_ab[:, :1]), np.exp(log_ab[:, 1:])
    else:
        a, b = np.full((samples, 1), fit.alpha), np.full((samples, 1), fit.beta)
    lam_existing = rng.gamma(a + k[None, :], 1.0 / (b + tau[None, :]), size=(samples, k.size))
    lam_new = rng.gamma(np.broadcast_to(a, (samples, new.size)), 1.0 / np.broadcast_to(b, (samples, new.size)))
    if screened is not None and randomized is not None:
        if not 0 <= randomized <= screened:
            raise ValueError("randomized must lie between 0 and the number screened")
        p = rng.beta(1.0 + randomized, 1.0 + screened - randomized, size=samples)
        p_mean = (1.0 + randomized) / (2.0 + screened)
    else:
        p = np.ones(samples)
        p_mean = 1.0
    days = np.arange(0, horizon_days + 1, dtype=float)
    active_exist = np.clip(days[:, None] - starts[None, :], 0, None)  # (T, S) active days after the cut
    active_new = np.clip(days[:, None] - new[None, :], 0, None)
    # Cumulative intensity per sample and day: (samples, T)
    m = (lam_existing @ active_exist.T + lam_new @ active_new.T) * p[:, None]
    cdf = special.gammainc(remaining, m).mean(axis=0)
    cdf = np.maximum.accumulate(cdf)
    mean_rates = np.concatenate([(fit.alpha + k) / (fit.beta + tau), np.full(new.size, fit.alpha / fit.beta)])
    by_site = (np.concatenate([active_exist, active_new], axis=1) * mean_rates[None, :] * p_mean).T
    # Predictive band of the cumulative count: one Poisson draw per sample and day, made monotone
    # by drawing increments.
    if band:
        inc = np.diff(m, axis=1, prepend=0.0)
        draws = np.cumsum(rng.poisson(np.clip(inc, 0, None)), axis=1)
        quantiles = np.quantile(draws, [0.025, 0.10, 0.5, 0.90, 0.975], axis=0)
    else:
        quantiles = np.empty((5, 0))
    return EnrollmentForecast(remaining=int(remaining), days=days, cdf=cdf, expected=by_site.sum(axis=0),
                              expected_by_site=by_site, band=quantiles, p_randomized=float(p_mean))


def simulate_recruitment(alpha: float, beta: float, n_sites: int, *, activation, until: float,
                         p_randomized: float = 1.0, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Known-truth recruitment: each site's screening times (days) and whether each was randomized.

    Returns per-site arrays of screening times in ``[activation_i, until]`` and a matching list of
    boolean arrays (randomized or screen failure), for tests and benchmarks.
    """
    rng = np.random.default_rng(seed)
    lam = rng.gamma(alpha, 1.0 / beta, n_sites)
    act = np.broadcast_to(np.asarray(activation, dtype=float), (n_sites,))
    times, ok = [], []
    for i in range(n_sites):
        n = rng.poisson(lam[i] * max(until - act[i], 0.0))
        t = np.sort(rng.uniform(act[i], until, n))
        times.append(t)
        ok.append(rng.random(n) < p_randomized)
    return times, ok
