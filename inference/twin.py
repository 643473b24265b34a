"""The TT-201 participant twin as the engine sees it: structural predictions, population prior,
calibration on a participant's data, posterior-predictive forecasts and cohort-level simulation.

Everything here is pure numerics: times are hours since the participant's first dose, values are
in canonical units (concentration ng/mL, fasting glucose mg/dL, HbA1c %). The structural model is
the one the demo study is simulated from (:mod:`inference.cohort`): 1-compartment oral PK with
allometric weight and eGFR effects on clearance -> Emax effect of the daily average concentration
on fasting glucose -> HbA1c with linear drift and a delayed drug offset (ADAG relation).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.signal import lfilter

from inference import calibration
from inference.calibration import Posterior
from inference.cohort import (ADAG_INTERCEPT, ADAG_SLOPE, BLOCK_SIZE, CovariateModel, Scenario,
                              TT201Population, sample_covariates, simulate_cohort)
from inference.covariates import Covariates
from inference.disease import DiseaseProgression, progress
from inference.pd import emax
# _phi is pk's single-dose response; it is reused here, not copied, so the two cannot drift apart
# (pk.py itself is pinned by the dropout model's source hash)
from inference.pk import DailyOneCompartmentOral, OneCompartment, TwoCompartment, _phi
from inference.population import (CovariateEffect, ObservationData, PopulationModel, ResidualError,
                                  predict, residual_log_likelihood, residual_variance, typical_parameters)

__all__ = [
    "MODEL_NAME", "MODEL_VERSION", "HORIZON_LIMIT_DAYS", "OUTPUTS", "OUTPUT_UNITS", "PARAMETERS",
    "ParticipantData", "TwinScenario", "TwinForecast", "PopulationResult",
    "population_model", "structural", "calibrate_participant", "posterior_from_state", "diagnostics",
    "forecast", "simulate_population",
]

MODEL_NAME = "tt201-twin"
MODEL_VERSION = "1.0.0"
#: the twin is not validated beyond one year of forecast
HORIZON_LIMIT_DAYS = 365
#: forecast outputs, in the order of the output index of observation rows
OUTPUTS = ("concentration", "fpg", "hba1c")
OUTPUT_UNITS = {"concentration": "ng/mL", "fpg": "mg/dL", "hba1c": "%"}
NG_ML_PER_MG_L = 1000.0

#: individual parameters (columns of ``phi``): name, scale, UCUM unit of the natural value
PARAMETERS: tuple[tuple[str, str, str], ...] = (
    ("CL", "log", "L/h"),
    ("V", "log", "L"),
    ("ka", "log", "/h"),
    ("Emax", "log", "mg/dL"),
    ("EC50", "log", "mg/L"),
    ("HbA1c0", "linear", "%"),
    ("FPG0dev", "linear", "mg/dL"),
)
_NAMES = tuple(name for name, _, _ in PARAMETERS)

# observation (assay) error on top of the twin, as in the demo study's generator: PK 15 %
# proportional (a floor of 1 ng/mL keeps the likelihood finite at zero), glucose 8 mg/dL, HbA1c 0.12 %
RESIDUAL_ERRORS = (ResidualError("combined", additive=1.0, proportional=0.15),
                   ResidualError("additive", additive=8.0),
                   ResidualError("additive", additive=0.12))
# reference covariates used when a participant has no weight or eGFR on record
REFERENCE_WEIGHT_KG = 70.0
REFERENCE_EGFR = 90.0


def population_model(population: TT201Population | None = None) -> PopulationModel:
    """The population prior of the TT-201 twin (model ``tt201-twin`` 1.0.0).

    The same typical values, variability and covariate effects as ``inference.cohort`` simulates
    the demo study from; HbA1c at baseline and the deviation of baseline glucose from the ADAG
    relation are on the linear scale, every other parameter log-normal.

    Examples
    --------
    >>> m = population_model()
    >>> m.parameters[:3], round(float(np.exp(m.theta[0])), 3)
    (('CL', 'V', 'ka'), 5.0)
    >>> [round(float(s), 2) for s in m.omega_sd]
    [0.3, 0.2, 0.4, 0.25, 0.5, 0.8, 15.0]
    """
    pop = TT201Population() if population is None else population
    theta = [np.log(pop.cl), np.log(pop.v), np.log(pop.ka), np.log(pop.fpg_emax), np.log(pop.ec50),
             pop.hba1c_mean, 0.0]
    omega = np.diag([pop.omega_cl, pop.omega_v, pop.omega_ka, pop.omega_fpg_emax, pop.omega_ec50,
                     pop.hba1c_sd, pop.fpg_residual_sd]) ** 2
    effects = (CovariateEffect("CL", "weight", "power", REFERENCE_WEIGHT_KG, pop.cl_weight_exponent, estimate=False),
               CovariateEffect("CL", "egfr", "power", REFERENCE_EGFR, pop.cl_egfr_exponent, estimate=False),
               CovariateEffect("V", "weight", "power", REFERENCE_WEIGHT_KG, pop.v_weight_exponent, estimate=False))
    return PopulationModel(_NAMES, theta, _NAMES, omega, RESIDUAL_ERRORS, covariate_effects=effects)


_POPULATION = TT201Population()


def _natural(phi: np.ndarray, population: TT201Population = _POPULATION) -> dict[str, np.ndarray]:
    phi = np.atleast_2d(phi)
    hba1c0 = phi[:, 5]
    return {"cl": np.exp(phi[:, 0]), "v": np.exp(phi[:, 1]), "ka": np.exp(phi[:, 2]),
            "emax": np.exp(phi[:, 3]), "ec50": np.exp(phi[:, 4]), "hba1c0": hba1c0,
            # the cohort model's floor on baseline glucose (no fasting glucose below 70 mg/dL)
            "fpg0": np.maximum(ADAG_SLOPE * hba1c0 + ADAG_INTERCEPT + phi[:, 6], 70.0),
            "tlag": np.full(phi.shape[0], population.tlag), "f": np.full(phi.shape[0], population.f)}


def _daily_activity(p: dict, dose_times_h: np.ndarray, dose_mg: np.ndarray, n_days: int) -> np.ndarray:
    """Emax activity of the daily average concentration, shape (n, n_days).

    Doses are binned to the nearest day boundary (the cohort model gives each day's doses at its
    start), so the glucose and HbA1c pathway sees daily dose totals. The day-by-day propagation of
    ``DailyOneCompartmentOral`` is a linear time-invariant system with poles exp(-24 k) and
    exp(-24 ka): three of its steps give the impulse response, from which the whole history is one
    second-order ``lfilter`` per participant instead of a Python loop over days (calibration calls
    this hundreds of times for one participant).
    """
    n = p["cl"].shape[0]
    day = np.clip(np.floor(np.asarray(dose_times_h) / 24.0 + 0.5).astype(np.int64), 0, None)
    amounts = np.broadcast_to(np.asarray(dose_mg, dtype=float), (n, day.shape[0]))
    per_day = np.zeros((n, n_days))
    keep = day < n_days
    np.add.at(per_day.T, day[keep], amounts[:, keep].T)
    pk = DailyOneCompartmentOral(cl=p["cl"], v=p["v"], ka=p["ka"], tlag=p["tlag"], f=p["f"])
    state = pk.start(n)
    g = []
    for impulse in (1.0, 0.0, 0.0):
        state, avg = pk.step(state, np.full(n, impulse))
        g.append(avg.copy())
    cc, dd = np.exp(-24.0 * p["cl"] / p["v"]), np.exp(-24.0 * p["ka"])
    a1, a2 = -(cc + dd), cc * dd
    b = np.stack([g[0], g[1] + a1 * g[0], g[2] + a1 * g[1] + a2 * g[0]], axis=1)
    a = np.stack([np.ones(n), a1, a2], axis=1)
    cavg = np.empty((n, n_days))
    same = np.all(per_day == per_day[:1], axis=None)
    for i in range(n):
        cavg[i] = lfilter(b[i], a[i], per_day[0 if same else i])
    return emax(np.maximum(cavg, 0.0), 1.0, p["ec50"][:, None])


_NEGLIGIBLE_EFOLDS = 16.0


def _oral_dose_contributions(model, dose_times, amounts, times) -> np.ndarray:
    """Each oral dose's contribution to the central concentration (mg/L), shape ``(n, n_doses, n_times)``.

    The doses are taken at times shared by all ``n`` participants (``amounts`` may differ per
    participant); summing over axis 1 gives :func:`inference.pk.concentration` of the same doses, value for
    value: every contribution is computed with the same arithmetic as there, but the response
    to a unit dose is evaluated once per participant and *distinct* time since a dose. With doses
    and outputs on a common grid (daily doses, daily outputs) the ``n_doses * n_times`` pairs
    have only about ``n_doses + n_times`` distinct gaps, which is what makes a posterior-predictive
    forecast of hundreds of draws over months of dosing cheap.

    Parameters
    ----------
    model : OneCompartment or TwoCompartment
        Parameters of shape ``(n,)``.
    dose_times : array_like, shape (n_doses,)
    amounts : array_like, shape (n_doses,) or (n, n_doses)
    times : array_like, shape (n_times,)

    Examples
    --------
    >>> from inference.dosing import DoseRecord
    >>> from inference.pk import concentration
    >>> m = OneCompartment(cl=[5.0, 3.0], v=[50.0, 40.0], ka=[1.0, 1.2], tlag=[0.5, 0.0])
    >>> dose_t, t = np.array([0.0, 24.0, 48.0]), np.array([1.0, 25.0, 30.0, 72.0])
    >>> parts = _oral_dose_contributions(m, dose_t, [100.0, 50.0, 100.0], t)
    >>> parts.shape
    (2, 3, 4)
    >>> whole = concentration(m, DoseRecord(times=dose_t, amounts=[100.0, 50.0, 100.0]), t)
    >>> bool(np.allclose(parts.sum(axis=1), whole, rtol=1e-14, atol=0))
    True
    """
    if not isinstance(model, (OneCompartment, TwoCompartment)):
        raise ValueError(f"_oral_dose_contributions needs a linear model, got {type(model).__name__}")
    n = model.n
    dose_times = np.asarray(dose_times, dtype=float)
    times = np.asarray(times, dtype=float)
    if dose_times.ndim != 1 or times.ndim != 1:
        raise ValueError("dose_times and times must be 1-D")
    if not (np.all(np.isfinite(dose_times)) and np.all(np.isfinite(times))):
        raise ValueError("dose_times and times must be finite")
    amounts = np.broadcast_to(np.asarray(amounts, dtype=float), (n, dose_times.size))
    if not np.all(np.isfinite(amounts)) or np.any(amounts < 0):
        raise ValueError("amounts must be finite and >= 0")
    since = times[None, :] - dose_times[:, None]
    gaps, where = np.unique(since, return_inverse=True)
    where = where.reshape(since.shape)
    ka, tlag, f = model.ka[:, None], model.tlag[:, None], model.f[:, None]
    tau = np.maximum(gaps[None, :] - tlag, 0.0)
    out = np.zeros((n, dose_times.size, times.size))
    for c, lam in model.disposition():
        unit = _phi(ka, lam[:, None], tau)[:, where]
        out += (f * amounts * ka * c[:, None])[:, :, None] * unit
    return out


def _concentration(p: dict, dose_times_h: np.ndarray, dose_mg: np.ndarray, times_h: np.ndarray) -> np.ndarray:
    """Concentration (ng/mL), shape (n, T): the contributions of the relevant doses, summed per row.

    ``_oral_dose_contributions`` evaluates each dose as its own single-dose response (the
    arithmetic of ``pk.concentration``), once per distinct time since a dose: calibration
    (observation times fixed, only phi changes) and forecasts (daily doses, daily outputs) share
    few distinct gaps among many dose/time pairs.
    """
    n = p["cl"].shape[0]
    dose_t = np.asarray(dose_times_h, dtype=float)
    amounts = np.broadcast_to(np.asarray(dose_mg, dtype=float), (n, dose_t.size))
    # Doses after the last output time contribute nothing, and a dose whose slowest decay (the
    # smaller of k and ka over all rows) has run for more than 16 e-folds before the first output
    # time adds less than 1e-7 of its peak: a forecast then superposes the last weeks, not all history.
    slowest = float(np.min(np.minimum(p["cl"] / p["v"], p["ka"])))
    elapsed = times_h.min() - dose_t - float(np.max(p["tlag"]))
    relevant = (dose_t < times_h.max()) & (slowest * elapsed < _NEGLIGIBLE_EFOLDS)
    dose_t, amounts = dose_t[relevant], amounts[:, relevant]
    if dose_t.size == 0 or not np.any(amounts):  # nothing taken (placebo): no drug in any row
        return np.zeros((n, times_h.size))
    model = OneCompartment(cl=p["cl"], v=p["v"], ka=p["ka"], tlag=p["tlag"], f=p["f"])
    c = _oral_dose_contributions(model, dose_t, amounts, times_h).sum(axis=1)
    return NG_ML_PER_MG_L * c


def _predict_grid(phi: np.ndarray, dose_times_h: np.ndarray, dose_mg: np.ndarray, times: dict,
                  population: TT201Population = _POPULATION) -> dict[int, np.ndarray]:
    """Predictions of output ``k`` at ``times[k]`` (hours) for each row of ``phi``: {k: (n, T_k)}."""
    p = _natural(phi, population)
    out: dict[int, np.ndarray] = {}
    if 0 in times:
        out[0] = _concentration(p, dose_times_h, dose_mg, np.asarray(times[0], dtype=float))
    slow = [k for k in (1, 2) if k in times]
    if slow:
        days = {k: np.clip(np.floor(np.asarray(times[k], dtype=float) / 24.0).astype(np.int64), 0, None)
                for k in slow}
        n_days = max(int(d.max()) for d in days.values()) + 1
        activity = _daily_activity(p, dose_times_h, dose_mg, n_days)
        drift = population.hba1c_drift_per_year / 365.25
        if 1 in days:
            fpg = (p["fpg0"][:, None] + ADAG_SLOPE * drift * np.arange(n_days)[None, :]
                   - p["emax"][:, None] * activity)
            out[1] = fpg[:, days[1]]
        if 2 in days:
            disease = DiseaseProgression(baseline=p["hba1c0"], slope=drift, max_offset=p["emax"] / ADAG_SLOPE,
                                         k_onset=1.0 / population.hba1c_delay_days)
            out[2] = progress(disease, activity)[:, days[2]]
    return out


def structural(phi: np.ndarray, data: ObservationData) -> np.ndarray:
    """The TT-201 structural model in the form ``inference.population`` and ``calibration`` use.

    ``data.design["output"]`` selects the output of each row (0 concentration ng/mL, 1 fasting
    glucose mg/dL, 2 HbA1c %); ``data.context`` holds the dosing history (``dose_times_h``,
    ``dose_mg``) shared by every subject of ``data`` (the tiled draws of one participant).

    Examples
    --------
    >>> m = population_model()
    >>> data = ParticipantData(dose_times_h=24.0 * np.arange(30), dose_mg=np.full(30, 100.0),
    ...                        obs_output=[0, 1, 2], obs_times_h=[700.0, 700.0, 700.0],
    ...                        obs_values=[np.nan] * 3).observation_data()
    >>> typical = np.asarray(m.theta)[None, :]
    >>> f = structural(typical, data)
    >>> bool(200 < f[0] < 2000), bool(f[1] < 8.2 * 28.7 - 46.7), bool(f[2] < 8.2)
    (True, True, True)
    """
    phi = np.atleast_2d(np.asarray(phi, dtype=float))
    output = np.asarray(data.design["output"]).astype(np.int64)
    rows, times, inverse = {}, {}, {}
    for k in np.unique(output):
        rows[k] = output == k
        times[k], inverse[k] = np.unique(data.time[rows[k]], return_inverse=True)
    grid = _predict_grid(phi, data.context["dose_times_h"], data.context["dose_mg"], times)
    result = np.empty(data.n_rows)
    for k, values in grid.items():
        result[rows[k]] = values[data.subject[rows[k]], inverse[k]]
    return result


def _frozen(values, dtype=float) -> np.ndarray:
    array = np.array(values, dtype=dtype, copy=True).reshape(-1)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class ParticipantData:
    """One participant's dosing and outcome observations, as the twin needs them.

    Parameters
    ----------
    dose_times_h, dose_mg : array_like
        Doses taken (hours since the first dose, mg). Placebo doses are 0 mg.
    obs_output : array_like of int
        Output index of each observation (0 concentration, 1 fasting glucose, 2 HbA1c).
    obs_times_h, obs_values : array_like
        Observation times (hours since the first dose) and values in canonical units.
    weight_kg, egfr : float, optional
        Baseline covariates; the reference values (70 kg, 90 mL/min/1.73 m2) stand in when absent.
    subject_id : str

    Examples
    --------
    >>> d = ParticipantData(dose_times_h=[0.0, 24.0], dose_mg=[100.0, 100.0], obs_output=[2],
    ...                     obs_times_h=[2.0], obs_values=[8.1], weight_kg=80.0)
    >>> d.n_observations, d.observation_data().covariates["egfr"].tolist()
    (1, [90.0])
    """

    dose_times_h: np.ndarray
    dose_mg: np.ndarray
    obs_output: np.ndarray
    obs_times_h: np.ndarray
    obs_values: np.ndarray
    weight_kg: float | None = None
    egfr: float | None = None
    subject_id: str = "0"

    def __post_init__(self) -> None:
        times, amounts = _frozen(self.dose_times_h), _frozen(self.dose_mg)
        if times.shape != amounts.shape or not np.all(np.isfinite(times)) or np.any(amounts < 0):
            raise ValueError("dose_times_h and dose_mg must be finite, of equal length, amounts >= 0")
        output = _frozen(self.obs_output, dtype=np.int64)
        obs_t, obs_v = _frozen(self.obs_times_h), _frozen(self.obs_values)
        if not (output.shape == obs_t.shape == obs_v.shape):
            raise ValueError("obs_output, obs_times_h and obs_values must have equal length")
        if output.size and (output.min() < 0 or output.max() >= len(OUTPUTS)):
            raise ValueError(f"obs_output must index {OUTPUTS}")
        if not np.all(np.isfinite(obs_t)):
            raise ValueError("observation times must be finite")
        for name in ("weight_kg", "egfr"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive")
        for name, value in (("dose_times_h", times), ("dose_mg", amounts), ("obs_output", output),
                            ("obs_times_h", obs_t), ("obs_values", obs_v)):
            object.__setattr__(self, name, value)

    @property
    def n_observations(self) -> int:
        """Number of observed (non-missing) outcome values."""
        return int(np.sum(~np.isnan(self.obs_values)))

    @property
    def current_dose_mg(self) -> float:
        """The most recent dose taken (0 when none)."""
        return float(self.dose_mg[np.argmax(self.dose_times_h)]) if self.dose_mg.size else 0.0

    @property
    def last_time_h(self) -> float:
        """Time of the last dose or observation (0 when there is neither)."""
        return float(max(np.max(self.dose_times_h, initial=0.0), np.max(self.obs_times_h, initial=0.0)))

    def covariates(self) -> dict[str, float]:
        """Covariates for the population model, reference values standing in for missing ones."""
        return {"weight": self.weight_kg or REFERENCE_WEIGHT_KG, "egfr": self.egfr or REFERENCE_EGFR}

    def observation_data(self) -> ObservationData:
        """The observations in ``inference.population`` form (dosing history in ``context``)."""
        if self.obs_times_h.size == 0:
            raise ValueError("the participant has no outcome observations")
        return ObservationData.single(self.obs_times_h, self.obs_values, subject_id=self.subject_id,
                                      covariates=self.covariates(),
                                      design={"output": self.obs_output.astype(float)},
                                      context={"dose_times_h": self.dose_times_h, "dose_mg": self.dose_mg})

    def replace(self, **changes) -> "ParticipantData":
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def calibrate_participant(data: ParticipantData, model: PopulationModel | None = None) -> Posterior:
    """Posterior (MAP + Laplace) of the participant's parameters given all their observations.

    Raises
    ------
    ValueError
        The participant has no outcome observation.

    Examples
    --------
    >>> d = ParticipantData(dose_times_h=24.0 * np.arange(60), dose_mg=np.full(60, 100.0),
    ...                     obs_output=[0, 0, 2, 2], obs_times_h=[4.0, 1156.0, 2.0, 1154.0],
    ...                     obs_values=[900.0, 1400.0, 8.4, 7.9], weight_kg=85.0, egfr=80.0)
    >>> post = calibrate_participant(d)
    >>> post.names[0], bool(post.sd[0] < population_model().omega_sd[0])
    ('CL', True)
    """
    if data.n_observations == 0:
        raise ValueError("the participant has no outcome observations to calibrate on")
    return calibration.calibrate(population_model() if model is None else model, structural,
                                 data.observation_data())


def posterior_from_state(data: ParticipantData, mean, cov, model: PopulationModel | None = None,
                         converged: bool = True) -> Posterior:
    """Rebuild a stored posterior (mean and covariance of the parameters) around the participant's data.

    Examples
    --------
    >>> d = ParticipantData(dose_times_h=[0.0], dose_mg=[50.0], obs_output=[2], obs_times_h=[2.0],
    ...                     obs_values=[8.0])
    >>> m = population_model()
    >>> float(posterior_from_state(d, m.theta, m.omega).sd[5])
    0.8
    """
    model = population_model() if model is None else model
    return Posterior(model=model, data=data.observation_data(), mean=mean, cov=cov,
                     prior_mean=typical_parameters(model, data.observation_data())[0],
                     prior_cov=model.omega, converged=converged)


def diagnostics(posterior: Posterior) -> dict[str, float | int | bool]:
    """Calibration diagnostics: -2 log-likelihood at the mode, observations used, convergence."""
    data = posterior.data
    f = predict(structural, posterior.parameters[None], data)
    loglik = residual_log_likelihood(posterior.model.error, data.value, f, data.design["output"])
    return {"minus2LL": float(-2.0 * np.sum(loglik)), "nObservations": posterior.n_observations,
            "converged": bool(posterior.converged)}


@dataclass(frozen=True)
class TwinScenario:
    """A what-if regimen from ``start_h`` (hours since the first dose): dose every ``interval_h``.

    Parameters
    ----------
    dose_mg : float
        Dose per administration (0 to 1000 mg).
    start_h : float
        Time of the scenario's first dose (the forecast start).
    interval_h : float
        Dosing interval (1 to 168 h).
    horizon_days : int
        Forecast length (1 to ``HORIZON_LIMIT_DAYS``).
    missed_dose_days : tuple of int
        Days (0 = the first scenario day) whose doses are skipped.
    adherence : float
        Probability that each remaining dose is taken.

    Examples
    --------
    >>> TwinScenario(dose_mg=50.0, start_h=0.0, horizon_days=400)
    Traceback (most recent call last):
    ...
    ValueError: horizon_days must be between 1 and 365 (the twin model is not validated beyond 365 days), got 400
    """

    dose_mg: float
    start_h: float
    interval_h: float = 24.0
    horizon_days: int = 28
    missed_dose_days: tuple[int, ...] = ()
    adherence: float = 1.0

    def __post_init__(self) -> None:
        if int(self.horizon_days) != self.horizon_days or not 1 <= self.horizon_days <= HORIZON_LIMIT_DAYS:
            raise ValueError(f"horizon_days must be between 1 and {HORIZON_LIMIT_DAYS} (the twin model is not "
                             f"validated beyond {HORIZON_LIMIT_DAYS} days), got {self.horizon_days}")
        if not (np.isfinite(self.dose_mg) and 0 <= self.dose_mg <= 1000):
            raise ValueError(f"dose_mg must lie in [0, 1000], got {self.dose_mg}")
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
        horizon's last day (glucose, HbA1c follow that day's drug activity) must see that day's
        dose, or the forecast would show a rebound that no participant on the regimen has.
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


def forecast(posterior: Posterior, scenario: TwinScenario, times_h, *, samples: int = 200, seed: int = 0,
             level: float = 0.9, outputs: Sequence[str] = OUTPUTS) -> TwinForecast:
    """Forecast the participant under ``scenario`` with prediction intervals (seeded, reproducible).

    Parameter vectors are drawn from the posterior, the scenario's doses (each taken with
    probability ``scenario.adherence``, skipped on missed days) follow the participant's dosing
    history, all draws are predicted in one vectorized call and the assay error of each output is
    added before the quantiles are taken.

    Parameters
    ----------
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
    outputs : sequence of str

    Examples
    --------
    >>> d = ParticipantData(dose_times_h=24.0 * np.arange(60), dose_mg=np.full(60, 100.0),
    ...                     obs_output=[0, 2], obs_times_h=[1156.0, 1154.0], obs_values=[1400.0, 7.9])
    >>> post = calibrate_participant(d)
    >>> s = TwinScenario(dose_mg=100.0, start_h=1440.0, horizon_days=7)
    >>> fc = forecast(post, s, np.arange(0, 169, 24.0), seed=1)
    >>> bool(np.all(fc.low["hba1c"] < fc.median["hba1c"])), bool(np.all(fc.median["hba1c"] < fc.high["hba1c"]))
    (True, True)
    >>> twice = forecast(post, s, np.arange(0, 169, 24.0), seed=1)
    >>> bool(np.array_equal(fc.median["concentration"], twice.median["concentration"]))
    True
    """
    if not 10 <= samples <= 5000:
        raise ValueError(f"samples must lie in [10, 5000], got {samples}")
    if not 0.5 <= level <= 0.99:
        raise ValueError(f"level must lie in [0.5, 0.99], got {level}")
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise ValueError(f"outputs must be among {OUTPUTS}, got {list(outputs)}")
    times = np.asarray(times_h, dtype=float)
    if times.ndim != 1 or times.size == 0 or times.min() < 0 or times.max() > 24.0 * scenario.horizon_days:
        raise ValueError("times_h must lie between 0 and the scenario horizon")
    rng = np.random.default_rng(seed)
    phi = calibration.sample_posterior(posterior, samples, rng)
    history_t = np.asarray(posterior.data.context["dose_times_h"], dtype=float)
    history_d = np.asarray(posterior.data.context["dose_mg"], dtype=float)
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
                             np.where(taken, scenario.dose_mg, 0.0)], axis=1)
    wanted = tuple(OUTPUTS.index(o) for o in outputs)
    grid = _predict_grid(phi, dose_t, dose_d, {k: scenario.start_h + times for k in wanted})
    tail = (1.0 - level) / 2.0
    median, low, high = {}, {}, {}
    for k in wanted:
        f = grid[k]
        variance = residual_variance(posterior.model.error, f.ravel(), np.full(f.size, k)).reshape(f.shape)
        noisy = f + rng.standard_normal(f.shape) * np.sqrt(variance)
        if k == 0:
            noisy = np.maximum(noisy, 0.0)  # an assay does not report negative concentrations
        lo, mid, hi = np.quantile(noisy, [tail, 0.5, 1.0 - tail], axis=0)
        name = OUTPUTS[k]
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


def _population_chunk(scenario: Scenario, covariates: Covariates, seed: int, population: TT201Population,
                      days: np.ndarray) -> tuple[dict, dict]:
    """One chunk of ``simulate_population``: each output on the summary days and on the last day."""
    traj = simulate_cohort(scenario, covariates=covariates, seed=seed, population=population,
                           trajectories=True).trajectories
    values = {"concentration": NG_ML_PER_MG_L * traj["concentration"], "fpg": traj["fpg"], "hba1c": traj["hba1c"]}
    return {o: values[o][:, days] for o in OUTPUTS}, {o: values[o][:, -1] for o in OUTPUTS}


def simulate_population(arm_doses: Sequence[float], member_arm, *, horizon_days: int = 28,
                        covariates: Covariates | None = None, seed: int = 0, level: float = 0.9,
                        step_days: int = 1, arm_names: Sequence[str] | None = None,
                        population: TT201Population | None = None,
                        on_chunk: Callable[[int, int], bool] | None = None,
                        executor=None) -> PopulationResult:
    """Simulate a cohort twin from randomization under each arm's dose, vectorized, with per-arm summaries.

    Each arm is run through ``inference.cohort.simulate_cohort`` (PK/PD/HbA1c with behaviour:
    adherence, attendance, dropout) in chunks of ``BLOCK_SIZE`` participants; chunk ``c`` of arm
    ``a`` draws from its own seed stream, so the result depends only on ``seed`` and the inputs.

    Parameters
    ----------
    arm_doses : sequence of float
        Once-daily dose (mg) of each arm.
    member_arm : array_like of int
        Arm index of each participant.
    horizon_days : int
        Days simulated (1 to ``HORIZON_LIMIT_DAYS``).
    covariates : Covariates, optional
        The members' covariates; sampled from the TT-201 covariate model when absent (virtual
        participants).
    seed : int
    level : float
        Coverage of the across-participant interval (e.g. 0.9: 5th to 95th percentile).
    step_days : int
        Spacing of the summary days.
    arm_names : sequence of str, optional
    population : TT201Population, optional
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
    >>> res = simulate_population([0.0, 100.0], np.repeat([0, 1], 300), horizon_days=56, seed=4)
    >>> res.participants
    (300, 300)
    >>> bool(res.median[1]["hba1c"][-1] < res.median[0]["hba1c"][-1])
    True
    """
    if not 1 <= horizon_days <= HORIZON_LIMIT_DAYS:
        raise ValueError(f"horizon_days must be between 1 and {HORIZON_LIMIT_DAYS}, got {horizon_days}")
    if not 0.5 <= level <= 0.99:
        raise ValueError(f"level must lie in [0.5, 0.99], got {level}")
    member_arm = np.asarray(member_arm, dtype=np.int64)
    n = member_arm.size
    doses = [float(d) for d in arm_doses]
    if n == 0 or member_arm.min() < 0 or member_arm.max() >= len(doses):
        raise ValueError("member_arm must index arm_doses and hold at least one participant")
    names = tuple(arm_names) if arm_names is not None else tuple(f"arm{i}" for i in range(len(doses)))
    population = TT201Population() if population is None else population
    streams = np.random.SeedSequence(seed)
    if covariates is None:
        covariates = sample_covariates(CovariateModel.tt201(), n, np.random.default_rng(streams.spawn(1)[0]))
    elif covariates.n != n:
        raise ValueError(f"{covariates.n} covariates for {n} participants")
    days = np.arange(0, horizon_days, max(int(step_days), 1))
    if days[-1] != horizon_days - 1:
        days = np.append(days, horizon_days - 1)
    member_end = {o: np.full(n, np.nan) for o in OUTPUTS}
    per_arm = {o: [[] for _ in doses] for o in OUTPUTS}
    chunks = [(a, idx[i:i + BLOCK_SIZE]) for a in range(len(doses))
              for idx in [np.flatnonzero(member_arm == a)] for i in range(0, idx.size, BLOCK_SIZE)]
    chunk_seeds = np.random.SeedSequence([seed, 1]).generate_state(max(len(chunks), 1))
    completed = True
    tasks = [(Scenario(dose_mg=doses[a], n_days=int(horizon_days)), covariates.take(idx), int(chunk_seeds[c]),
              population, days) for c, (a, idx) in enumerate(chunks)]
    # on an executor every chunk is handed out at once so the workers run them side by side; only
    # the summary days travel back, not the daily trajectories
    futures = None if executor is None else [executor.submit(_population_chunk, *task) for task in tasks]
    for c, (a, idx) in enumerate(chunks):
        at_days, at_end = _population_chunk(*tasks[c]) if futures is None else futures[c].result()
        for o in OUTPUTS:
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
        for o in OUTPUTS:
            stacked = np.concatenate(per_arm[o][a]) if per_arm[o][a] else np.full((0, days.size), np.nan)
            if stacked.shape[0]:
                lo[o], med[o], hi[o] = np.quantile(stacked, [tail, 0.5, 1.0 - tail], axis=0)
            else:
                lo[o] = med[o] = hi[o] = np.full(days.size, np.nan)
        sizes.append(int(sum(part.shape[0] for part in per_arm["hba1c"][a])))
        medians.append(med)
        lows.append(lo)
        highs.append(hi)
    return PopulationResult(arms=names, participants=tuple(sizes), days=days, median=tuple(medians),
                            low=tuple(lows), high=tuple(highs), member_arm=member_arm, member_end=member_end,
                            level=float(level), completed=completed)
