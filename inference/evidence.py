"""Trial evidence: treatment effects with prognostic covariate adjustment and external controls.

Pure numerics (numpy + statsmodels): PROCOVA (Schuler et al. 2021), propensity-score weighting and
matching for external controls with balance diagnostics, and hybrid designs that borrow external
controls by a fixed power prior or a test-then-pool rule (Viele et al. 2014).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import statsmodels.api as sm

__all__ = [
    "Effect", "PrognosticModel", "Balance", "PropensityResult", "BorrowingResult",
    "estimate_effects", "fit_prognostic_model", "propensity_weights", "match_on_propensity",
    "balance_table", "effective_sample_size", "weighted_effect", "borrow_external_controls",
    "equivalent_sample_size", "validate_scores",
]

#: Robust (heteroskedasticity-consistent) covariance used for every regression standard error.
DEFAULT_COV_TYPE = "HC3"


@dataclass(frozen=True)
class Effect:
    """One estimate of the treatment effect (treated minus control) and its uncertainty.

    ``coefficients`` and ``standard_errors`` hold every regression term (``const``, ``treated``
    and the covariates by name), so a reader can check them against statsmodels directly.
    """

    method: str
    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    coefficients: dict = field(default_factory=dict)
    standard_errors: dict = field(default_factory=dict)


def _design(treated: np.ndarray, covariates: dict[str, np.ndarray] | None) -> tuple[np.ndarray, list[str]]:
    names = ["const", "treated"]
    cols = [np.ones(treated.shape[0]), treated.astype(float)]
    for name, values in (covariates or {}).items():
        names.append(name)
        cols.append(np.asarray(values, dtype=float))
    return np.column_stack(cols), names


def _fit(method: str, y: np.ndarray, treated: np.ndarray, covariates: dict | None,
         weights: np.ndarray | None, cov_type: str, alpha: float) -> Effect:
    x, names = _design(treated, covariates)
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise ValueError(f"{method}: the design matrix is singular (a covariate is constant or collinear "
                         f"with the arm); columns {names}")
    model = sm.OLS(y, x) if weights is None else sm.WLS(y, x, weights=weights)
    res = model.fit(cov_type=cov_type)
    ci = res.conf_int(alpha=alpha)
    return Effect(method=method, estimate=float(res.params[1]), se=float(res.bse[1]),
                  ci_low=float(ci[1, 0]), ci_high=float(ci[1, 1]), p_value=float(res.pvalues[1]),
                  n=int(y.shape[0]),
                  coefficients={k: float(v) for k, v in zip(names, res.params)},
                  standard_errors={k: float(v) for k, v in zip(names, res.bse)})


def estimate_effects(y, treated, covariates: dict | None = None, score=None, *,
                     score_covariates: dict | None = None, cov_type: str = DEFAULT_COV_TYPE,
                     alpha: float = 0.05) -> dict[str, Effect]:
    """Unadjusted, ANCOVA and PROCOVA estimates of a randomized treatment effect.

    Parameters
    ----------
    y : array_like, shape (n,)
        Outcome at the primary time point.
    treated : array_like of bool, shape (n,)
        True for the treatment arm, False for control.
    covariates : dict of str to array_like, optional
        Baseline covariates for the ANCOVA (name → values).
    score : array_like, shape (n,), optional
        The prognostic score (predicted control outcome from baseline data). With it, PROCOVA is
        the ANCOVA on the arm and the score (Schuler et al. 2021), plus ``score_covariates``.
    score_covariates : dict of str to array_like, optional
        Covariates kept beside the score in PROCOVA. By default none: a score built from the same
        covariates would make the design collinear.
    cov_type : str
        statsmodels robust covariance (``HC0`` … ``HC3``).
    alpha : float
        1 − confidence level of the intervals.

    Returns
    -------
    dict
        ``unadjusted`` always; ``ancova`` when covariates are given; ``procova`` when a score is.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=400); t = np.arange(400) % 2 == 0
    >>> y = 1.0 + 0.5 * t + 2.0 * x + rng.normal(size=400)
    >>> r = estimate_effects(y, t, {"x": x}, score=2.0 * x)
    >>> sorted(r), round(r["procova"].estimate, 1)
    (['ancova', 'procova', 'unadjusted'], 0.5)
    >>> r["procova"].se < r["unadjusted"].se
    True
    """
    y = np.asarray(y, dtype=float)
    treated = np.asarray(treated, dtype=bool)
    if y.ndim != 1 or treated.shape != y.shape:
        raise ValueError("y and treated must be 1-D arrays of the same length")
    if not np.all(np.isfinite(y)):
        raise ValueError("the outcome has missing or non-finite values")
    n_t, n_c = int(treated.sum()), int((~treated).sum())
    if n_t < 2 or n_c < 2:
        raise ValueError(f"each arm needs at least 2 participants with the outcome (treated {n_t}, control {n_c})")
    out = {"unadjusted": _fit("unadjusted", y, treated, None, None, cov_type, alpha)}
    if covariates:
        out["ancova"] = _fit("ancova", y, treated, covariates, None, cov_type, alpha)
    if score is not None:
        with_score = dict(score_covariates or {})
        with_score["prognosticScore"] = np.asarray(score, dtype=float)
        out["procova"] = _fit("procova", y, treated, with_score, None, cov_type, alpha)
    return out


def equivalent_sample_size(n: int, se_adjusted: float, se_unadjusted: float) -> float:
    """The sample size an unadjusted analysis needs for the adjusted analysis's precision.

    Variance scales as 1/n, so ``n · se_unadjusted² / se_adjusted²``.

    >>> equivalent_sample_size(100, 0.5, 1.0)
    400.0
    """
    return float(n * (se_unadjusted / se_adjusted) ** 2)


# ----------------------------------------------------------------------------- prognostic model

@dataclass(frozen=True)
class PrognosticModel:
    """A linear model of the control outcome on baseline covariates, with its held-out validation.

    ``ranges`` holds each covariate's (min, max) in the training data: scoring outside it is
    extrapolation and is reported.
    """

    names: tuple[str, ...]
    coefficients: np.ndarray  # intercept first
    ranges: dict
    n_train: int
    n_test: int
    r2_test: float
    rmse_test: float
    calibration_slope: float
    calibration_intercept: float

    def predict(self, covariates: dict[str, np.ndarray]) -> np.ndarray:
        """The predicted control outcome for each row of ``covariates``."""
        missing = [n for n in self.names if n not in covariates]
        if missing:
            raise ValueError(f"the prognostic model needs covariates {missing}")
        x = np.column_stack([np.ones(len(covariates[self.names[0]]))]
                            + [np.asarray(covariates[n], dtype=float) for n in self.names])
        return x @ self.coefficients

    def out_of_range(self, covariates: dict[str, np.ndarray]) -> dict[str, int]:
        """How many rows lie outside the training range, per covariate (only those with any)."""
        counts = {}
        for name in self.names:
            lo, hi = self.ranges[name]
            v = np.asarray(covariates[name], dtype=float)
            k = int(np.sum((v < lo) | (v > hi)))
            if k:
                counts[name] = k
        return counts


def fit_prognostic_model(y, covariates: dict[str, np.ndarray], *, test_fraction: float = 0.3,
                         seed: int = 0) -> PrognosticModel:
    """Fit the prognostic model on historical control data and validate it on a held-out part.

    The held-out part (``test_fraction``, chosen at random with ``seed``) gives R², RMSE and the
    calibration line (observed regressed on predicted: slope 1 and intercept 0 when calibrated);
    the returned coefficients are then refitted on all rows.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> x = rng.normal(size=300); y = 3 + 2 * x + rng.normal(scale=0.5, size=300)
    >>> m = fit_prognostic_model(y, {"x": x})
    >>> abs(float(m.coefficients[1]) - 2.0) < 0.1, m.r2_test > 0.9
    (True, True)
    """
    y = np.asarray(y, dtype=float)
    names = tuple(covariates)
    if not names:
        raise ValueError("the prognostic model needs at least one baseline covariate")
    x = np.column_stack([np.ones(y.shape[0])] + [np.asarray(covariates[n], dtype=float) for n in names])
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("historical data have missing or non-finite values")
    n = y.shape[0]
    n_test = int(round(test_fraction * n))
    if n - n_test < x.shape[1] + 5 or n_test < 5:
        raise ValueError(f"too few historical controls ({n}) to fit and validate a model with {len(names)} covariates")
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    beta_train = sm.OLS(y[train], x[train]).fit().params
    r2, rmse, slope, intercept = validate_scores(y[test], x[test] @ beta_train)
    beta = sm.OLS(y, x).fit().params
    ranges = {name: (float(x[:, j + 1].min()), float(x[:, j + 1].max())) for j, name in enumerate(names)}
    return PrognosticModel(names=names, coefficients=np.asarray(beta), ranges=ranges, n_train=int(train.size),
                           n_test=int(n_test), r2_test=r2, rmse_test=rmse,
                           calibration_slope=slope, calibration_intercept=intercept)


def validate_scores(y, predicted) -> tuple[float, float, float, float]:
    """R², RMSE and the calibration line (observed regressed on predicted: slope, intercept) of predictions.

    Use it on outcomes the predictions never saw (a held-out split, or a trial's control arm for
    scores made from baseline data only).

    >>> r2, rmse, slope, intercept = validate_scores([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    >>> r2, rmse, round(slope, 6), round(intercept, 6)
    (1.0, 0.0, 1.0, 0.0)
    """
    y = np.asarray(y, dtype=float)
    pred = np.asarray(predicted, dtype=float)
    resid = y - pred
    r2 = 1.0 - float(resid @ resid) / float(np.sum((y - y.mean()) ** 2))
    cal = sm.OLS(y, sm.add_constant(pred, has_constant="add")).fit().params
    return r2, float(np.sqrt(np.mean(resid ** 2))), float(cal[1]), float(cal[0])


# ----------------------------------------------------------------------------- external controls

@dataclass(frozen=True)
class Balance:
    """Standardized mean difference and variance ratio of one covariate, before and after weighting."""

    name: str
    smd_before: float
    smd_after: float
    variance_ratio_before: float
    variance_ratio_after: float


@dataclass(frozen=True)
class PropensityResult:
    """ATT weights for the controls (treated weigh 1), with what trimming removed.

    ``keep`` marks the rows that stay after trimming; ``weights`` is 0 for the others.
    """

    score: np.ndarray
    weights: np.ndarray
    keep: np.ndarray
    coefficients: dict


def _weighted_mean_var(v: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    m = float(np.average(v, weights=w))
    return m, float(np.average((v - m) ** 2, weights=w))


def balance_table(covariates: dict[str, np.ndarray], treated, weights=None) -> list[Balance]:
    """Balance of each covariate between treated and controls (ATT: weights apply to controls).

    The SMD divides the difference in (weighted) means by the pooled unweighted SD,
    ``sqrt((s²_treated + s²_control) / 2)`` (Austin 2009), the same denominator before and after.

    >>> t = np.array([1, 1, 0, 0, 0], bool)
    >>> b = balance_table({"x": np.array([1., 2., 0., 1., 2.])}, t)[0]
    >>> round(b.smd_before, 3)
    0.5
    """
    treated = np.asarray(treated, dtype=bool)
    w = np.ones(treated.shape[0]) if weights is None else np.asarray(weights, dtype=float)
    rows = []
    for name, values in covariates.items():
        v = np.asarray(values, dtype=float)
        vt, vc = v[treated], v[~treated]
        wt, wc = w[treated], w[~treated]
        pooled = np.sqrt((vt.var(ddof=1) + vc.var(ddof=1)) / 2.0)
        pooled = pooled if pooled > 0 else 1.0
        mt0, st0 = vt.mean(), vt.var(ddof=1)
        mc0, sc0 = vc.mean(), vc.var(ddof=1)
        keep_t, keep_c = wt > 0, wc > 0
        mt1, st1 = _weighted_mean_var(vt[keep_t], wt[keep_t])
        mc1, sc1 = _weighted_mean_var(vc[keep_c], wc[keep_c])
        rows.append(Balance(name=name, smd_before=float((mt0 - mc0) / pooled),
                            smd_after=float((mt1 - mc1) / pooled),
                            variance_ratio_before=float(st0 / sc0) if sc0 > 0 else float("inf"),
                            variance_ratio_after=float(st1 / sc1) if sc1 > 0 else float("inf")))
    return rows


def effective_sample_size(weights) -> float:
    """Kish's effective sample size ``(Σw)² / Σw²``.

    >>> effective_sample_size([1, 1, 1, 1])
    4.0
    """
    w = np.asarray(weights, dtype=float)
    return float(w.sum() ** 2 / np.sum(w ** 2)) if np.any(w) else 0.0


def propensity_weights(covariates: dict[str, np.ndarray], treated, *, trim: float = 0.05) -> PropensityResult:
    """Propensity score by logistic regression and ATT weights ``e/(1−e)`` for the controls.

    Rows whose score lies outside ``[trim, 1 − trim]`` are trimmed (weight 0) — on both sides, so
    the estimand is the ATT on the region of overlap (Crump et al. 2009 use 0.1; 0.05 is milder).

    Raises
    ------
    ValueError
        When the logistic fit fails (perfect separation: no overlap at all) or trimming leaves
        fewer than two rows in a group.
    """
    treated = np.asarray(treated, dtype=bool)
    names = list(covariates)
    x = sm.add_constant(np.column_stack([np.asarray(covariates[n], dtype=float) for n in names]), has_constant="add")
    try:
        res = sm.Logit(treated.astype(float), x).fit(disp=0, method="newton", maxiter=100, warn_convergence=False)
    except Exception as exc:  # statsmodels raises PerfectSeparationError / LinAlgError variants
        raise ValueError(f"the propensity model could not be fitted ({type(exc).__name__}): the groups do not "
                         "overlap on these covariates") from None
    e = np.clip(res.predict(x), 1e-12, 1 - 1e-12)
    if not np.all(np.isfinite(res.params)):
        raise ValueError("the propensity model did not converge: the groups do not overlap")
    keep = (e >= trim) & (e <= 1.0 - trim)
    if keep[treated].sum() < 2 or keep[~treated].sum() < 2:
        raise ValueError(f"no overlap after trimming propensity scores outside [{trim}, {1 - trim}]: "
                         f"{int(keep[treated].sum())} treated and {int(keep[~treated].sum())} controls remain")
    w = np.where(treated, 1.0, e / (1.0 - e)) * keep
    return PropensityResult(score=e, weights=w, keep=keep,
                            coefficients={k: float(v) for k, v in zip(["const", *names], res.params)})


def match_on_propensity(score, treated, *, caliper_sd: float = 0.2) -> np.ndarray:
    """1:1 nearest-neighbour matching with replacement on the logit of the score, within a caliper.

    The caliper is ``caliper_sd`` standard deviations of the logit score (Austin 2011). Returns
    weights: 1 for matched treated, the number of times used for each control, 0 for the rest.
    """
    score = np.asarray(score, dtype=float)
    treated = np.asarray(treated, dtype=bool)
    logit = np.log(score / (1 - score))
    cal = caliper_sd * logit.std(ddof=1)
    ti, ci = np.flatnonzero(treated), np.flatnonzero(~treated)
    order = np.argsort(logit[ci])
    sorted_c = logit[ci][order]
    pos = np.clip(np.searchsorted(sorted_c, logit[ti]), 1, len(sorted_c) - 1)
    left, right = sorted_c[pos - 1], sorted_c[pos]
    pick = np.where(np.abs(logit[ti] - left) <= np.abs(logit[ti] - right), pos - 1, pos)
    dist = np.abs(logit[ti] - sorted_c[pick])
    ok = dist <= cal
    w = np.zeros(score.shape[0])
    w[ti[ok]] = 1.0
    np.add.at(w, ci[order[pick[ok]]], 1.0)
    return w


def weighted_effect(y, treated, weights, *, cov_type: str = DEFAULT_COV_TYPE, alpha: float = 0.05,
                    method: str = "weighted") -> Effect:
    """The weighted difference in means (WLS on the arm) with a robust sandwich standard error.

    The SE treats the weights as known (it ignores the propensity model's estimation error, which
    for ATT weights is usually conservative — stated, not corrected).
    """
    y = np.asarray(y, dtype=float)
    treated = np.asarray(treated, dtype=bool)
    w = np.asarray(weights, dtype=float)
    keep = w > 0
    return _fit(method, y[keep], treated[keep], None, w[keep], cov_type, alpha)


@dataclass(frozen=True)
class BorrowingResult:
    """A hybrid control arm: how much of the external controls was borrowed, and the effect."""

    rule: str
    borrowed_fraction: float
    effect: Effect
    test_p_value: float | None = None


def borrow_external_controls(y_trial, treated_trial, y_external, external_weights, *, rule: str = "test-then-pool",
                             fraction: float = 0.5, alpha_pool: float = 0.10,
                             cov_type: str = DEFAULT_COV_TYPE, alpha: float = 0.05) -> BorrowingResult:
    """The effect with a hybrid control arm: trial controls plus a share of (weighted) external ones.

    Rules
    -----
    ``fixed``
        A power prior with a fixed discount ``a0 = fraction`` (Ibrahim & Chen 2000): in a normal
        model this is the weighted regression with external controls weighted by ``a0`` (times their
        propensity weights).
    ``test-then-pool``
        Viele et al. (2014): test whether the trial and (weighted) external control means differ
        (two-sided, level ``alpha_pool``); pool fully (``a0 = 1``) if not, borrow nothing otherwise.
    """
    y_trial = np.asarray(y_trial, dtype=float)
    treated_trial = np.asarray(treated_trial, dtype=bool)
    y_ext = np.asarray(y_external, dtype=float)
    w_ext = np.asarray(external_weights, dtype=float)
    p_value = None
    if rule == "fixed":
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"the borrowed fraction must lie in [0, 1]; got {fraction}")
        a0 = fraction
    elif rule == "test-then-pool":
        keep = w_ext > 0
        yc = y_trial[~treated_trial]
        y = np.concatenate([yc, y_ext[keep]])
        g = np.concatenate([np.zeros(yc.size, bool), np.ones(int(keep.sum()), bool)])
        w = np.concatenate([np.ones(yc.size), w_ext[keep]])
        p_value = _fit("pool-test", y, g, None, w, cov_type, alpha).p_value
        a0 = 1.0 if p_value >= alpha_pool else 0.0
    else:
        raise ValueError(f"unknown borrowing rule {rule!r} (fixed or test-then-pool)")
    y = np.concatenate([y_trial, y_ext])
    t = np.concatenate([treated_trial, np.zeros(y_ext.size, bool)])
    w = np.concatenate([np.ones(y_trial.size), a0 * w_ext])
    effect = weighted_effect(y, t, w, cov_type=cov_type, alpha=alpha, method=f"hybrid-{rule}")
    return BorrowingResult(rule=rule, borrowed_fraction=float(a0), effect=effect, test_p_value=p_value)
