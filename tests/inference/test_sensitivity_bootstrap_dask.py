"""Sobol indices and population bootstraps on a real dask.distributed cluster equal the in-process run.

References: the Ishigami indices in closed form (see tests/inference/test_sensitivity.py, tolerance
0.02) and the nlme fit of Theoph (Pinheiro & Bates 2000, fm3Theo: lKe -2.4547, lKa 0.4657,
lCl -3.2272), which every 90 % bootstrap interval must contain.
"""
import numpy as np
import pytest

from inference.bootstrap import bootstrap_fit, resample_subjects
from inference.datasets import ssfol
from inference.population import ObservationData, PopulationModel, ResidualError
from inference.sensitivity import sobol_indices

pytestmark = [pytest.mark.unit, pytest.mark.slow]

pytest.importorskip("distributed", reason="the 'dask' extra is part of the test install")

NLME_THEOPH = {"lKe": -2.4547, "lKa": 0.4657, "lCl": -3.2272}


def test_sobol_on_the_cluster_identical_and_analytic(dask_client):
    from tests.inference.test_sensitivity import analytic

    a, b = 7.0, 0.1

    # a closure: cloudpickle sends it by value to the worker processes
    def ishigami(x):
        return np.sin(x[:, 0]) + a * np.sin(x[:, 1]) ** 2 + b * x[:, 2] ** 4 * np.sin(x[:, 0])

    bounds, names = [(-np.pi, np.pi)] * 3, ["x1", "x2", "x3"]
    local = sobol_indices(ishigami, bounds, names, n_base=2 ** 13, seed=3)
    remote = sobol_indices(ishigami, bounds, names, n_base=2 ** 13, seed=3, executor=dask_client, chunk_size=10_000)
    assert remote == local  # 50 000 rows in 5 chunks over 2 workers, same floats
    for row in remote:
        s1, st = analytic()[row["name"]]
        assert abs(row["S1"] - s1) < 0.02 and abs(row["ST"] - st) < 0.02


def test_bootstrap_on_the_cluster_identical_and_covers_nlme(dask_client, theoph):
    start = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
                            np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    local = bootstrap_fit(start, ssfol, theoph, n_boot=12, seed=5)
    remote = bootstrap_fit(start, ssfol, theoph, n_boot=12, seed=5, executor=dask_client)
    np.testing.assert_array_equal(remote.subjects, local.subjects)
    np.testing.assert_array_equal(remote.estimates, local.estimates)
    np.testing.assert_array_equal(remote.converged, local.converged)
    assert remote.names == local.names and remote.converged.sum() >= 10
    interval = remote.interval(0.9)
    for name, value in NLME_THEOPH.items():
        assert interval[name][0] < value < interval[name][1], (name, interval[name])
    # another seed draws other subjects
    assert not np.array_equal(bootstrap_fit(start, ssfol, theoph, n_boot=2, seed=6).subjects, local.subjects[:2])


def test_resample_keeps_each_drawn_subject_whole(theoph):
    data = resample_subjects(theoph, [3, 3, 0])
    assert data.n_subjects == 3
    assert data.subject_ids == (f"{theoph.subject_ids[3]}#0", f"{theoph.subject_ids[3]}#1",
                                f"{theoph.subject_ids[0]}#0")
    one = theoph.select_subjects([3])
    for k in (0, 1):
        np.testing.assert_array_equal(data.value[data.subject == k], one.value)
        for key, v in data.design.items():
            np.testing.assert_array_equal(v[data.subject == k], one.design[key])
    for key, v in data.covariates.items():
        assert v[0] == v[1] == theoph.covariates[key][3]


def test_bad_bootstrap_input_is_refused(theoph):
    start = PopulationModel(("lKe", "lKa", "lCl"), [-2.45, 0.47, -3.23], ("lKa", "lCl"),
                            np.diag([0.64, 0.17]) ** 2, ResidualError("additive", additive=0.7))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_fit(start, ssfol, theoph, n_boot=0)
    with pytest.raises(ValueError, match="seed"):
        bootstrap_fit(start, ssfol, theoph, n_boot=1, seed=-1)
    with pytest.raises(ValueError, match="out of range"):
        resample_subjects(theoph, [theoph.n_subjects])
    with pytest.raises(ValueError, match="level"):
        bootstrap_fit(start, ssfol, theoph, n_boot=1).interval(1.0)
    tiny = ObservationData([0, 0], [1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="out of range"):
        resample_subjects(tiny, [])
