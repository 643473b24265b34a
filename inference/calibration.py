"""Bayesian calibration of one participant's twin: the population model is the prior, the
participant's own observations update it (MAP + Laplace, optional importance resampling), forecasts carry prediction intervals.

Works with any structural model ``structural(phi, data)`` (see ``inference.population``). The
posterior is over the participant's random-effect parameters on the log scale; parameters without
random effects stay at their typical (covariate-adjusted) values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from inference.estimation import find_modes
from inference.population import (
    ObservationData,
    PopulationModel,
    Structural,
    output_index,
    predict,
    residual_log_likelihood,
    residual_variance,
    typical_parameters,
)

__all__ = [
    "Posterior",
    "Forecast",
    "ImportanceSample",
    "calibrate",
    "calibrate_each",
    "update",
    "sample_posterior",
    "importance_resample",
    "forecast",
]


def _frozen(values: Any) -> np.ndarray:
    array = np.array(values, dtype=float, copy=True)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Posterior:
    """Gaussian (Laplace) posterior of one participant's random-effect parameters.

    Attributes
    ----------
    model : PopulationModel
        The population model that supplied the prior and the residual error.
    data : ObservationData
        Every observation of the participant this posterior has absorbed (one subject).
    mean : ndarray, shape (q,)
        Posterior mode (MAP) of the log-scale parameters ``model.random_effects``.
    cov : ndarray, shape (q, q)
        Laplace covariance: inverse Hessian of the negative log posterior at the mode.
    prior_mean, prior_cov : ndarray
        The prior this posterior was computed from (population, or an earlier posterior).
    converged : bool
        Whether the mode search converged.
    method : str
        ``"laplace"`` (from the population prior) or ``"laplace-sequential"``.
    """

    model: PopulationModel
    data: ObservationData
    mean: np.ndarray
    cov: np.ndarray
    prior_mean: np.ndarray
    prior_cov: np.ndarray
    converged: bool = True
    method: str = "laplace"

    def __post_init__(self) -> None:
        q = self.model.n_random_effects
        if self.data.n_subjects != 1:
            raise ValueError("a Posterior describes exactly one participant")
        for name in ("mean", "prior_mean"):
            value = _frozen(getattr(self, name))
            if value.shape != (q,) or not np.all(np.isfinite(value)):
                raise ValueError(f"{name} must hold {q} finite values")
            object.__setattr__(self, name, value)
        for name in ("cov", "prior_cov"):
            value = _frozen(getattr(self, name))
            if value.shape != (q, q) or not np.allclose(value, value.T) or np.linalg.eigvalsh(value).min() <= 0:
                raise ValueError(f"{name} must be a symmetric positive definite {q}x{q} matrix")
            object.__setattr__(self, name, value)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the calibrated parameters (the model's random effects)."""
        return self.model.random_effects

    @property
    def sd(self) -> np.ndarray:
        """Posterior standard deviations."""
        return np.sqrt(np.diag(self.cov))

    @property
    def parameters(self) -> np.ndarray:
        """All log-scale parameters at the posterior mode, shape (p,)."""
        phi = typical_parameters(self.model, self.data)[0]
        phi[self.model.random_index] = self.mean
        return phi

    @property
    def n_observations(self) -> int:
        """Number of observed values absorbed."""
        return int(self.data.observed.sum())

    def interval(self, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Equal-tailed credible interval of each calibrated parameter (log scale)."""
        if not 0 < level < 1:
            raise ValueError("level must lie in (0, 1)")
        z = stats.norm.ppf(0.5 + level / 2)
        return self.mean - z * self.sd, self.mean + z * self.sd

    def replace(self, **changes: Any) -> "Posterior":
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_single(data: ObservationData) -> None:
    if data.n_subjects != 1:
        raise ValueError(f"calibration takes one participant's data, got {data.n_subjects} subjects")
    if not np.any(data.observed):
        raise ValueError("calibration needs at least one observed value")


def _laplace_cov(observed: np.ndarray, expected: np.ndarray) -> np.ndarray:
    # the full Hessian can be indefinite far from a well-determined mode; the expected
    # information is always positive definite
    if np.linalg.eigvalsh(observed).min() > 0:
        return np.linalg.inv(observed)
    return np.linalg.inv(expected)


def _posteriors(
    model: PopulationModel,
    structural: Structural,
    data: ObservationData,
    prior_mean: np.ndarray,
    prior_cov: np.ndarray,
    absorbed: list[ObservationData],
    method: str,
) -> list[Posterior]:
    typical = typical_parameters(model, data)[:, model.random_index]
    modes = find_modes(
        model,
        structural,
        data,
        prior_mean=prior_mean - typical,
        prior_precision=np.linalg.inv(prior_cov),
        eta0=prior_mean - typical,
    )
    out = []
    for i in range(data.n_subjects):
        out.append(
            Posterior(
                model=model,
                data=absorbed[i],
                mean=typical[i] + modes.eta[i],
                cov=_laplace_cov(modes.observed_hessian[i], modes.hessian[i]),
                prior_mean=prior_mean[i],
                prior_cov=prior_cov[i],
                converged=bool(modes.converged[i]),
                method=method,
            )
        )
    return out


def _as_same_participant(posterior: Posterior, new: ObservationData) -> ObservationData:
    """New rows relabelled as the posterior's participant, inheriting covariates it does not restate."""
    _check_single(new)
    return new.replace(
        subject_ids=posterior.data.subject_ids, covariates={**posterior.data.covariates, **new.covariates}
    )


def calibrate(
    model: PopulationModel, structural: Structural, data: ObservationData, *, prior: Posterior | None = None
) -> Posterior:
    """Posterior of one participant's parameters given their observations.

    Parameters
    ----------
    model : PopulationModel
        Population model (prior ``N(typical, Omega)`` and residual error).
    structural : callable
        ``structural(phi, data) -> predictions``.
    data : ObservationData
        The participant's observations (one subject; covariates as the model needs).
    prior : Posterior, optional
        An earlier posterior of the same participant: ``data`` are then only the *new*
        observations, and the earlier Gaussian posterior is the prior (sequential update).

    Returns
    -------
    Posterior

    Examples
    --------
    >>> from inference.datasets import ssfol
    >>> from inference.population import PopulationModel, ResidualError
    >>> model = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
    ...     np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    >>> first = ObservationData.single([1.0, 4.0], [7.0, 7.5], design={"dose": [4.0, 4.0]})
    >>> post = calibrate(model, ssfol, first)
    >>> post.names, bool(np.all(post.sd < model.omega_sd))
    (('lKa', 'lCl'), True)
    """
    _check_single(data)
    if prior is None:
        typical = typical_parameters(model, data)[0, model.random_index]
        return _posteriors(model, structural, data, typical[None], model.omega[None], [data], "laplace")[0]
    if prior.model is not model and not (
        prior.model.parameters == model.parameters and np.array_equal(prior.model.theta, model.theta)
    ):
        raise ValueError("a sequential update must use the population model of the prior posterior")
    data = _as_same_participant(prior, data)
    all_data = prior.data.append(data)
    return _posteriors(
        model, structural, data, prior.mean[None], prior.cov[None], [all_data], "laplace-sequential"
    )[0]


def calibrate_each(model: PopulationModel, structural: Structural, data: ObservationData) -> tuple[Posterior, ...]:
    """Calibrate every subject of ``data`` independently from the population prior, in one vectorized pass.

    Equivalent to ``calibrate`` on each subject's rows, much faster for many participants.

    Examples
    --------
    >>> from inference.datasets import load_theoph, ssfol
    >>> from inference.population import PopulationModel, ResidualError
    >>> model = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
    ...     np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    >>> posteriors = calibrate_each(model, ssfol, load_theoph())
    >>> len(posteriors), posteriors[0].data.subject_ids
    (12, ('1',))
    """
    if not np.all(np.bincount(data.subject, weights=data.observed.astype(float), minlength=data.n_subjects) > 0):
        raise ValueError("every subject needs at least one observed value")
    typical = typical_parameters(model, data)[:, model.random_index]
    prior_cov = np.broadcast_to(model.omega, (data.n_subjects,) + model.omega.shape)
    absorbed = list(data.split())
    return tuple(_posteriors(model, structural, data, typical, prior_cov, absorbed, "laplace"))


def update(
    posterior: Posterior, structural: Structural, new_data: ObservationData, *, sequential: bool = False
) -> Posterior:
    """Absorb new observations of the participant.

    By default the posterior is recomputed from the population prior with all observations
    (exact up to the Laplace approximation); ``sequential=True`` uses the current Gaussian
    posterior as the prior for the new data only (cheaper; close when the posterior is near
    Gaussian).

    Examples
    --------
    >>> from inference.datasets import ssfol
    >>> from inference.population import PopulationModel, ResidualError
    >>> model = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
    ...     np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    >>> first = calibrate(model, ssfol, ObservationData.single([1.0], [7.0], design={"dose": [4.0]}))
    >>> later = update(first, ssfol, ObservationData.single([8.0, 24.0], [5.0, 1.5], design={"dose": [4.0, 4.0]}))
    >>> later.n_observations, bool(later.sd[1] < first.sd[1])
    (3, True)
    """
    if sequential:
        return calibrate(posterior.model, structural, new_data, prior=posterior)
    return calibrate(posterior.model, structural, posterior.data.append(_as_same_participant(posterior, new_data)))


def sample_posterior(posterior: Posterior, n: int, seed: int | np.random.Generator | None = None) -> np.ndarray:
    """Draw ``n`` full parameter vectors ``phi`` (shape ``(n, p)``) from the Gaussian posterior (seeded).

    Examples
    --------
    >>> from inference.datasets import ssfol
    >>> from inference.population import PopulationModel, ResidualError
    >>> model = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
    ...     np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    >>> post = calibrate(model, ssfol, ObservationData.single([1.0, 6.0], [7.0, 6.0], design={"dose": [4.0] * 2}))
    >>> draws = sample_posterior(post, 1000, seed=0)
    >>> draws.shape, bool(np.all(draws[:, 0] == -2.45))
    ((1000, 3), True)
    """
    rng = np.random.default_rng(seed)
    draws = rng.multivariate_normal(posterior.mean, posterior.cov, size=n, method="cholesky")
    phi = np.tile(posterior.parameters, (n, 1))
    phi[:, posterior.model.random_index] = draws
    return phi


@dataclass(frozen=True, eq=False)
class ImportanceSample:
    """Draws from the exact posterior obtained by sampling-importance-resampling.

    Attributes
    ----------
    parameters : ndarray, shape (n, p)
        Resampled parameter vectors (log scale).
    effective_sample_size : float
        Kish effective sample size of the importance weights (before resampling); small
        values mean the Laplace proposal was poor and more proposals are needed.
    n_proposals : int
    """

    parameters: np.ndarray
    effective_sample_size: float
    n_proposals: int


def _log_posterior(posterior: Posterior, structural: Structural, draws: np.ndarray) -> np.ndarray:
    """Unnormalised log posterior of random-effect draws (one per row), vectorized."""
    n = draws.shape[0]
    tiled = posterior.data.tile(n)
    phi = np.tile(posterior.parameters, (n, 1))
    phi[:, posterior.model.random_index] = draws
    f = predict(structural, phi, tiled)
    loglik = np.bincount(tiled.subject, weights=residual_log_likelihood(posterior.model.error, tiled.value, f, output_index(tiled)), minlength=n)
    # the prior of the *first* calibration: the population (covariate-adjusted) distribution
    typical = typical_parameters(posterior.model, posterior.data)[0, posterior.model.random_index]
    prior = stats.multivariate_normal(typical, posterior.model.omega).logpdf(draws)
    return loglik + np.atleast_1d(prior)


def importance_resample(
    posterior: Posterior,
    structural: Structural,
    n: int,
    *,
    seed: int | np.random.Generator | None = None,
    n_proposals: int | None = None,
    df: float = 4.0,
) -> ImportanceSample:
    """Sample the exact posterior (population prior x all observations) by importance resampling.

    Proposals come from a multivariate Student t (``df`` degrees of freedom) centred on the
    Laplace mode with the Laplace covariance, which has heavier tails than the target where the
    Laplace approximation is good and still covers skewed posteriors reasonably; they are
    weighted by target / proposal and resampled with replacement.

    Examples
    --------
    >>> from inference.datasets import ssfol
    >>> from inference.population import PopulationModel, ResidualError
    >>> model = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
    ...     np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    >>> post = calibrate(model, ssfol, ObservationData.single([1.0, 6.0, 12.0], [7.0, 6.0, 4.0],
    ...                                                       design={"dose": [4.0] * 3}))
    >>> draws = importance_resample(post, ssfol, 2000, seed=3)
    >>> draws.parameters.shape, draws.effective_sample_size > 1000
    ((2000, 3), True)
    """
    rng = np.random.default_rng(seed)
    m = n_proposals or 5 * n
    proposal = stats.multivariate_t(posterior.mean, posterior.cov, df=df)
    draws = np.atleast_2d(proposal.rvs(size=m, random_state=rng)).reshape(m, -1)
    log_w = _log_posterior(posterior, structural, draws) - proposal.logpdf(draws)
    log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    ess = 1.0 / np.sum(w**2)
    chosen = rng.choice(m, size=n, replace=True, p=w)
    phi = np.tile(posterior.parameters, (n, 1))
    phi[:, posterior.model.random_index] = draws[chosen]
    return ImportanceSample(parameters=phi, effective_sample_size=float(ess), n_proposals=m)


@dataclass(frozen=True, eq=False)
class Forecast:
    """Posterior-predictive forecast at future rows of one participant.

    Attributes
    ----------
    time : ndarray
        Times of the forecast rows.
    prediction : ndarray
        Structural prediction at the posterior mode.
    median, lower, upper : ndarray
        Median and equal-tailed ``level`` prediction interval of a new observation (parameter
        uncertainty plus residual error), or of the noise-free prediction if
        ``include_residual`` was false.
    level : float
    n_samples : int
    """

    time: np.ndarray
    prediction: np.ndarray
    median: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    level: float
    n_samples: int


def forecast(
    posterior: Posterior,
    structural: Structural,
    future: ObservationData,
    *,
    level: float = 0.9,
    n_samples: int = 2000,
    seed: int | np.random.Generator | None = None,
    include_residual: bool = True,
    draws: np.ndarray | None = None,
) -> Forecast:
    """Forecast the participant's observations at the rows of ``future`` with prediction intervals.

    Monte Carlo (seeded): parameter vectors are drawn from the posterior (or taken from
    ``draws``, e.g. ``importance_resample(...).parameters``), predictions are computed for all
    of them in one vectorized call, residual noise is added, and quantiles are taken.

    Parameters
    ----------
    future : ObservationData
        One subject; values are ignored (may be ``nan``). Missing covariates are taken from
        the posterior's data.

    Examples
    --------
    >>> from inference.datasets import ssfol
    >>> from inference.population import PopulationModel, ResidualError
    >>> model = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
    ...     np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    >>> post = calibrate(model, ssfol, ObservationData.single([1.0, 6.0], [7.0, 6.0], design={"dose": [4.0] * 2}))
    >>> later = ObservationData.single([12.0, 24.0], [np.nan, np.nan], design={"dose": [4.0] * 2})
    >>> fc = forecast(post, structural=ssfol, future=later, seed=1)
    >>> bool(np.all(fc.lower < fc.median) and np.all(fc.median < fc.upper))
    True
    """
    if future.n_subjects != 1:
        raise ValueError("forecast takes one participant's future rows")
    if not 0 < level < 1:
        raise ValueError("level must lie in (0, 1)")
    covariates = {**posterior.data.covariates, **future.covariates}
    future = future.replace(covariates=covariates, value=np.full(future.n_rows, np.nan))
    rng = np.random.default_rng(seed)
    phi = sample_posterior(posterior, n_samples, rng) if draws is None else np.asarray(draws, dtype=float)
    n = phi.shape[0]
    tiled = future.tile(n)
    f = predict(structural, phi, tiled).reshape(n, future.n_rows)
    if include_residual:
        output = output_index(tiled)
        variance = residual_variance(posterior.model.error, f.ravel(), output).reshape(f.shape)
        f = f + rng.standard_normal(f.shape) * np.sqrt(variance)
    tail = (1 - level) / 2
    lower, median, upper = np.quantile(f, [tail, 0.5, 1 - tail], axis=0)
    at_mode = predict(structural, posterior.parameters[None], future)
    return Forecast(
        time=_frozen(future.time),
        prediction=_frozen(at_mode),
        median=_frozen(median),
        lower=_frozen(lower),
        upper=_frozen(upper),
        level=float(level),
        n_samples=int(n),
    )
