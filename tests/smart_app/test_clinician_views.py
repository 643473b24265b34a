"""Unit tests of the clinician app's readers and plots: Parameters shaped by the $simulate OperationDefinition
(built with the project's own output builder), dropout-risk RiskAssessments, the SVG the pages embed.
"""
from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import profiles
from fhir_ops import parameters
from smart_app.app import calendar_date
from smart_app.clinician import RISK_DRIVER, Cohort, age_on, parse_forecast, parse_risk
from smart_app.plots import cohort_panels, forecast_panels

pytestmark = pytest.mark.unit

START = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.timezone.utc)
#: outputs of a model that is not the demo's: the app must draw whatever the server says it forecast
OUTPUTS = (("tumour-size", 42.0, "mm", "Sum of longest diameters"), ("adas-cog", 20.0, "{score}", "ADAS-Cog 11"),
           ("conc", 1.2, "mg/L", "Theophylline concentration"))


def simulate_result(days: int = 14, shift: float = 0.0, outputs=OUTPUTS) -> dict:
    """A Patient $simulate answer as the OperationDefinition shapes it (values from a simple decay, seeded)."""
    rng = np.random.default_rng(3)
    forecast, observed = [], []
    for output, level, unit, display in outputs:
        for day in range(days + 1):
            median = level * (1 - 0.01 * day) + shift
            forecast.append({"output": output, "time": (START + dt.timedelta(days=day)).isoformat(), "day": float(day),
                             "median": median, "low": median * 0.9, "high": median * 1.1, "unit": unit,
                             "display": display})
        for back in (-30, -10, -2):
            observed.append({"output": output, "time": (START + dt.timedelta(days=back)).isoformat(),
                             "value": float(level * (1 + 0.02 * rng.standard_normal()))})
    definition = profiles.load("OperationDefinition-simulate.json")
    return parameters.build_output(definition, {"forecast": forecast, "observed": observed,
                                                "modelVersion": "oncology-tgi 1.0.0"})


def test_forecast_is_read_per_output_with_labels_units_and_dates_from_the_server():
    fc = parse_forecast(simulate_result())
    assert fc.outputs == ["tumour-size", "adas-cog", "conc"]  # the server's outputs, in its order
    assert fc.labels == {"tumour-size": "Sum of longest diameters", "adas-cog": "ADAS-Cog 11",
                         "conc": "Theophylline concentration"}
    assert fc.units == {"tumour-size": "mm", "adas-cog": "{score}", "conc": "mg/L"}
    assert fc.series["conc"]["day"] == [float(d) for d in range(15)]
    assert fc.series["conc"]["time"][0] == START and fc.series["conc"]["time"][-1] == START + dt.timedelta(days=14)
    assert [t for t, _ in fc.observed["conc"]] == [START + dt.timedelta(days=d) for d in (-30, -10, -2)]
    assert fc.start == START and fc.model_version == "oncology-tgi 1.0.0"


def test_a_row_without_display_is_labelled_by_its_code():
    result = simulate_result()
    for p in result["parameter"]:
        p["part"] = [part for part in p.get("part", []) if part["name"] != "display"]
    assert parse_forecast(result).labels["conc"] == "conc"


def _root(svg: str):
    return ET.fromstring(svg)


def test_forecast_panels_one_responsive_svg_per_output_on_calendar_dates():
    baseline, scenario = parse_forecast(simulate_result()), parse_forecast(simulate_result(shift=-0.5))
    panels = forecast_panels(baseline, scenario)
    assert [p["output"] for p in panels] == ["tumour-size", "adas-cog", "conc"]
    for p in panels:
        root = _root(p["svg"])
        ids = {el.get("id") for el in root.iter() if el.get("id")}
        out = p["output"]
        assert {f"forecast-band-{out}", f"forecast-median-{out}", f"observed-{out}", f"scenario-band-{out}"} <= ids
        # scales with its container: a viewBox and no fixed size
        assert root.get("viewBox") and root.get("width") is None and root.get("height") is None
        assert root.get("role") == "img" and p["label"] in root.get("aria-label")
        text = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
        assert p["label"] in text and p["unit"] in text  # title and y-axis unit
        assert "date (2026, UTC)" in text and re.search(r"\b\d{1,2} (Jan|Feb|Mar)\b", text)  # calendar ticks
        assert "days from" not in text
        assert 'href="http' not in p["svg"] and "url(http" not in p["svg"]  # nothing fetched at render time
    only_baseline = forecast_panels(baseline)
    assert "scenario-band-conc" not in only_baseline[2]["svg"]
    assert forecast_panels(baseline) == only_baseline  # deterministic output (fixed hash salt, no date)


def test_last_dose_is_marked_for_a_participant_without_further_doses():
    baseline = parse_forecast(simulate_result())
    marked = forecast_panels(baseline, last_dose=START - dt.timedelta(days=1))[0]["svg"]
    assert "last dose" in marked and "last dose" not in forecast_panels(baseline)[0]["svg"]


def test_cohort_panels_one_band_per_arm_with_units_on_calendar_dates():
    cohort = Cohort("s1", arms=["control", "low", "high"], labels={"size": "Tumour size"}, units={"size": "mm"})
    day0 = dt.datetime(2026, 3, 2, 8, tzinfo=dt.timezone.utc)
    days = [0.0, 21.0, 42.0, 63.0, 84.0]
    cohort.arm_series = {"size": {arm: {"day": days, "time": [day0 + dt.timedelta(days=d) for d in days],
                                        "median": [8, 7.8, 7.6, 7.5, 7.4], "low": [7, 6.9, 6.8, 6.7, 6.6],
                                        "high": [9, 8.7, 8.4, 8.3, 8.2]} for arm in ("high", "control", "low")}}
    [panel] = cohort_panels(cohort)
    svg = panel["svg"]
    assert all(f'id="arm-band-size-{i}"' in svg for i in range(3))
    text = " ".join(t.text or "" for t in _root(svg).iter() if t.tag.endswith("text"))
    assert "Tumour size" in text and "mm" in text and "date (2026, UTC)" in text
    assert "days since randomization" not in text
    assert re.search(r"\b\d{1,2} (Mar|Apr|May)\b", text)  # calendar ticks such as '16 Mar'
    assert text.index("control") < text.index("low") < text.index("high")  # the study's arm order
    assert 'aria-label="Simulated Tumour size (mm) by arm and date from randomization on 2 Mar 2026' in svg


def test_cohort_panels_of_a_day_long_simulation_are_labelled_by_the_hour():
    cohort = Cohort("pk", arms=["320 mg"], labels={"c": "Theophylline"}, units={"c": "mg/L"})
    day0 = dt.datetime(2025, 3, 3, 8, tzinfo=dt.timezone.utc)
    hours = list(range(0, 25, 2))
    cohort.arm_series = {"c": {"320 mg": {"day": [h / 24 for h in hours],
                                          "time": [day0 + dt.timedelta(hours=h) for h in hours],
                                          "median": [0.0] + [5.0] * 12, "low": [0.0] + [3.0] * 12,
                                          "high": [0.0] + [7.0] * 12}}}
    text = " ".join(t.text or "" for t in _root(cohort_panels(cohort)[0]["svg"]).iter() if t.tag.endswith("text"))
    assert "time (3 Mar – 4 Mar 2025, UTC)" in text and re.search(r"\b(12|16|20):00\b", text)


def _driver(feature, value, contribution, **words):
    parts = [{"url": "feature", "valueCode": feature}, {"url": "value", "valueDecimal": value},
             {"url": "contribution", "valueDecimal": contribution}]
    parts += [{"url": k, "valueString": v} for k, v in words.items()]
    return {"url": RISK_DRIVER, "extension": parts}


def test_risk_reads_predictions_and_drivers_in_plain_words_ordered_by_size():
    resource = {"resourceType": "RiskAssessment", "id": "ra1", "occurrenceDateTime": "2026-03-02T08:00:00Z",
                "prediction": [{"outcome": {"text": "Misses the next visit"}, "probabilityDecimal": 0.83}],
                "extension": [
                    _driver("missed_doses_14d", 5.0, 0.4),
                    _driver("next_visit_travel_km", 80.0, 1.2, label="Travel to the next visit", valueText="80 km"),
                    _driver("next_visit_remote", 0.0, -0.7, label="Next visit is remote", valueText="no")]}
    risk = parse_risk(resource)
    assert risk.predictions == [("Misses the next visit", 0.83)]
    assert risk.drivers == [("Travel to the next visit", "80 km", 1.2), ("Next visit is remote", "no", -0.7),
                            ("missed_doses_14d", "5", 0.4)]  # no label in the resource: its code and raw value


def test_age_in_completed_years():
    assert age_on("1960-06-15", dt.date(2026, 6, 14)) == 65
    assert age_on("1960", dt.date(2026, 1, 1)) == 66
    assert age_on(None, dt.date(2026, 1, 1)) is None


def test_calendar_dates_for_people():
    assert calendar_date("2026-10-20") == "20 Oct 2026"
    assert calendar_date(dt.datetime(2026, 3, 2, 8, tzinfo=dt.timezone.utc)) == "2 Mar 2026"
    assert calendar_date("not a date") == "not a date" and calendar_date(None) == ""
