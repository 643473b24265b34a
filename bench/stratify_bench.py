"""Responder stratification of 10^5 simulated participants against the textbook baseline, same run.

Run: python bench/stratify_bench.py  -> prints the ratios, writes bench/results/stratify_bench.json

Workload: 10^5 participants' twin features (log Emax, log EC50 posterior means) with three planted
responder subgroups (``inference.stratify.planted_population``) and two baseline covariates.

* product: ``inference.stratify.stratify`` — Gaussian mixtures k = 1..4 chosen by BIC, bootstrap
  stability (5 refits, adjusted Rand index), depth-2 rule tree with 5-fold cross-validation.
* baseline: what one writes first — k-means for k = 2..4 chosen by the mean silhouette width
  (scikit-learn ``silhouette_score``, exact: O(n^2) distances). At 10^5 the silhouette needs 10^10
  distances, so the baseline is timed on growing subsamples and extrapolated with its measured
  O(n^2) exponent; it also cannot answer "one stratum" (the silhouette is undefined for k = 1).
* feature step: the simulated steady-state response of every participant, vectorized against a
  per-participant Python loop (both at the full 10^5).
Accuracy is the adjusted Rand index against the planted truth.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import describe  # noqa: E402

from threadpoolctl import threadpool_limits  # noqa: E402

from inference.stratify import planted_population, steady_state_response, stratify  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stratify_bench.json"
N = 100_000


def kmeans_silhouette(x, seed):
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    z = (x - x.mean(0)) / x.std(0)
    best = (-2.0, None, None)
    for k in (2, 3, 4):
        labels = KMeans(k, n_init=3, random_state=seed).fit_predict(z)
        score = silhouette_score(z, labels)
        if score > best[0]:
            best = (score, k, labels)
    return best[1], best[2]


def main() -> None:
    from sklearn.metrics import adjusted_rand_score

    x, truth, cov = planted_population(N, seed=1)
    with threadpool_limits(1):  # one core, like every figure in bench/
        t0 = time.perf_counter()
        s = stratify(x, ["log Emax", "log EC50"], cov, ["age", "egfr"], bootstrap=5, seed=1)
        t_product = time.perf_counter() - t0
        ari_product = adjusted_rand_score(truth, s.labels)
        sizes, times, aris, ks = [2000, 4000, 8000], [], [], []
        for n in sizes:
            t0 = time.perf_counter()
            k, labels = kmeans_silhouette(x[:n], seed=1)
            times.append(time.perf_counter() - t0)
            aris.append(adjusted_rand_score(truth[:n], labels))
            ks.append(k)
    exponent = float(np.polyfit(np.log(sizes), np.log(times), 1)[0])
    t_baseline = times[-1] * (N / sizes[-1]) ** exponent

    emax, ec50 = np.exp(x[:, 0]), np.exp(x[:, 1])
    cl = np.full(N, 5.0)
    t0 = time.perf_counter()
    fast = steady_state_response(emax, ec50, cl, 100.0)
    t_vec = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = np.array([float(steady_state_response(emax[i], ec50[i], cl[i], 100.0)) for i in range(N)])
    t_loop = time.perf_counter() - t0

    result = {
        "machine": describe(["numpy", "scipy", "scikit-learn"], threads=1),
        "workload": {"participants": N, "features": 2, "planted_strata": 3, "bootstrap": 5},
        "product": {"seconds": t_product, "strata": s.k, "ari_vs_truth": ari_product, "stability": s.stability,
                    "rule_cv_accuracy": s.rule_cv_accuracy, "bic": s.bic},
        "baseline_kmeans_silhouette": {"subsample_sizes": sizes, "seconds": times, "ari_vs_truth": aris,
                                       "strata": ks, "scaling_exponent": exponent,
                                       "extrapolated_seconds_at_1e5": t_baseline},
        "ratio_baseline_over_product": t_baseline / t_product,
        "features": {"vectorized_seconds": t_vec, "loop_seconds": t_loop, "ratio": t_loop / t_vec,
                     "max_abs_difference": float(np.max(np.abs(fast - slow)))},
    }
    print(f"product: {N} participants in {t_product:.1f} s, k={s.k}, ARI {ari_product:.3f}, stability "
          f"{s.stability:.3f}; k-means+silhouette ~n^{exponent:.2f}: {times[-1]:.1f} s at {sizes[-1]}, "
          f"~{t_baseline:.0f} s at {N} -> x{t_baseline / t_product:.0f}; features x{t_loop / t_vec:.0f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
