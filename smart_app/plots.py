"""Server-side SVG plots for the clinician app (matplotlib, no browser scripts, no external assets).

One small figure per output, so the page can wrap them on a narrow screen: forecast bands on calendar dates with
the observed points and a what-if overlay; per-arm bands of a study simulation from randomization, on the calendar
dates of the first randomization.
"""
from __future__ import annotations

import io
import re
import threading
from datetime import timedelta
from html import escape

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

# pyplot keeps global state; one figure at a time across the server's threads.
_LOCK = threading.Lock()
_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "trialtwin", "font.size": 10, "axes.spines.top": False,
          "axes.spines.right": False, "axes.titlesize": 11, "legend.fontsize": 9}
#: one panel's size in inches; about 420 px wide, so at 400 px the text keeps close to its nominal size
PANEL = (4.4, 3.1)
BASELINE, SCENARIO, OBSERVED, MARKER = "#1f5fa8", "#c2571a", "#222222", "#888888"
ARM_COLOURS = ("#6b6b6b", "#1f5fa8", "#2e8b57", "#c2571a", "#7b3fa0")


def _svg(fig, title: str) -> str:
    """The figure as an inline ``<svg>`` that scales with its container (viewBox kept, fixed size dropped)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]  # inline in HTML: no XML prolog or DOCTYPE
    head_end = text.index(">")
    head = re.sub(r'\s(width|height)="[^"]*"', "", text[:head_end])
    # An accessible name for the figure as a whole (screen readers announce role=img with its label).
    head = head.replace("<svg ", f'<svg role="img" aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet" ', 1)
    return head + text[head_end:]


def axis_label(label: str, unit: str | None) -> str:
    """``label (unit)``, or the label alone for a dimensionless quantity.

    Examples
    --------
    >>> axis_label("HbA1c", "%"), axis_label("Count", "1")
    ('HbA1c (%)', 'Count')
    """
    return f"{label} ({unit})" if unit and unit != "1" else label


def _date_axis(ax, first, last) -> None:
    """Calendar dates as ``20 Oct``, at most five ticks; the year(s) go in the axis label, not in a tick.
    A span of under three days is labelled by the hour (``06:00``), its date(s) in the axis label."""
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=5))
    if last - first < timedelta(days=3):
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        days = (f"{first.day} {first:%b %Y}" if first.date() == last.date()
                else f"{first.day} {first:%b} – {last.day} {last:%b %Y}")
        ax.set_xlabel(f"time ({days}, UTC)")
        return
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%-d %b"))
    years = f"{first.year}" if first.year == last.year else f"{first.year}–{last.year}"
    ax.set_xlabel(f"date ({years}, UTC)")


def forecast_panels(baseline, scenario=None, level: float = 0.9, last_dose=None) -> list[dict]:
    """One figure per output of the forecast: band + median, observed points, the what-if scenario overlaid.

    Parameters
    ----------
    baseline, scenario : smart_app.clinician.Forecast
        ``scenario`` may be None. Outputs, their labels and units come from the forecast (the server).
    level : float
        Nominal coverage of the intervals, for the legend.
    last_dose : datetime, optional
        Marked on the time axis (participants who receive no more doses).

    Returns
    -------
    list of dict
        ``{"output", "label", "unit", "svg"}`` per output; in each ``<svg>`` the band carries
        ``id="forecast-band-<output>"``, the observed points ``id="observed-<output>"`` and the scenario
        ``id="scenario-band-<output>"``.
    """
    panels = []
    for out in baseline.outputs:
        s = baseline.series[out]
        label, unit = baseline.labels.get(out, out), baseline.units.get(out) or ""
        with _LOCK, plt.rc_context(_STYLE):
            fig, ax = plt.subplots(figsize=PANEL)
            band = ax.fill_between(s["time"], s["low"], s["high"], color=BASELINE, alpha=0.22, linewidth=0,
                                   label=f"{level:.0%} prediction interval")
            band.set_gid(f"forecast-band-{out}")
            line, = ax.plot(s["time"], s["median"], color=BASELINE, linewidth=1.8, label="median forecast")
            line.set_gid(f"forecast-median-{out}")
            if scenario is not None and out in scenario.series:
                w = scenario.series[out]
                sband = ax.fill_between(w["time"], w["low"], w["high"], color=SCENARIO, alpha=0.18, linewidth=0,
                                        label="what-if interval")
                sband.set_gid(f"scenario-band-{out}")
                sline, = ax.plot(w["time"], w["median"], color=SCENARIO, linewidth=1.8, linestyle="--",
                                 label="what-if median")
                sline.set_gid(f"scenario-median-{out}")
            start, end = s["time"][0], s["time"][-1]
            # Recent history only (three horizons back): older points would squeeze the forecast.
            earliest = start - 3 * (end - start)
            points = [(t, v) for t, v in baseline.observed.get(out) or [] if t >= earliest]
            if points:
                dots = ax.scatter([p[0] for p in points], [p[1] for p in points], s=16, color=OBSERVED, zorder=3,
                                  label="observed")
                dots.set_gid(f"observed-{out}")
            ax.axvline(start, color=MARKER, linewidth=0.9, linestyle=":", label="forecast start")
            if last_dose is not None and last_dose >= earliest:
                ax.axvline(last_dose, color=SCENARIO, linewidth=0.9, linestyle="-.", label="last dose")
            left = min([start] + [p[0] for p in points] + ([last_dose] if last_dose is not None and last_dose >= earliest else []))
            pad = (end - left) * 0.03
            ax.set_xlim(left - pad, end + pad)
            _date_axis(ax, left, end)
            ax.set_title(label, loc="left")
            ax.set_ylabel(unit if unit and unit != "1" else "value")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
            fig.tight_layout()
            title = (f"{label} ({unit}) forecast by date with the {level:.0%} prediction interval"
                     + (" and observed values" if points else "") + (" and the what-if scenario" if scenario else ""))
            panels.append({"output": out, "label": label, "unit": unit, "svg": _svg(fig, title)})
    return panels


def cohort_panels(cohort) -> list[dict]:
    """Per-arm median and spread across participants, one figure per output (arms in the study's order).

    Parameters
    ----------
    cohort : smart_app.clinician.Cohort
        ``arm_series`` (each arm's ``time``: calendar datetimes), ``labels``, ``units``, ``arms`` (the study's
        order), ``level``.

    Returns
    -------
    list of dict
        ``{"output", "label", "unit", "svg"}``; arm ``i``'s band carries ``id="arm-band-<output>-<i>"``.
    """
    panels = []
    rank = {arm: i for i, arm in enumerate(cohort.arms)}
    for out, by_arm in cohort.arm_series.items():
        label, unit = cohort.labels.get(out, out), cohort.units.get(out) or ""
        arms = sorted(by_arm.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
        with _LOCK, plt.rc_context(_STYLE):
            fig, ax = plt.subplots(figsize=PANEL)
            for i, (arm, s) in enumerate(arms):
                colour = ARM_COLOURS[i % len(ARM_COLOURS)]
                band = ax.fill_between(s["time"], s["low"], s["high"], color=colour, alpha=0.15, linewidth=0)
                band.set_gid(f"arm-band-{out}-{i}")
                ax.plot(s["time"], s["median"], color=colour, linewidth=1.6, label=arm)
            first = min(s["time"][0] for _, s in arms)
            last = max(s["time"][-1] for _, s in arms)
            _date_axis(ax, first, last)
            ax.set_title(label, loc="left")
            ax.set_ylabel(unit if unit and unit != "1" else "value")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(3, len(arms)), frameon=False)
            fig.tight_layout()
            panels.append({"output": out, "label": label, "unit": unit, "svg": _svg(
                fig, f"Simulated {axis_label(label, unit)} by arm and date from randomization on "
                     f"{first.day} {first:%b %Y}: median and the {cohort.level:.0%} range across participants")})
    return panels


def enrollment_panel(enrollment) -> str:
    """The enrollment curve: observed cumulative randomized by date, the forecast's expected line and its
    80 % and 95 % predictive bands, and the target.

    Parameters
    ----------
    enrollment : smart_app.study_results.Enrollment
        ``observed`` (date, count) steps, ``curve`` (weekly forecast), ``target``, ``time_to_target``.

    Returns
    -------
    str
        An inline ``<svg>``; the observed steps carry ``id="enrollment-observed"``, the expected line
        ``id="enrollment-expected"``, the bands ``id="enrollment-band-80"`` / ``id="enrollment-band-95"``.
    """
    import datetime as dt

    c = enrollment.curve
    dates = list(c["date"])
    # Show the forecast up to a little past the late end of the 95 % interval (the server looks two years ahead).
    late = enrollment.time_to_target.get("high95")
    keep = len(dates)
    if late is not None:
        keep = next((i + 2 for i, d in enumerate(dates) if d >= late), len(dates))
    keep = max(2, min(keep, len(dates)))

    def cut(key):
        return c[key][:keep]

    with _LOCK, plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=PANEL)
        shown = dates[:keep]
        b95 = ax.fill_between(shown, cut("low95"), cut("high95"), color=BASELINE, alpha=0.12, linewidth=0,
                              label="95% prediction interval")
        b95.set_gid("enrollment-band-95")
        b80 = ax.fill_between(shown, cut("low80"), cut("high80"), color=BASELINE, alpha=0.25, linewidth=0,
                              label="80% prediction interval")
        b80.set_gid("enrollment-band-80")
        line, = ax.plot(shown, cut("expected"), color=BASELINE, linewidth=1.8, label="expected (forecast)")
        line.set_gid("enrollment-expected")
        first = shown[0]
        if enrollment.observed:
            days = [d for d, _ in enrollment.observed]
            counts = [n for _, n in enrollment.observed]
            # a step per randomization date, continued flat to the data cut
            end = enrollment.as_of or days[-1]
            steps, = ax.step(days + [end], counts + [counts[-1]], where="post", color=OBSERVED, linewidth=1.6,
                             label="observed")
            steps.set_gid("enrollment-observed")
            first = min(first, days[0])
        if enrollment.target:
            ax.axhline(enrollment.target, color=SCENARIO, linewidth=1.0, linestyle="--",
                       label=f"target ({enrollment.target})")
        last = shown[-1]
        pad = (last - first) * 0.03 if last > first else dt.timedelta(days=1)
        ax.set_xlim(first - pad, last + pad)
        ax.set_ylim(bottom=0)
        _date_axis(ax, first, last)
        ax.set_xlabel(ax.get_xlabel().replace(", UTC", ""))  # whole calendar days
        ax.set_ylabel("participants randomized")
        ax.set_title("Enrollment", loc="left")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
        fig.tight_layout()
        return _svg(fig, f"Participants randomized by date: observed, and the forecast's expected count with its "
                         f"80% and 95% prediction intervals, up to the target of {enrollment.target}")
