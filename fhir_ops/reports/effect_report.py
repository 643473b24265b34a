"""The treatment-effect report: a forest plot of every estimate, the love plot of covariate balance,
and the numbers behind both, as one self-contained HTML page (inline SVG, no scripts)."""
from __future__ import annotations

import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)

_LABELS = {"unadjusted": "Unadjusted difference", "ancova": "ANCOVA (baseline covariates)",
           "procova": "PROCOVA (prognostic score)", "external-weighted": "External controls, ATT weights",
           "external-matched": "External controls, caliper matching",
           "hybrid-fixed": "Hybrid control arm (fixed power prior)",
           "hybrid-test-then-pool": "Hybrid control arm (test-then-pool)"}


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def forest_plot(effects, unit: str | None) -> str:
    """Each method's estimate with its 95 % interval, on one axis with the line of no effect."""
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(effects) + 1.0))
    for i, e in enumerate(reversed(effects)):
        ax.plot([e.ci_low, e.ci_high], [i, i], color="#1f5f8b", lw=2)
        ax.plot([e.estimate], [i], "o", color="#1f5f8b")
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(range(len(effects)), [_LABELS.get(e.method, e.method) for e in reversed(effects)])
    ax.set_xlabel(f"Treatment effect (treated − control){f' [{unit}]' if unit else ''}, 95 % CI")
    ax.set_title("Treatment effect by method")
    return _svg(fig)


def love_plot(balance) -> str:
    """Absolute standardized mean differences before and after weighting, with the 0.1 threshold."""
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(balance) + 1.0))
    names = [b.name for b in balance]
    ax.scatter([abs(b.smd_before) for b in balance], names, marker="o", facecolors="none", edgecolors="#b03a2e",
               label="before")
    ax.scatter([abs(b.smd_after) for b in balance], names, marker="o", color="#1f5f8b", label="after")
    ax.axvline(0.1, color="grey", lw=1, ls="--")
    ax.set_xlabel("|Standardized mean difference| (treated vs external controls)")
    ax.set_title("Covariate balance (love plot)")
    ax.legend(loc="lower right")
    return _svg(fig)


def _row(cells) -> str:
    return "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def render_effect_report(study_ref: str, endpoint, treatment_arm: str, control_arm: str, unit: str | None,
                         effects, balance, out: dict) -> str:
    """The whole report as an HTML string (every value escaped)."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Treatment effect report</title>",
        "<style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}svg{max-width:100%;height:auto}</style>",
        "</head><body>",
        f"<h1>Effect of {esc(treatment_arm)} vs {esc(control_arm)}</h1>",
        f"<p>{esc(study_ref)}; endpoint {esc(endpoint.token)} at day {endpoint.day:g} (± {endpoint.window:g} days)"
        f"{f', unit {esc(unit)}' if unit else ''}. Robust (HC3) standard errors.</p>",
        forest_plot(effects, unit),
        "<table><tr><th>method</th><th>estimate</th><th>SE</th><th>95 % CI</th><th>p</th><th>n</th></tr>",
    ]
    parts += [_row([_LABELS.get(e.method, e.method), f"{e.estimate:.4g}", f"{e.se:.3g}",
                    f"{e.ci_low:.4g} to {e.ci_high:.4g}", f"{e.p_value:.3g}", e.n]) for e in effects]
    parts.append("</table>")
    if "rho" in out:
        pm = out["prognosticModel"]
        parts.append(
            f"<h2>Prognostic covariate adjustment</h2><p>ρ = {out['rho']:.3f} between the score and the outcome in "
            f"the control arm: expected variance factor 1 − ρ² = {out['expectedVarianceFactor']:.3f}; observed "
            f"variance reduction {out['varianceReduction']:.1%}; an unadjusted analysis would need "
            f"{out['equivalentSampleSize']:.0f} participants for the same precision.</p>"
            + (f"<p>Prognostic model on {esc(', '.join(pm['covariate']))}, trained on "
               f"{esc(pm['trainedOn']['reference'])}: held-out R² {pm['r2']:.3f}, RMSE {pm['rmse']:.3g}, "
               f"calibration slope {pm['calibrationSlope']:.3f} / intercept {pm['calibrationIntercept']:.3g} "
               f"(n train {pm['nTrain']}, n test {pm['nTest']}).</p>" if pm["nTrain"] else
               f"<p>Scores from the twin model {esc(pm['trainedOn']['reference'])} ({esc(', '.join(pm['covariate']))})"
               f": on the control arm, whose outcomes the scores never saw, R² {pm['r2']:.3f}, RMSE {pm['rmse']:.3g},"
               f" calibration slope {pm['calibrationSlope']:.3f} / intercept {pm['calibrationIntercept']:.3g} "
               f"(n {pm['nTest']}).</p>"))
        if pm.get("outOfRange"):
            parts.append(f"<p><strong>Outside the training range:</strong> {esc('; '.join(pm['outOfRange']))}</p>")
    if balance:
        parts.append("<h2>External controls</h2>")
        parts.append(love_plot(balance))
        parts.append("<table><tr><th>covariate</th><th>SMD before</th><th>SMD after</th>"
                     "<th>variance ratio before</th><th>after</th></tr>")
        parts += [_row([b.name, f"{b.smd_before:.3f}", f"{b.smd_after:.3f}", f"{b.variance_ratio_before:.2f}",
                        f"{b.variance_ratio_after:.2f}"]) for b in balance]
        parts.append(f"</table><p>Effective sample size of the weighted external controls "
                     f"{out['effectiveSampleSize']:.1f}; {out['trimmed']} trimmed; the hybrid arm borrowed "
                     f"{out['borrowedFraction']:.0%} of their weight.</p>")
    parts.append("</body></html>")
    return "".join(parts)
