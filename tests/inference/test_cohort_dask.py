"""Cohort simulation on a real dask.distributed cluster (2 worker processes) equals the in-process run."""
import numpy as np
import pytest

from inference.cohort import Scenario
from inference.cohort import simulate_cohort as _simulate_cohort
from inference.cohort import sweep as _sweep
from inference.model_definition import example_regimen

MODEL = example_regimen()


def simulate_cohort(*args, **kwargs):
    return _simulate_cohort(*args, model=MODEL, **kwargs)


def sweep(*args, **kwargs):
    return _sweep(*args, model=MODEL, **kwargs)

pytestmark = [pytest.mark.unit, pytest.mark.slow]

distributed = pytest.importorskip("distributed", reason="the 'dask' extra is part of the test install")


@pytest.fixture
def client(dask_client):
    return dask_client


def test_twenty_thousand_participants_identical_to_in_process(client):
    scenario = Scenario(dose_mg=100.0, n_days=180)
    local = simulate_cohort(scenario, n=20_000, seed=11)
    with distributed.get_task_stream(client) as stream:
        remote = simulate_cohort(scenario, n=20_000, seed=11, executor=client)
    assert remote.n == 20_000
    for key, value in local.summary.items():
        np.testing.assert_array_equal(remote.summary[key], value, err_msg=key)
    # the chunks really ran on the cluster, spread over both workers
    assert len({task["worker"] for task in stream.data}) == 2


def test_sweep_with_trajectories_identical(client):
    local = sweep(Scenario(n_days=60), "dose_mg", [0.0, 50.0], n=3_000, seed=5)
    remote = sweep(Scenario(n_days=60), "dose_mg", [0.0, 50.0], n=3_000, seed=5, executor=client)
    assert remote == local
    traj_local = simulate_cohort(Scenario(n_days=30), n=2_500, seed=2, trajectories=True).trajectories
    traj_remote = simulate_cohort(Scenario(n_days=30), n=2_500, seed=2, trajectories=True,
                                  executor=client).trajectories
    for key, value in traj_local.items():
        np.testing.assert_array_equal(traj_remote[key], value, err_msg=key)
