"""The study view's responder-strata and safety panels over real HTTP, for an EDC launch with real tokens:
results stored by $stratify and $safety-signal (run by a backend client) are shown, a page view stores
nothing, and a study without results says so in words."""
from __future__ import annotations

import html as html_lib
import re

import pytest

from smart_app.study_safety import safety_of

from .conftest import combined_server
from .test_browser import ARTIFACTS, browser, launch_from_simulator  # noqa: F401
from .test_study_results import Loader, _section, _study_page

pytestmark = pytest.mark.api


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    for combined in combined_server(tmp_path_factory):
        loader = Loader(combined)
        # the combined server's demo has 6 participants; stratification needs at least 10 whose data inform
        # their twins (placebo participants' do not): load 24, 16 of them on a dosed arm
        from fhir_ops.demo import build_demo_resources, simulate_demo_records

        loader.transaction([{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                            for r in build_demo_resources(simulate_demo_records(seed=5, n=24))], size=500)
        r = loader.post("ResearchStudy/tt-201/$stratify", [{"name": "bootstrap", "valueInteger": 3}])
        assert r.status_code == 200, r.text[:400]
        r2 = loader.post("ResearchStudy/tt-201/$safety-signal", [])
        assert r2.status_code == 200, r2.text[:400]
        yield combined, loader, r.json(), r2.json()


def _text(fragment: str) -> str:
    return html_lib.unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_strata_panel_lists_each_stored_stratum_with_rule_and_responses(served):
    combined, loader, strat, _ = served
    before = loader.count("Group"), loader.count("MeasureReport")
    panel = _section(_study_page(combined, "tt-201").text, "strata-h")
    strata = [p for p in strat["parameter"] if p["name"] == "stratum"]
    rows = re.findall(r"<tr><td>(\d+)</td><td class=\"num\">(\d+)</td>", panel)
    assert [int(n) for _, n in rows] == [next(q["valueInteger"] for q in s["part"] if q["name"] == "size")
                                         for s in strata]
    for s in strata:
        rule = next(q["valueString"] for q in s["part"] if q["name"] == "rule")
        assert rule in _text(panel)
    assert "100 mg:" in _text(panel) and "mg/dL" in panel
    assert (loader.count("Group"), loader.count("MeasureReport")) == before  # reading stores nothing


def test_safety_panel_shows_rates_probabilities_and_forecast(served):
    combined, _, _, safety = served
    panel = _text(_section(_study_page(combined, "tt-201").text, "safety-h"))
    rates = [p for p in safety["parameter"] if p["name"] == "rate"]
    assert "Data up to" in panel and ("open safety signal" in panel or "No open safety signal" in panel)
    for r in rates:
        parts = {q["name"]: next(v for k, v in q.items() if k.startswith("value")) for q in r["part"]}
        assert parts["display"] in panel
        if "probabilityExceeds" in parts:
            assert f"{parts['probabilityExceeds']:.3f}" in panel
    assert panel.count("control") >= 1
    if any(p["name"] == "forecast" for p in safety["parameter"]):
        assert "Forecast from the twins' exposure" in panel and "expected" in panel


def test_a_study_without_results_says_so_in_words(served):
    combined, loader, *_ = served
    loader.transaction([{"resource": {"resourceType": "ResearchStudy", "id": "empty", "status": "active"},
                         "request": {"method": "PUT", "url": "ResearchStudy/empty"}}])
    html = _study_page(combined, "empty").text
    assert "No responder strata for this study yet" in _section(html, "strata-h")
    assert "No safety analysis for this study yet" in _section(html, "safety-h")
    assert "HTTP" not in _section(html, "safety-h")
    # the safety report reader copes with a report without groups
    assert safety_of({"period": {"end": "2026-11-20"}}).rates == []


@pytest.mark.browser
def test_the_strata_and_safety_panels_render_at_400_px(browser, served):  # noqa: F811
    combined, *_ = served
    context = browser.new_context(viewport={"width": 400, "height": 900})
    page = context.new_page()
    try:
        launch_from_simulator(page, combined, study="tt-201")
        assert page.locator("#strata-table tbody tr").count() >= 1
        assert page.locator("#safety-rates tbody tr").count() >= 3
        assert page.evaluate("document.documentElement.scrollWidth") <= 400  # no sideways scroll
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#safety").screenshot(path=str(ARTIFACTS / "study-safety-400.png"))
    finally:
        context.close()


def test_both_operations_hold_real_tokens_to_the_cohort_and_write_scopes(served):
    """$stratify and $safety-signal read every participant of the study and store results: a participant's
    own token is refused, a study-wide read-only token may only ask with persist=false, no token gets 401,
    and none of the refusals stores anything."""
    from .test_fhir_enforcement import P1, call, outcome_id

    combined, loader, *_ = served
    written = ("Group", "MeasureReport", "DetectedIssue", "Task", "Provenance")
    stored = {t: loader.count(t) for t in written}
    calls = {"$stratify": [{"name": "bootstrap", "valueInteger": 0}], "$safety-signal": []}
    patient = combined.user_token("patient/*.cruds", patient=P1)["access_token"]
    reader = combined.user_token("user/*.rs")["access_token"]
    for op, parameters in calls.items():
        url = f"{combined.fhir}/ResearchStudy/tt-201/{op}"
        body = {"resourceType": "Parameters", "parameter": parameters}
        refused = call("POST", url, patient, json=body)
        assert refused.status_code == 403 and outcome_id(refused) == "cohort-needs-broad-scope", (op, refused.text)
        persisting = call("POST", url, reader, json=body)
        assert persisting.status_code == 403 and outcome_id(persisting) == "insufficient-scope", (op, persisting.text)
        anonymous = call("POST", url, None, json=body)
        assert anonymous.status_code == 401, (op, anonymous.status_code)
        dry_run = {"resourceType": "Parameters", "parameter": [*parameters, {"name": "persist", "valueBoolean": False}]}
        asked = call("POST", url, reader, json=dry_run)
        assert asked.status_code == 200, (op, asked.text[:400])
    assert {t: loader.count(t) for t in written} == stored
