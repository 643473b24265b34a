"""Non-linear mixed-effects (population) model specification: fixed effects, log-normal variability,
covariate effects and residual-error models, with sampling, prediction and likelihood verbs.

Individual parameters live on the log scale (``phi``): ``phi = theta + covariate shifts + eta`` with
``eta ~ N(0, Omega)``, so the natural-scale parameter ``exp(phi)`` is log-normal. A structural model
is any vectorized callable ``structural(phi, data) -> predictions`` where ``phi`` has one row per
subject of ``data`` (shape ``(data.n_subjects, n_parameters)``) and the result has one value per
observation row of ``data``. It decides how to read ``phi`` (e.g. ``exp(phi[:, 0])`` as a rate).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

__all__ = [
    "ObservationData",
    "ResidualError",
    "CovariateEffect",
    "PopulationModel",
    "Structural",
    "residual_variance",
    "output_index",
    "residual_log_likelihood",
    "typical_parameters",
    "individual_parameters",
    "sample_random_effects",
    "sample_individual_parameters",
    "predict",
    "conditional_log_likelihood",
    "simulate_observations",
]

Structural = Callable[[np.ndarray, "ObservationData"], np.ndarray]
"""``structural(phi, data)``: ``phi`` ``(data.n_subjects, p)`` → predictions ``(data.n_rows,)``."""


def _frozen_array(values: Any, *, dtype: Any = float, name: str = "array") -> np.ndarray:
    array = np.array(values, dtype=dtype, copy=True)
    array.setflags(write=False)
    return array


def _frozen_mapping(mapping: Mapping[str, Any] | None, length: int | None, what: str) -> Mapping[str, np.ndarray]:
    out = {}
    for key, values in (mapping or {}).items():
        array = _frozen_array(values, name=key)
        if array.ndim != 1 or (length is not None and array.shape[0] != length):
            raise ValueError(f"{what} {key!r} must be a 1-D array of length {length}, got shape {array.shape}")
        out[str(key)] = array
    return MappingProxyType(out)


@dataclass(frozen=True, eq=False)
class ObservationData:
    """Observations of one or more subjects, in long format (one row per observation).

    Parameters
    ----------
    subject : array of int, shape (n_rows,)
        Subject index of each row, in ``0 .. n_subjects - 1``.
    time : array of float, shape (n_rows,)
        Observation time of each row.
    value : array of float, shape (n_rows,)
        Observed value; ``nan`` marks a row to predict but not fit (e.g. a future time).
    subject_ids : tuple of str, optional
        Label of each subject; defaults to ``"0", "1", ...``.
    covariates : mapping of str to array, optional
        Subject-level covariates (one value per subject), e.g. ``{"weight": [...]}``.
    design : mapping of str to array, optional
        Row-level design variables the structural model reads, e.g. ``{"dose": [...]}``.
    context : mapping, optional
        Anything else the structural model needs (e.g. a dosing history); passed through as is.

    Examples
    --------
    >>> data = ObservationData.single([0.5, 1.0, 2.0], [1.2, 2.0, 1.7], covariates={"weight": 70})
    >>> data.n_subjects, data.n_rows, float(data.covariates["weight"][0])
    (1, 3, 70.0)
    """

    subject: np.ndarray
    time: np.ndarray
    value: np.ndarray
    subject_ids: tuple[str, ...] = ()
    covariates: Mapping[str, np.ndarray] = field(default_factory=dict)
    design: Mapping[str, np.ndarray] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        subject = np.asarray(self.subject)
        if subject.ndim != 1 or subject.size == 0:
            raise ValueError("subject must be a non-empty 1-D array of subject indices")
        if not np.issubdtype(subject.dtype, np.integer):
            if not np.all(np.equal(np.mod(subject, 1), 0)):
                raise ValueError("subject must hold integer subject indices")
        subject = _frozen_array(subject, dtype=np.int64)
        n_rows = subject.shape[0]
        time = _frozen_array(self.time)
        value = _frozen_array(self.value)
        if time.shape != (n_rows,) or value.shape != (n_rows,):
            raise ValueError(f"time and value must have one entry per row ({n_rows}); got {time.shape} and {value.shape}")
        if not np.all(np.isfinite(time)):
            raise ValueError("time must be finite")
        if np.any(np.isinf(value)):
            raise ValueError("value must be finite or nan (nan = not observed)")
        if subject.min() < 0:
            raise ValueError("subject indices must be >= 0")
        n_subjects = int(subject.max()) + 1
        if np.unique(subject).size != n_subjects:
            raise ValueError("subject indices must cover 0 .. n_subjects - 1 without gaps")
        ids = tuple(str(s) for s in self.subject_ids) or tuple(str(i) for i in range(n_subjects))
        if len(ids) != n_subjects:
            raise ValueError(f"subject_ids has {len(ids)} labels for {n_subjects} subjects")
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "time", time)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "subject_ids", ids)
        object.__setattr__(self, "covariates", _frozen_mapping(self.covariates, n_subjects, "covariate"))
        object.__setattr__(self, "design", _frozen_mapping(self.design, n_rows, "design variable"))
        object.__setattr__(self, "context", MappingProxyType(dict(self.context or {})))

    @classmethod
    def single(
        cls,
        time: Any,
        value: Any,
        *,
        subject_id: str = "0",
        covariates: Mapping[str, float] | None = None,
        design: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> "ObservationData":
        """Observations of one participant (covariates given as scalars)."""
        time = np.atleast_1d(np.asarray(time, dtype=float))
        return cls(
            subject=np.zeros(time.shape[0], dtype=np.int64),
            time=time,
            value=np.atleast_1d(np.asarray(value, dtype=float)),
            subject_ids=(subject_id,),
            covariates={k: [float(v)] for k, v in (covariates or {}).items()},
            design=design or {},
            context=context or {},
        )

    @property
    def n_rows(self) -> int:
        """Number of observation rows."""
        return int(self.subject.shape[0])

    @property
    def n_subjects(self) -> int:
        """Number of subjects."""
        return len(self.subject_ids)

    @property
    def observed(self) -> np.ndarray:
        """Boolean mask of rows that carry an observed value."""
        return ~np.isnan(self.value)

    def replace(self, **changes: Any) -> "ObservationData":
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def select_rows(self, mask: Any) -> "ObservationData":
        """Keep the rows where ``mask`` is true; every subject must keep at least one row."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.n_rows,):
            raise ValueError("mask must have one entry per row")
        if np.unique(self.subject[mask]).size != self.n_subjects:
            raise ValueError("select_rows would leave a subject without rows; use select_subjects")
        return self.replace(
            subject=self.subject[mask],
            time=self.time[mask],
            value=self.value[mask],
            design={k: v[mask] for k, v in self.design.items()},
        )

    def select_subjects(self, indices: Any) -> "ObservationData":
        """Keep the given subjects (in the given order), renumbered ``0 .. len(indices) - 1``."""
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if indices.size == 0 or indices.min() < 0 or indices.max() >= self.n_subjects:
            raise ValueError("subject indices out of range")
        new_index = np.full(self.n_subjects, -1, dtype=np.int64)
        new_index[indices] = np.arange(indices.size)
        rows = np.concatenate([np.flatnonzero(self.subject == i) for i in indices])
        return self.replace(
            subject=new_index[self.subject[rows]],
            time=self.time[rows],
            value=self.value[rows],
            subject_ids=tuple(self.subject_ids[i] for i in indices),
            covariates={k: v[indices] for k, v in self.covariates.items()},
            design={k: v[rows] for k, v in self.design.items()},
        )

    def split(self) -> tuple["ObservationData", ...]:
        """One single-subject data set per subject, in subject order (linear time).

        Examples
        --------
        >>> data = ObservationData([1, 0, 1], [1.0, 1.0, 2.0], [3.0, 2.0, 5.0], subject_ids=("a", "b"))
        >>> [(d.subject_ids, d.value.tolist()) for d in data.split()]
        [(('a',), [2.0]), (('b',), [3.0, 5.0])]
        """
        order = np.argsort(self.subject, kind="stable")
        bounds = np.cumsum(np.bincount(self.subject, minlength=self.n_subjects))[:-1]
        out = []
        for i, rows in enumerate(np.split(order, bounds)):
            out.append(
                self.replace(
                    subject=np.zeros(rows.size, dtype=np.int64),
                    time=self.time[rows],
                    value=self.value[rows],
                    subject_ids=(self.subject_ids[i],),
                    covariates={k: v[i : i + 1] for k, v in self.covariates.items()},
                    design={k: v[rows] for k, v in self.design.items()},
                )
            )
        return tuple(out)

    def append(self, other: "ObservationData") -> "ObservationData":
        """Rows of ``self`` followed by rows of ``other`` for the same subjects (new observations)."""
        if other.subject_ids != self.subject_ids:
            raise ValueError("append needs the same subjects in the same order")
        if set(other.design) != set(self.design):
            raise ValueError("append needs the same design variables")
        for key, values in self.covariates.items():
            if key in other.covariates and not np.allclose(other.covariates[key], values):
                raise ValueError(f"covariate {key!r} differs between the two data sets")
        return self.replace(
            subject=np.concatenate([self.subject, other.subject]),
            time=np.concatenate([self.time, other.time]),
            value=np.concatenate([self.value, other.value]),
            design={k: np.concatenate([v, other.design[k]]) for k, v in self.design.items()},
            context={**self.context, **other.context},
        )

    def tile(self, n: int) -> "ObservationData":
        """Repeat the whole data set ``n`` times as ``n * n_subjects`` subjects (for vectorized draws)."""
        if n < 1:
            raise ValueError("n must be >= 1")
        offsets = np.repeat(np.arange(n) * self.n_subjects, self.n_rows)
        return self.replace(
            subject=np.tile(self.subject, n) + offsets,
            time=np.tile(self.time, n),
            value=np.tile(self.value, n),
            subject_ids=tuple(f"{s}#{k}" for k in range(n) for s in self.subject_ids),
            covariates={k: np.tile(v, n) for k, v in self.covariates.items()},
            design={k: np.tile(v, n) for k, v in self.design.items()},
        )


_ERROR_KINDS = ("additive", "proportional", "combined")


@dataclass(frozen=True)
class ResidualError:
    """Residual (within-subject) error model ``y = f + e`` with ``e ~ N(0, V(f))``.

    ``additive``: ``V = a**2``; ``proportional``: ``V = (b f)**2``; ``combined``:
    ``V = a**2 + (b f)**2`` (variances add, as NONMEM's combined error and nlme's
    ``varConstPower(power=1)`` up to parameterization).

    Parameters
    ----------
    kind : {"additive", "proportional", "combined"}
    additive : float
        Additive standard deviation ``a`` (> 0 for additive and combined, 0 otherwise).
    proportional : float
        Proportional coefficient ``b`` (> 0 for proportional and combined, 0 otherwise).

    Examples
    --------
    >>> ResidualError("combined", additive=0.1, proportional=0.2)
    ResidualError(kind='combined', additive=0.1, proportional=0.2)
    >>> ResidualError("additive", additive=0.7).replace(additive=0.5).additive
    0.5
    """

    kind: str
    additive: float = 0.0
    proportional: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _ERROR_KINDS:
            raise ValueError(f"residual error kind must be one of {_ERROR_KINDS}, got {self.kind!r}")
        a, b = float(self.additive), float(self.proportional)
        if not (np.isfinite(a) and np.isfinite(b)) or a < 0 or b < 0:
            raise ValueError("residual error parameters must be finite and non-negative")
        needs_a = self.kind in ("additive", "combined")
        needs_b = self.kind in ("proportional", "combined")
        if needs_a != (a > 0) or needs_b != (b > 0):
            raise ValueError(
                f"{self.kind} error needs additive {'> 0' if needs_a else '= 0'} and proportional {'> 0' if needs_b else '= 0'}"
            )
        object.__setattr__(self, "additive", a)
        object.__setattr__(self, "proportional", b)

    @property
    def n_parameters(self) -> int:
        """Number of estimated residual-error parameters."""
        return 2 if self.kind == "combined" else 1

    def replace(self, **changes: Any) -> "ResidualError":
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# Floor on the residual variance: a purely proportional model at a zero prediction would
# otherwise give an infinite likelihood.
_MIN_VARIANCE = 1e-12


def _errors(error: Any) -> tuple[ResidualError, ...]:
    errors = (error,) if isinstance(error, ResidualError) else tuple(error)
    if not errors or not all(isinstance(e, ResidualError) for e in errors):
        raise ValueError("error must be a ResidualError or a non-empty tuple of them (one per output)")
    return errors


def _error_coefficients(error: Any, output: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row additive SD and proportional coefficient, picking each row's output's error model."""
    errors = _errors(error)
    a = np.array([e.additive for e in errors])
    b = np.array([e.proportional for e in errors])
    if output is None:
        if len(errors) > 1:
            raise ValueError("several residual error models need an output index per row")
        return np.full(n, a[0]), np.full(n, b[0])
    index = np.asarray(output)
    if index.shape != (n,) or np.any(index != np.round(index)) or index.min() < 0 or index.max() >= len(errors):
        raise ValueError(f"output indices must be integers in 0 .. {len(errors) - 1}, one per row")
    index = index.astype(np.int64)
    return a[index], b[index]


def output_index(data: "ObservationData") -> np.ndarray | None:
    """Row-level output index (``data.design["output"]``) selecting the residual error model, if any.

    Examples
    --------
    >>> rows = ObservationData([0, 0], [1.0, 1.0], [5.0, 7.1], design={"output": [0, 1]})
    >>> output_index(rows).tolist(), output_index(rows.replace(design={}))
    ([0.0, 1.0], None)
    """
    return data.design.get("output")


def residual_variance(error: Any, prediction: Any, output: Any = None) -> np.ndarray:
    """Residual variance ``V(f)`` at each prediction.

    Parameters
    ----------
    error : ResidualError or tuple of ResidualError
        One error model, or one per output (e.g. drug concentration, HbA1c, glucose).
    prediction : array
    output : array of int, optional
        Output index of each row (required with several error models).

    Examples
    --------
    >>> residual_variance(ResidualError("proportional", proportional=0.1), [10.0, 20.0])
    array([1., 4.])
    >>> two = (ResidualError("proportional", proportional=0.1), ResidualError("additive", additive=0.5))
    >>> residual_variance(two, [10.0, 10.0], output=[0, 1])
    array([1.  , 0.25])
    """
    f = np.asarray(prediction, dtype=float)
    a, b = _error_coefficients(error, output, f.size)
    variance = a.reshape(f.shape) ** 2 + (b.reshape(f.shape) * f) ** 2
    return np.maximum(variance, _MIN_VARIANCE)


def _variance_slope(error: Any, prediction: np.ndarray, output: Any = None) -> np.ndarray:
    """dV/df, needed by the interaction (FOCEI) terms."""
    _, b = _error_coefficients(error, output, prediction.size)
    return 2.0 * b.reshape(prediction.shape) ** 2 * prediction


def residual_log_likelihood(error: Any, observed: Any, predicted: Any, output: Any = None) -> np.ndarray:
    """Log density of each observation given its prediction, ``log N(y; f, V(f))``.

    Rows whose observation is ``nan`` contribute 0.

    Examples
    --------
    >>> err = ResidualError("additive", additive=1.0)
    >>> round(float(residual_log_likelihood(err, [1.0], [0.0])[0]), 6)
    -1.418939
    """
    y = np.asarray(observed, dtype=float)
    f = np.asarray(predicted, dtype=float)
    variance = residual_variance(error, f, output)
    out = -0.5 * ((y - f) ** 2 / variance + np.log(2.0 * np.pi * variance))
    return np.where(np.isnan(y), 0.0, out)


_COVARIATE_FORMS = ("power", "exponential", "linear")


@dataclass(frozen=True)
class CovariateEffect:
    """Effect of a subject covariate on one log-scale parameter.

    With ``x`` the covariate and ``x_ref`` its reference value, the shift added to ``phi`` is
    ``power``: ``c * log(x / x_ref)`` (natural scale ``(x / x_ref) ** c``, e.g. allometric
    weight with ``c = 0.75``); ``exponential``: ``c * (x - x_ref)``; ``linear``:
    ``log(1 + c * (x - x_ref))``.

    Examples
    --------
    >>> effect = CovariateEffect("lCl", "weight", "power", reference=70.0, coefficient=0.75)
    >>> round(float(np.exp(effect.shift([140.0])[0])), 4)  # doubling weight → 2**0.75
    1.6818
    """

    parameter: str
    covariate: str
    form: str
    reference: float
    coefficient: float
    estimate: bool = True

    def __post_init__(self) -> None:
        if self.form not in _COVARIATE_FORMS:
            raise ValueError(f"covariate form must be one of {_COVARIATE_FORMS}, got {self.form!r}")
        if not np.isfinite(self.reference) or not np.isfinite(self.coefficient):
            raise ValueError("covariate reference and coefficient must be finite")
        if self.form == "power" and self.reference <= 0:
            raise ValueError("a power covariate effect needs a positive reference value")
        object.__setattr__(self, "reference", float(self.reference))
        object.__setattr__(self, "coefficient", float(self.coefficient))

    @property
    def name(self) -> str:
        """Label used in estimates, e.g. ``"lCl~weight"``."""
        return f"{self.parameter}~{self.covariate}"

    def shift(self, values: Any, coefficient: float | None = None) -> np.ndarray:
        """Log-scale shift for the given covariate values."""
        x = np.asarray(values, dtype=float)
        c = self.coefficient if coefficient is None else coefficient
        if self.form == "power":
            if np.any(x <= 0):
                raise ValueError(f"covariate {self.covariate!r} must be positive for a power effect")
            return c * np.log(x / self.reference)
        if self.form == "exponential":
            return c * (x - self.reference)
        scale = 1.0 + c * (x - self.reference)
        if np.any(scale <= 0):
            raise ValueError(f"linear effect of {self.covariate!r} gives a non-positive parameter")
        return np.log(scale)

    def replace(self, **changes: Any) -> "CovariateEffect":
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class PopulationModel:
    """A non-linear mixed-effects model: typical values, variability, covariates, residual error.

    Parameters
    ----------
    parameters : tuple of str
        Names of the log-scale individual parameters, in the column order of ``phi``.
    theta : array of float, shape (p,)
        Typical (fixed-effect) values of ``phi`` at the covariates' reference values.
    random_effects : tuple of str
        Parameters that carry inter-individual variability (a subset of ``parameters``).
    omega : array of float, shape (q, q)
        Covariance of ``eta`` for ``random_effects`` (symmetric positive definite).
    error : ResidualError or tuple of ResidualError
        One residual error model, or one per output; rows then pick theirs by the integer
        ``data.design["output"]`` (e.g. 0 = drug concentration, 1 = HbA1c).
    covariate_effects : tuple of CovariateEffect, optional
    omega_structure : {"diagonal", "full"}
        Whether off-diagonal elements of ``omega`` are free (estimated) or zero.

    Examples
    --------
    >>> model = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
    ...                         np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    >>> model.n_parameters, model.n_random_effects, model.random_index.tolist()
    (3, 2, [1, 2])
    >>> model.replace(theta=[-2.5, 0.5, -3.2]).theta.tolist()
    [-2.5, 0.5, -3.2]
    """

    parameters: tuple[str, ...]
    theta: np.ndarray
    random_effects: tuple[str, ...]
    omega: np.ndarray
    error: ResidualError | tuple[ResidualError, ...]
    covariate_effects: tuple[CovariateEffect, ...] = ()
    omega_structure: str = "diagonal"

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.parameters)
        if not names or len(set(names)) != len(names):
            raise ValueError("parameters must be a non-empty tuple of unique names")
        theta = _frozen_array(self.theta)
        if theta.shape != (len(names),) or not np.all(np.isfinite(theta)):
            raise ValueError(f"theta must hold {len(names)} finite values, got shape {theta.shape}")
        random = tuple(str(n) for n in self.random_effects)
        if len(set(random)) != len(random) or not set(random) <= set(names):
            raise ValueError(f"random_effects {random} must be unique names among {names}")
        omega = _frozen_array(np.atleast_2d(self.omega) if random else np.zeros((0, 0)))
        q = len(random)
        if omega.shape != (q, q):
            raise ValueError(f"omega must be {q}x{q} for random effects {random}, got {omega.shape}")
        if self.omega_structure not in ("diagonal", "full"):
            raise ValueError("omega_structure must be 'diagonal' or 'full'")
        if q:
            if not np.allclose(omega, omega.T) or not np.all(np.isfinite(omega)):
                raise ValueError("omega must be a finite symmetric matrix")
            if self.omega_structure == "diagonal" and np.any(omega[~np.eye(q, dtype=bool)] != 0):
                raise ValueError("a diagonal omega must have zero off-diagonal elements")
            if np.linalg.eigvalsh(omega).min() <= 0:
                raise ValueError("omega must be positive definite")
        if not isinstance(self.error, ResidualError):
            object.__setattr__(self, "error", _errors(self.error))
        effects = tuple(self.covariate_effects)
        for effect in effects:
            if not isinstance(effect, CovariateEffect) or effect.parameter not in names:
                raise ValueError(f"covariate effect on unknown parameter: {effect!r}")
        if len({e.name for e in effects}) != len(effects):
            raise ValueError("each (parameter, covariate) pair may have one effect")
        object.__setattr__(self, "parameters", names)
        object.__setattr__(self, "theta", theta)
        object.__setattr__(self, "random_effects", random)
        object.__setattr__(self, "omega", omega)
        object.__setattr__(self, "covariate_effects", effects)

    @property
    def n_parameters(self) -> int:
        """Number of individual parameters ``p``."""
        return len(self.parameters)

    @property
    def n_random_effects(self) -> int:
        """Number of random effects ``q``."""
        return len(self.random_effects)

    @property
    def random_index(self) -> np.ndarray:
        """Column of ``phi`` for each random effect."""
        return np.array([self.parameters.index(n) for n in self.random_effects], dtype=np.int64)

    @property
    def errors(self) -> tuple[ResidualError, ...]:
        """The residual error models, one per output (a 1-tuple for a single output)."""
        return _errors(self.error)

    @property
    def omega_sd(self) -> np.ndarray:
        """Standard deviations of the random effects (square roots of ``diag(omega)``)."""
        return np.sqrt(np.diag(self.omega))

    def replace(self, **changes: Any) -> "PopulationModel":
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _unchecked_replace(model: PopulationModel, **changes: Any) -> PopulationModel:
    """A copy with ``changes`` that skips ``__post_init__``'s validation (eigenvalues, symmetry, names).

    Only for callers whose changes are valid by construction: the estimator's unconstrained
    parameterization (log SDs or a Cholesky factor for ``omega``, log residual parameters) is
    evaluated hundreds of times per fit, and re-validating every point cost a sixth of a fit. Arrays
    are frozen as the validated constructor does; non-finite values still raise ``ValueError``.
    """
    out = object.__new__(PopulationModel)
    for f in dataclasses.fields(PopulationModel):
        value = changes.get(f.name, getattr(model, f.name))
        if f.name in ("theta", "omega") and f.name in changes:
            value = np.array(value, dtype=float)
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{f.name} must be finite")
            if f.name == "omega" and value.size:
                try:  # a Cholesky factor is cheaper than the eigenvalues and says the same
                    np.linalg.cholesky(value)
                except np.linalg.LinAlgError:
                    raise ValueError("omega must be positive definite") from None
            value.setflags(write=False)
        object.__setattr__(out, f.name, value)
    return out


def typical_parameters(model: PopulationModel, data: ObservationData) -> np.ndarray:
    """Typical log-scale parameters of each subject (``theta`` plus covariate shifts).

    Returns
    -------
    ndarray, shape (data.n_subjects, model.n_parameters)

    Examples
    --------
    >>> model = PopulationModel(("lCl",), [0.0], ("lCl",), [[0.1]],
    ...     ResidualError("additive", additive=1.0),
    ...     (CovariateEffect("lCl", "weight", "power", 70.0, 1.0),))
    >>> data = ObservationData([0, 1], [1.0, 1.0], [0.0, 0.0], covariates={"weight": [70, 140]})
    >>> np.exp(typical_parameters(model, data)).ravel().tolist()
    [1.0, 2.0]
    """
    phi = np.tile(model.theta, (data.n_subjects, 1))
    for effect in model.covariate_effects:
        if effect.covariate not in data.covariates:
            raise ValueError(f"the data lack covariate {effect.covariate!r} needed by {effect.name}")
        phi[:, model.parameters.index(effect.parameter)] += effect.shift(data.covariates[effect.covariate])
    return phi


def individual_parameters(model: PopulationModel, eta: Any, data: ObservationData) -> np.ndarray:
    """Individual log-scale parameters ``phi = typical + eta`` (eta on the random-effect columns).

    Parameters
    ----------
    eta : array, shape (data.n_subjects, q)

    Returns
    -------
    ndarray, shape (data.n_subjects, p)

    Examples
    --------
    >>> model = PopulationModel(("lKe", "lCl"), [-2.0, -3.0], ("lCl",), [[0.04]],
    ...                         ResidualError("additive", additive=1.0))
    >>> data = ObservationData([0, 1], [1.0, 1.0], [np.nan, np.nan])
    >>> individual_parameters(model, [[0.1], [-0.2]], data).tolist()
    [[-2.0, -2.9], [-2.0, -3.2]]
    """
    eta = np.asarray(eta, dtype=float).reshape(data.n_subjects, model.n_random_effects)
    phi = typical_parameters(model, data)
    phi[:, model.random_index] += eta
    return phi


def sample_random_effects(model: PopulationModel, n: int, seed: int | np.random.Generator | None = None) -> np.ndarray:
    """Draw ``n`` random-effect vectors ``eta ~ N(0, omega)`` (seeded).

    Examples
    --------
    >>> model = PopulationModel(("a", "b"), [0.0, 0.0], ("a", "b"), np.diag([0.04, 0.25]),
    ...                         ResidualError("additive", additive=1.0))
    >>> eta = sample_random_effects(model, 20000, seed=1)
    >>> np.round(eta.std(axis=0), 1).tolist()
    [0.2, 0.5]
    """
    rng = np.random.default_rng(seed)
    q = model.n_random_effects
    if q == 0:
        return np.zeros((n, 0))
    return rng.standard_normal((n, q)) @ np.linalg.cholesky(model.omega).T


def sample_individual_parameters(
    model: PopulationModel, data: ObservationData, seed: int | np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw individual parameters for every subject of ``data`` (covariates from ``data``).

    Returns
    -------
    phi : ndarray, shape (n_subjects, p)
    eta : ndarray, shape (n_subjects, q)

    Examples
    --------
    >>> model = PopulationModel(("lKe", "lCl"), [-2.0, -3.0], ("lCl",), [[0.04]],
    ...                         ResidualError("additive", additive=1.0))
    >>> phi, eta = sample_individual_parameters(model, ObservationData([0, 1, 2], [1.0] * 3, [1.0] * 3), seed=0)
    >>> phi.shape, eta.shape, bool(np.allclose(phi[:, 1], -3.0 + eta[:, 0]))
    ((3, 2), (3, 1), True)
    """
    eta = sample_random_effects(model, data.n_subjects, seed)
    return individual_parameters(model, eta, data), eta


def predict(structural: Structural, phi: Any, data: ObservationData) -> np.ndarray:
    """Individual predictions for every row of ``data``, with the structural model's output shape checked.

    Examples
    --------
    >>> line = lambda phi, data: phi[data.subject, 0] + phi[data.subject, 1] * data.time
    >>> predict(line, [[1.0, 2.0]], ObservationData.single([0.0, 1.0], [np.nan, np.nan])).tolist()
    [1.0, 3.0]
    """
    phi = np.asarray(phi, dtype=float)
    if phi.ndim != 2 or phi.shape[0] != data.n_subjects:
        raise ValueError(f"phi must have one row per subject ({data.n_subjects}), got shape {phi.shape}")
    out = np.asarray(structural(phi, data), dtype=float)
    if out.shape != (data.n_rows,):
        raise ValueError(f"the structural model returned shape {out.shape}, expected ({data.n_rows},)")
    return out


def conditional_log_likelihood(
    model: PopulationModel, structural: Structural, eta: Any, data: ObservationData
) -> np.ndarray:
    """Residual-error log-likelihood of each subject's observations given its ``eta``.

    Returns
    -------
    ndarray, shape (n_subjects,)

    Examples
    --------
    >>> model = PopulationModel(("a",), [0.0], ("a",), [[1.0]], ResidualError("additive", additive=1.0))
    >>> level = lambda phi, data: phi[data.subject, 0]
    >>> data = ObservationData([0, 0, 1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    >>> np.round(conditional_log_likelihood(model, level, [[0.0], [1.0]], data), 4).tolist()
    [-1.8379, -0.9189]
    """
    f = predict(structural, individual_parameters(model, eta, data), data)
    per_row = residual_log_likelihood(model.error, data.value, f, output_index(data))
    return np.bincount(data.subject, weights=per_row, minlength=data.n_subjects)


def simulate_observations(
    model: PopulationModel,
    structural: Structural,
    data: ObservationData,
    seed: int | np.random.Generator | None = None,
    eta: Any = None,
) -> tuple[ObservationData, np.ndarray]:
    """Simulate observations at the rows of ``data`` (random effects drawn unless given).

    Returns
    -------
    simulated : ObservationData
        ``data`` with ``value`` replaced by simulated observations.
    eta : ndarray, shape (n_subjects, q)
        The true random effects used.

    Examples
    --------
    >>> model = PopulationModel(("a",), [2.0], ("a",), [[0.01]], ResidualError("additive", additive=0.1))
    >>> level = lambda phi, data: phi[data.subject, 0]
    >>> sim, eta = simulate_observations(model, level, ObservationData([0, 0], [0.0, 1.0], [np.nan] * 2), seed=1)
    >>> bool(np.all(np.abs(sim.value - 2.0) < 1.0)), eta.shape
    (True, (1, 1))
    """
    rng = np.random.default_rng(seed)
    eta = sample_random_effects(model, data.n_subjects, rng) if eta is None else np.asarray(eta, dtype=float)
    f = predict(structural, individual_parameters(model, eta, data), data)
    noise = rng.standard_normal(f.shape) * np.sqrt(residual_variance(model.error, f, output_index(data)))
    return data.replace(value=f + noise), eta
