"""Server-side SVG plots for the clinician app (matplotlib, no browser scripts, no external assets).

Forecast bands (median and prediction interval), observed points, a what-if overlay, and per-arm cohort bands.
"""
from __future__ import annotations

import io
import re
import threading

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from .clinician import OUTPUT_LABELS  # noqa: E402

# pyplot keeps global state; one figure at a time across the server's threads.
_LOCK = threading.Lock()
_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "trialtwin", "font.size": 9, "axes.spines.top": False,
          "axes.spines.right": False}
BASELINE, SCENARIO, OBSERVED = "#1f5fa8", "#c2571a", "#222222"
ARM_COLOURS = ("#6b6b6b", "#1f5fa8", "#2e8b57", "#c2571a", "#7b3fa0")


def _svg(fig, title: str) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]  # inline in HTML: no XML prolog or DOCTYPE
    # An accessible name for the figure as a whole (screen readers announce role=img with its label).
    return re.sub(r"<svg ", f'<svg role="img" aria-label="{title}" ', text, count=1)


def forecast_svg(baseline, scenario=None, outputs=("hba1c", "fpg", "concentration"), level: float = 0.9) -> str:
    """One panel per output: baseline band + median, observed points, and the what-if scenario overlaid.

    Parameters
    ----------
    baseline, scenario : smart_app.clinician.Forecast
        ``scenario`` may be None.
    outputs : sequence of str
        Outputs to draw, in order; those the forecast lacks are skipped.
    level : float
        Nominal coverage of the intervals, for the legend.

    Returns
    -------
    str
        An ``<svg>`` element; the band carries ``id="forecast-band-<output>"``, the observed points
        ``id="observed-<output>"`` and the scenario ``id="scenario-band-<output>"``.
    """
    shown = [o for o in outputs if o in baseline.series]
    if not shown:
        return ""
    with _LOCK, plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.0), squeeze=False)
        for ax, out in zip(axes[0], shown):
            s = baseline.series[out]
            band = ax.fill_between(s["day"], s["low"], s["high"], color=BASELINE, alpha=0.22, linewidth=0,
                                   label=f"{level:.0%} interval")
            band.set_gid(f"forecast-band-{out}")
            line, = ax.plot(s["day"], s["median"], color=BASELINE, linewidth=1.8, label="median forecast")
            line.set_gid(f"forecast-median-{out}")
            if scenario is not None and out in scenario.series:
                w = scenario.series[out]
                sband = ax.fill_between(w["day"], w["low"], w["high"], color=SCENARIO, alpha=0.18, linewidth=0,
                                        label="what-if interval")
                sband.set_gid(f"scenario-band-{out}")
                sline, = ax.plot(w["day"], w["median"], color=SCENARIO, linewidth=1.8, linestyle="--",
                                 label="what-if median")
                sline.set_gid(f"scenario-median-{out}")
            points = baseline.observed.get(out) or []
            if points:
                dots = ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, color=OBSERVED, zorder=3,
                                  label="observed")
                dots.set_gid(f"observed-{out}")
            ax.axvline(0, color="#999999", linewidth=0.8, linestyle=":")
            # Recent history only (three horizons back): older points would squeeze the forecast.
            horizon = max(s["day"]) if s["day"] else 28.0
            left = min([p[0] for p in points if p[0] >= -3 * horizon] or [0.0])
            ax.set_xlim(left - 0.03 * (horizon - left), horizon + 0.03 * (horizon - left))
            unit = baseline.units.get(out) or ""
            ax.set_title(OUTPUT_LABELS.get(out, out), loc="left", fontsize=10)
            ax.set_xlabel("days from the forecast start")
            ax.set_ylabel(unit)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.tight_layout()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(labels), fontsize=8,
                   frameon=False)
        return _svg(fig, "Forecast of " + ", ".join(OUTPUT_LABELS.get(o, o) for o in shown)
                    + " with prediction intervals and observed values")


def cohort_svg(arm_series: dict, units: dict | None = None, outputs=("hba1c", "fpg", "concentration"),
               arm_order=()) -> str:
    """Per-arm median and spread across participants, one panel per output (arms in ``arm_order`` first)."""
    shown = [o for o in outputs if o in arm_series]
    if not shown:
        return ""
    with _LOCK, plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.0), squeeze=False)
        for ax, out in zip(axes[0], shown):
            rank = {arm: i for i, arm in enumerate(arm_order)}
            arms = sorted(arm_series[out].items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
            for i, (arm, s) in enumerate(arms):
                colour = ARM_COLOURS[i % len(ARM_COLOURS)]
                band = ax.fill_between(s["day"], s["low"], s["high"], color=colour, alpha=0.15, linewidth=0)
                band.set_gid(f"arm-band-{out}-{i}")
                ax.plot(s["day"], s["median"], color=colour, linewidth=1.6, label=arm)
            ax.set_title(OUTPUT_LABELS.get(out, out), loc="left", fontsize=10)
            ax.set_xlabel("days from the forecast start")
            ax.set_ylabel((units or {}).get(out, ""))
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.tight_layout()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(labels), fontsize=8,
                   frameon=False)
        return _svg(fig, "Per-arm forecast of the study population")
