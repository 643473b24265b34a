"""Seeded covariate sets shared by the engine tests (a plain helper, not a fixture, so the
package conftest stays free for the population-layer fixtures)."""
import numpy as np

from inference.covariates import Covariates


def make_covariates(n: int, seed: int = 0, distance_km: float | None = None) -> Covariates:
    rng = np.random.default_rng(seed)
    dist = rng.gamma(2.0, 10.0, n) if distance_km is None else np.full(n, distance_km)
    return Covariates(weight_kg=rng.normal(85, 15, n).clip(45, 160), age_y=rng.normal(58, 9, n).clip(25, 85),
                      egfr=rng.normal(85, 20, n).clip(30, 130), sex_female=rng.integers(0, 2, n),
                      distance_km=dist, site=rng.integers(0, 3, n))
