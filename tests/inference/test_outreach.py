"""Outreach thresholds from a stated target: operating points against scikit-learn, choice rules, bad targets."""
import numpy as np
import pytest
from sklearn.metrics import precision_score, recall_score

from inference.outreach import OutreachTarget, choose_threshold, operating_points

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(8)
    p = 1 / (1 + np.exp(-rng.normal(-2.5, 1.2, 20_000)))
    return (rng.random(p.size) < p).astype(int), p


def test_operating_points_equal_scikit_learn(data):
    y, p = data
    for q in operating_points(y, p, grid=(0.05, 0.2, 0.5)):
        flagged = (p >= q["threshold"]).astype(int)
        assert q["precision"] == pytest.approx(precision_score(y, flagged))
        assert q["recall"] == pytest.approx(recall_score(y, flagged))
        assert q["n_flagged"] == flagged.sum()


def test_precision_target_takes_the_most_recall_that_meets_it(data):
    y, p = data
    points = operating_points(y, p)
    chosen = choose_threshold(points, OutreachTarget("precision", 0.4))
    assert chosen["precision"] >= 0.4 and chosen["n_flagged"] >= 30
    eligible = [q for q in points if q["n_flagged"] >= 30 and q["precision"] >= 0.4]
    assert chosen["recall"] == max(q["recall"] for q in eligible)


def test_weekly_capacity_flags_at_most_the_capacity_share(data):
    y, p = data
    chosen = choose_threshold(operating_points(y, p), OutreachTarget("weekly-capacity", 5), n_on_study=200)
    assert 0 < chosen["flagged_fraction"] <= 5 / 200
    with pytest.raises(ValueError, match="number of participants"):
        choose_threshold(operating_points(y, p), OutreachTarget("weekly-capacity", 5))


@pytest.mark.parametrize("kind, value", [("recall", 0.5), ("precision", 0.0), ("precision", 1.0),
                                         ("weekly-capacity", 0.5)])
def test_bad_targets_are_refused(kind, value):
    with pytest.raises(ValueError):
        OutreachTarget(kind, value)


def test_unreachable_precision_is_an_error(data):
    y, p = data
    with pytest.raises(ValueError, match="no threshold reaches precision 0.99"):
        choose_threshold(operating_points(y, p), OutreachTarget("precision", 0.99))
