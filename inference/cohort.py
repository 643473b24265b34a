"""Virtual populations and vectorized cohort simulation of a daily-regimen twin model.

Covariates are sampled from a cohort's distribution, parameters get log-normal variability and
covariate effects, and ``simulate_cohort`` runs PK -> PD -> disease + behaviour for up to 10^6
participants in one call, chunked to bound memory, seeded and independent of the chunk size.

The model is data: a definition of the daily-regimen family compiled by
:class:`inference.regimen.DailyRegimen` (typical values, variability, covariate effects, the
virtual population). Its structure: 1-compartment first-order oral PK with lag; once-daily doses at
the start of each day, taken according to the behaviour model; an Emax effect of the daily average
concentration on a biomarker (the PD output); a disease marker with linear natural drift whose drug
offset is the biomarker change times a scale, reached with a first-order onset
(:class:`inference.disease.DiseaseProgression`); behaviour from :mod:`inference.behaviour`
(adherence, adverse events driven by concentration, attendance, dropout).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from inference.behaviour import (BehaviourModel, VisitSchedule, draw_random_bits, n_uniforms,
                                 simulate_behaviour)
from inference.covariates import Covariates
from inference.disease import DiseaseProgression, progress
from inference.pk import DailyOneCompartmentOral

__all__ = [
    "CovariateModel",
    "fit_covariate_model",
    "sample_covariates",
    "Scenario",
    "CohortResult",
    "simulate_cohort",
    "summarize",
    "sweep",
    "BLOCK_SIZE",
]

#: participants per random-number block; results are identical for any chunk size that is a
#: multiple of it because every block draws from its own stream
BLOCK_SIZE = 1000

_CONTINUOUS = ("weight_kg", "age_y", "egfr", "distance_km")
_BOUNDS = {"weight_kg": (35.0, 250.0), "age_y": (18.0, 90.0), "egfr": (15.0, 150.0),
           "distance_km": (0.0, 400.0)}


def _to_latent(cov: Covariates) -> np.ndarray:
    # log scales make weight, eGFR and distance roughly normal and keep samples positive
    return np.column_stack([np.log(cov.weight_kg), cov.age_y, np.log(cov.egfr),
                            np.log1p(cov.distance_km)])


def _from_latent(z: np.ndarray) -> dict:
    raw = {"weight_kg": np.exp(z[:, 0]), "age_y": z[:, 1], "egfr": np.exp(z[:, 2]),
           "distance_km": np.expm1(z[:, 3])}
    return {k: np.clip(v, *_BOUNDS[k]) for k, v in raw.items()}


@dataclass(frozen=True, eq=False)
class CovariateModel:
    """Distribution of covariates: sex, then a sex-specific multivariate normal on a latent scale.

    The latent vector is (log weight, age, log eGFR, log(1 + distance)); sites are drawn from
    their observed frequencies. Samples are clipped to physiological bounds.

    Examples
    --------
    >>> cm = CovariateModel(p_female=0.45, mean=[[np.log(92.0), 58.0, np.log(82.0), np.log1p(20.0)]] * 2,
    ...                     cov=[np.diag([0.17, 9.0, 0.25, 0.9]) ** 2] * 2, site_probabilities=[0.6, 0.4])
    >>> cov = sample_covariates(cm, 1000, np.random.default_rng(0))
    >>> 70 < float(np.median(cov.weight_kg)) < 100
    True
    """

    p_female: float
    mean: np.ndarray          # (2, 4): row 0 male, row 1 female
    cov: np.ndarray           # (2, 4, 4)
    site_probabilities: np.ndarray
    _chol: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.p_female <= 1.0:
            raise ValueError("p_female must lie in [0, 1]")
        mean = np.asarray(self.mean, dtype=float)
        cov = np.asarray(self.cov, dtype=float)
        if mean.shape != (2, 4) or cov.shape != (2, 4, 4):
            raise ValueError("mean must have shape (2, 4) and cov (2, 4, 4) (male, female)")
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            raise ValueError("covariance matrices must be symmetric positive definite") from None
        sites = np.asarray(self.site_probabilities, dtype=float)
        if sites.ndim != 1 or sites.size == 0 or np.any(sites < 0) or not math.isclose(sites.sum(), 1.0,
                                                                                       rel_tol=1e-9):
            raise ValueError("site_probabilities must be non-negative and sum to 1")
        for name, value in (("mean", mean), ("cov", cov), ("site_probabilities", sites),
                            ("_chol", chol)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> "CovariateModel":
        """Return a validated copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


def fit_covariate_model(covariates: Covariates, n_sites: int | None = None) -> CovariateModel:
    """Match a :class:`CovariateModel` to an observed cohort (moments per sex on the latent scale).

    Examples
    --------
    >>> cm = CovariateModel(p_female=0.45, mean=[[np.log(92.0), 58.0, np.log(82.0), np.log1p(20.0)]] * 2,
    ...                     cov=[np.diag([0.17, 9.0, 0.25, 0.9]) ** 2] * 2, site_probabilities=[0.6, 0.4])
    >>> fitted = fit_covariate_model(sample_covariates(cm, 20000, np.random.default_rng(1)))
    >>> abs(fitted.p_female - 0.45) < 0.02
    True
    """
    z = _to_latent(covariates)
    female = covariates.sex_female.astype(bool)
    means, covs = [], []
    for group in (~female, female):
        if group.sum() < 6:
            # too few of one sex to estimate a covariance: pool both sexes
            group = np.ones_like(female)
        means.append(z[group].mean(axis=0))
        covs.append(np.cov(z[group], rowvar=False) + 1e-9 * np.eye(4))
    n_sites = int(covariates.site.max()) + 1 if n_sites is None else n_sites
    counts = np.bincount(covariates.site, minlength=n_sites).astype(float)
    return CovariateModel(p_female=float(female.mean()), mean=np.stack(means), cov=np.stack(covs),
                          site_probabilities=counts / counts.sum())


def sample_covariates(model: CovariateModel, n: int, rng: np.random.Generator) -> Covariates:
    """Draw ``n`` virtual participants' covariates from ``model``.

    Examples
    --------
    >>> cm = CovariateModel(p_female=0.45, mean=[[np.log(92.0), 58.0, np.log(82.0), np.log1p(20.0)]] * 2,
    ...                     cov=[np.diag([0.17, 9.0, 0.25, 0.9]) ** 2] * 2, site_probabilities=[0.6, 0.4])
    >>> cov = sample_covariates(cm, 5, np.random.default_rng(0))
    >>> cov.n, bool(np.all((cov.egfr >= 15) & (cov.egfr <= 150)))
    (5, True)
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    female = (rng.random(n) < model.p_female).astype(np.int8)
    z = rng.standard_normal((n, 4))
    latent = model.mean[female] + np.einsum("nij,nj->ni", model._chol[female], z)
    site = rng.choice(model.site_probabilities.size, size=n, p=model.site_probabilities)
    return Covariates(sex_female=female, site=site, **_from_latent(latent))


def _monthly_visits() -> VisitSchedule:
    return VisitSchedule.every(28, 6)


@dataclass(frozen=True)
class Scenario:
    """What is simulated: once-daily dose, study length, visit schedule and behaviour.

    Examples
    --------
    >>> s = Scenario(dose_mg=50.0)
    >>> s.replace(n_days=365).n_days
    365
    """

    dose_mg: float = 100.0
    n_days: int = 169
    schedule: VisitSchedule = field(default_factory=_monthly_visits)
    behaviour: BehaviourModel = field(default_factory=BehaviourModel)
    name: str = ""

    def __post_init__(self):
        if not (np.isfinite(self.dose_mg) and self.dose_mg >= 0):
            raise ValueError("dose_mg must be finite and >= 0")
        if int(self.n_days) != self.n_days or self.n_days < 1:
            raise ValueError("n_days must be a positive integer")
        if not isinstance(self.schedule, VisitSchedule) or self.schedule.remote.ndim != 1:
            raise ValueError("schedule must be a VisitSchedule with one modality per visit")
        if not isinstance(self.behaviour, BehaviourModel):
            raise ValueError("behaviour must be a BehaviourModel")

    def replace(self, **changes) -> "Scenario":
        """Return a validated copy with some fields replaced."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class CohortResult:
    """Per-participant summaries (``summary[name]``, shape ``(n,)``) and optional daily trajectories.

    Summaries: the covariates; every variable and derived parameter by its definition name; the
    behaviour (``adherence``, ``n_ae``, ``visits_attended``, ``visits_missed``, ``dropout_day``);
    ``cavg_on_study``; and, named after the model's outputs (``<pd>`` the biomarker, ``<disease>``
    the disease marker): ``<pd>_last``, ``<disease>_last``, ``<disease>_change_last`` (change from
    baseline on the last day on study, what a trial would observe) and ``<disease>_change_end``
    (at the end of the study period including the washout after dropout, a treatment-policy
    estimand).
    """

    scenario: Scenario
    seed: int
    summary: dict
    trajectories: dict | None = None

    @property
    def n(self) -> int:
        """Number of participants."""
        return int(self.summary["dropout_day"].shape[0])


def _block_generator(seed: int, block: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(block,))))


def _simulate_chunk(scenario, model, covariate_model, covariates, blocks, sizes, seed, keep_trajectories):
    n_days = scenario.n_days
    k_draws = n_uniforms(scenario.schedule, n_days)
    # every block draws covariates, then parameters, then behaviour bits from its own stream
    # A partial last block draws as if it were full and keeps its first participants, so that a
    # participant's draws never depend on how many follow (sampled covariates only).
    offsets = np.cumsum([0] + list(sizes))
    params, named, cov_parts = {}, {}, []
    bits = np.empty((k_draws, int(offsets[-1])), dtype=np.uint32)
    for i, (b, size) in enumerate(zip(blocks, sizes)):
        rng = _block_generator(seed, b)
        if covariates is None:
            block_cov = sample_covariates(covariate_model, BLOCK_SIZE, rng)
            width = BLOCK_SIZE
        else:
            block_cov = covariates.take(slice(offsets[i], offsets[i + 1]))
            width = size
        cov_parts.append(block_cov.take(slice(0, size)))
        drawn = model.sample_parameters(block_cov, rng)
        for k, v in drawn.pop("named").items():
            named.setdefault(k, []).append(v[:size])
        for k, v in drawn.items():
            if np.ndim(v):
                params.setdefault(k, []).append(v[:size])
            else:
                params[k] = v
        bits[:, offsets[i]:offsets[i + 1]] = draw_random_bits(rng, width, k_draws)[:, :size]
    cov = Covariates(**{k: np.concatenate([c.as_dict()[k] for c in cov_parts])
                        for k in cov_parts[0].as_dict()})
    params = {k: np.concatenate(v) if isinstance(v, list) else v for k, v in params.items()}
    named = {k: np.concatenate(v) for k, v in named.items()}
    pd_name = model.output_of("pd") or "pd"
    disease_name = model.output_of("disease") or "disease"

    pk = DailyOneCompartmentOral(cl=params["cl"], v=params["v"], ka=params["ka"],
                                 tlag=params["tlag"], f=params["f"])
    beh = simulate_behaviour(scenario.behaviour, cov, scenario.schedule, n_days,
                             dose_mg=scenario.dose_mg, exposure=pk, random_bits=bits)
    n = cov.n
    effect = params["sign"] * params["emax"]          # full drug effect on the biomarker
    base, slope = params.get("base", np.zeros(n)), params.get("slope", np.zeros(n))
    max_offset = -params.get("effscale", np.ones(n)) * effect
    # TONSET has no inter-individual variability (a rule of the daily-regimen family): one onset rate
    k_onset = float(params["k_onset"][0]) if "k_onset" in params else np.inf
    last = np.maximum(np.minimum(beh.dropout_day, n_days) - 1, 0)
    on_days = last + 1
    traj = None
    if keep_trajectories:
        # built before the summaries, which overwrite the concentrations in place
        activity = beh.concentration / (params["ec50"][:, None] + beh.concentration)
        disease = DiseaseProgression(baseline=base, slope=slope, max_offset=max_offset, k_onset=k_onset)
        # troughs: replay the doses actually taken through the same exact stepper
        trough = np.empty((n_days, n))
        state = pk.start(n)
        taken_dn = beh.taken.T
        for t in range(n_days):
            state, _ = pk.step(state, taken_dn[t] * scenario.dose_mg)
            trough[t] = pk.trough(state)
        traj = {"concentration": beh.concentration.copy(), "trough": trough.T.copy(),
                disease_name: progress(disease, activity),
                pd_name: params["e0"][:, None] + params["e0_slope"][:, None] * np.arange(n_days)[None, :]
                + effect[:, None] * activity,
                "taken": beh.taken.copy(), "ae": beh.ae.copy(), "attended": beh.attended,
                "visit_days": beh.visit_days}
    conc_dn = beh.concentration.T  # (n_days, n), contiguous
    act_last, offset_last, offset_end, conc_sum = _exposure_summaries(conc_dn, params["ec50"], k_onset, last)
    disease_last = base + slope * last - max_offset * offset_last
    summary = dict(cov.as_dict())
    summary.update(named)
    summary.update({
        "adherence": beh.adherence,
        "n_ae": beh.ae.sum(axis=1),
        "visits_attended": beh.attended.sum(axis=1),
        "visits_missed": beh.missed.sum(axis=1),
        "dropout_day": beh.dropout_day,
        "cavg_on_study": conc_sum / on_days,
        f"{pd_name}_last": params["e0"] + params["e0_slope"] * last + effect * act_last,
        f"{disease_name}_last": disease_last,
        f"{disease_name}_change_last": disease_last - base,
        f"{disease_name}_change_end": slope * (n_days - 1) - max_offset * offset_end,
    })
    return summary, traj


def _exposure_summaries(conc_dn, ec50, k_onset, last):
    """One pass over the days: Emax activity, delayed disease offset and concentration sum, read on
    each participant's last day on study and at the end. Overwrites ``conc_dn`` with the activity.

    The same first-order update as :func:`inference.disease.progress`, kept here as a day loop
    over contiguous rows with in-place updates; each participant's values are captured on their
    own last day (participants grouped by that day), so no ``(n_days, n)`` history is built.
    """
    n_days, n = conc_dn.shape
    a = 1.0 - math.exp(-k_onset)
    offset = np.zeros(n)
    total = np.zeros(n)
    buf = np.empty(n)
    act_last, offset_last, total_last = np.zeros(n), np.zeros(n), np.zeros(n)
    order = np.argsort(last, kind="stable")
    bounds = np.searchsorted(last[order], np.arange(n_days + 1))
    for t in range(n_days):
        c = conc_dn[t]
        total += c
        np.add(c, ec50, out=buf)
        np.divide(c, buf, out=c)
        offset *= 1.0 - a
        np.multiply(c, a, out=buf)
        offset += buf
        if bounds[t + 1] > bounds[t]:
            sel = order[bounds[t]:bounds[t + 1]]
            act_last[sel] = c[sel]
            offset_last[sel] = offset[sel]
            total_last[sel] = total[sel]
    return act_last, offset_last, offset, total_last


def simulate_cohort(scenario: Scenario, n: int | None = None, seed: int = 0, *,
                    model,
                    covariate_model: CovariateModel | None = None,
                    covariates: Covariates | None = None,
                    chunk_size: int = 10 * BLOCK_SIZE,
                    trajectories: bool = False,
                    executor=None) -> CohortResult:
    """Simulate a daily-regimen twin model for a virtual cohort in one call.

    Parameters
    ----------
    scenario : Scenario
        Dose, study length, visit schedule and behaviour model.
    n : int, optional
        Number of virtual participants (sampled from ``covariate_model``); omit when
        ``covariates`` are given.
    seed : int
        Seed; participant ``i`` draws from the stream of block ``i // BLOCK_SIZE``, so the result
        never depends on ``chunk_size``, and (for sampled covariates) participant ``i``'s result
        does not change when ``n`` grows.
    model : inference.regimen.DailyRegimen
        The compiled model definition: typical values, variability, covariate effects.
    covariate_model : CovariateModel, optional
        Covariate distribution of virtual participants (default: the definition's
        ``virtualPopulation``).
    covariates : Covariates, optional
        Observed covariates to simulate instead of sampled ones (a cohort twin).
    chunk_size : int
        Participants simulated together; a multiple of ``BLOCK_SIZE``. Memory grows with
        ``chunk_size * n_days``.
    trajectories : bool
        Also return daily ``(n, n_days)`` arrays: ``concentration`` (average over the day, mg/L),
        ``trough`` (end of the day, just before the next dose), ``taken``,
        ``ae``, plus ``attended`` and ``visit_days``, and the biomarker and disease marker under their
        output names; refused above 2 * 10^7 participant-days.
    executor : optional
        Where the chunks run: ``None`` in this process, one after the other; otherwise anything
        with ``submit(fn, *args)`` returning a future with ``result()`` — a
        ``dask.distributed.Client`` (scale-out on an existing cluster) or a
        ``concurrent.futures`` executor. Chunks are seeded by block, so the result is identical
        to the in-process run whatever executes them.

    Returns
    -------
    CohortResult

    Examples
    --------
    >>> from inference.model_definition import example_regimen
    >>> model = example_regimen()
    >>> res = simulate_cohort(Scenario(dose_mg=100.0), n=300, seed=1, model=model)
    >>> res.n, res.summary["hba1c_change_last"].shape
    (300, (300,))
    >>> bool(np.mean(res.summary["hba1c_change_last"]) < -0.3)
    True
    """
    covariate_model = model.covariate_model if covariate_model is None else covariate_model
    if covariates is None and covariate_model is None:
        raise ValueError(f"{model.canonical} has no virtual population: give the participants' covariates")
    if covariates is not None:
        if n is not None and n != covariates.n:
            raise ValueError(f"n={n} does not match the {covariates.n} given covariates")
        n = covariates.n
    if n is None or int(n) != n or n < 1:
        raise ValueError("n must be a positive integer")
    n = int(n)
    if chunk_size < BLOCK_SIZE or chunk_size % BLOCK_SIZE:
        raise ValueError(f"chunk_size must be a positive multiple of BLOCK_SIZE={BLOCK_SIZE}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError("seed must be a non-negative integer")
    if trajectories and n * scenario.n_days > 2 * 10 ** 7:
        raise ValueError("trajectories are limited to 2e7 participant-days; ask for summaries")
    n_blocks = -(-n // BLOCK_SIZE)
    per_chunk = chunk_size // BLOCK_SIZE
    tasks = []
    for first in range(0, n_blocks, per_chunk):
        blocks = list(range(first, min(first + per_chunk, n_blocks)))
        sizes = [min(BLOCK_SIZE, n - b * BLOCK_SIZE) for b in blocks]
        start, stop = blocks[0] * BLOCK_SIZE, blocks[0] * BLOCK_SIZE + sum(sizes)
        sub_cov = covariates.take(slice(start, stop)) if covariates is not None else None
        tasks.append((scenario, model, covariate_model, sub_cov, blocks, sizes, int(seed), trajectories))
    if executor is None:
        results = [_simulate_chunk(*task) for task in tasks]
    else:
        # all chunks are handed out first so that the workers run them side by side; results are
        # read back in chunk order, which keeps participant i at row i
        futures = [executor.submit(_simulate_chunk, *task) for task in tasks]
        results = [future.result() for future in futures]
    parts = [summary for summary, _ in results]
    traj_parts = [traj for _, traj in results]
    summary = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    traj = None
    if trajectories:
        traj = {k: np.concatenate([p[k] for p in traj_parts]) for k in traj_parts[0] if k != "visit_days"}
        traj["visit_days"] = traj_parts[0]["visit_days"]
    return CohortResult(scenario=scenario, seed=int(seed), summary=summary, trajectories=traj)


def summarize(result: CohortResult) -> dict[str, float]:
    """Cohort-level figures: mean disease-marker change, dropout and missed-visit rates, AE rate, adherence.

    The change is reported under the disease output's name (``<disease>_change_last_mean``, ...).

    Examples
    --------
    >>> from inference.model_definition import example_regimen
    >>> s = summarize(simulate_cohort(Scenario(dose_mg=0.0), n=200, seed=3, model=example_regimen()))
    >>> abs(s["hba1c_change_last_mean"]) < 0.2
    True
    """
    s = result.summary
    change = next(k[:-len("_change_last")] for k in s if k.endswith("_change_last"))
    n_days = result.scenario.n_days
    scheduled = s["visits_attended"] + s["visits_missed"]
    days_on = np.minimum(s["dropout_day"], n_days)
    return {
        "n": float(result.n),
        "dose_mg": float(result.scenario.dose_mg),
        f"{change}_change_last_mean": float(np.mean(s[f"{change}_change_last"])),
        f"{change}_change_end_mean": float(np.mean(s[f"{change}_change_end"])),
        "dropout_rate": float(np.mean(s["dropout_day"] < n_days)),
        "missed_visit_rate": float(np.sum(s["visits_missed"]) / max(np.sum(scheduled), 1)),
        "ae_per_participant_year": float(np.sum(s["n_ae"]) / max(np.sum(days_on), 1) * 365.25),
        "adherence_mean": float(np.nanmean(s["adherence"])),
        "cavg_mean": float(np.mean(s["cavg_on_study"])),
    }


def sweep(scenario: Scenario, parameter: str, values, n: int, seed: int = 0, **kwargs) -> list[dict]:
    """Run ``simulate_cohort`` once per value of one scenario parameter; one summary row per value.

    ``parameter`` names a :class:`Scenario` field (``"dose_mg"``, ``"n_days"``) or a behaviour
    parameter as ``"behaviour.<name>"``. The same seed is used for every value (common random
    numbers), so differences between rows come from the parameter, not from sampling noise.

    Examples
    --------
    >>> from inference.model_definition import example_regimen
    >>> rows = sweep(Scenario(), "dose_mg", [0.0, 100.0], n=200, seed=2, model=example_regimen())
    >>> rows[1]["hba1c_change_last_mean"] < rows[0]["hba1c_change_last_mean"]
    True
    """
    rows = []
    for value in values:
        if parameter.startswith("behaviour."):
            name = parameter.split(".", 1)[1]
            if name not in {f.name for f in dataclasses.fields(BehaviourModel)}:
                raise ValueError(f"unknown behaviour parameter {name!r}")
            changed = scenario.replace(behaviour=scenario.behaviour.replace(**{name: value}))
        elif parameter in {f.name for f in dataclasses.fields(Scenario)}:
            changed = scenario.replace(**{parameter: value})
        else:
            raise ValueError(f"unknown scenario parameter {parameter!r}")
        row = summarize(simulate_cohort(changed, n=n, seed=seed, **kwargs))
        row[parameter] = value
        rows.append(row)
    return rows
