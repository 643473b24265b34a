"""Operating characteristics of the safety monitoring rule: detection by interim and false alarms.

Run: python bench/safety_design.py  -> prints a Markdown table, writes bench/results/safety_design.json

Simulated two-arm studies (``inference.safety.MonitoringDesign``: 150 per arm enrolled over 180 days,
looks at days 120, 240 and 360, control rate 0.6 events per person-year, active-arm rate
0.6 · exp(slope · AUC / typical AUC) with log-normal clearance, SD 0.3). A signal is raised at the
first look where P(rate_active > rate_control | data) > 0.99 under the Gamma(0.5, 0.1 person-years)
prior. slope = 0 is the null: the share of studies with any signal is the false-alarm rate, against
the design level of 5 % over all three looks. The exposure–response forecast's 80 % interval is
checked against the events that then happen in the next period.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import describe  # noqa: E402

from inference.safety import MonitoringDesign, operating_characteristics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "safety_design.json"
REPLICATES = 1000
DESIGN_LEVEL = 0.05
SLOPES = (0.0, 0.3, 0.5, 0.8)


def main() -> None:
    rows = []
    for i, slope in enumerate(SLOPES):
        design = MonitoringDesign(slope=slope)
        oc = operating_characteristics(design, REPLICATES, seed=100 + i)
        rows.append({"slope": slope, "rate_ratio_at_typical_exposure": round(float(2.718281828459045 ** slope), 3),
                     "signal_by_interim": [float(v) for v in oc["signal_by_interim"]],
                     "forecast_coverage80": oc["forecast_coverage80"], "forecasts": oc["forecasts"]})
    design = MonitoringDesign()
    header = ("| slope (rate ratio at typical AUC) | signalled by day 120 | by day 240 | by day 360 | "
              "80 % forecast interval coverage |\n|---|---|---|---|---|")
    lines = [header] + [
        f"| {r['slope']:g} (×{r['rate_ratio_at_typical_exposure']:g}){' — null' if r['slope'] == 0 else ''} | "
        + " | ".join(f"{v:.3f}" for v in r["signal_by_interim"]) + f" | {r['forecast_coverage80']:.3f} |"
        for r in rows]
    table = "\n".join(lines)
    false_alarm = rows[0]["signal_by_interim"][-1]
    result = {"machine": describe(["numpy", "scipy"]), "replicates_per_row": REPLICATES,
              "design": {"n_per_arm": design.n_per_arm, "enrollment_days": design.enrollment_days,
                         "interims": list(design.interims), "base_rate_per_person_year": design.base_rate,
                         "cl_sd": design.cl_sd, "threshold": design.threshold, "margin": design.margin,
                         "prior": {"shape": design.prior.shape, "rate": design.prior.rate}},
              "design_level": DESIGN_LEVEL, "false_alarm_rate": false_alarm,
              "false_alarm_within_design_level": false_alarm <= DESIGN_LEVEL, "rows": rows, "table": table}
    print(table)
    print(f"false-alarm rate {false_alarm:.3f} (design level {DESIGN_LEVEL})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
