"""Real-data validation of withdrawal prediction (Mayo PBC trial, R survival::pbcseq): recomputed, seeded.

Produces the numbers recorded in the withdrawal model's metadata and docs/LEARNED_MODELS.md and checks
that they reproduce; the shipped CSV is checked against R's own copy where R is installed.
"""
import shutil
import subprocess

import numpy as np
import pytest

from inference.registry import default_registry
from inference.training.withdrawal_transfer import pbcseq_slots, person_periods, transfer_validation

pytestmark = [pytest.mark.unit, pytest.mark.slow]


@pytest.fixture(scope="module")
def committed():
    return default_registry().latest("withdrawal").metadata["real_data_validation"]


def test_transfer_validation_reproduces_the_recorded_numbers(committed):
    results, curves = transfer_validation(committed["seed"])
    for name, recorded in committed["settings"].items():
        got = results["settings"][name]
        for key, value in recorded.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, abs=1e-9), (name, key)
            elif isinstance(value, list):
                np.testing.assert_allclose(got[key], value, atol=1e-9)
    # the simulator is learnable from the shared features (its held-out AUC interval excludes 0.5) ...
    assert results["settings"]["sim_to_sim"]["auc_ci95"][0] > 0.5
    # ... and every setting saw events and scored every row
    for name, (y, p) in curves.items():
        assert y.sum() > 20 and np.all((p > 0) & (p < 1)), name


def test_pbcseq_withdrawals_follow_the_stated_definition():
    table = pbcseq_slots()
    X, y, g = person_periods(table)
    assert table.n == 312 and int(table.placebo.sum()) == 154 and int(table.female.sum()) == 276
    # independent count: participants whose last attended protocol slot is followed by >= 2 due, missed slots
    count = 0
    for i in range(table.n):
        due = np.flatnonzero(table.due[i])
        att = np.flatnonzero(table.attended[i])
        if due.size and due[-1] - (att[-1] if att.size else -1) >= 2:
            count += 1
    assert y.sum() == count
    assert np.all(np.bincount(g[y == 1]) <= 1)  # at most one withdrawal per participant


def test_shipped_csv_matches_r_survival():
    if not shutil.which("Rscript") or subprocess.run(["Rscript", "-e", "library(survival)"],
                                                     capture_output=True).returncode:
        pytest.skip("R with survival not installed (Debian: apt-get install r-cran-survival)")
    script = ("suppressMessages(library(survival)); d <- pbcseq; "
              "cat(nrow(d), length(unique(d$id)), sum(d$day), sum(d$futime[!duplicated(d$id)]), "
              "sum(d$trt[!duplicated(d$id)] == 1))")
    r = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, check=True).stdout.split()
    from importlib import resources
    import csv

    text = resources.files("inference").joinpath("data/pbcseq_visits.csv").read_text()
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    first = {}
    for row in rows:
        first.setdefault(row["id"], row)
    mine = [len(rows), len(first), sum(int(r["day"]) for r in rows), sum(int(r["futime"]) for r in first.values()),
            sum(r["trt"] == "1" for r in first.values())]
    assert [int(v) for v in r] == mine


def test_docs_show_the_committed_calibration_plot():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    entry = default_registry().latest("withdrawal")
    committed = (entry.onnx_path.parent / entry.metadata["files"]["transfer_plot"]).read_bytes()
    assert (root / "docs" / "img" / "withdrawal-transfer-calibration.png").read_bytes() == committed
