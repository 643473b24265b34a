"""Responder stratification: digital phenotypes from twin features, validated and explained.

Pure numerics (numpy + scikit-learn). Participants are described by features taken from their
twins (posterior means of parameters such as log Emax and log EC50, and optionally the simulated
response under a stated scenario); :func:`stratify` chooses the number of strata by the Bayesian
information criterion of Gaussian mixtures over k = 1..``max_strata`` (k = 1 competes, so data
with no structure gives one stratum), measures how stable the partition is under bootstrap
resampling (adjusted Rand index against the full-data partition; an unstable k > 1 partition is
reported as one stratum) and explains each stratum by a
shallow decision tree on baseline covariates (a readable rule and its accuracy).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_STABILITY", "Stratification", "StratumRule", "stratify", "select_strata", "bootstrap_stability",
           "stratum_rules", "steady_state_response", "planted_population", "single_threaded_blas"]

#: mean bootstrap ARI below which a partition into k > 1 strata is not reported (see :func:`stratify`)
MIN_STABILITY = 0.5


@dataclass(frozen=True)
class StratumRule:
    """Readable rule of one stratum: ``text`` (``"egfr <= 60.5 and age > 55"``), and how well it
    picks the stratum's members: ``precision`` (members among those the rule selects) and
    ``recall`` (members the rule selects)."""

    stratum: int
    text: str
    precision: float
    recall: float


@dataclass(frozen=True, eq=False)
class Stratification:
    """Result of :func:`stratify`.

    ``labels[i]`` is participant i's stratum (0..k-1; strata are numbered by the mean of the first
    feature, so the numbering does not depend on the mixture's internal order); ``bic[k]`` the BIC
    of each candidate k (None when a candidate had a stratum below ``min_fraction``);
    ``stability`` the mean bootstrap ARI (1.0 for k = 1); ``means`` per stratum and feature (the
    features' own units); ``rules`` one per stratum; ``rule_accuracy`` the tree's accuracy on all
    participants and ``rule_cv_accuracy`` its 5-fold cross-validated accuracy (None without
    covariates or with k = 1).
    """

    k: int
    labels: np.ndarray
    bic: dict
    stability: float
    stability_draws: np.ndarray
    means: np.ndarray
    sizes: tuple
    rules: tuple
    rule_accuracy: float | None
    rule_cv_accuracy: float | None
    feature_names: tuple
    #: the k BIC preferred when its partition was too unstable to report (see ``min_stability``), else None
    unstable_k: int | None = None
    unstable_stability: float | None = None


_BLAS_LOCK = threading.RLock()  # held by the one thread inside single_threaded_blas (re-entrant)
_BLAS_DEPTH = threading.local()


@contextmanager
def single_threaded_blas():
    """Run BLAS/OpenMP with one thread inside (process-wide; one thread at a time; re-entrant).

    A mixture fit here factors d x d matrices (d = 1..3 features) thousands of times; a multi-threaded
    BLAS pays its thread hand-off on each of them: on a busy 2-core machine the default demo's
    ``stratify`` took 11 s with the default threads and under 1 s with one (bench/stratify_op_bench.py).
    BLAS thread counts are process-wide, and OpenBLAS (0.3.30) ignores a change from one thread while
    another thread that changed it lives on: a limit set by one request's thread and restored by
    another's (callers overlapping in a threaded server) left the process at one BLAS thread for good.
    So callers take turns, and each sets and restores its own limit in its own thread: the process
    always gets its thread count back. (A later caller on another thread may then run with the default
    threads, slower, not different.) Results are the same either way (at these sizes BLAS splits no
    work between threads).
    """
    from threadpoolctl import threadpool_limits

    # the limit reaches the thread pools loaded when it is set: load scikit-learn's OpenMP runtime first
    import sklearn.cluster  # noqa: F401
    import sklearn.mixture  # noqa: F401

    with _BLAS_LOCK:
        depth = getattr(_BLAS_DEPTH, "n", 0)
        limiter = threadpool_limits(limits=1) if depth == 0 else None
        _BLAS_DEPTH.n = depth + 1
        try:
            yield
        finally:
            _BLAS_DEPTH.n = depth
            if limiter is not None:
                limiter.restore_original_limits()


def _standardize(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _fit(z: np.ndarray, k: int, seed: int, n_init: int):
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=k, covariance_type="full", n_init=n_init, random_state=seed,
                           reg_covar=1e-6, max_iter=500).fit(z)


def _ordered(labels: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Relabel so that stratum 0 has the smallest mean of the first feature."""
    order = np.argsort([x[labels == j, 0].mean() if np.any(labels == j) else np.inf for j in range(k)])
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return remap[labels]


def select_strata(features, *, max_strata: int = 4, seed: int = 0, n_init: int = 3,
                  min_fraction: float = 0.05) -> tuple[int, np.ndarray, dict]:
    """Choose k in 1..``max_strata`` by BIC of full-covariance Gaussian mixtures on standardized features.

    A candidate whose smallest component holds less than ``min_fraction`` of the participants is
    not eligible (a mixture can buy likelihood with a handful of outliers).

    Returns
    -------
    k, labels, bic
        The chosen k, each participant's stratum, and the BIC of every candidate.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> x = np.vstack([rng.normal(0, 1, (150, 2)), rng.normal(5, 1, (150, 2))])
    >>> k, labels, bic = select_strata(x, seed=1)
    >>> k, np.bincount(labels).tolist()
    (2, [150, 150])
    """
    x = np.asarray(features, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError("features must be a 2-D array with at least 2 rows and 1 column")
    if not np.all(np.isfinite(x)):
        raise ValueError("features must be finite")
    if max_strata < 1:
        raise ValueError("max_strata must be at least 1")
    z = _standardize(x)
    n, d = z.shape
    best = (np.inf, 1, np.zeros(n, dtype=np.int64))
    bic: dict[int, float | None] = {}
    for k in range(1, max_strata + 1):
        # a full covariance needs enough participants per component to be estimable at all
        if k * (d + 1) > n:
            break
        model = _fit(z, k, seed, n_init if k > 1 else 1)
        labels = model.predict(z)
        sizes = np.bincount(labels, minlength=k)
        if k > 1 and sizes.min() < max(min_fraction * n, d + 1):
            bic[k] = None
            continue
        value = float(model.bic(z))
        bic[k] = value
        if value < best[0]:
            best = (value, k, labels)
    _, k, labels = best
    return k, _ordered(labels, x, k), bic


def bootstrap_stability(features, k: int, reference_labels, *, draws: int = 20, seed: int = 0) -> np.ndarray:
    """Adjusted Rand index between the reference partition and partitions refitted on bootstrap samples.

    Each draw refits a k-component mixture on a resample (with replacement) of the participants and
    assigns *every* participant with it; its agreement with ``reference_labels`` is the ARI
    (invariant to stratum numbering). ``k = 1`` is perfectly stable by definition.

    Examples
    --------
    >>> rng = np.random.default_rng(2)
    >>> x = np.vstack([rng.normal(0, 1, (100, 2)), rng.normal(6, 1, (100, 2))])
    >>> k, labels, _ = select_strata(x, seed=2)
    >>> bool(bootstrap_stability(x, k, labels, draws=5, seed=2).min() > 0.95)
    True
    """
    from sklearn.metrics import adjusted_rand_score

    x = np.asarray(features, dtype=float)
    if k == 1:
        return np.ones(draws)
    z = _standardize(x)
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for b in range(draws):
        idx = rng.integers(0, z.shape[0], z.shape[0])
        model = _fit(z[idx], k, int(rng.integers(2**31 - 1)), 1)
        out[b] = adjusted_rand_score(reference_labels, model.predict(z))
    return out


def _leaf_paths(tree, names: list[str]) -> dict[int, list[str]]:
    """Conditions leading to each leaf of a fitted sklearn tree, as readable text."""
    t = tree.tree_
    paths: dict[int, list[str]] = {}

    def walk(node: int, conditions: list[str]) -> None:
        if t.children_left[node] == t.children_right[node]:  # a leaf
            paths[node] = conditions
            return
        name, thr = names[t.feature[node]], t.threshold[node]
        walk(t.children_left[node], conditions + [f"{name} <= {thr:.4g}"])
        walk(t.children_right[node], conditions + [f"{name} > {thr:.4g}"])

    walk(0, [])
    return paths


def stratum_rules(covariates, names, labels, k: int, *, max_depth: int = 2, seed: int = 0
                  ) -> tuple[tuple[StratumRule, ...], float | None, float | None]:
    """One readable rule per stratum from a shallow decision tree on baseline covariates.

    The tree (depth ``max_depth``, leaves of at least 5 % of the participants) predicts the stratum
    from the covariates; a stratum's rule is the disjunction of the paths to the leaves that
    predict it. Returns the rules, the tree's accuracy on all participants and its 5-fold
    cross-validated accuracy. A stratum no leaf predicts gets the rule ``"(no rule: ...)"`` and
    recall 0.

    Examples
    --------
    >>> age = np.arange(100.0)
    >>> rules, acc, _ = stratum_rules(age[:, None], ["age"], (age > 49.5).astype(int), 2)
    >>> rules[1].text, acc
    ('age > 49.5', 1.0)
    """
    from sklearn.model_selection import cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    labels = np.asarray(labels, dtype=np.int64)
    n = labels.size
    if k == 1:
        return (StratumRule(0, "all participants", 1.0, 1.0),), None, None
    c = np.asarray(covariates, dtype=float).reshape(n, -1)
    if c.shape[1] == 0:
        return tuple(StratumRule(j, "(no rule: no baseline covariates)", 0.0, 0.0) for j in range(k)), None, None
    tree = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=max(2, int(0.05 * n)), random_state=seed)
    tree.fit(c, labels)
    predicted = tree.predict(c)
    accuracy = float(np.mean(predicted == labels))
    folds = min(5, int(np.bincount(labels).min()))
    cv = float(np.mean(cross_val_score(tree, c, labels, cv=folds))) if folds >= 2 else None
    paths = _leaf_paths(tree, list(names))
    leaf_of = tree.apply(c)
    rules = []
    for j in range(k):
        leaves = [leaf for leaf in paths if tree.classes_[int(np.argmax(tree.tree_.value[leaf][0]))] == j]
        if not leaves:
            rules.append(StratumRule(j, "(no rule: the covariates do not single out this stratum)", 0.0, 0.0))
            continue
        text = " or ".join("(" + " and ".join(paths[leaf]) + ")" if len(leaves) > 1 and len(paths[leaf]) > 1
                           else " and ".join(paths[leaf]) or "all participants" for leaf in leaves)
        selected = np.isin(leaf_of, leaves)
        members = labels == j
        rules.append(StratumRule(j, text, float(np.mean(members[selected])) if selected.any() else 0.0,
                                 float(np.mean(selected[members]))))
    return tuple(rules), accuracy, cv


def stratify(features, feature_names, covariates=None, covariate_names=(), *, max_strata: int = 4,
             bootstrap: int = 20, seed: int = 0, min_fraction: float = 0.05, max_depth: int = 2,
             min_stability: float = MIN_STABILITY) -> Stratification:
    """Strata of participants from twin features: BIC model choice, bootstrap stability, readable rules.

    Parameters
    ----------
    features : array_like, shape (n, d)
        One row per participant (e.g. posterior means of log Emax and log EC50).
    feature_names : sequence of str
    covariates : array_like, shape (n, p), optional
        Baseline covariates the rules may use (age, weight, eGFR, sex as 0/1, ...).
    covariate_names : sequence of str
    max_strata : int
        Largest k considered (k = 1 always competes).
    bootstrap : int
        Bootstrap draws for the stability estimate.
    seed : int
        Seeds every random step: the result depends only on the inputs and ``seed``.
    min_stability : float
        A partition into k > 1 strata whose mean bootstrap ARI is below this is not reported: the
        result is one stratum, with the rejected k and its stability in ``unstable_k`` and
        ``unstable_stability``. With few participants BIC can prefer strata that a resample does not
        reproduce; 0.5 follows Hennig's (2007) reading of bootstrap agreement at or below 0.5 as a
        dissolved cluster. Needs ``bootstrap > 0``.

    Examples
    --------
    >>> rng = np.random.default_rng(3)
    >>> s = stratify(rng.normal(size=(200, 2)), ["a", "b"], bootstrap=3, seed=3)
    >>> s.k, s.rules[0].text
    (1, 'all participants')
    """
    x = np.asarray(features, dtype=float)
    with single_threaded_blas():
        k, labels, bic = select_strata(x, max_strata=max_strata, seed=seed, min_fraction=min_fraction)
        draws = bootstrap_stability(x, k, labels, draws=bootstrap, seed=seed)
    unstable_k = unstable_stability = None
    if k > 1 and draws.size and float(draws.mean()) < min_stability:
        unstable_k, unstable_stability = k, float(draws.mean())
        k, labels, draws = 1, np.zeros(x.shape[0], dtype=np.int64), np.ones(bootstrap)
    means = np.array([x[labels == j].mean(axis=0) for j in range(k)])
    cov = np.zeros((x.shape[0], 0)) if covariates is None else np.asarray(covariates, dtype=float)
    with single_threaded_blas():
        rules, acc, cv = stratum_rules(cov, covariate_names, labels, k, max_depth=max_depth, seed=seed)
    return Stratification(k=k, labels=labels, bic=bic, stability=float(draws.mean()) if draws.size else float('nan'), stability_draws=draws,
                          means=means, sizes=tuple(int(s) for s in np.bincount(labels, minlength=k)), rules=rules,
                          rule_accuracy=acc, rule_cv_accuracy=cv, feature_names=tuple(feature_names),
                          unstable_k=unstable_k, unstable_stability=unstable_stability)


def steady_state_response(emax, ec50, cl, dose_mg, *, bioavailability: float = 1.0, interval_h: float = 24.0):
    """Emax response at the steady-state average concentration of a regimen (a stated scenario).

    ``C_avg = F · dose / (CL · tau)`` (mg/L with CL in L/h and tau in h); the response is
    ``Emax · C_avg / (EC50 + C_avg)`` in Emax's units (e.g. mg/dL of fasting-glucose
    lowering). Vectorized over participants.

    Examples
    --------
    >>> float(steady_state_response(40.0, 0.2, 5.0, 24.0))   # C_avg = 0.2 mg/L = EC50
    20.0
    """
    c_avg = bioavailability * np.asarray(dose_mg, dtype=float) / (np.asarray(cl, dtype=float) * interval_h)
    return np.asarray(emax, dtype=float) * c_avg / (np.asarray(ec50, dtype=float) + c_avg)


def planted_population(n: int, *, seed: int, subgroups: bool = True, estimation_sd: float = 0.12):
    """Simulated twin features with (or without) planted responder subgroups, for validation and benches.

    Log Emax and log EC50 follow a glucose-lowering Emax population (typical Emax 40 mg/dL, EC50 0.5 mg/L;
    between-participant SD 0.25 and 0.5 on the log scale). With ``subgroups``, about 25 % are
    *high responders* (Emax ×2.5, EC50 ÷6) and 25 % *poor responders* (Emax ×0.4, EC50 ×6); membership
    is partly explained by eGFR (high responders tend to have low eGFR). ``estimation_sd`` adds the
    error of a twin's posterior mean. Returns ``(features, truth, covariates)`` with features
    ``[log Emax, log EC50]`` and covariates ``[age, egfr]``.
    """
    rng = np.random.default_rng(seed)
    truth = np.zeros(n, dtype=np.int64)
    egfr = rng.normal(80.0, 15.0, n)
    if subgroups:
        u = rng.random(n)
        low_egfr = egfr < 70.0
        truth[np.where(low_egfr, u < 0.7, u < 0.1)] = 2  # high responders, mostly low eGFR
        truth[(truth == 0) & (rng.random(n) < 0.33)] = 1  # poor responders
    shift_emax = np.array([0.0, np.log(0.4), np.log(2.5)])[truth]
    shift_ec50 = np.array([0.0, np.log(6.0), np.log(1 / 6.0)])[truth]
    log_emax = np.log(40.0) + shift_emax + rng.normal(0, 0.25, n) + rng.normal(0, estimation_sd, n)
    log_ec50 = np.log(0.5) + shift_ec50 + rng.normal(0, 0.5, n) + rng.normal(0, estimation_sd, n)
    age = rng.normal(58.0, 9.0, n)
    return np.column_stack([log_emax, log_ec50]), truth, np.column_stack([age, egfr])
