"""The participant twin as the engine sees it: calibration on a participant's data, posterior-predictive
forecasts and cohort-level simulation, for any daily-regimen model definition.

Everything here is pure numerics: times are hours since the participant's first dose, values are
in the model's output units, doses in its dose unit. The model (structural predictions, population
prior, outputs, limits) is a compiled definition, :class:`inference.regimen.DailyRegimen`; nothing
here knows a study.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from inference import calibration
from inference.calibration import Posterior
from inference.cohort import BLOCK_SIZE, Scenario, sample_covariates, simulate_cohort
from inference.covariates import Covariates
from inference.population import (ObservationData, PopulationModel, predict, residual_log_likelihood,
                                  residual_variance, typical_parameters)
from inference.regimen import DailyRegimen

__all__ = [
    "MAX_HORIZON_DAYS", "ParticipantData", "TwinScenario", "TwinForecast", "PopulationResult",
    "calibrate_participant", "posterior_from_state", "diagnostics", "forecast", "simulate_population",
]

#: the longest forecast any model may declare (``horizonLimitDays`` of a definition is at most this)
MAX_HORIZON_DAYS = 3650


def _frozen(values, dtype=float) -> np.ndarray:
    array = np.array(values, dtype=dtype, copy=True).reshape(-1)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class ParticipantData:
    """One participant's dosing and outcome observations, as the twin needs them.

    Parameters
    ----------
    dose_times_h, doses : array_like
        Doses taken (hours since the first dose; the model's dose unit). Placebo doses are 0.
    obs_output : array_like of int
        Output index (in the model's output order) of each observation.
    obs_times_h, obs_values : array_like
        Observation times (hours since the first dose) and values in the outputs' units.
    covariates : mapping of str to float
        The model's covariates by name (the mapping layer fills defaults for missing ones).
    subject_id : str

    Examples
    --------
    >>> d = ParticipantData(dose_times_h=[0.0, 24.0], doses=[100.0, 100.0], obs_output=[2],
    ...                     obs_times_h=[2.0], obs_values=[8.1], covariates={"WT": 80.0})
    >>> d.n_observations, d.observation_data().covariates["WT"].tolist()
    (1, [80.0])
    """

    dose_times_h: np.ndarray
    doses: np.ndarray
    obs_output: np.ndarray
    obs_times_h: np.ndarray
    obs_values: np.ndarray
    covariates: Mapping[str, float] = field(default_factory=dict)
    subject_id: str = "0"

    def __post_init__(self) -> None:
        times, amounts = _frozen(self.dose_times_h), _frozen(self.doses)
        if times.shape != amounts.shape or not np.all(np.isfinite(times)) or np.any(amounts < 0):
            raise ValueError("dose_times_h and doses must be finite, of equal length, amounts >= 0")
        output = _frozen(self.obs_output, dtype=np.int64)
        obs_t, obs_v = _frozen(self.obs_times_h), _frozen(self.obs_values)
        if not (output.shape == obs_t.shape == obs_v.shape):
            raise ValueError("obs_output, obs_times_h and obs_values must have equal length")
        if output.size and output.min() < 0:
            raise ValueError("obs_output must be output indices (>= 0)")
        if not np.all(np.isfinite(obs_t)):
            raise ValueError("observation times must be finite")
        for name, value in self.covariates.items():
            if not np.isfinite(value):
                raise ValueError(f"covariate {name} must be finite")
        for name, value in (("dose_times_h", times), ("doses", amounts), ("obs_output", output),
                            ("obs_times_h", obs_t), ("obs_values", obs_v)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "covariates", dict(self.covariates))

    @property
    def n_observations(self) -> int:
        """Number of observed (non-missing) outcome values."""
        return int(np.sum(~np.isnan(self.obs_values)))

    @property
    def current_dose(self) -> float:
        """The most recent dose taken (0 when none)."""
        return float(self.doses[np.argmax(self.dose_times_h)]) if self.doses.size else 0.0

    @property
    def last_time_h(self) -> float:
        """Time of the last dose or observation (0 when there is neither)."""
        return float(max(np.max(self.dose_times_h, initial=0.0), np.max(self.obs_times_h, initial=0.0)))

    def observation_data(self) -> ObservationData:
        """The observations in ``inference.population`` form (dosing history in ``context``)."""
        if self.obs_times_h.size == 0:
            raise ValueError("the participant has no outcome observations")
        return ObservationData.single(self.obs_times_h, self.obs_values, subject_id=self.subject_id,
                                      covariates=self.covariates,
                                      design={"output": self.obs_output.astype(float)},
                                      context={"dose_times_h": self.dose_times_h, "doses": self.doses})

    def replace(self, **changes) -> "ParticipantData":
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_outputs(model: DailyRegimen, data: ParticipantData) -> None:
    if data.obs_output.size and data.obs_output.max() >= len(model.outputs):
        raise ValueError(f"obs_output must index the model's outputs {model.outputs}")


def calibrate_participant(model: DailyRegimen, data: ParticipantData,
                          prior: PopulationModel | None = None) -> Posterior:
    """Posterior (MAP + Laplace) of the participant's parameters given all their observations.

    ``prior`` is the study's population estimate when it has one (default: the definition's prior).

    Raises
    ------
    ValueError
        The participant has no outcome observation.

    Examples
    --------
    >>> from inference.model_definition import example_regimen
    >>> m = example_regimen()
    >>> d = ParticipantData(dose_times_h=24.0 * np.arange(60), doses=np.full(60, 100.0),
    ...                     obs_output=[0, 0, 2, 2], obs_times_h=[4.0, 1156.0, 2.0, 1154.0],
    ...                     obs_values=[900.0, 1400.0, 8.4, 7.9], covariates={"WT": 85.0, "EGFR": 80.0})
    >>> post = calibrate_participant(m, d)
    >>> post.names[0], bool(post.sd[0] < m.population.omega_sd[0])
    ('CL', True)
    """
    _check_outputs(model, data)
    if data.n_observations == 0:
        raise ValueError("the participant has no outcome observations to calibrate on")
    return calibration.calibrate(model.population if prior is None else prior, model.structural,
                                 data.observation_data())


def posterior_from_state(model: DailyRegimen, data: ParticipantData, mean, cov,
                         prior: PopulationModel | None = None, converged: bool = True) -> Posterior:
    """Rebuild a stored posterior (mean and covariance of the parameters) around the participant's data.

    Examples
    --------
    >>> from inference.model_definition import example_regimen
    >>> m = example_regimen()
    >>> d = ParticipantData(dose_times_h=[0.0], doses=[50.0], obs_output=[2], obs_times_h=[2.0],
    ...                     obs_values=[8.0], covariates={"WT": 70.0, "EGFR": 90.0})
    >>> q = m.population.random_index
    >>> float(posterior_from_state(m, d, np.asarray(m.population.theta)[q], m.population.omega).sd[5])
    0.8
    """
    prior = model.population if prior is None else prior
    return Posterior(model=prior, data=data.observation_data(), mean=mean, cov=cov,
                     prior_mean=typical_parameters(prior, data.observation_data())[0][prior.random_index],
                     prior_cov=prior.omega, converged=converged)


def diagnostics(model: DailyRegimen, posterior: Posterior) -> dict[str, float | int | bool]:
    """Calibration diagnostics: -2 log-likelihood at the mode, observations used, convergence."""
    data = posterior.data
    f = predict(model.structural, posterior.parameters[None], data)
    loglik = residual_log_likelihood(posterior.model.error, data.value, f, data.design["output"])
    return {"minus2LL": float(-2.0 * np.sum(loglik)), "nObservations": posterior.n_observations,
            "converged": bool(posterior.converged)}


@dataclass(frozen=True)
class TwinScenario:
    """A what-if regimen from ``start_h`` (hours since the first dose): ``dose`` every ``interval_h``.

    Parameters
    ----------
    dose : float
        Dose per administration (model's dose unit, >= 0).
    start_h : float
        Time of the scenario's first dose (the forecast start).
    interval_h : float
        Dosing interval (1 to 168 h).
    horizon_days : int
        Forecast length (1 to the model's ``horizon_limit_days``, checked by :func:`forecast`).
    missed_dose_days : tuple of int
        Days (0 = the first scenario day) whose doses are skipped.
    adherence : float
        Probability that each remaining dose is taken.

    Examples
    --------
    >>> TwinScenario(dose=50.0, start_h=0.0, horizon_days=0)
    Traceback (most recent call last):
    ...
    ValueError: horizon_days must be between 1 and 3650, got 0
    """

    dose: float
    start_h: float
    interval_h: float = 24.0
    horizon_days: int = 28
    missed_dose_days: tuple[int, ...] = ()
    adherence: float = 1.0

    def __post_init__(self) -> None:
        if int(self.horizon_days) != self.horizon_days or not 1 <= self.horizon_days <= MAX_HORIZON_DAYS:
            raise ValueError(f"horizon_days must be between 1 and {MAX_HORIZON_DAYS}, got {self.horizon_days}")
        if not (np.isfinite(self.dose) and self.dose >= 0):
            raise ValueError(f"dose must be finite and >= 0, got {self.dose}")
        if not (np.isfinite(self.interval_h) and 1 <= self.interval_h <= 168):
            raise ValueError(f"interval_h must lie in [1, 168], got {self.interval_h}")
        if not (np.isfinite(self.adherence) and 0 <= self.adherence <= 1):
            raise ValueError(f"adherence must lie in [0, 1], got {self.adherence}")
        if not np.isfinite(self.start_h):
            raise ValueError("start_h must be finite")
        missed = tuple(int(d) for d in self.missed_dose_days)
        if any(d < 0 or d >= self.horizon_days for d in missed):
            raise ValueError(f"missed_dose_days must lie in [0, {self.horizon_days - 1}] (within the horizon)")
        object.__setattr__(self, "missed_dose_days", missed)

    def dose_times_h(self) -> np.ndarray:
        """Scheduled dose times of the scenario (hours since the first dose).

        The regimen runs through the whole forecast window, the end included: outputs at the
        horizon's last day (biomarker and disease follow that day's drug activity) must see that
        day's dose, or the forecast would show a rebound that no participant on the regimen has.
        """
        return self.start_h + self.interval_h * np.arange(int(np.floor(24.0 * self.horizon_days / self.interval_h)) + 1)

    def replace(self, **changes) -> "TwinScenario":
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class TwinForecast:
    """Posterior-predictive forecast: ``median[k]``, ``low[k]``, ``high[k]`` per output name, over ``times_h``.

    ``times_h`` are hours since the forecast start (``scenario.start_h``).
    """

    scenario: TwinScenario
    times_h: np.ndarray
    median: dict
    low: dict
    high: dict
    level: float
    samples: int
    seed: int


def forecast(model: DailyRegimen, posterior: Posterior, scenario: TwinScenario, times_h, *, samples: int = 200,
             seed: int = 0, level: float = 0.9, outputs: Sequence[str] | None = None) -> TwinForecast:
    """Forecast the participant under ``scenario`` with prediction intervals (seeded, reproducible).

    Parameter vectors are drawn from the posterior, the scenario's doses (each taken with
    probability ``scenario.adherence``, skipped on missed days) follow the participant's dosing
    history, all draws are predicted in one vectorized call and the residual error of each output
    is added before the quantiles are taken.

    Parameters
    ----------
    model : DailyRegimen
    posterior : calibration.Posterior
        From :func:`calibrate_participant` or :func:`posterior_from_state`.
    scenario : TwinScenario
    times_h : array_like
        Output times, hours since ``scenario.start_h`` (0 to the horizon).
    samples : int
        Posterior-predictive draws (10 to 5000).
    seed : int
    level : float
        Nominal coverage of the intervals (0.5 to 0.99).
    outputs : sequence of str, optional
        Default: every output of the model.

    Examples
    --------
    >>> from inference.model_definition import example_regimen
    >>> m = example_regimen()
    >>> d = ParticipantData(dose_times_h=24.0 * np.arange(60), doses=np.full(60, 100.0),
    ...                     obs_output=[0, 2], obs_times_h=[1156.0, 1154.0], obs_values=[1400.0, 7.9],
    ...                     covariates={"WT": 70.0, "EGFR": 90.0})
    >>> post = calibrate_participant(m, d)
    >>> s = TwinScenario(dose=100.0, start_h=1440.0, horizon_days=7)
    >>> fc = forecast(m, post, s, np.arange(0, 169, 24.0), seed=1)
    >>> bool(np.all(fc.low["hba1c"] < fc.median["hba1c"])), bool(np.all(fc.median["hba1c"] < fc.high["hba1c"]))
    (True, True)
    >>> twice = forecast(m, post, s, np.arange(0, 169, 24.0), seed=1)
    >>> bool(np.array_equal(fc.median["concentration"], twice.median["concentration"]))
    True
    """
    outputs = model.outputs if outputs is None else tuple(outputs)
    if scenario.horizon_days > model.horizon_limit_days:
        raise ValueError(f"horizon_days must be between 1 and {model.horizon_limit_days} (the twin model is not "
                         f"validated beyond {model.horizon_limit_days} days), got {scenario.horizon_days}")
    if not 10 <= samples <= 5000:
        raise ValueError(f"samples must lie in [10, 5000], got {samples}")
    if not 0.5 <= level <= 0.99:
        raise ValueError(f"level must lie in [0.5, 0.99], got {level}")
    unknown = [o for o in outputs if o not in model.outputs]
    if unknown or not outputs:
        raise ValueError(f"outputs must be among {model.outputs}, got {list(outputs)}")
    times = np.asarray(times_h, dtype=float)
    if times.ndim != 1 or times.size == 0 or times.min() < 0 or times.max() > 24.0 * scenario.horizon_days:
        raise ValueError("times_h must lie between 0 and the scenario horizon")
    rng = np.random.default_rng(seed)
    phi = calibration.sample_posterior(posterior, samples, rng)
    history_t = np.asarray(posterior.data.context["dose_times_h"], dtype=float)
    history_d = np.asarray(posterior.data.context["doses"], dtype=float)
    keep = history_t < scenario.start_h  # the scenario replaces whatever was recorded after its start
    future_t = scenario.dose_times_h()
    taken = np.ones((samples, future_t.size), dtype=bool)
    if scenario.adherence < 1.0:
        taken = rng.random((samples, future_t.size)) < scenario.adherence
    if scenario.missed_dose_days:
        day = np.floor((future_t - scenario.start_h) / 24.0).astype(np.int64)
        taken &= ~np.isin(day, scenario.missed_dose_days)[None, :]
    dose_t = np.concatenate([history_t[keep], future_t])
    dose_d = np.concatenate([np.broadcast_to(history_d[keep], (samples, int(keep.sum()))),
                             np.where(taken, scenario.dose, 0.0)], axis=1)
    wanted = tuple(model.outputs.index(o) for o in outputs)
    grid = model.predict_grid(phi, dose_t, dose_d, {k: scenario.start_h + times for k in wanted})
    tail = (1.0 - level) / 2.0
    median, low, high = {}, {}, {}
    for k in wanted:
        f = grid[k]
        name = model.outputs[k]
        variance = residual_variance(posterior.model.error, f.ravel(), np.full(f.size, k)).reshape(f.shape)
        noisy = f + rng.standard_normal(f.shape) * np.sqrt(variance)
        if model.output_sources[name] == "pk":
            noisy = np.maximum(noisy, 0.0)  # an assay does not report negative concentrations
        lo, mid, hi = np.quantile(noisy, [tail, 0.5, 1.0 - tail], axis=0)
        median[name], low[name], high[name] = mid, lo, hi
    return TwinForecast(scenario=scenario, times_h=times, median=median, low=low, high=high,
                        level=float(level), samples=int(samples), seed=int(seed))


# ------------------------------------------------------------------------------- cohort level

@dataclass(frozen=True, eq=False)
class PopulationResult:
    """Cohort-level simulation: per arm and output, quantiles across participants on ``days``.

    ``arms[a]`` is the arm name, ``participants[a]`` its size, ``median[a][output]`` (and ``low``,
    ``high``) arrays over ``days``; ``member_arm`` and ``member_end[output]`` give each
    participant's arm index and end-of-horizon value (in input order); ``completed`` is False when
    the run was stopped early (``should_stop``).
    """

    arms: tuple[str, ...]
    participants: tuple[int, ...]
    days: np.ndarray
    median: tuple[dict, ...]
    low: tuple[dict, ...]
    high: tuple[dict, ...]
    member_arm: np.ndarray
    member_end: dict
    level: float
    completed: bool = True


def _population_chunk(scenario: Scenario, covariates: Covariates, seed: int, model: DailyRegimen,
                      days: np.ndarray) -> tuple[dict, dict]:
    """One chunk of ``simulate_population``: each output on the summary days and on the last day."""
    traj = dict(simulate_cohort(scenario, covariates=covariates, seed=seed, model=model,
                                trajectories=True).trajectories)
    pk_output = model.output_of("pk")
    if pk_output is not None:
        traj[pk_output] = model.output_scale[model.outputs.index(pk_output)] * traj["concentration"]
    return {o: traj[o][:, days] for o in model.outputs}, {o: traj[o][:, -1] for o in model.outputs}


def simulate_population(model: DailyRegimen, arm_doses: Sequence[float], member_arm, *, horizon_days: int = 28,
                        covariates: Covariates | None = None, seed: int = 0, level: float = 0.9,
                        step_days: int = 1, arm_names: Sequence[str] | None = None,
                        on_chunk: Callable[[int, int], bool] | None = None, executor=None) -> PopulationResult:
    """Simulate a cohort twin from randomization under each arm's dose, vectorized, with per-arm summaries.

    Each arm is run through ``inference.cohort.simulate_cohort`` (PK/PD/disease with behaviour:
    adherence, attendance, dropout) in chunks of ``BLOCK_SIZE`` participants; chunk ``c`` of arm
    ``a`` draws from its own seed stream, so the result depends only on ``seed`` and the inputs.

    Parameters
    ----------
    model : DailyRegimen
        The compiled model definition (parameters, outputs, virtual population, horizon limit).
    arm_doses : sequence of float
        Dose per day (the model's dose unit) of each arm.
    member_arm : array_like of int
        Arm index of each participant.
    horizon_days : int
        Days simulated (1 to the model's ``horizon_limit_days``).
    covariates : Covariates, optional
        The members' covariates; sampled from the model's virtual population when absent.
    seed : int
    level : float
        Coverage of the across-participant interval (e.g. 0.9: 5th to 95th percentile).
    step_days : int
        Spacing of the summary days.
    arm_names : sequence of str, optional
    on_chunk : callable, optional
        ``on_chunk(done, total)`` after every chunk; returning False stops the run (cancel).
    executor : optional
        Where the chunks run (see ``inference.cohort.simulate_cohort``): None in this process;
        a ``dask.distributed.Client`` or ``concurrent.futures`` executor gets every chunk at once
        and the results are read back in chunk order, identical to the in-process run.

    Returns
    -------
    PopulationResult

    Examples
    --------
    >>> from inference.model_definition import example_regimen
    >>> res = simulate_population(example_regimen(), [0.0, 100.0], np.repeat([0, 1], 300), horizon_days=56, seed=4)
    >>> res.participants
    (300, 300)
    >>> bool(res.median[1]["hba1c"][-1] < res.median[0]["hba1c"][-1])
    True
    """
    if not 1 <= horizon_days <= model.horizon_limit_days:
        raise ValueError(f"horizon_days must be between 1 and {model.horizon_limit_days}, got {horizon_days}")
    if not 0.5 <= level <= 0.99:
        raise ValueError(f"level must lie in [0.5, 0.99], got {level}")
    member_arm = np.asarray(member_arm, dtype=np.int64)
    n = member_arm.size
    doses = [float(d) for d in arm_doses]
    if n == 0 or member_arm.min() < 0 or member_arm.max() >= len(doses):
        raise ValueError("member_arm must index arm_doses and hold at least one participant")
    names = tuple(arm_names) if arm_names is not None else tuple(f"arm{i}" for i in range(len(doses)))
    streams = np.random.SeedSequence(seed)
    if covariates is None:
        if model.covariate_model is None:
            raise ValueError(f"{model.canonical} has no virtual population: give the members' covariates")
        covariates = sample_covariates(model.covariate_model, n, np.random.default_rng(streams.spawn(1)[0]))
    elif covariates.n != n:
        raise ValueError(f"{covariates.n} covariates for {n} participants")
    days = np.arange(0, horizon_days, max(int(step_days), 1))
    if days[-1] != horizon_days - 1:
        days = np.append(days, horizon_days - 1)
    outputs = model.outputs
    member_end = {o: np.full(n, np.nan) for o in outputs}
    per_arm = {o: [[] for _ in doses] for o in outputs}
    chunks = [(a, idx[i:i + BLOCK_SIZE]) for a in range(len(doses))
              for idx in [np.flatnonzero(member_arm == a)] for i in range(0, idx.size, BLOCK_SIZE)]
    chunk_seeds = np.random.SeedSequence([seed, 1]).generate_state(max(len(chunks), 1))
    completed = True
    tasks = [(Scenario(dose_mg=doses[a], n_days=int(horizon_days)), covariates.take(idx), int(chunk_seeds[c]),
              model, days) for c, (a, idx) in enumerate(chunks)]
    # on an executor every chunk is handed out at once so the workers run them side by side; only
    # the summary days travel back, not the daily trajectories
    futures = None if executor is None else [executor.submit(_population_chunk, *task) for task in tasks]
    for c, (a, idx) in enumerate(chunks):
        at_days, at_end = _population_chunk(*tasks[c]) if futures is None else futures[c].result()
        for o in outputs:
            per_arm[o][a].append(at_days[o])
            member_end[o][idx] = at_end[o]
        if on_chunk is not None and on_chunk(c + 1, len(chunks)) is False:
            completed = False
            for future in futures or ():
                future.cancel()
            break
    tail = (1.0 - level) / 2.0
    medians, lows, highs, sizes = [], [], [], []
    for a in range(len(doses)):
        med, lo, hi = {}, {}, {}
        for o in outputs:
            stacked = np.concatenate(per_arm[o][a]) if per_arm[o][a] else np.full((0, days.size), np.nan)
            if stacked.shape[0]:
                lo[o], med[o], hi[o] = np.quantile(stacked, [tail, 0.5, 1.0 - tail], axis=0)
            else:
                lo[o] = med[o] = hi[o] = np.full(days.size, np.nan)
        sizes.append(int(sum(part.shape[0] for part in per_arm[outputs[0]][a])))
        medians.append(med)
        lows.append(lo)
        highs.append(hi)
    return PopulationResult(arms=names, participants=tuple(sizes), days=days, median=tuple(medians),
                            low=tuple(lows), high=tuple(highs), member_arm=member_arm, member_end=member_end,
                            level=float(level), completed=completed)
