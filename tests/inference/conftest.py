"""Fixtures for the population-layer tests: the Theoph data and simple population models."""
from __future__ import annotations

import numpy as np
import pytest

from inference.datasets import load_theoph
from inference.population import ObservationData, PopulationModel, ResidualError


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


@pytest.fixture(scope="session")
def dask_client():
    """A real dask.distributed cluster of 2 worker processes (one thread each), shared by the session.

    Processes, not threads: work travels pickled to other interpreters, as on a real cluster.
    """
    distributed = pytest.importorskip("distributed", reason="the 'dask' extra is part of the test install")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  death_timeout=120) as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        yield client
