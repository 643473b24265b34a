"""Population maximum-likelihood estimation of non-linear mixed-effects models (FOCE with interaction).

Also holds the vectorized per-subject mode search (empirical Bayes estimates) that individual calibration reuses.

Method: for each subject the random effects ``eta`` are set to the mode of
``p(y_i | eta) p(eta)`` (damped Newton, all subjects and finite-difference points in stacked calls),
and the marginal likelihood is the Laplace approximation at that mode with the expected-information
Hessian ``H_i = J' W J + Omega^-1`` (``W = 1/V + (V'/V)^2 / 2``). With an additive error this is
FOCE and coincides with the linearization of nlme (Lindstrom-Bates) at ML; with a
prediction-dependent error it is FOCE with interaction (FOCEI). The outer problem over ``theta``,
covariate coefficients, ``Omega`` (log SDs, Cholesky for a full matrix) and the residual
parameters (log scale) is solved by BFGS started from the linearized model's expected information,
on analytical gradients (envelope and implicit function theorems, one mode search per point);
standard errors come from forward differences of that gradient at the optimum.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
from scipy import optimize

from inference import estimation_kernel
from inference.population import (
    _MIN_VARIANCE,
    CovariateEffect,
    ObservationData,
    PopulationModel,
    ResidualError,
    Structural,
    _unchecked_replace,
    output_index,
    predict,
    residual_variance,
    typical_parameters,
)

__all__ = ["BoundaryWarning", "FitCancelled", "ModeEstimate", "PopulationFit", "find_modes", "fit_population",
           "objective_function"]


class FitCancelled(Exception):
    """Raised by :func:`fit_population` when its ``callback`` asks to stop."""


class BoundaryWarning(UserWarning):
    """A random-effect variance converged to (nearly) zero: its standard error is meaningless."""


# an SD below this fraction of the typical value's magnitude (at least 1) counts as zero: the
# likelihood is then flat in the log SD and the random effect could be dropped
_BOUNDARY_SD = 1e-3

# One step on the log-scale parameters serves first and second differences: truncation error
# ~1e-9 for the former, rounding error ~1e-8 (relative) for the latter.
_FD_STEP = 1e-4
_MAX_STEP = 2.0  # largest trusted Newton step on the log scale (a factor e^2 on the parameter)
_DAMPING0 = 1e-3
# When every subject's undamped Newton step is below this, the mode search takes that last step
# without evaluating the model there: the step's own error (~c step^2) is below the mode tolerance,
# the objective terms move with it to second order and the expected information to first order
# (from the second derivatives already at hand). Measured against searches converged to 1e-13, the
# modes and -2 log L are as accurate as with the extra evaluation (Theoph, Indometh: |d eta| < 1e-9,
# |d -2 log L| < 2e-8), and a search needs ~25 % fewer structural calls (Indometh 70 -> 53 a fit).
_LAST_STEP = 1e-6


@dataclass(frozen=True, eq=False)
class ModeEstimate:
    """Per-subject posterior modes of the random effects and the curvature there.

    Attributes
    ----------
    eta : ndarray, shape (n_subjects, q)
        Modes (empirical Bayes estimates).
    hessian : ndarray, shape (n_subjects, q, q)
        Expected-information Hessian of the negative log posterior at the mode.
    data_term : ndarray, shape (n_subjects,)
        ``-2 log p(y_i | eta_i)`` at the mode.
    prior_term : ndarray, shape (n_subjects,)
        ``(eta_i - m)' P (eta_i - m)`` at the mode.
    converged : ndarray of bool, shape (n_subjects,)
    n_iterations : int
    observed_hessian : ndarray, shape (n_subjects, q, q)
        Hessian of the negative log posterior at the mode including the residual-curvature
        term (the Laplace precision used for individual posteriors).
    log_det_hessian : ndarray, shape (n_subjects,), optional
        ``log det`` of ``hessian`` where the compiled search computed it (nan where ``hessian`` is not
        positive definite); None otherwise (``slogdet`` is then used).
    """

    eta: np.ndarray
    hessian: np.ndarray
    data_term: np.ndarray
    prior_term: np.ndarray
    converged: np.ndarray
    n_iterations: int
    observed_hessian: np.ndarray
    log_det_hessian: np.ndarray | None = None


def _per_subject_sum(subject: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(subject, weights=values, minlength=n)


# Rows of observation data the structural model sees in one stacked call: all finite-difference
# points of a small problem go in one call, a large population is split so memory stays bounded.
_STACK_ROWS = 20_000


_TILED: "weakref.WeakKeyDictionary[ObservationData, dict[int, ObservationData]]" = weakref.WeakKeyDictionary()


class _Stacked:
    """Evaluates the structural model at several ``phi`` (same subjects) in as few calls as possible.

    The perturbed copies become extra subjects of one tiled data set: a call costs the structural
    model's fixed overhead once instead of once per finite-difference point, and each subject's rows
    are computed exactly as in a call of its own.
    """

    def __init__(self, structural: Structural, data: ObservationData):
        self.structural = structural
        self.data = data
        self.per_call = max(1, _STACK_ROWS // data.n_rows)
        # a population fit searches the modes of the same data hundreds of times: tile it once
        self._tiled: dict[int, ObservationData] = _TILED.setdefault(data, {})

    def _data(self, copies: int) -> ObservationData:
        if copies == 1:
            return self.data
        tiled = self._tiled.get(copies)
        if tiled is None:
            d, n = self.data, self.data.n_subjects
            tiled = ObservationData(
                subject=np.tile(d.subject, copies) + np.repeat(np.arange(copies) * n, d.n_rows),
                time=np.tile(d.time, copies),
                value=np.tile(d.value, copies),
                subject_ids=tuple(f"{s}#{c}" for c in range(copies) for s in d.subject_ids),
                covariates={k: np.tile(v, copies) for k, v in d.covariates.items()},
                design={k: np.tile(v, copies) for k, v in d.design.items()},
                context=d.context,
            )
            self._tiled[copies] = tiled
        return tiled

    def grid(self, phi: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Predictions at ``phi + offsets[k]`` for every row ``k`` of ``offsets``, shape (len(offsets), rows):
        the finite-difference points built in one broadcast instead of one copy each."""
        return self.at_points(phi[None, :, :] + offsets[:, None, :])

    def at_points(self, points: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Predictions at every ``points[k]`` (shape (count, subjects, p)), shape (count, rows), into ``out``."""
        rows, count, p = self.data.n_rows, points.shape[0], points.shape[2]
        out = np.empty((count, rows)) if out is None else out
        for start in range(0, count, self.per_call):
            group = points[start : start + self.per_call]
            out[start : start + group.shape[0]] = predict(
                self.structural, group.reshape(-1, p), self._data(group.shape[0])).reshape(-1, rows)
        return out

    def __call__(self, phis: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        rows = self.data.n_rows
        for start in range(0, len(phis), self.per_call):
            group = phis[start : start + self.per_call]
            f = predict(self.structural, np.concatenate(group, axis=0), self._data(len(group)))
            out.extend(f[i * rows : (i + 1) * rows] for i in range(len(group)))
        return out


def _predict_with_derivatives(
    model: PopulationModel,
    structural: Structural,
    data: ObservationData,
    typical: np.ndarray,
    eta: np.ndarray,
    second: bool = False,
    stacked: _Stacked | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Predictions, their derivatives in eta and (optionally) second derivatives, by central differences.

    All subjects and all finite-difference points are evaluated together (stacked as extra
    subjects), so the cost is about one call of the structural model whatever the number of
    subjects and random effects.
    """
    stacked = _Stacked(structural, data) if stacked is None else stacked
    # ``model`` may be a PopulationModel or directly the index array of the random effects
    ridx = model.random_index if isinstance(model, PopulationModel) else np.asarray(model)
    q = ridx.size
    phi = typical.copy()
    phi[:, ridx] += eta
    h = _FD_STEP
    # the centre, +-h in each random effect and, for the cross terms, only the (+a, +b) and
    # (-a, -b) corners
    offsets, pairs = _difference_points(typical.shape[1], tuple(ridx.tolist()), tuple(range(q)) if second else (), h)
    values = stacked.grid(phi, offsets)
    f, jac = _first_differences(values, q, h)
    if not second:
        return f, jac, None
    return f, jac, _second_differences(values, q, h, pairs)


def _first_differences(values: np.ndarray, k: int, h: float) -> tuple[np.ndarray, np.ndarray]:
    """The centre and the central first differences from a stencil laid out as ``_difference_points``
    lays it out: centre, +h in each of ``k`` directions, -h in each; then the (+a, +b), (-a, -b) corners."""
    up, down = values[1 : k + 1], values[k + 1 : 2 * k + 1]
    return values[0], ((up - down) / (2 * h)).T


def _second_differences(values: np.ndarray, k: int, h: float, pairs) -> np.ndarray:
    """Second differences (rows, k, k) from the same stencil; they reuse the first-derivative points, and
    the cross terms exist only for ``pairs`` (the others are left unset)."""
    f, up, down = values[0], values[1 : k + 1], values[k + 1 : 2 * k + 1]
    second = np.empty((f.size, k, k))
    diagonal = (up - 2 * f + down) / h**2
    for a in range(k):
        second[:, a, a] = diagonal[a]
    if pairs:
        a_, b_ = np.array(pairs).T
        corners = values[2 * k + 1 :: 2] + values[2 * k + 2 :: 2]
        cross = (corners - up[a_] - down[a_] - up[b_] - down[b_] + 2 * f) / (2 * h**2)
        for i, (a, b) in enumerate(pairs):
            second[:, a, b] = second[:, b, a] = cross[i]
    return second


@functools.lru_cache(maxsize=256)
def _difference_points(p: int, columns: tuple[int, ...], paired: tuple[int, ...], h: float
                       ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Offsets (points, p) of the central-difference points in ``columns`` of ``phi``: the centre,
    ``+h`` and ``-h`` in each, then the (+a, +b) and (-a, -b) corners of every pair of ``paired``
    (indices into ``columns``), and those pairs."""
    k = len(columns)
    pairs = [(a, b) for i, a in enumerate(paired) for b in paired[i + 1 :]]
    offsets = np.zeros((1 + 2 * k + 2 * len(pairs), p))
    for i, c in enumerate(columns):
        offsets[1 + i, c] = h
        offsets[1 + k + i, c] = -h
    for i, (a, b) in enumerate(pairs):
        offsets[1 + 2 * k + 2 * i, [columns[a], columns[b]]] = h
        offsets[2 + 2 * k + 2 * i, [columns[a], columns[b]]] = -h
    offsets.flags.writeable = False
    return offsets, pairs


def find_modes(
    model: PopulationModel,
    structural: Structural,
    data: ObservationData,
    *,
    prior_mean: Any = None,
    prior_precision: Any = None,
    eta0: Any = None,
    max_iter: int = 200,
    tol: float = 1e-9,
) -> ModeEstimate:
    """Posterior modes of every subject's random effects, found for all subjects at once.

    Minimizes ``-2 log p(y_i | eta) + (eta - m_i)' P_i (eta - m_i)`` per subject by
    Levenberg-Marquardt: damped Newton steps on the exact Hessian (finite-difference curvature
    of the predictions, observed second derivative of the residual term), falling back to the
    expected information where that is not positive definite; the returned Hessians are the
    expected information and the Laplace Hessian. Rows whose value is ``nan`` are ignored.

    Parameters
    ----------
    prior_mean : array, shape (q,) or (n_subjects, q), optional
        Prior mean of eta (default 0, the population prior).
    prior_precision : array, shape (q, q) or (n_subjects, q, q), optional
        Prior precision (default ``inv(model.omega)``).
    eta0 : array, shape (n_subjects, q), optional
        Starting point (default the prior mean).

    Examples
    --------
    >>> from inference.datasets import load_theoph, ssfol
    >>> from inference.population import ResidualError
    >>> model = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
    ...     np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    >>> modes = find_modes(model, ssfol, load_theoph())
    >>> modes.eta.shape, bool(modes.converged.all())
    ((12, 2), True)
    """
    n, q = data.n_subjects, model.n_random_effects
    typical = typical_parameters(model, data)
    m = np.broadcast_to(np.zeros(q) if prior_mean is None else np.asarray(prior_mean, float), (n, q))
    precision = np.linalg.inv(model.omega) if prior_precision is None else np.asarray(prior_precision, float)
    precision = np.broadcast_to(precision, (n, q, q))
    eta = np.array(m if eta0 is None else np.asarray(eta0, float).reshape(n, q), dtype=float)
    return _find_modes(model.random_index, typical, model.error, output_index(data), m, precision, eta,
                       structural, data, max_iter=max_iter, tol=tol)


def _find_modes(ridx, typical, error, output, m, precision, eta, structural, data, *, max_iter, tol,
                stacked=None) -> ModeEstimate:
    """Mode search on plain arrays: per-subject typical parameters, prior mean and precision.

    Every subject's Newton iterations are independent of the others' (the loop only stops when
    all have converged), so several problems stacked as extra subjects, each with its own
    parameters and its own residual error model (picked per row by ``output``), give the same
    modes as separate calls; :func:`_batched_objectives` relies on that.

    Each iteration makes one stacked call of the structural model: the trial point's value and
    its derivatives together, so an accepted step (nearly all of them near the mode) needs no
    second call for the derivatives it moves to.
    """
    n, q = data.n_subjects, ridx.size
    if q and estimation_kernel.kernel_wanted():
        return _find_modes_compiled(ridx, typical, error, output, m, precision, eta, structural, data,
                                    max_iter=max_iter, tol=tol, stacked=stacked)
    mask = data.observed
    y = np.where(mask, data.value, 0.0)
    weight_mask = mask.astype(float)
    subject = data.subject
    stacked = _Stacked(structural, data) if stacked is None else stacked
    prior_sd = np.sqrt(np.einsum("nii->ni", np.linalg.inv(precision)))
    step_limit = _MAX_STEP * np.maximum(prior_sd, 1.0)
    a_rows, b_rows = _error_rows(error, output, data.n_rows)
    proportional = bool(np.any(b_rows))

    def terms(eta_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        phi = typical.copy()
        phi[:, ridx] += eta_
        f = predict(structural, phi, data)
        v = residual_variance(error, f, output)
        data_term = _per_subject_sum(subject, weight_mask * ((y - f) ** 2 / v + np.log(2 * np.pi * v)), n)
        d = eta_ - m
        return data_term, np.einsum("ni,nij,nj->n", d, precision, d)

    def evaluate(eta_: np.ndarray) -> tuple[np.ndarray, ...]:
        """Data and prior terms at eta, the half-gradient, the expected-information Hessian, the
        Laplace Hessian (with the residual-curvature term) and the Hessian Newton steps take."""
        f, jac, curvature = _predict_with_derivatives(ridx, structural, data, typical, eta_, second=True,
                                                      stacked=stacked)
        v = np.maximum(a_rows**2 + (b_rows * f) ** 2, _MIN_VARIANCE)
        r = y - f
        d = eta_ - m
        data_term = _per_subject_sum(subject, weight_mask * (r**2 / v + np.log(2 * np.pi * v)), n)
        prior_term = np.einsum("ni,nij,nj->n", d, precision, d)
        if proportional:
            dv = 2.0 * b_rows**2 * f
            d2v = 2.0 * b_rows**2
            # half the derivative of r^2/V + log V with respect to f
            dl_df = weight_mask * (-r / v + 0.5 * dv / v * (1.0 - r**2 / v))
            w = weight_mask * (1.0 / v + 0.5 * (dv / v) ** 2)
            # the observed minus the expected second derivative in f: with a prediction-dependent
            # error, Newton steps on the expected form alone converge only linearly (a dozen extra
            # iterations to reach tol), on the exact form quadratically
            w_extra = weight_mask * (2 * r * dv / v**2 - 0.5 * r**2 * d2v / v**2 + r**2 * dv**2 / v**3
                                     + 0.5 * d2v / v - dv**2 / v**2)
            # d w / d f, for moving the expected information along a last Newton step
            dw_df = weight_mask * (-dv / v**2 + (dv / v) * (d2v / v - dv**2 / v**2))
        else:
            dl_df = weight_mask * (-r / v)
            w = weight_mask / v
            w_extra = dw_df = None
        jj = jac[:, :, None] * jac[:, None, :]
        # rows: the gradient, J'WJ and the residual-curvature term Gauss-Newton drops (without it
        # the mode search crawls for subjects the model fits poorly), summed per subject at once
        parts = [dl_df[:, None] * jac, w[:, None, None] * jj, dl_df[:, None, None] * curvature]
        if w_extra is not None:
            parts.append(w_extra[:, None, None] * jj)
        sums = _subject_sums(subject, np.concatenate([p_.reshape(data.n_rows, -1) for p_ in parts], axis=1), n)
        grad = sums[:, :q] + np.einsum("nij,nj->ni", precision, d)
        expected = sums[:, q : q + q * q].reshape(n, q, q) + precision
        laplace = expected + sums[:, q + q * q : q + 2 * q * q].reshape(n, q, q)
        step_hess = laplace if w_extra is None else laplace + sums[:, q + 2 * q * q :].reshape(n, q, q)
        return (data_term, prior_term, grad, expected, laplace, step_hess), (jac, curvature, w, dw_df)

    if q == 0:
        data_term, prior_term = terms(eta)
        return ModeEstimate(eta, np.zeros((n, 0, 0)), data_term, prior_term, np.ones(n, bool), 0, np.zeros((n, 0, 0)))

    current, aux = evaluate(eta)
    damping = np.full(n, _DAMPING0)
    converged = np.zeros(n, dtype=bool)
    iteration = 0
    eye = np.eye(q)
    for iteration in range(1, max_iter + 1):
        data_term, prior_term, grad, expected, hess, step_hess = current
        total = data_term + prior_term
        # converged when the undamped Newton step is negligible: the outer objective's finite
        # differences need modes far more accurate than the objective's own tolerance
        try:
            newton = np.linalg.solve(hess, grad[..., None])[..., 0]
        except np.linalg.LinAlgError:
            newton = np.full_like(eta, np.inf)
        positive = np.linalg.eigvalsh(hess)[:, 0] > 0
        size = np.max(np.abs(newton), axis=1)
        converged = (size < tol) & positive
        if not converged.all() and tol <= _LAST_STEP and positive.all() and np.all(size < _LAST_STEP):
            # every subject one step from its mode: take the exact Newton step (on the Hessian steps
            # use) without evaluating the model there (see _LAST_STEP), and move the terms with it
            if step_hess is hess:
                final = -newton
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    final = -np.linalg.solve(step_hess, grad[..., None])[..., 0]
            if np.all(np.abs(final) < _LAST_STEP):
                eta = eta + final
                d = eta - m
                # Q(eta + s) = Q(eta) + 2 g's + s'Ks = Q + g's for the Newton step s = -K^-1 g
                total = total + np.einsum("ni,ni->n", grad, final)
                prior_term = np.einsum("ni,nij,nj->n", d, precision, d)
                # the expected information to first order along the step: J moves by C s (C the
                # predictions' second derivatives) and, with a prediction-dependent error, W by
                # (dW/df) J s; without this log det H would be off by ~10 * step (Theoph)
                jac, curvature, w, dw_df = aux
                s_rows = final[subject]
                moved = np.einsum("rak,rk->ra", curvature, s_rows)
                change = w[:, None, None] * (moved[:, :, None] * jac[:, None, :] + jac[:, :, None] * moved[:, None, :])
                if dw_df is not None:
                    change += (dw_df * np.einsum("rk,rk->r", jac, s_rows))[:, None, None] * (
                        jac[:, :, None] * jac[:, None, :])
                shift = _subject_sums(subject, change.reshape(-1, q * q), n).reshape(n, q, q)
                current = (total - prior_term, prior_term, grad, expected + shift, hess + shift, step_hess)
                converged = positive
        if converged.all():
            break
        diag = np.einsum("nii->ni", expected)
        damped = step_hess + damping[:, None, None] * diag[:, :, None] * eye
        # where the exact Hessian is not positive definite, fall back to expected information
        indefinite = np.linalg.eigvalsh(damped)[:, 0] <= 0
        if np.any(indefinite):
            damped[indefinite] = (expected[indefinite]
                                  + damping[indefinite, None, None] * diag[indefinite, :, None] * eye)
        step = -np.linalg.solve(damped, grad[..., None])[..., 0]
        step[converged] = 0.0
        # a log-scale step of more than 2 (a factor e^2 on the parameter) is never trusted; an
        # effect whose prior SD exceeds 1 (a linear-scale parameter in its own units, e.g. mg/dL)
        # may move 2 prior SDs, or reaching a mode 40 units away would take 20 iterations
        overshoot = np.max(np.abs(step) / step_limit, axis=1)
        step *= np.minimum(1.0, 1.0 / np.maximum(overshoot, 1e-300))[:, None]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            # overshooting trial points may overflow; they are rejected below as non-finite
            candidate, cand_aux = evaluate(eta + step)
        cand_total = candidate[0] + candidate[1]
        # tiny increases are rounding: accepting them lets Newton finish the last digits of eta
        better = np.isfinite(cand_total) & (cand_total <= total + 1e-12 * (1 + np.abs(total))) & ~converged
        eta = np.where(better[:, None], eta + step, eta)
        # converged subjects (step 0) were evaluated where they are: their candidate equals their current
        if np.all(better | converged):  # the usual case: no per-subject selection needed
            current, aux = candidate, cand_aux
        elif better.any():
            current = tuple(np.where(better.reshape((n,) + (1,) * (c.ndim - 1)), c, o)
                            for c, o in zip(candidate, current))
            rows_better = better[subject]
            aux = tuple(None if c is None else np.where(rows_better.reshape((-1,) + (1,) * (c.ndim - 1)), c, o)
                        for c, o in zip(cand_aux, aux))
        damping = np.where(better, np.maximum(damping / 10, 1e-12), damping * 10)
        if np.all(converged | (damping > 1e12)):
            break
    data_term, prior_term, _, hessian, observed, _ = current
    return ModeEstimate(eta, hessian, data_term, prior_term, converged, iteration, observed)


_ROWS: "weakref.WeakKeyDictionary[ObservationData, tuple]" = weakref.WeakKeyDictionary()


def _row_constants(data: ObservationData, output: Any) -> tuple[np.ndarray, ...]:
    """Observed values (0 where missing), the observed mask as floats, the subject of each row and the
    residual error model of each row, as the compiled kernels take them (cached per data set; a fit
    asks for them hundreds of times)."""
    cached = _ROWS.get(data)
    if cached is None:
        observed = data.observed
        cached = (np.where(observed, data.value, 0.0), observed.astype(float), np.array(data.subject, dtype=np.int64),
                  np.zeros(data.n_rows, dtype=np.int64))
        _ROWS[data] = cached
    y, mask, subject, zeros = cached
    return y, mask, subject, (zeros if output is None else np.asarray(output).astype(np.int64))


@functools.lru_cache(maxsize=64)
def _pair_arrays(q: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of ``_difference_points(..., paired=range(q))`` as two index arrays."""
    pairs = [(a, b) for a in range(q) for b in range(a + 1, q)]
    return (np.array([a for a, _ in pairs], dtype=np.int64), np.array([b for _, b in pairs], dtype=np.int64))


@functools.lru_cache(maxsize=256)
def _phi_pair_index(p: int, random: tuple[int, ...]) -> np.ndarray:
    """(p, p) table: the index of pair (a, b) (either order) in ``_phi_difference_points``, -1 where none."""
    _, pairs = _phi_difference_points(p, random, _FD_STEP)
    table = np.full((p, p), -1, dtype=np.int64)
    for k, (a, b) in enumerate(pairs):
        table[a, b] = table[b, a] = k
    return table


def _error_arrays(error: Any, rows_of: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Additive SD and proportional coefficient per residual error model, and whether any row's is
    prediction-dependent (as ``np.any(b_rows)`` in the numpy path)."""
    errors = error if isinstance(error, tuple) else (error,)
    a_out = np.array([e.additive for e in errors], dtype=float)
    b_out = np.array([e.proportional for e in errors], dtype=float)
    return a_out, b_out, bool(np.any(b_out[rows_of])) if len(errors) > 1 else bool(b_out[0])


def _find_modes_compiled(ridx, typical, error, output, m, precision, eta, structural, data, *, max_iter, tol,
                         stacked=None) -> ModeEstimate:
    """``_find_modes`` with each Newton iteration's per-subject algebra in one compiled call
    (``inference.estimation_kernel.mode_search_step``); the structural model is called exactly as in
    the numpy path, once per iteration on the stacked finite-difference grid."""
    n, q = data.n_subjects, ridx.size
    y, mask, subject, rows_of = _row_constants(data, output)
    a_out, b_out, proportional = _error_arrays(error, rows_of)
    stacked = _Stacked(structural, data) if stacked is None else stacked
    offsets, _ = _difference_points(typical.shape[1], tuple(ridx.tolist()), tuple(range(q)), _FD_STEP)
    pair_a, pair_b = _pair_arrays(q)
    workspace = estimation_kernel.ModeWorkspace(n, q, data.n_rows, offsets.shape[0], typical.shape[1])
    workspace.damping[:] = _DAMPING0
    eta = np.array(eta, dtype=float, order="C")
    m = np.ascontiguousarray(m, dtype=float)
    precision = np.ascontiguousarray(precision, dtype=float)
    typical = np.ascontiguousarray(typical, dtype=float)
    values = np.empty((offsets.shape[0], data.n_rows))
    args = (typical, ridx.astype(np.int64), offsets, pair_a, pair_b, y, mask, subject, rows_of, a_out, b_out,
            proportional, _MIN_VARIANCE, m, precision, _FD_STEP, tol, _LAST_STEP, _MAX_STEP, max_iter)
    status = estimation_kernel.mode_search_step(values, workspace, eta, *args)  # step limits, the start's grid
    if status == estimation_kernel.CONTINUE:
        stacked.at_points(workspace.points, values)  # the start, evaluated as the numpy path does (no errstate)
        status = estimation_kernel.mode_search_step(values, workspace, eta, *args)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # overshooting trial points may overflow; the kernel rejects them as non-finite
        while status == estimation_kernel.CONTINUE:
            stacked.at_points(workspace.points, values)
            status = estimation_kernel.mode_search_step(values, workspace, eta, *args)
    if status == estimation_kernel.SINGULAR:
        raise np.linalg.LinAlgError("Singular matrix")
    data_term, prior_term, _, expected, laplace = workspace.current[:5]
    return ModeEstimate(eta, expected, data_term, prior_term, workspace.converged, int(workspace.state[1]), laplace,
                        log_det_hessian=estimation_kernel.log_det(expected))


def _log_det_hessian(modes: ModeEstimate) -> tuple[np.ndarray, np.ndarray]:
    """Sign and ``log det`` of every subject's Hessian: the compiled search's Cholesky values where it
    has them, ``slogdet`` otherwise."""
    known = modes.log_det_hessian
    if known is not None and not np.isnan(known).any():
        return np.ones(known.shape), known
    return np.linalg.slogdet(modes.hessian)


def objective_function(model: PopulationModel, modes: ModeEstimate) -> float:
    """FOCE(I) ``-2 log L`` of the population model from the subjects' modes (Laplace approximation).

    ``sum_i [ -2 log p(y_i | eta_i) + eta_i' Omega^-1 eta_i + log det Omega + log det H_i ]``.

    Examples
    --------
    >>> from inference.datasets import load_theoph, ssfol
    >>> from inference.population import ResidualError
    >>> model = PopulationModel(("lKe", "lKa", "lCl"), [-2.4655, 0.4821, -3.2304], ("lKa", "lCl"),
    ...     np.diag([0.6564, 0.1675]) ** 2, ResidualError("additive", additive=0.7078))
    >>> round(objective_function(model, find_modes(model, ssfol, load_theoph())), 2)
    353.98
    """
    q = model.n_random_effects
    if q == 0:
        return float(modes.data_term.sum())
    _, logdet_omega = np.linalg.slogdet(model.omega)
    sign, logdet_h = _log_det_hessian(modes)
    if np.any(sign <= 0):
        return np.inf
    return float(np.sum(modes.data_term + modes.prior_term + logdet_omega + logdet_h))


def _tile_subjects(data: ObservationData, copies: int) -> ObservationData:
    """``data`` repeated as ``copies`` blocks of extra subjects (cached per data set, like _Stacked)."""
    if copies == 1:
        return data
    return _Stacked(None, data)._data(copies)


def _batched_objectives(models: list[PopulationModel], structural: Structural, data: ObservationData,
                        eta0: np.ndarray, *, max_iter: int = 200, tol: float = 1e-9
                        ) -> tuple[np.ndarray, ModeEstimate]:
    """``-2 log L`` of several parameter sets of one model structure, from one stacked mode search.

    Each parameter set becomes a block of copies of the subjects with its own typical parameters,
    prior precision and residual error models; since every subject's mode search is independent,
    the values equal those of separate :func:`find_modes` + :func:`objective_function` calls,
    at the cost of about one call (the search is dominated by per-call overhead for small data).
    """
    k, n = len(models), data.n_subjects
    first = models[0]
    ridx, q = first.random_index, first.n_random_effects
    tiled = _tile_subjects(data, k)
    base = output_index(data)
    n_outputs = len(first.errors)
    base = np.zeros(data.n_rows) if base is None else np.asarray(base, float)
    # the batch's own error index per row: block b uses errors b * n_outputs + its output
    output = np.repeat(np.arange(k) * n_outputs, data.n_rows) + np.tile(base, k)
    errors = tuple(e for mdl in models for e in mdl.errors)
    typical = np.concatenate([typical_parameters(mdl, data) for mdl in models])
    omega_inv = [np.linalg.inv(mdl.omega) for mdl in models]
    precision = np.concatenate([np.broadcast_to(w, (n, q, q)) for w in omega_inv])
    eta0 = np.asarray(eta0, float)
    # one start for every block, or each block's own (k * n rows)
    eta = eta0.reshape(k * n, q).copy() if eta0.size == k * n * q else np.tile(eta0.reshape(n, q), (k, 1))
    modes = _find_modes(ridx, typical, errors, output, np.zeros((k * n, q)), precision, eta, structural,
                        tiled, max_iter=max_iter, tol=tol)
    sign, logdet_h = _log_det_hessian(modes)
    per_subject = modes.data_term + modes.prior_term + logdet_h
    values = np.empty(k)
    for b, mdl in enumerate(models):
        block = slice(b * n, (b + 1) * n)
        _, logdet_omega = np.linalg.slogdet(mdl.omega)
        ok = np.all(sign[block] > 0) and np.all(np.isfinite(per_subject[block]))
        values[b] = float(np.sum(per_subject[block]) + n * logdet_omega) if ok else np.inf
    return values, modes


class _Parameterization:
    """Maps the unconstrained optimizer vector to a PopulationModel and names its entries."""

    def __init__(self, model: PopulationModel):
        self.template = model
        self.estimated_effects = [i for i, e in enumerate(model.covariate_effects) if e.estimate]
        q = model.n_random_effects
        names = list(model.parameters)
        names += [model.covariate_effects[i].name for i in self.estimated_effects]
        if model.omega_structure == "full":
            self.tril = np.tril_indices(q)
            names += [
                f"omega_log_chol({model.random_effects[i]})" if i == j else f"omega_chol({model.random_effects[i]},{model.random_effects[j]})"
                for i, j in zip(*self.tril)
            ]
        else:
            names += [f"omega_log_sd({n})" for n in model.random_effects]
        multi = len(model.errors) > 1
        for k, error in enumerate(model.errors):
            suffix = f"[{k}]" if multi else ""
            if error.kind in ("additive", "combined"):
                names.append("log_sigma_additive" + suffix)
            if error.kind in ("proportional", "combined"):
                names.append("log_sigma_proportional" + suffix)
        self.names = tuple(names)

    def pack(self, model: PopulationModel) -> np.ndarray:
        x = list(model.theta)
        x += [model.covariate_effects[i].coefficient for i in self.estimated_effects]
        if model.omega_structure == "full":
            chol = np.linalg.cholesky(model.omega)
            x += [np.log(chol[i, j]) if i == j else chol[i, j] for i, j in zip(*self.tril)]
        else:
            x += list(np.log(model.omega_sd))
        for error in model.errors:
            if error.kind in ("additive", "combined"):
                x.append(np.log(error.additive))
            if error.kind in ("proportional", "combined"):
                x.append(np.log(error.proportional))
        return np.array(x, dtype=float)

    def unpack(self, x: np.ndarray, checked: bool = True) -> PopulationModel:
        """The model at ``x``; ``checked=False`` skips re-validation (valid by construction) for the
        optimizer's many trial points."""
        model = self.template
        p = model.n_parameters
        theta = x[:p]
        k = p
        effects = list(model.covariate_effects)
        for i in self.estimated_effects:
            effects[i] = effects[i].replace(coefficient=float(x[k]))
            k += 1
        q = model.n_random_effects
        if model.omega_structure == "full":
            chol = np.zeros((q, q))
            for (i, j) in zip(*self.tril):
                chol[i, j] = np.exp(x[k]) if i == j else x[k]
                k += 1
            omega = chol @ chol.T
        else:
            omega = np.diag(np.exp(2 * x[k : k + q]))
            k += q
        errors = []
        for error in model.errors:
            if error.kind in ("additive", "combined"):
                error = error.replace(additive=float(np.exp(x[k])))
                k += 1
            if error.kind in ("proportional", "combined"):
                error = error.replace(proportional=float(np.exp(x[k])))
                k += 1
            errors.append(error)
        error = errors[0] if isinstance(model.error, ResidualError) else tuple(errors)
        if not checked:
            return _unchecked_replace(model, theta=theta, covariate_effects=tuple(effects), omega=omega, error=error)
        return model.replace(theta=theta, covariate_effects=tuple(effects), omega=omega, error=error)

    def omega_slopes(self, model: PopulationModel) -> np.ndarray:
        """``d Omega / d x_k`` for each Omega entry of the optimizer vector, in its order (shape (k, q, q))."""
        q = model.n_random_effects
        if model.omega_structure != "full":
            out = np.zeros((q, q, q))
            diagonal = np.arange(q)
            out[diagonal, diagonal, diagonal] = 2.0 * np.diagonal(model.omega)
            return out
        chol = np.linalg.cholesky(model.omega)
        out = np.empty((len(self.tril[0]), q, q))
        for k, (i, j) in enumerate(zip(*self.tril)):
            d_chol = np.zeros((q, q))
            d_chol[i, j] = chol[i, j] if i == j else 1.0  # diagonal entries are stored as logs
            out[k] = d_chol @ chol.T + chol @ d_chol.T
        return out

    def natural_standard_errors(self, x: np.ndarray, cov: np.ndarray) -> dict[str, float]:
        """SEs on the reported scale: fixed effects as is, SDs by the delta method from log SDs."""
        se = np.sqrt(np.clip(np.diag(cov), 0, None))
        out = {}
        for name, value, s in zip(self.names, x, se):
            if name.startswith("omega_log_sd("):
                out["omega_sd(" + name[len("omega_log_sd(") :]] = float(np.exp(value) * s)
            elif name.startswith("log_sigma_"):
                out[name[len("log_"):]] = float(np.exp(value) * s)
            else:
                out[name] = float(s)
        return out


def _phi_derivatives(structural: Structural, data: ObservationData, phi: np.ndarray, ridx: np.ndarray,
                     stacked: _Stacked) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions, their first derivatives in every column of ``phi`` and the second derivatives that
    involve a random-effect column, by central differences in one stacked call of the structural model.

    Returns ``f`` (rows,), ``F`` (rows, p) and ``S`` (rows, q, p) with ``S[:, a, j]`` the derivative
    in ``phi[:, ridx[a]]`` and ``phi[:, j]``.
    """
    p, h = phi.shape[1], _FD_STEP
    offsets, pairs = _phi_difference_points(p, tuple(ridx.tolist()), h)
    values = stacked.grid(phi, offsets)
    f, first = _first_differences(values, p, h)
    return f, first, _second_differences(values, p, h, pairs)[:, ridx, :]


@functools.lru_cache(maxsize=256)
def _phi_difference_points(p: int, random: tuple[int, ...], h: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """_difference_points in every column of ``phi``, the cross terms only for pairs with a random effect."""
    pairs = [(a, b) for a in range(p) for b in range(a + 1, p) if a in random or b in random]
    offsets = np.zeros((1 + 2 * p + 2 * len(pairs), p))
    for c in range(p):
        offsets[1 + c, c] = h
        offsets[1 + p + c, c] = -h
    for i, (a, b) in enumerate(pairs):
        offsets[1 + 2 * p + 2 * i, [a, b]] = h
        offsets[2 + 2 * p + 2 * i, [a, b]] = -h
    offsets.flags.writeable = False
    return offsets, pairs


def _objective_gradient(param: "_Parameterization", x: np.ndarray, model: PopulationModel, modes: ModeEstimate,
                        structural: Structural, data: ObservationData, stacked: _Stacked
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of the FOCE(I) ``-2 log L`` in the optimizer's parameters, analytically from one set of modes.

    With ``Q_i = -2 log p(y_i | eta) + eta' Omega^-1 eta`` and ``H_i`` the expected-information
    Hessian, each subject contributes ``Q_i + log det Omega + log det H_i`` at its mode ``eta_i``.
    ``Q_i`` is stationary in eta at the mode (envelope theorem), so only ``log det H_i`` sees the
    mode move, by ``d eta_i = -K_i^-1 d(grad Q_i / 2)`` (implicit function theorem; ``K_i`` is half
    the exact Hessian of ``Q_i``). Every term needs the predictions' first and second derivatives
    in ``phi`` only, taken by central differences in one stacked call of the structural model, so
    a gradient costs about one mode search instead of the ``2 len(x)`` of central differences of
    the objective.

    Returns the gradient and the modes' sensitivity ``d eta_i / d x`` (shape ``(n, q, len(x))``),
    from which the next point's mode search starts (a first-order prediction of its modes).
    """
    n, q = data.n_subjects, model.n_random_effects
    ridx = model.random_index
    output = output_index(data)
    eta = modes.eta
    phi = typical_parameters(model, data)
    phi[:, ridx] += eta
    if estimation_kernel.kernel_wanted():
        return _objective_gradient_compiled(param, x, model, modes, structural, data, stacked, phi, output)
    subject = data.subject
    observed = data.observed
    mask = observed.astype(float)
    y = np.where(observed, data.value, 0.0)
    f, F, S = _phi_derivatives(structural, data, phi, ridx, stacked)
    J = F[:, ridx]
    a_rows, b_rows = _error_rows(model.error, output, f.size)
    v = np.maximum(a_rows**2 + (b_rows * f) ** 2, _MIN_VARIANCE)
    r = y - f
    interaction = bool(np.any(b_rows))
    if interaction:
        dv = 2.0 * b_rows**2 * f
        d2v = 2.0 * b_rows**2
        dl = mask * (-r / v + 0.5 * dv / v * (1.0 - r**2 / v))  # half d/df of r^2/V + log V
        w = 1.0 / v + 0.5 * (dv / v) ** 2  # expected information per row
        w_obs = (1.0 / v + 2 * r * dv / v**2 - 0.5 * r**2 * d2v / v**2 + r**2 * dv**2 / v**3
                 + 0.5 * d2v / v - 0.5 * dv**2 / v**2)
        dw = -dv / v**2 + (dv / v) * (d2v / v - dv**2 / v**2)
    else:  # additive errors: the interaction terms vanish
        dv = np.zeros_like(f)
        dl = mask * (-r / v)
        w = w_obs = 1.0 / v
        dw = None
    precision = np.linalg.inv(model.omega)
    M = np.linalg.inv(modes.hessian)
    MJ = np.einsum("rab,rb->ra", M[subject], J)
    jmj = np.einsum("ra,ra->r", J, MJ)
    # per row: tr(M dH/dphi_j) for every column j of phi (H's prior part does not depend on phi)
    trace_dh = 2 * (mask * w)[:, None] * np.einsum("ra,raj->rj", MJ, S)
    if dw is not None:
        trace_dh += (mask * dw * jmj)[:, None] * F
    # d(grad Q / 2)/dphi per row; its random-effect columns are the data part of K, half the exact
    # Hessian of Q in eta (residual curvature included) that the mode search's Newton steps use
    cross_rows = (mask * w_obs)[:, None, None] * J[:, :, None] * F[:, None, :] + dl[:, None, None] * S
    # residual parameters (log scale), each acting on the rows of its output: direct terms
    # d Q/ds + tr(M dH/ds) and d(grad Q / 2)/ds per row
    live = mask * (v > _MIN_VARIANCE)  # where the variance floor holds, V does not move with its parameters
    rows_of = np.zeros(f.size, dtype=np.int64) if output is None else np.asarray(output).astype(np.int64)
    residual_direct, residual_cross = [], []
    for o, error in enumerate(model.errors):
        on = live * (rows_of == o)
        slots = []
        if error.kind in ("additive", "combined"):
            slots.append((2 * error.additive**2, 0.0))
        if error.kind in ("proportional", "combined"):
            slots.append((2 * error.proportional**2 * f**2, 2 * dv))
        for d_v, d_dv in slots:
            dq = (1.0 / v - r**2 / v**2) * d_v
            d_w = -d_v / v**2 + (dv / v) * (d_dv / v - dv * d_v / v**2)
            d_dl = (r * d_v / v**2 + 0.5 * (d_dv / v - dv * d_v / v**2) * (1.0 - r**2 / v)
                    + 0.5 * (dv / v) * r**2 * d_v / v**2)
            residual_direct.append(on * (dq + d_w * jmj))
            residual_cross.append((on * d_dl)[:, None] * J)
    p, m_res = model.n_parameters, len(residual_direct)
    # every per-subject sum in one bincount: direct phi terms, d log det H / d eta, the cross
    # derivatives, the residual parameters' direct and cross terms
    blocks = [2 * dl[:, None] * F + trace_dh, trace_dh[:, ridx], cross_rows.reshape(f.size, q * p)]
    if m_res:
        blocks += [np.stack(residual_direct, axis=1), np.stack(residual_cross, axis=2).reshape(f.size, q * m_res)]
    sums = _subject_sums(subject, np.concatenate(blocks, axis=1), n)
    direct_phi, u = sums[:, :p], sums[:, p : p + q]
    cross_phi = sums[:, p + q : p + q + q * p].reshape(n, q, p)
    K = cross_phi[:, :, ridx] + precision
    # the mode moves with x by -K^-1 d(grad Q / 2)/dx; log det H sees that move through u
    vvec = np.linalg.solve(K, u[..., None])[..., 0]
    direct = np.zeros(x.size)
    cross = np.zeros((n, q, x.size))
    direct[:p] = direct_phi.sum(axis=0)
    cross[:, :, :p] = cross_phi
    k = p
    for i in param.estimated_effects:
        effect = model.covariate_effects[i]
        slope = _shift_slope(effect, data.covariates[effect.covariate])
        column = model.parameters.index(effect.parameter)
        direct[k] = float(direct_phi[:, column] @ slope)
        cross[:, :, k] = cross_phi[:, :, column] * slope[:, None]
        k += 1
    # Omega enters through its inverse (prior term, H, the mode) and log det Omega
    G = eta.T @ eta + M.sum(axis=0)
    for d_omega in param.omega_slopes(model):
        d_precision = -precision @ d_omega @ precision
        direct[k] = float(np.sum(G * d_precision) + n * np.trace(precision @ d_omega))
        cross[:, :, k] = eta @ d_precision
        k += 1
    if m_res:
        start = p + q + q * p
        direct[k:] = sums[:, start : start + m_res].sum(axis=0)
        cross[:, :, k:] = sums[:, start + m_res :].reshape(n, q, m_res)
    grad = direct - np.einsum("na,nak->k", vvec, cross)
    return grad, -np.linalg.solve(K, cross)


def _objective_gradient_compiled(param: "_Parameterization", x: np.ndarray, model: PopulationModel,
                                 modes: ModeEstimate, structural: Structural, data: ObservationData, stacked: _Stacked,
                                 phi: np.ndarray, output: Any) -> tuple[np.ndarray, np.ndarray]:
    """``_objective_gradient`` with everything after the structural call in one compiled call
    (``inference.estimation_kernel.objective_gradient_terms``), from the same stacked grid."""
    ridx = model.random_index
    random = tuple(ridx.tolist())
    offsets, _ = _phi_difference_points(phi.shape[1], random, _FD_STEP)
    values = stacked.grid(phi, offsets)
    y, mask, subject, rows_of = _row_constants(data, output)
    a_out, b_out, interaction = _error_arrays(model.error, rows_of)
    slots = [(o, kind, value) for o, error in enumerate(model.errors)
             for kind, value in ((0.0, error.additive), (1.0, error.proportional))
             if error.kind in (("additive", "combined") if kind == 0.0 else ("proportional", "combined"))]
    effects = [model.covariate_effects[i] for i in param.estimated_effects]
    columns = np.array([model.parameters.index(e.parameter) for e in effects], dtype=np.int64)
    slopes = (np.array([_shift_slope(e, data.covariates[e.covariate]) for e in effects], dtype=float) if effects
              else np.zeros((0, data.n_subjects)))
    out = estimation_kernel.objective_gradient_terms(
        values, _FD_STEP, _phi_pair_index(phi.shape[1], random), ridx, y, mask, subject, rows_of, a_out, b_out,
        interaction, _MIN_VARIANCE, np.array(slots, dtype=float).reshape(-1, 3), np.ascontiguousarray(modes.eta),
        np.ascontiguousarray(modes.hessian), np.array(model.omega, dtype=float), param.omega_slopes(model), columns, slopes, x.size)
    if out is None:
        raise np.linalg.LinAlgError("Singular matrix")
    return out


def _linearized_information(param: "_Parameterization", model: PopulationModel, modes: ModeEstimate,
                            structural: Structural, data: ObservationData, stacked: _Stacked) -> np.ndarray:
    """Expected information of the model linearized at the modes (FOCE's marginal Gaussian), as a
    Hessian of ``-2 log L`` in the optimizer's parameters: BFGS's starting curvature.

    Each subject's observations are taken as ``N(m_i, J_i Omega J_i' + diag(V_i))``; the information
    is ``2 dm' Vt^-1 dm`` for the fixed effects and covariate coefficients and
    ``tr(Vt^-1 dVt Vt^-1 dVt)`` for Omega's and the residual parameters (Gaussian: no cross terms).
    Starting from it instead of a scaled identity, BFGS needs about half the iterations; it is only
    a start, so the approximation (no interaction term, linearization) does not bias the estimates.
    """
    n = data.n_subjects
    ridx = model.random_index
    phi = typical_parameters(model, data)
    phi[:, ridx] += modes.eta
    p = phi.shape[1]
    h = _FD_STEP
    points = [phi.copy() for _ in range(2 * p)]
    for k in range(p):
        points[k][:, k] += h
        points[p + k][:, k] -= h
    values = stacked(points)
    F = np.stack([(values[k] - values[p + k]) / (2 * h) for k in range(p)], axis=1)
    f = stacked([phi])[0]
    observed = data.observed
    output = output_index(data)
    a_rows, b_rows = _error_rows(model.error, output, data.n_rows)
    v = np.maximum(a_rows**2 + (b_rows * f) ** 2, _MIN_VARIANCE)
    # rows padded to a rectangle per subject; padding rows (and unobserved ones) get V = 1 and no
    # derivatives, so they add nothing
    order = np.argsort(data.subject, kind="stable")
    counts = np.bincount(data.subject, minlength=n)
    width = int(counts.max())
    slot = np.arange(data.n_rows) - np.repeat(np.cumsum(counts) - counts, counts)
    who = data.subject[order]
    pad = lambda rows_, fill: _padded(rows_[order], who, slot, n, width, fill)  # noqa: E731
    Fp = pad(np.where(observed[:, None], F, 0.0), 0.0)
    Vp = pad(np.where(observed, v, 1.0), 1.0)
    Jp = Fp[:, :, ridx]
    Vt = Jp @ model.omega @ Jp.transpose(0, 2, 1) + Vp[:, :, None] * np.eye(width)
    Vt_inv = np.linalg.inv(Vt)
    # mean parameters: fixed effects and estimated covariate coefficients
    mean_cols = [Fp]
    for i in param.estimated_effects:
        effect = model.covariate_effects[i]
        slope = _shift_slope(effect, data.covariates[effect.covariate])
        mean_cols.append(Fp[:, :, [model.parameters.index(effect.parameter)]] * slope[:, None, None])
    dm = np.concatenate(mean_cols, axis=2)
    mean_info = 2.0 * np.einsum("nrk,nrs,nsl->kl", dm, Vt_inv, dm)
    # covariance parameters: Omega's entries, then each output's residual parameters
    d_vt = [Jp @ d_omega @ Jp.transpose(0, 2, 1) for d_omega in param.omega_slopes(model)]
    rows_of = np.zeros(data.n_rows, dtype=np.int64) if output is None else np.asarray(output).astype(np.int64)
    for o, error in enumerate(model.errors):
        on = observed & (rows_of == o) & (v > _MIN_VARIANCE)
        if error.kind in ("additive", "combined"):
            d_vt.append(pad(np.where(on, 2 * error.additive**2, 0.0), 0.0)[:, :, None] * np.eye(width))
        if error.kind in ("proportional", "combined"):
            d_vt.append(pad(np.where(on, 2 * (error.proportional * f) ** 2, 0.0), 0.0)[:, :, None] * np.eye(width))
    products = [Vt_inv @ d for d in d_vt]
    cov_info = np.array([[np.einsum("nij,nji->", a, b) for b in products] for a in products])
    k_mean = dm.shape[2]
    info = np.zeros((k_mean + len(products),) * 2)
    info[:k_mean, :k_mean] = mean_info
    info[k_mean:, k_mean:] = cov_info
    return info


def _padded(rows: np.ndarray, who: np.ndarray, slot: np.ndarray, n: int, width: int, fill: float) -> np.ndarray:
    out = np.full((n, width) + rows.shape[1:], fill, dtype=float)
    out[who, slot] = rows
    return out


def _subject_sums(subject: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Per-subject sums of row values of any trailing shape, in one ``bincount``."""
    width = int(np.prod(rows.shape[1:]))
    index = (subject[:, None] * width + np.arange(width)).ravel()
    sums = np.bincount(index, weights=rows.reshape(-1), minlength=n * width)
    return sums.reshape((n,) + rows.shape[1:])


def _error_rows(error: Any, output: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row additive SD and proportional coefficient (see ``residual_variance``)."""
    errors = error if isinstance(error, tuple) else (error,)
    a = np.array([e.additive for e in errors])
    b = np.array([e.proportional for e in errors])
    index = np.zeros(n, dtype=np.int64) if output is None else np.asarray(output).astype(np.int64)
    return a[index], b[index]


def _shift_slope(effect: CovariateEffect, values: np.ndarray) -> np.ndarray:
    """Derivative of a covariate effect's log-scale shift in its coefficient."""
    x = np.asarray(values, dtype=float)
    if effect.form == "power":
        return np.log(x / effect.reference)
    if effect.form == "exponential":
        return x - effect.reference
    return (x - effect.reference) / (1.0 + effect.coefficient * (x - effect.reference))


@dataclass(frozen=True, eq=False)
class PopulationFit:
    """Result of a population fit.

    Attributes
    ----------
    model : PopulationModel
        The model at the estimates.
    objective : float
        ``-2 log L`` at the estimates (FOCE(I)/Laplace approximation, constants included).
    estimates : mapping of str to float
        Optimizer-scale estimates (fixed effects, covariate coefficients, log SDs / Cholesky
        entries of Omega, log residual parameters).
    covariance : ndarray or None
        Covariance of the optimizer-scale estimates (inverse of half the Hessian of ``-2 log L``).
    standard_errors : mapping of str to float
        SEs of the fixed effects and covariate coefficients, of the random-effect SDs
        (``omega_sd(name)``) and residual parameters (``sigma_additive``...) by the delta method.
    eta : ndarray, shape (n_subjects, q)
        Empirical Bayes estimates of the random effects.
    eta_covariance : ndarray, shape (n_subjects, q, q)
        Laplace covariance of each subject's random effects.
    individual_parameters : ndarray, shape (n_subjects, p)
        ``phi`` at the empirical Bayes estimates.
    subject_ids : tuple of str
    n_observations : int
    converged : bool
    message : str
    n_iterations : int
    n_evaluations : int
        Number of times all subjects' modes were searched.
    boundary : tuple of str
        Random effects whose variance converged to ~0 (a :class:`BoundaryWarning` is issued):
        their SD's standard error is meaningless and the effect could be removed.
    """

    model: PopulationModel
    objective: float
    estimates: Mapping[str, float]
    covariance: np.ndarray | None
    standard_errors: Mapping[str, float]
    eta: np.ndarray
    eta_covariance: np.ndarray
    individual_parameters: np.ndarray
    subject_ids: tuple[str, ...]
    n_observations: int
    converged: bool
    message: str
    n_iterations: int
    n_evaluations: int
    method: str = "FOCEI"
    boundary: tuple[str, ...] = ()

    @property
    def log_likelihood(self) -> float:
        """Approximate marginal log-likelihood."""
        return -0.5 * self.objective

    @property
    def n_estimated(self) -> int:
        """Number of estimated population parameters."""
        return len(self.estimates)

    @property
    def aic(self) -> float:
        """Akaike information criterion."""
        return self.objective + 2 * self.n_estimated

    @property
    def bic(self) -> float:
        """Bayesian information criterion (number of observations as sample size, as nlme)."""
        return self.objective + np.log(self.n_observations) * self.n_estimated

    @property
    def degrees_of_freedom(self) -> int:
        """Degrees of freedom of the t intervals: subjects minus random effects (at least 1).

        The default of SAS PROC NLMIXED (``DF=``). A population's typical value is estimated from
        ``n`` subjects whose individual values scatter with an estimated SD, as a mean with an
        estimated variance is, so its Wald statistic follows a t rather than a normal distribution
        in small studies; with 16 subjects the normal quantile covers the truth ~92 %, not 95 %
        (docs/models.md, "How honest are the intervals").
        """
        return max(1, len(self.subject_ids) - self.model.n_random_effects)

    def confidence_interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        """Wald interval ``estimate +- t(df) * SE`` of an optimizer-scale estimate (a fixed effect on its
        own scale, a covariate coefficient), with :attr:`degrees_of_freedom`.

        Examples
        --------
        >>> from inference.datasets import load_theoph, ssfol
        >>> from inference.population import ResidualError
        >>> start = PopulationModel(("lKe", "lKa", "lCl"), [-2.5, 0.5, -3.0], ("lKa", "lCl"),
        ...     np.diag([0.5, 0.5]) ** 2, ResidualError("additive", additive=1.0))
        >>> fit = fit_population(start, ssfol, load_theoph())
        >>> fit.degrees_of_freedom, [round(v, 2) for v in fit.confidence_interval("lCl")]
        (10, [-3.36, -3.1])
        """
        from scipy import stats

        if name not in self.standard_errors or name not in self.estimates:
            raise KeyError(f"no standard error for {name!r}")
        half = float(stats.t.ppf(0.5 + level / 2, self.degrees_of_freedom)) * self.standard_errors[name]
        return self.estimates[name] - half, self.estimates[name] + half

    def replace(self, **changes: Any) -> "PopulationFit":
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def fit_population(
    model: PopulationModel,
    structural: Structural,
    data: ObservationData,
    *,
    max_iter: int = 500,
    gtol: float = 1e-4,
    standard_errors: bool = True,
    callback: Callable[[int, float], bool | None] | None = None,
) -> PopulationFit:
    """Estimate a population model by maximum likelihood (FOCE with interaction).

    Parameters
    ----------
    model : PopulationModel
        Initial values and structure (which parameters have random effects, diagonal or full
        Omega, residual error kind, covariate effects; those with ``estimate=False`` stay fixed).
    structural : callable
        ``structural(phi, data) -> predictions`` (see ``inference.population``).
    data : ObservationData
        Observations; rows with ``nan`` values are ignored.
    max_iter : int
        BFGS iteration limit.
    gtol : float
        Convergence threshold on the largest gradient component of ``-2 log L`` (BFGS); a
        fit whose line search stops at the objective's rounding counts as converged when the
        largest component is below ``100 * gtol``.
    standard_errors : bool
        Whether to compute the covariance of the estimates (forward differences of the
        analytical gradient).
    callback : callable, optional
        ``callback(iteration, objective)`` after every BFGS iteration and before the standard
        errors; returning False stops the fit with :class:`FitCancelled` (job cancel, progress).

    Returns
    -------
    PopulationFit

    Examples
    --------
    >>> from inference.datasets import load_theoph, ssfol
    >>> from inference.population import ResidualError
    >>> start = PopulationModel(("lKe", "lKa", "lCl"), [-2.5, 0.5, -3.0], ("lKa", "lCl"),
    ...     np.diag([0.5, 0.5]) ** 2, ResidualError("additive", additive=1.0))
    >>> fit = fit_population(start, ssfol, load_theoph(), standard_errors=False)
    >>> np.round(fit.model.theta, 2).tolist(), round(fit.model.error.additive, 2)
    ([-2.47, 0.48, -3.23], 0.71)
    """
    if not np.any(data.observed):
        raise ValueError("the data carry no observed values")
    if model.n_random_effects == 0:
        raise ValueError("a population fit needs at least one random effect")
    # evaluated once outside the optimizer's error handling so that a broken structural model
    # or missing covariate is reported as such rather than as a failed fit
    find_modes(model, structural, data, max_iter=1)
    param = _Parameterization(model)
    x0 = param.pack(model)
    n_obs = int(data.observed.sum())
    state = {"eta": np.zeros((data.n_subjects, model.n_random_effects)), "evaluations": 0}

    def evaluate(x: np.ndarray, eta0: np.ndarray) -> tuple[float, ModeEstimate | None]:
        state["evaluations"] += 1
        try:
            candidate = param.unpack(x, checked=False)
            modes = find_modes(candidate, structural, data, eta0=eta0)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            return np.inf, None
        value = objective_function(candidate, modes)
        return (value if np.isfinite(value) else np.inf), modes

    def evaluate_many(xs: list[np.ndarray], eta0: np.ndarray) -> np.ndarray:
        """Objectives of several points from one stacked mode search (see _batched_objectives)."""
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                values, _ = _batched_objectives([param.unpack(x, checked=False) for x in xs], structural, data, eta0)
            state["evaluations"] += len(xs)
            return values
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            # one bad point (e.g. a singular Hessian) must not cost the others: one by one
            return np.array([evaluate(x, eta0)[0] for x in xs])

    def _central_gradients(xs: list[np.ndarray], step: float) -> list[np.ndarray]:
        base_eta = state["eta"]
        eye = np.eye(xs[0].size) * step
        points = [x + s * e for x in xs for e in eye for s in (1.0, -1.0)]
        values = evaluate_many(points, base_eta).reshape(len(xs), xs[0].size, 2)
        up, down = values[..., 0], values[..., 1]
        ok = np.isfinite(up) & np.isfinite(down)
        return list(np.where(ok, (up - down) / (2 * step), 0.0))

    stacked = _Stacked(structural, data)

    def value_and_gradient(x: np.ndarray) -> tuple[float, np.ndarray, ModeEstimate | None]:
        """``-2 log L`` and its analytical gradient from one mode search (see _objective_gradient),
        started from the modes predicted by the last point's sensitivity; central differences of
        the objective where the analytical form is not finite."""
        x_last, eta_last, sensitivity = state["anchor"]
        # a first-order prediction of the new modes saves one or two Newton iterations; it is
        # capped at 1 (log scale) per effect so that a far trial point cannot throw the start away
        eta0 = eta_last if sensitivity is None else eta_last + np.clip(sensitivity @ (x - x_last), -1.0, 1.0)
        state["evaluations"] += 1
        try:
            candidate = param.unpack(x, checked=False)
            modes = find_modes(candidate, structural, data, eta0=eta0)
            value = objective_function(candidate, modes)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            return np.inf, np.zeros(x.size), None
        if not np.isfinite(value):
            return np.inf, np.zeros(x.size), None
        try:
            gradient, sensitivity = _objective_gradient(param, x, candidate, modes, structural, data, stacked)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            gradient, sensitivity = np.full(x.size, np.nan), None
        if sensitivity is None or not (np.all(np.isfinite(gradient)) and np.all(np.isfinite(sensitivity))):
            state["eta"] = modes.eta
            gradient, sensitivity = _central_gradients([x], 1e-3)[0], None
        state["anchor"] = (x.copy(), modes.eta, sensitivity)
        state["eta"] = modes.eta
        state["modes"] = modes
        return value, gradient, modes

    state["anchor"] = (x0.copy(), state["eta"], None)

    def _gradients_at(points: np.ndarray, anchor: tuple) -> list[np.ndarray] | None:
        """Analytical gradients at several points from one stacked mode search (the standard
        errors' Hessian): each point a block of subject copies started from its predicted modes."""
        x_last, eta_last, sensitivity = anchor
        n = data.n_subjects
        try:
            models = [param.unpack(point, checked=False) for point in points]
            starts = [eta_last if sensitivity is None else eta_last + np.clip(sensitivity @ (point - x_last), -1.0, 1.0)
                      for point in points]
            values, together = _batched_objectives(models, structural, data, np.concatenate(starts))
            state["evaluations"] += len(points)
            grads = []
            for b, (point, mdl) in enumerate(zip(points, models)):
                block = slice(b * n, (b + 1) * n)
                modes = ModeEstimate(eta=together.eta[block], hessian=together.hessian[block],
                                     data_term=together.data_term[block], prior_term=together.prior_term[block],
                                     converged=together.converged[block], n_iterations=together.n_iterations,
                                     observed_hessian=together.observed_hessian[block])
                grads.append(_objective_gradient(param, point, mdl, modes, structural, data, stacked)[0])
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            return None
        if not (np.all(np.isfinite(values)) and np.all(np.isfinite(grads))):
            return None
        return grads
    iterations = [0]

    def on_iteration(xk: np.ndarray) -> None:
        iterations[0] += 1
        if callback is not None and callback(iterations[0], float(state.get("last", np.nan))) is False:
            raise FitCancelled(f"stopped after {iterations[0]} iterations")

    def fun_tracked(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, gradient, _ = value_and_gradient(x)
        state["last"] = value
        return (value if np.isfinite(value) else 1e300), gradient

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        first = fun_tracked(x0)
        inverse0 = None
        if state["anchor"][2] is not None:
            # the linearized model's information at the start: BFGS then takes Fisher-scoring-like
            # first steps and needs about half the iterations of a scaled-identity start
            try:
                info = _linearized_information(param, param.unpack(x0, checked=False), state["modes"], structural,
                                               data, stacked)
                inverse0 = np.linalg.inv(info)
                if not (np.all(np.isfinite(inverse0)) and np.linalg.eigvalsh(0.5 * (inverse0 + inverse0.T))[0] > 0):
                    inverse0 = None
            except (ValueError, np.linalg.LinAlgError, FloatingPointError):
                inverse0 = None
        # a diagonal Omega's SD below 3 % of its scale that BFGS still pushes down is tried at a tenth of
        # the boundary threshold (the likelihood is flat there; it is then reported as at the boundary)
        sds = [i for i, name in enumerate(param.names) if name.startswith("omega_log_sd(")]
        scale = np.maximum(np.abs(model.theta[model.random_index]), 1.0)
        boundary = ((np.array(sds, dtype=np.int64), np.log(0.03 * scale), np.log(0.1 * _BOUNDARY_SD * scale))
                    if sds else None)
        result = _bfgs(fun_tracked, x0, gtol=gtol, max_iter=max_iter, callback=on_iteration, start=first,
                       inverse0=inverse0, boundary=boundary)
        if callback is not None and callback(iterations[0], float(result.fun)) is False:
            raise FitCancelled(f"stopped after {iterations[0]} iterations")
        x = result.x
        fitted = param.unpack(x)
        objective, final_grad, modes = value_and_gradient(x)
        if modes is None:  # cannot happen at a point BFGS accepted, but fail loudly rather than oddly
            raise ValueError("the objective is not finite at the estimates")
        anchor = state["anchor"]
        covariance = None
        ses: dict[str, float] = {}
        if standard_errors:
            # forward differences of the analytical gradient: len(x) mode searches, each started from
            # the optimum's modes moved by their sensitivity (off by ~h^2, so one or two Newton
            # iterations). The gradient is exact up to ~1e-7 relative, so a step of 1e-4 leaves a
            # truncation error of ~1e-4 relative in the Hessian and noise far below it; central
            # differences would double the cost for accuracy no standard error needs.
            h = 1e-4
            grads = _gradients_at(x + h * np.eye(x.size), anchor)
            if grads is None:  # a point the stacked search could not take: one by one
                grads = []
                for e in np.eye(x.size):
                    state["anchor"] = anchor
                    grads.append(value_and_gradient(x + h * e)[1])
            state["anchor"] = anchor
            hess = np.array([(grads[i] - final_grad) / h for i in range(x.size)])
            hess = 0.5 * (hess + hess.T)
            try:
                covariance = 2.0 * np.linalg.inv(hess)
                ses = param.natural_standard_errors(x, covariance)
            except np.linalg.LinAlgError:
                covariance = None
    # BFGS may stop where no decrease is left above the objective's rounding; a gradient below
    # 100 * gtol there moves the estimates by far less than their standard errors
    converged = bool(result.success or np.max(np.abs(final_grad)) < 100 * gtol) and bool(modes.converged.all())
    eta_cov = np.linalg.inv(modes.hessian)
    scale = np.maximum(np.abs(fitted.theta[fitted.random_index]), 1.0)
    boundary = tuple(name for name, sd, s in zip(fitted.random_effects, fitted.omega_sd, scale)
                     if sd < _BOUNDARY_SD * s)
    if boundary:
        warnings.warn(f"variance of {', '.join(boundary)} converged to ~0 (SD "
                      f"{', '.join(f'{sd:.2g}' for sd in fitted.omega_sd[np.isin(fitted.random_effects, boundary)])}):"
                      " the standard errors of these SDs are meaningless; consider removing the random "
                      "effect(s)", BoundaryWarning, stacklevel=2)
    return PopulationFit(
        model=fitted,
        objective=float(objective),
        estimates=MappingProxyType(dict(zip(param.names, map(float, x)))),
        covariance=covariance,
        standard_errors=MappingProxyType(ses),
        eta=modes.eta,
        eta_covariance=eta_cov,
        individual_parameters=typical_parameters(fitted, data) + _embed(fitted, modes.eta),
        subject_ids=data.subject_ids,
        n_observations=n_obs,
        converged=converged,
        message=str(result.message),
        n_iterations=int(result.nit),
        n_evaluations=int(state["evaluations"]),
        boundary=boundary,
    )


def _bfgs(fun_grad: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, *, gtol: float,
          max_iter: int, callback: Callable[[np.ndarray], None] | None = None,
          start: tuple[float, np.ndarray] | None = None, inverse0: np.ndarray | None = None,
          boundary: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> optimize.OptimizeResult:
    """Minimize by BFGS (Nocedal & Wright, Algorithm 6.1) with a backtracking Armijo line search.

    Each evaluation is a mode search of every subject, so evaluations are what a fit costs. SciPy's
    BFGS (a Wolfe line search) spent ~20 of them at the end of a Theoph fit zooming on steps whose
    decrease (~1e-11) lay below the objective's rounding; here nearly every iteration takes its unit
    step in one evaluation, and the search stops when the decrease the quadratic model predicts is
    below rounding. Converged when the largest gradient component is below ``gtol``.

    ``start`` is ``fun_grad(x0)`` when the caller has it; ``inverse0`` an initial inverse Hessian
    (default: a steepest-descent first step, then the scaled identity of Nocedal & Wright (6.20)).

    ``boundary = (index, trigger, floor)``: coordinates (log SDs) whose optimum may lie at -inf. When
    one is below its trigger and still pushed down (positive gradient), the point with that
    coordinate at its floor is tried once; if it is lower, the coordinate stays there (its row and
    column of the inverse Hessian are cleared, so BFGS no longer moves it). Without this, a
    variance heading to zero walks its log SD down ~0.3 per iteration: on Indometh half the fit.
    """
    x = np.array(x0, dtype=float)
    f, g = fun_grad(x) if start is None else start
    n_evaluations, inverse = 1, inverse0
    frozen = np.zeros(x.size, dtype=bool)
    probed = np.zeros(x.size, dtype=bool)
    success, message, iteration = False, "maximum number of iterations reached", 0
    for iteration in range(1, max_iter + 1):
        if np.max(np.abs(np.where(frozen, 0.0, g))) < gtol:
            success, message, iteration = True, "gradient below gtol", iteration - 1
            break
        if inverse is None:
            # steepest descent, at most 1 in any coordinate, until a step measures the curvature
            direction = -g / max(1.0, float(np.max(np.abs(g))))
        else:
            direction = -inverse @ g
        slope = float(g @ direction)
        if slope >= 0:  # lost positive definiteness to rounding: restart from steepest descent
            inverse = None
            direction = -g / max(1.0, float(np.max(np.abs(g))))
            slope = float(g @ direction)
        rounding = 1e-11 * (1.0 + abs(f))
        if -slope < rounding:
            message, iteration = "predicted decrease below the objective's rounding", iteration - 1
            break
        alpha, accepted = 1.0, False
        while alpha * -slope >= rounding:
            x_new = x + alpha * direction
            f_new, g_new = fun_grad(x_new)
            n_evaluations += 1
            if np.isfinite(f_new) and f_new <= f + 1e-4 * alpha * slope:
                accepted = True
                break
            # minimum of the quadratic through f, the slope and f_new, kept within [alpha/10, alpha/2]
            curvature = f_new - f - slope * alpha if np.isfinite(f_new) else np.inf
            trial = -slope * alpha**2 / (2.0 * curvature) if curvature > 0 else 0.0
            alpha = min(max(trial, 0.1 * alpha), 0.5 * alpha)
        if not accepted:
            message, iteration = "no decrease above the objective's rounding along the search direction", iteration - 1
            break
        step, change = x_new - x, g_new - g
        sy = float(step @ change)
        if sy > 1e-10 * np.linalg.norm(step) * np.linalg.norm(change):
            if inverse is None:
                inverse = sy / float(change @ change) * np.eye(x.size)  # Nocedal & Wright (6.20)
            rho = 1.0 / sy
            v = np.eye(x.size) - rho * np.outer(step, change)
            inverse = v @ inverse @ v.T + rho * np.outer(step, step)
        x, f, g = x_new, f_new, g_new
        if boundary is not None and inverse is not None:
            index, trigger, floor = boundary
            for k, low, bottom in zip(index, trigger, floor):
                if probed[k] or x[k] >= low or g[k] <= 0:
                    continue
                probed[k] = True
                x_try = x.copy()
                x_try[k] = bottom
                f_try, g_try = fun_grad(x_try)
                n_evaluations += 1
                if np.isfinite(f_try) and f_try < f:
                    x, f, g = x_try, f_try, g_try
                    frozen[k] = True
                    inverse[k, :] = inverse[:, k] = 0.0
        if callback is not None:
            callback(x)
    return optimize.OptimizeResult(x=x, fun=f, jac=g, success=success, message=message, nit=iteration,
                                   nfev=n_evaluations)


def _embed(model: PopulationModel, eta: np.ndarray) -> np.ndarray:
    out = np.zeros((eta.shape[0], model.n_parameters))
    out[:, model.random_index] = eta
    return out
