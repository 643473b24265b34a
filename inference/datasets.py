"""Public reference data sets shipped with the engine, and the structural models they are fitted with.

Used to check estimation against published fits (e.g. nlme on the Theophylline data).
"""
from __future__ import annotations

import csv
from importlib import resources

import numpy as np

from inference.population import ObservationData

__all__ = ["load_indometh", "load_theoph", "ssbiexp", "ssfol"]


def load_theoph() -> ObservationData:
    """The Theophylline pharmacokinetic data, R ``datasets::Theoph``.

    Twelve subjects each received one oral dose of theophylline (mg/kg); serum concentrations
    (mg/L) were measured at 11 times over 25 hours (132 rows). Source: the public R
    ``datasets`` package; originally Boeckmann, Sheiner & Beal (1994), NONMEM Users Guide
    Part V; analysed in Pinheiro & Bates (2000), *Mixed-Effects Models in S and S-PLUS*.
    The shipped CSV was transcribed from two independent public copies that agree row for
    row (see the file header).

    Returns
    -------
    ObservationData
        ``time`` in hours, ``value`` = concentration (mg/L), ``design["dose"]`` (mg/kg, per
        row), covariate ``weight`` (kg); subjects keep their original numbers as ids, in the
        file's order (1 .. 12).

    Examples
    --------
    >>> theoph = load_theoph()
    >>> theoph.n_subjects, theoph.n_rows
    (12, 132)
    >>> theoph.subject_ids[0], float(theoph.covariates["weight"][0]), float(theoph.design["dose"][0])
    ('1', 79.6, 4.02)
    >>> theoph.time[:2].tolist(), theoph.value[:2].tolist()
    ([0.0, 0.25], [0.74, 2.84])
    """
    text = resources.files("inference").joinpath("data/theoph.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    ids: list[str] = []
    for row in rows:
        if row["Subject"] not in ids:
            ids.append(row["Subject"])
    subject = np.array([ids.index(row["Subject"]) for row in rows], dtype=np.int64)
    weight = np.array([next(float(r["Wt"]) for r in rows if r["Subject"] == s) for s in ids])
    return ObservationData(
        subject=subject,
        time=np.array([float(r["Time"]) for r in rows]),
        value=np.array([float(r["conc"]) for r in rows]),
        subject_ids=tuple(ids),
        covariates={"weight": weight},
        design={"dose": np.array([float(r["Dose"]) for r in rows])},
    )


def load_indometh() -> ObservationData:
    """The indomethacin pharmacokinetic data, R ``datasets::Indometh``.

    Six subjects each received one intravenous bolus of indomethacin; plasma concentrations
    (mcg/mL) were measured at 11 times over 8 hours (66 rows). Source: the public R ``datasets``
    package (exported from R 4.2.2); originally Kwan et al. (1976); fitted with ``SSbiexp`` in
    Pinheiro & Bates (2000), ch. 6. ``bench/population_bench.py`` fits it against R nlme.

    Returns
    -------
    ObservationData
        ``time`` in hours, ``value`` = concentration (mcg/mL); subjects keep their numbers as ids,
        in the file's order (1 .. 6).

    Examples
    --------
    >>> indometh = load_indometh()
    >>> indometh.n_subjects, indometh.n_rows, indometh.subject_ids[:2]
    (6, 66, ('1', '2'))
    >>> indometh.time[:2].tolist(), indometh.value[:2].tolist()
    ([0.25, 0.5], [1.5, 0.94])
    """
    text = resources.files("inference").joinpath("data/indometh.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    ids = list(dict.fromkeys(row["Subject"] for row in rows))
    return ObservationData(
        subject=np.array([ids.index(row["Subject"]) for row in rows], dtype=np.int64),
        time=np.array([float(row["time"]) for row in rows]),
        value=np.array([float(row["conc"]) for row in rows]),
        subject_ids=tuple(ids),
    )


def ssfol(phi: np.ndarray, data: ObservationData) -> np.ndarray:
    """One-compartment model with first-order absorption and elimination, nlme's ``SSfol``.

    ``C(t) = Dose exp(lKe + lKa - lCl) (exp(-exp(lKe) t) - exp(-exp(lKa) t)) / (exp(lKa) - exp(lKe))``
    with ``phi`` columns ``(lKe, lKa, lCl)`` (log elimination rate 1/h, log absorption rate 1/h,
    log clearance per kg), the dose per row in ``data.design["dose"]`` and time since the dose
    in ``data.time``.

    Parameters
    ----------
    phi : ndarray, shape (data.n_subjects, 3)
    data : ObservationData

    Returns
    -------
    ndarray, shape (data.n_rows,)

    Examples
    --------
    >>> data = ObservationData.single([0.0, 1.0], [np.nan, np.nan], design={"dose": [4.0, 4.0]})
    >>> np.round(ssfol(np.array([[-2.45, 0.47, -3.23]]), data), 3).tolist()
    [0.0, 6.599]
    """
    p = phi[data.subject]
    lke, lka, lcl = p[:, 0], p[:, 1], p[:, 2]
    ke, ka = np.exp(lke), np.exp(lka)
    t = data.time
    return data.design["dose"] * np.exp(lke + lka - lcl) * (np.exp(-ke * t) - np.exp(-ka * t)) / (ka - ke)


def ssbiexp(phi: np.ndarray, data: ObservationData) -> np.ndarray:
    """Biexponential decline, nlme's ``SSbiexp`` (e.g. R ``datasets::Indometh``).

    ``C(t) = A1 exp(-exp(lrc1) t) + A2 exp(-exp(lrc2) t)`` with ``phi`` columns
    ``(A1, lrc1, A2, lrc2)``: the amplitudes on their own (linear) scale, as in nlme, and the log
    rate constants (1/h).

    Parameters
    ----------
    phi : ndarray, shape (data.n_subjects, 4)
    data : ObservationData

    Returns
    -------
    ndarray, shape (data.n_rows,)

    Examples
    --------
    >>> data = ObservationData.single([0.0, 1.0], [np.nan, np.nan])
    >>> np.round(ssbiexp(np.array([[2.0, 0.0, 0.5, -2.0]]), data), 4).tolist()
    [2.5, 1.1725]
    """
    # rate constants per subject, then gathered per row: two row-length exponentials instead of
    # four and no (rows, 4) copy (a fit calls this ~100 times on small data: 39 -> 28 us a call)
    sub, t = data.subject, data.time
    rate = np.exp(phi[:, 1::2])
    return phi[sub, 0] * np.exp(-rate[sub, 0] * t) + phi[sub, 2] * np.exp(-rate[sub, 1] * t)
