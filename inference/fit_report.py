"""What a population fit is judged by: predictions (PRED, IPRED), residuals (IWRES, CWRES), shrinkage,
condition number and boundary warnings, a visual predictive check, their plots, and the estimate as a
JSON document that later becomes the prior of a study's twins.

CWRES follow Hooker, Staatz & Karlsson (2007): the model is linearized around each subject's
empirical Bayes estimate, ``E[y] = f(eta_hat) - J eta_hat`` and ``Cov[y] = J Omega J' + R``, and the
residuals are decorrelated with the Cholesky factor of that covariance.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from inference.estimation import PopulationFit
from inference.population import (ObservationData, PopulationModel, Structural, individual_parameters, predict,
                                  residual_variance, simulate_observations, typical_parameters)

__all__ = ["FitDiagnostics", "fit_diagnostics", "visual_predictive_check", "estimate_document", "apply_estimate",
           "gof_png", "vpc_png"]

_H = 1e-4
#: an IIV standard deviation below this (log scale: 1 %) sits on its lower boundary
SD_BOUNDARY = 0.01
CORRELATION_BOUNDARY = 0.99


@dataclass(frozen=True, eq=False)
class FitDiagnostics:
    """Per-row predictions and residuals (``nan`` on dose rows and unobserved rows) and fit summaries."""

    pred: np.ndarray
    ipred: np.ndarray
    iwres: np.ndarray
    cwres: np.ndarray
    eta_shrinkage: Mapping[str, float]
    epsilon_shrinkage: Mapping[int, float]
    condition_number: float | None
    warnings: tuple[str, ...]


def _output(data: ObservationData) -> np.ndarray:
    out = data.design.get("output")
    return np.zeros(data.n_rows, dtype=np.int64) if out is None else np.asarray(out).astype(np.int64)


def fit_diagnostics(fit: PopulationFit, structural: Structural, data: ObservationData) -> FitDiagnostics:
    """Diagnostics of ``fit`` on the data it was fitted to.

    Examples
    --------
    >>> from inference.datasets import load_theoph, ssfol
    >>> from inference.estimation import fit_population
    >>> from inference.population import ResidualError
    >>> start = PopulationModel(("lKe", "lKa", "lCl"), [-2.5, 0.5, -3.0], ("lKa", "lCl"),
    ...     np.diag([0.5, 0.5]) ** 2, ResidualError("additive", additive=1.0))
    >>> data = load_theoph()
    >>> fit = fit_population(start, ssfol, data, standard_errors=False)
    >>> d = fit_diagnostics(fit, ssfol, data)
    >>> bool(abs(np.nanmean(d.cwres)) < 0.3), bool(0.7 < np.nanstd(d.cwres) < 1.3)
    (True, True)
    """
    model = fit.model
    observed = data.observed
    if "evid" in data.design:
        observed = observed & (data.design["evid"] == 0)
    output = _output(data)
    typical = typical_parameters(model, data)
    pred = predict(structural, typical, data)
    phi = individual_parameters(model, fit.eta, data)
    ipred = predict(structural, phi, data)
    err = model.error if len(model.errors) > 1 else model.errors[0]
    out_arg = output if len(model.errors) > 1 else None
    var = residual_variance(err, ipred, out_arg)
    iwres = np.where(observed, (data.value - ipred) / np.sqrt(var), np.nan)
    # Jacobian of the predictions in eta at the EBEs, all subjects per call
    ridx = model.random_index
    jac = np.empty((data.n_rows, ridx.size))
    for k, col in enumerate(ridx):
        up, down = phi.copy(), phi.copy()
        up[:, col] += _H
        down[:, col] -= _H
        jac[:, k] = (predict(structural, up, data) - predict(structural, down, data)) / (2 * _H)
    cwres = np.full(data.n_rows, np.nan)
    for i in range(data.n_subjects):
        rows = np.flatnonzero((data.subject == i) & observed)
        if rows.size == 0:
            continue
        j = jac[rows]
        mean = ipred[rows] - j @ fit.eta[i]
        cov = j @ model.omega @ j.T + np.diag(var[rows])
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            continue
        cwres[rows] = np.linalg.solve(chol, data.value[rows] - mean)
    sd = model.omega_sd
    eta_shrinkage = {name: float(1.0 - np.std(fit.eta[:, k], ddof=1) / sd[k]) if fit.eta.shape[0] > 1 else float("nan")
                     for k, name in enumerate(model.random_effects)}
    eps = {}
    for k in np.unique(output[observed]):
        sel = observed & (output == k)
        eps[int(k)] = float(1.0 - np.std(iwres[sel], ddof=1)) if sel.sum() > 1 else float("nan")
    condition = None
    warnings = []
    if fit.covariance is not None and np.all(np.isfinite(fit.covariance)):
        d = np.sqrt(np.clip(np.diag(fit.covariance), 1e-300, None))
        corr = fit.covariance / np.outer(d, d)
        eig = np.linalg.eigvalsh(0.5 * (corr + corr.T))
        condition = float(eig.max() / eig.min()) if eig.min() > 0 else float("inf")
        if not eig.min() > 0:
            warnings.append("the covariance matrix of the estimates is not positive definite")
    elif fit.covariance is None:
        warnings.append("no standard errors: the covariance step was skipped or failed")
    if not fit.converged:
        warnings.append(f"the fit did not converge ({fit.message})")
    for k, name in enumerate(model.random_effects):
        if sd[k] < SD_BOUNDARY:
            warnings.append(f"the IIV SD of {name} ({sd[k]:.3g}) sits on its lower boundary (0)")
    if model.omega_structure == "full" and model.n_random_effects > 1:
        corr = model.omega / np.outer(sd, sd)
        for a in range(corr.shape[0]):
            for b in range(a + 1, corr.shape[0]):
                if abs(corr[a, b]) > CORRELATION_BOUNDARY:
                    warnings.append(f"the correlation of {model.random_effects[a]} and {model.random_effects[b]} "
                                    f"({corr[a, b]:.3f}) sits on its boundary (+-1)")
    for e_index, e in enumerate(model.errors):
        for part in ("additive", "proportional"):
            value = getattr(e, part)
            if value and value < 1e-4:
                warnings.append(f"the {part} residual error of output {e_index} ({value:.3g}) sits on its lower "
                                "boundary (0)")
    nan = lambda a: np.where(observed, a, np.nan)  # noqa: E731
    return FitDiagnostics(pred=nan(pred), ipred=nan(ipred), iwres=iwres, cwres=cwres, eta_shrinkage=eta_shrinkage,
                          epsilon_shrinkage=eps, condition_number=condition, warnings=tuple(warnings))


def _bins(times: np.ndarray, n_bins: int) -> np.ndarray:
    unique = np.unique(times)
    if unique.size <= n_bins:
        edges = np.concatenate([[-np.inf], 0.5 * (unique[1:] + unique[:-1]), [np.inf]])
    else:
        edges = np.unique(np.quantile(times, np.linspace(0, 1, n_bins + 1)))
        edges[0], edges[-1] = -np.inf, np.inf
    return edges


def visual_predictive_check(fit: PopulationFit, structural: Structural, data: ObservationData, *,
                            replicates: int = 200, seed: int = 0, n_bins: int = 12,
                            level: float = 0.9) -> dict[int, dict[str, np.ndarray]]:
    """Observed and simulated 5th/50th/95th percentiles per time bin and output (percentile VPC).

    The design (doses, times, covariates) is replicated ``replicates`` times and simulated from the
    fitted model; for each simulated percentile the median and a ``level`` interval across
    replicates are returned.

    Returns
    -------
    dict
        ``{output: {"time", "observed" (3, bins), "simulated" (3, 3, bins): percentile x (low, median, high)}}``
    """
    observed = data.observed
    if "evid" in data.design:
        observed = observed & (data.design["evid"] == 0)
    output = _output(data)
    sim_data = data.tile(replicates)
    sim, _ = simulate_observations(fit.model, structural, sim_data, seed=seed)
    sim_values = sim.value.reshape(replicates, data.n_rows)
    tail = (1 - level) / 2
    result = {}
    for k in np.unique(output[observed]):
        rows = observed & (output == k)
        t = data.time[rows]
        edges = _bins(t, n_bins)
        which = np.digitize(t, edges[1:-1])
        bins = np.unique(which)
        obs_q = np.full((3, bins.size), np.nan)
        sim_q = np.full((3, 3, bins.size), np.nan)
        mid = np.empty(bins.size)
        for b_i, b in enumerate(bins):
            in_bin = which == b
            mid[b_i] = np.median(t[in_bin])
            obs_q[:, b_i] = np.quantile(data.value[rows][in_bin], [0.05, 0.5, 0.95])
            per_rep = np.quantile(sim_values[:, rows][:, in_bin], [0.05, 0.5, 0.95], axis=1)  # (3, replicates)
            sim_q[:, :, b_i] = np.quantile(per_rep, [tail, 0.5, 1 - tail], axis=1)
        result[int(k)] = {"time": mid, "observed": obs_q, "simulated": sim_q}
    return result


def estimate_document(fit: PopulationFit, diagnostics: FitDiagnostics, *, parameter_scales: Sequence[str],
                      output_names: Sequence[str]) -> dict[str, Any]:
    """The population estimate as JSON (what is stored, and what :func:`apply_estimate` reads back)."""
    model = fit.model
    se = fit.standard_errors
    fixed = []
    for name, value, scale in zip(model.parameters, model.theta, parameter_scales):
        entry = {"name": name, "scale": scale, "estimate": float(value)}
        if scale == "log":
            entry["natural"] = float(np.exp(value))
        if name in se:
            entry["se"] = se[name]
            # t quantile with subjects - random effects degrees of freedom (see PopulationFit.degrees_of_freedom)
            entry["ci95"] = [float(v) for v in fit.confidence_interval(name)]
        fixed.append(entry)
    effects = [{"name": e.name, "parameter": e.parameter, "covariate": e.covariate, "form": e.form,
                "reference": e.reference, "coefficient": e.coefficient, "estimated": e.estimate,
                **({"se": se[e.name]} if e.name in se else {})} for e in model.covariate_effects]
    sigma = []
    multi = len(model.errors) > 1
    for k, e in enumerate(model.errors):
        entry = {"output": output_names[k], "kind": e.kind}
        for part in ("additive", "proportional"):
            if getattr(e, part):
                entry[part] = getattr(e, part)
                key = f"sigma_{part}" + (f"[{k}]" if multi else "")
                if key in se:
                    entry[f"{part}SE"] = se[key]
        sigma.append(entry)
    return {
        "method": fit.method, "objective": fit.objective, "aic": fit.aic, "bic": fit.bic,
        "converged": fit.converged, "message": fit.message, "iterations": fit.n_iterations,
        "subjects": len(fit.subject_ids), "observations": fit.n_observations,
        "ciDegreesOfFreedom": fit.degrees_of_freedom,
        "fixedEffects": fixed, "covariateEffects": effects,
        "omega": {"parameters": list(model.random_effects), "structure": model.omega_structure,
                  "matrix": model.omega.tolist(),
                  "sd": {n: float(s) for n, s in zip(model.random_effects, model.omega_sd)},
                  "sdSE": {n: se[f"omega_sd({n})"] for n in model.random_effects if f"omega_sd({n})" in se}},
        "sigma": sigma,
        "conditionNumber": diagnostics.condition_number,
        "shrinkage": {"eta": dict(diagnostics.eta_shrinkage),
                      "epsilon": {output_names[k]: v for k, v in diagnostics.epsilon_shrinkage.items()}},
        "warnings": list(diagnostics.warnings),
        "individual": [{"id": sid, "eta": [float(x) for x in fit.eta[i]]} for i, sid in enumerate(fit.subject_ids)],
    }


def apply_estimate(model: PopulationModel, estimate: Mapping[str, Any]) -> PopulationModel:
    """``model`` with the fixed effects, covariate coefficients, Omega and residual errors of a stored estimate.

    Raises
    ------
    ValueError
        When the estimate's parameters are not the model's (a fit of another model).
    """
    names = [f["name"] for f in estimate["fixedEffects"]]
    if tuple(names) != model.parameters or tuple(estimate["omega"]["parameters"]) != model.random_effects:
        raise ValueError("the estimate was fitted with other parameters or random effects than this model")
    coefficients = {e["name"]: e["coefficient"] for e in estimate.get("covariateEffects", [])}
    effects = tuple(e.replace(coefficient=coefficients.get(e.name, e.coefficient)) for e in model.covariate_effects)
    errors = tuple(e.replace(additive=s.get("additive", 0.0), proportional=s.get("proportional", 0.0))
                   for e, s in zip(model.errors, estimate["sigma"]))
    return model.replace(theta=[f["estimate"] for f in estimate["fixedEffects"]], covariate_effects=effects,
                         omega=np.array(estimate["omega"]["matrix"]), error=errors if len(errors) > 1 else errors[0])


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def gof_png(data: ObservationData, diagnostics: FitDiagnostics, output_names: Sequence[str],
            output_units: Sequence[str], time_unit: str) -> bytes:
    """Goodness-of-fit plots, one row per output: observed vs PRED, observed vs IPRED, CWRES vs time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = _output(data)
    present = [k for k in range(len(output_names)) if np.any(np.isfinite(diagnostics.pred[output == k]))]
    fig, axes = plt.subplots(len(present), 3, figsize=(12, 3.6 * len(present)), squeeze=False)
    for row, k in enumerate(present):
        sel = (output == k) & np.isfinite(diagnostics.pred)
        y = data.value[sel]
        for col, (pred, label) in enumerate(((diagnostics.pred[sel], "PRED"), (diagnostics.ipred[sel], "IPRED"))):
            ax = axes[row, col]
            ax.scatter(pred, y, s=12, alpha=0.7)
            lim = [min(pred.min(), y.min()), max(pred.max(), y.max())]
            ax.plot(lim, lim, "k--", lw=1)
            ax.set_xlabel(f"{label} ({output_units[k]})")
            ax.set_ylabel(f"observed {output_names[k]} ({output_units[k]})")
            ax.set_title(f"{output_names[k]}: observed vs {label}")
        ax = axes[row, 2]
        ax.scatter(data.time[sel], diagnostics.cwres[sel], s=12, alpha=0.7)
        ax.axhline(0, color="k", lw=1)
        for z in (-2, 2):
            ax.axhline(z, color="k", lw=0.5, ls=":")
        ax.set_xlabel(f"time ({time_unit})")
        ax.set_ylabel("CWRES")
        ax.set_title(f"{output_names[k]}: CWRES vs time")
    fig.tight_layout()
    return _png(fig)


def vpc_png(vpc: Mapping[int, Mapping[str, np.ndarray]], data: ObservationData, output_names: Sequence[str],
            output_units: Sequence[str], time_unit: str) -> bytes:
    """Percentile VPC: observed points and percentiles over the simulated percentiles' intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = _output(data)
    keys = sorted(vpc)
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    observed = data.observed & ((data.design["evid"] == 0) if "evid" in data.design else True)
    for col, k in enumerate(keys):
        ax = axes[0, col]
        v = vpc[k]
        sel = observed & (output == k)
        ax.scatter(data.time[sel], data.value[sel], s=8, color="0.5", alpha=0.6, label="observed")
        for p, color in zip(range(3), ("tab:blue", "tab:red", "tab:blue")):
            ax.fill_between(v["time"], v["simulated"][p, 0], v["simulated"][p, 2], color=color, alpha=0.2)
            ax.plot(v["time"], v["observed"][p], color=color, lw=1.5)
        ax.set_xlabel(f"time ({time_unit})")
        ax.set_ylabel(f"{output_names[k]} ({output_units[k]})")
        ax.set_title(f"VPC {output_names[k]}: 5th/50th/95th percentiles")
    fig.tight_layout()
    return _png(fig)
