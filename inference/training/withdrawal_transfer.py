"""Withdrawal prediction across the simulator and real trial data (Mayo PBC, R ``survival::pbcseq``).

Both sources become the same visit-slot person-period table with the features they share; models
fitted on one are scored on the other, plus a cross-validated fit on the real data as the ceiling.

Definitions (the same code path for both sources)
-------------------------------------------------
* **Slots** are the protocol's scheduled visits (pbcseq: 6 months, 1 year, then yearly; simulator:
  every 14 or 28 days). A real visit counts for the slot whose window (half-way to the neighbouring
  slots) holds it; late visits therefore count as attended, extra visits add nothing.
* A slot is **due** when its whole window lies within follow-up (pbcseq: before death, transplant
  or censoring at ``futime``; simulator: before the end of the simulated study).
* **Withdrawal** is observable behaviour, not a recorded status: the participant attends no more
  visits and at least ``MIN_TRAILING_MISSED`` due slots follow the last attended one. It happens
  at the first of those missed slots.
* One row per participant and landmark ``j`` (baseline, then each due slot), while still on
  study, whose label is known (slots ``j+1`` and ``j+2`` due): label 1 if the participant withdraws
  at slot ``j+1``. This is a discrete-time hazard with one period per visit interval.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources

import numpy as np

__all__ = ["SHARED_FEATURES", "MIN_TRAILING_MISSED", "SlotTable", "pbcseq_slots", "simulator_slots",
           "person_periods", "bootstrap_metrics", "transfer_validation", "calibration_figure"]

MIN_TRAILING_MISSED = 2
SHARED_FEATURES = ("log_slots_elapsed", "missed_visit_rate", "last_visit_missed", "consecutive_missed",
                   "age_decades", "sex_female", "arm_placebo")
#: pbcseq protocol: visits at 6 months, 1 year, then yearly (Therneau & Grambsch 2000, pbcseq help page).
PBC_SLOT_DAYS = np.array([182] + [365 * k for k in range(1, 15)])
N_BOOTSTRAP = 200
CV_FOLDS = 5


@dataclass(frozen=True)
class SlotTable:
    """Per-participant visit slots: ``attended`` / ``due`` ``(n, S)`` and baseline covariates ``(n,)``."""

    source: str
    attended: np.ndarray
    due: np.ndarray
    age_years: np.ndarray
    female: np.ndarray
    placebo: np.ndarray

    @property
    def n(self) -> int:
        return int(self.attended.shape[0])


def _slot_windows(slot_days: np.ndarray) -> np.ndarray:
    """``(S + 1,)`` window edges: half-way between neighbouring slots (first window starts half-way from day 0)."""
    mids = (slot_days[:-1] + slot_days[1:]) / 2.0
    first = slot_days[0] / 2.0
    last = slot_days[-1] + (slot_days[-1] - slot_days[-2]) / 2.0
    return np.concatenate([[first], mids, [last]])


def pbcseq_slots() -> SlotTable:
    """The shipped pbcseq visits (``inference/data/pbcseq_visits.csv``) as a :class:`SlotTable`.

    Examples
    --------
    >>> t = pbcseq_slots()
    >>> t.n, t.attended.shape[1], int(t.placebo.sum())
    (312, 15, 154)
    """
    text = resources.files("inference").joinpath("data/pbcseq_visits.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    ids = sorted({int(r["id"]) for r in rows})
    index = {pid: i for i, pid in enumerate(ids)}
    edges = _slot_windows(PBC_SLOT_DAYS)
    n, s = len(ids), PBC_SLOT_DAYS.size
    attended = np.zeros((n, s), dtype=bool)
    futime = np.zeros(n)
    age, female, placebo = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for r in rows:
        i = index[int(r["id"])]
        futime[i] = float(r["futime"])
        age[i], female[i], placebo[i] = float(r["age"]), r["sex"] == "f", r["trt"] != "1"  # 1 D-penicillamine; placebo 0 (pbc: 2)
        day = float(r["day"])
        slot = int(np.searchsorted(edges, day, side="right")) - 1
        if day > 0 and 0 <= slot < s:
            attended[i, slot] = True
    due = edges[None, 1:] <= futime[:, None]
    return SlotTable("pbcseq", attended & due, due, age, female, placebo)


def simulator_slots(n: int, seed: int) -> SlotTable:
    """Simulated participants of the missed-visit model's training design, as a :class:`SlotTable`.

    Every scheduled visit is due (the simulated study follows everyone to its end); visits after the
    simulated dropout day are missed.
    """
    from inference.behaviour import BehaviourModel, VisitSchedule, simulate_behaviour
    from inference.training.dropout import ARM_DOSE_MG, ARMS, TrainingDesign, _covariates, _exposure

    design = TrainingDesign()
    rng = np.random.default_rng(seed)
    cov = _covariates(n, rng, design)
    arm = rng.integers(0, len(ARMS), n)
    two_weekly = rng.random(n) < 0.5
    p_remote = rng.random(n)
    s_max = (design.n_days - 1) // 14
    attended = np.zeros((n, s_max), dtype=bool)
    due = np.zeros((n, s_max), dtype=bool)
    for flag in (False, True):
        idx = np.flatnonzero(two_weekly == flag)
        interval = 14 if flag else 28
        n_visits = (design.n_days - 1) // interval
        schedule = VisitSchedule.every(interval, n_visits, remote=rng.random((idx.size, n_visits)) < p_remote[idx, None])
        sub = cov.take(idx)
        dose = np.array([ARM_DOSE_MG[ARMS[k]] for k in arm[idx]])
        res = simulate_behaviour(BehaviourModel(), sub, schedule, design.n_days, rng, dose_mg=dose,
                                 exposure=_exposure(sub, rng))
        attended[idx, :n_visits] = res.attended & res.scheduled
        due[idx, :n_visits] = True
    return SlotTable("simulator", attended, due, cov.age_y, cov.sex_female.astype(bool), arm == 0)


def person_periods(table: SlotTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, group)``: shared-feature rows (``SHARED_FEATURES`` order), labels, participant index.

    Examples
    --------
    >>> t = SlotTable("toy", np.array([[True, False, False, False]]), np.ones((1, 4), bool),
    ...               np.array([50.0]), np.array([True]), np.array([False]))
    >>> X, y, g = person_periods(t)
    >>> y.tolist(), X[:, 3].tolist()       # withdraws at slot 1 (slots 1, 2, 3 missed)
    ([0, 1], [0.0, 0.0])
    """
    rows, labels, groups = [], [], []
    for i in range(table.n):
        due_slots = np.flatnonzero(table.due[i])
        if due_slots.size == 0:
            continue
        last_due = int(due_slots[-1])
        att = np.flatnonzero(table.attended[i])
        last_att = int(att[-1]) if att.size else -1
        withdrawn = last_due - last_att >= MIN_TRAILING_MISSED
        base = (table.age_years[i] / 10.0, float(table.female[i]), float(table.placebo[i]))
        missed, consecutive, last_missed = 0, 0, 0.0
        for j in range(-1, last_due - 1):   # landmark after slot j; needs slots j+1 and j+2 due
            if j >= 0:
                was_missed = not table.attended[i, j]
                missed += was_missed
                consecutive = consecutive + 1 if was_missed else 0
                last_missed = float(was_missed)
            label = int(withdrawn and j == last_att)
            rows.append((np.log1p(j + 1), (missed + 1.0) / (j + 3.0), last_missed, consecutive, *base))
            labels.append(label)
            groups.append(i)
            if label:
                break
    return (np.asarray(rows, dtype=np.float64).reshape(-1, len(SHARED_FEATURES)), np.asarray(labels, dtype=np.int8),
            np.asarray(groups, dtype=np.int64))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC with mid-ranks for ties (equals scikit-learn's ``roc_auc_score``)."""
    from scipy.stats import rankdata

    ranks = rankdata(p)
    n1 = int(y.sum())
    n0 = y.size - n1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _recalibration(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of ``logit P(y) = a + b logit(p)`` by Newton's method (2 parameters).

    The same maximum-likelihood fit as :func:`inference.training.dropout.calibration_slope_intercept`,
    written out so that 200 bootstrap replicates cost milliseconds each.
    """
    q = np.clip(p, 1e-7, 1 - 1e-7)
    z = np.column_stack([np.ones_like(q), np.log(q / (1 - q))])
    beta = np.array([0.0, 1.0])
    for _ in range(100):
        mu = 1.0 / (1.0 + np.exp(-(z @ beta)))
        grad = z.T @ (y - mu)
        hess = (z * (mu * (1 - mu))[:, None]).T @ z
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.abs(step).max() < 1e-12:
            break
    return float(beta[1]), float(beta[0])


def _metrics(y: np.ndarray, p: np.ndarray) -> dict:
    slope, intercept = _recalibration(y.astype(float), p)
    return {"auc": _auc(y, p), "brier": float(np.mean((p - y) ** 2)),
            "calibration_slope": slope, "calibration_intercept": intercept,
            "observed_rate": float(y.mean()), "mean_predicted": float(p.mean())}


def bootstrap_metrics(y, p, group, seed: int, n_boot: int = N_BOOTSTRAP) -> dict:
    """Point metrics and participant-cluster bootstrap 95 % percentile intervals (seeded).

    Participants are resampled with replacement (all their rows together), so the intervals allow
    for the correlation between a participant's rows.
    """
    y, p, group = np.asarray(y), np.asarray(p, dtype=float), np.asarray(group)
    point = _metrics(y, p)
    ids, inverse = np.unique(group, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(ids.size))
    ends = np.append(starts[1:], order.size)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in ("auc", "brier", "calibration_slope", "calibration_intercept")}
    for _ in range(n_boot):
        pick = rng.integers(0, ids.size, ids.size)
        idx = np.concatenate([order[starts[k]:ends[k]] for k in pick])
        if y[idx].min() == y[idx].max():
            continue
        m = _metrics(y[idx], p[idx])
        for k in draws:
            draws[k].append(m[k])
    out = {"n_rows": int(y.size), "n_participants": int(ids.size), "n_events": int(y.sum()), **point,
           "bootstrap": {"replicates": n_boot, "seed": seed, "method": "participant-cluster percentile"}}
    for k, values in draws.items():
        lo, hi = np.percentile(values, [2.5, 97.5])
        out[f"{k}_ci95"] = [float(lo), float(hi)]
    return out


def _fit(X, y):
    from inference.training.dropout import fit_model

    return fit_model(X, y)


def transfer_validation(seed: int, n_sim: int = 1500) -> tuple[dict, dict]:
    """Sim -> real, real -> sim, cross-validated real (ceiling) and sim -> sim, with bootstrap intervals.

    Returns ``(results, curves)``: ``results`` is JSON-able (what docs and metadata record);
    ``curves`` holds ``(y, p)`` per setting for :func:`calibration_figure`.
    """
    ss = np.random.SeedSequence(seed).spawn(4)
    sim_train_seed, sim_test_seed, cv_seed, boot_seed = (int(s.generate_state(1)[0]) for s in ss)
    real = person_periods(pbcseq_slots())
    sim_train = person_periods(simulator_slots(n_sim, sim_train_seed))
    sim_test = person_periods(simulator_slots(n_sim, sim_test_seed))

    on_sim, on_real = _fit(*sim_train[:2]), _fit(*real[:2])
    curves = {
        "sim_to_real": (real[1], on_sim.predict_proba(real[0])[:, 1], real[2]),
        "real_to_sim": (sim_test[1], on_real.predict_proba(sim_test[0])[:, 1], sim_test[2]),
        "sim_to_sim": (sim_test[1], on_sim.predict_proba(sim_test[0])[:, 1], sim_test[2]),
    }
    # Ceiling: 5-fold cross-validation on the real data, folds by participant (seeded).
    X, y, g = real
    ids = np.unique(g)
    fold_of = np.empty(ids.max() + 1, dtype=np.int64)
    fold_of[np.random.default_rng(cv_seed).permutation(ids)] = np.arange(ids.size) % CV_FOLDS
    oof = np.empty(y.size)
    for k in range(CV_FOLDS):
        test = fold_of[g] == k
        oof[test] = _fit(X[~test], y[~test]).predict_proba(X[test])[:, 1]
    curves["cv_real"] = (y, oof, g)

    results = {"settings": {}, "shared_features": list(SHARED_FEATURES),
               "definition": f"withdrawal = no visit attended after the last one, with >= {MIN_TRAILING_MISSED} due "
                             "protocol visits missed after it; one row per participant and visit interval "
                             "(discrete-time hazard), label = withdraws at the next scheduled visit",
               "real_data": "R survival::pbcseq (Mayo PBC trial, 312 patients), inference/data/pbcseq_visits.csv",
               "simulator": f"inference.behaviour default BehaviourModel, TrainingDesign(); {n_sim} participants "
                            "per simulated set",
               "seed": seed}
    for name, (yy, pp, gg) in curves.items():
        results["settings"][name] = bootstrap_metrics(yy, pp, gg, seed=boot_seed)
    return results, {k: (v[0], v[1]) for k, v in curves.items()}


LABELS = {"sim_to_real": "trained on simulator, scored on PBC", "real_to_sim": "trained on PBC, scored on simulator",
          "cv_real": "PBC, 5-fold cross-validated (ceiling)", "sim_to_sim": "simulator, held-out simulation",
          "held_out": "held-out simulated participants"}


def calibration_figure(curves: dict, path, n_bins: int = 8,
                       title: str = "Withdrawal hazard per visit interval: transfer between simulator and PBC trial",
                       xlabel: str = "predicted probability of withdrawing at the next visit") -> list[dict]:
    """Reliability diagram (quantile bins) of every setting in one PNG; return the bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    top, bins = 0.0, []
    for name, (y, p) in curves.items():
        edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
        which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, edges.size - 2)
        mp = np.array([p[which == b].mean() for b in range(edges.size - 1) if (which == b).any()])
        ob = np.array([y[which == b].mean() for b in range(edges.size - 1) if (which == b).any()])
        top = max(top, mp.max(), ob.max())
        ax.plot(mp, ob, "o-", label=LABELS.get(name, name))
        bins += [{"setting": name, "mean_predicted": float(a), "observed": float(b)} for a, b in zip(mp, ob)]
    top = min(1.0, top * 1.1)
    ax.plot([0, top], [0, top], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("observed frequency")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return bins
