"""Unit tests of the clinician app's readers and plots: Parameters shaped by the $simulate OperationDefinition
(built with the project's own output builder), dropout-risk RiskAssessments, the SVG the pages embed.
"""
from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import profiles
from fhir_ops import parameters
from smart_app.clinician import RISK_DRIVER, age_on, parse_forecast, parse_risk
from smart_app.plots import cohort_svg, forecast_svg

pytestmark = pytest.mark.unit

START = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.timezone.utc)


def simulate_result(days: int = 14, shift: float = 0.0) -> dict:
    """A Patient $simulate answer as the OperationDefinition shapes it (values from a simple decay, seeded)."""
    rng = np.random.default_rng(3)
    forecast, observed = [], []
    for output, level, unit in (("hba1c", 8.0, "%"), ("fpg", 160.0, "mg/dL"), ("concentration", 1.2, "mg/L")):
        for day in range(days + 1):
            median = level * (1 - 0.01 * day) + shift
            forecast.append({"output": output, "time": (START + dt.timedelta(days=day)).isoformat(), "day": float(day),
                             "median": median, "low": median * 0.9, "high": median * 1.1, "unit": unit})
        for back in (-30, -10, -2):
            observed.append({"output": output, "time": (START + dt.timedelta(days=back)).isoformat(),
                             "value": float(level * (1 + 0.02 * rng.standard_normal()))})
    definition = profiles.load("OperationDefinition-simulate.json")
    return parameters.build_output(definition, {"forecast": forecast, "observed": observed,
                                                "modelVersion": "tt201-twin 1.0.0"})


def test_forecast_is_read_per_output_with_observed_days_before_the_start():
    fc = parse_forecast(simulate_result())
    assert set(fc.series) == {"hba1c", "fpg", "concentration"}
    assert fc.series["hba1c"]["day"] == [float(d) for d in range(15)]
    assert fc.series["hba1c"]["median"][0] == pytest.approx(8.0)
    assert fc.units == {"hba1c": "%", "fpg": "mg/dL", "concentration": "mg/L"}
    assert [round(d) for d, _ in fc.observed["fpg"]] == [-30, -10, -2]
    assert fc.start == START and fc.model_version == "tt201-twin 1.0.0"


def test_forecast_svg_has_band_median_observed_and_scenario():
    baseline, scenario = parse_forecast(simulate_result()), parse_forecast(simulate_result(shift=-0.5))
    svg = forecast_svg(baseline, scenario)
    root = ET.fromstring(svg)
    ids = {el.get("id") for el in root.iter() if el.get("id")}
    for output in ("hba1c", "fpg", "concentration"):
        assert {f"forecast-band-{output}", f"forecast-median-{output}", f"observed-{output}",
                f"scenario-band-{output}"} <= ids
    assert root.get("role") == "img" and "prediction intervals" in root.get("aria-label")
    assert "href=\"http" not in svg and "url(http" not in svg  # nothing fetched at render time
    only_baseline = forecast_svg(baseline)
    assert "scenario-band-hba1c" not in only_baseline
    assert forecast_svg(baseline) == only_baseline  # deterministic output (fixed hash salt, no date)


def test_cohort_svg_draws_one_band_per_arm():
    series = {"hba1c": {arm: {"day": [0.0, 7.0, 14.0], "median": [8, 7.8, 7.6], "low": [7, 6.9, 6.8],
                              "high": [9, 8.7, 8.4]} for arm in ("placebo", "50 mg", "100 mg")}}
    svg = cohort_svg(series, {"hba1c": "%"})
    assert all(f'id="arm-band-hba1c-{i}"' in svg for i in range(3)) and "50 mg" in svg


def test_risk_reads_predictions_and_orders_drivers_by_size():
    resource = {"resourceType": "RiskAssessment", "id": "ra1", "occurrenceDateTime": "2026-03-02T08:00:00Z",
                "prediction": [{"outcome": {"text": "Misses the next visit"}, "probabilityDecimal": 0.83}],
                "extension": [{"url": RISK_DRIVER, "extension": [
                    {"url": "feature", "valueCode": f}, {"url": "value", "valueDecimal": v},
                    {"url": "contribution", "valueDecimal": c}]} for f, v, c in
                    (("missed_doses_14d", 5.0, 0.4), ("travel_km", 80.0, 1.2), ("age", 61.0, -0.7))]}
    risk = parse_risk(resource)
    assert risk.predictions == [("Misses the next visit", 0.83)]
    assert [d[0] for d in risk.drivers] == ["travel_km", "age", "missed_doses_14d"]


def test_age_in_completed_years():
    assert age_on("1960-06-15", dt.date(2026, 6, 14)) == 65
    assert age_on("1960", dt.date(2026, 1, 1)) == 66
    assert age_on(None, dt.date(2026, 1, 1)) is None
