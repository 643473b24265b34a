"""Shared fixtures for the engine tests: seeded covariate sets, the Theoph data, simple population models."""
from __future__ import annotations

import numpy as np
import pytest

from inference.covariates import Covariates
from inference.datasets import load_theoph
from inference.population import ObservationData, PopulationModel, ResidualError


def make_covariates(n: int, seed: int = 0, distance_km: float | None = None) -> Covariates:
    rng = np.random.default_rng(seed)
    dist = rng.gamma(2.0, 10.0, n) if distance_km is None else np.full(n, distance_km)
    return Covariates(weight_kg=rng.normal(85, 15, n).clip(45, 160), age_y=rng.normal(58, 9, n).clip(25, 85),
                      egfr=rng.normal(85, 20, n).clip(30, 130), sex_female=rng.integers(0, 2, n),
                      distance_km=dist, site=rng.integers(0, 3, n))


@pytest.fixture
def covariates_500() -> Covariates:
    return make_covariates(500, seed=11)


@pytest.fixture(scope="session")
def theoph() -> ObservationData:
    return load_theoph()


@pytest.fixture
def theoph_start() -> PopulationModel:
    """Rough starting values, deliberately away from the optimum."""
    return PopulationModel(
        ("lKe", "lKa", "lCl"),
        [-2.5, 0.5, -3.0],
        ("lKa", "lCl"),
        np.diag([0.5, 0.5]) ** 2,
        ResidualError("additive", additive=1.0),
    )


@pytest.fixture
def oral_population() -> PopulationModel:
    """A 1-compartment oral population with a combined residual error, used for simulation studies."""
    return PopulationModel(
        ("lKe", "lKa", "lCl"),
        [-2.3, 0.3, -3.2],
        ("lKa", "lCl"),
        np.diag([0.4, 0.25]) ** 2,
        ResidualError("combined", additive=0.2, proportional=0.1),
    )


def design(times: list[float], n_subjects: int, dose: float = 4.0) -> ObservationData:
    """The same sampling times and dose for every subject, values left unobserved."""
    t = np.tile(np.asarray(times, float), n_subjects)
    return ObservationData(
        subject=np.repeat(np.arange(n_subjects), len(times)),
        time=t,
        value=np.full(t.shape, np.nan),
        design={"dose": np.full(t.shape, dose)},
    )


@pytest.fixture
def make_design():
    return design
