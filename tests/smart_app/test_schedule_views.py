"""The app's schedule panels over real HTTP with real tokens: the study view's proposal with its expected gains
($optimize-schedule, persist=false) and the participant view's proposed visits (stored Appointments)."""
from __future__ import annotations

import datetime as dt
import html as html_lib
import re

import pytest

from .conftest import combined_server
from .helpers import UserAgent
from .test_browser import ARTIFACTS, browser, launch_from_simulator  # noqa: F401
from .test_clinician_app import launch
from .test_study_results import Loader, _section

N = 8


def _put(r):
    return {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    for combined in combined_server(tmp_path_factory):
        loader = Loader(combined)
        # a study that follows the demo's visit plan, randomized 20 days ago: all six visits still to come
        start = (dt.date.today() - dt.timedelta(days=20)).isoformat()
        entries = [_put({"resourceType": "ResearchStudy", "id": "sched", "status": "active",
                         "protocol": [{"reference": "PlanDefinition/tt201-visit-plan"}],
                         "site": [{"reference": "Location/tt201-loc-north"}]})]
        for i in range(N):
            pid = f"sched-p{i}"
            entries += [
                _put({"resourceType": "Patient", "id": pid, "birthDate": "1970-01-01",
                      "managingOrganization": {"reference": "Organization/tt201-site-north"}}),
                _put({"resourceType": "ResearchSubject", "id": f"sched-rs{i}", "status": "on-study",
                      "study": {"reference": "ResearchStudy/sched"}, "individual": {"reference": f"Patient/{pid}"},
                      "period": {"start": start}}),
                _put({"resourceType": "Observation", "id": f"{pid}-distance", "status": "final",
                      "code": {"coding": [{"system": "https://trialtwin.org/fhir/CodeSystem/covariate",
                                           "code": "travel-distance"}]},
                      "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": start,
                      "valueQuantity": {"value": 10.0 + 15 * i, "unit": "km", "system": "http://unitsofmeasure.org",
                                        "code": "km"}})]
        loader.transaction(entries)
        yield combined, loader


def _page(combined, **context):
    agent = UserAgent()
    page = launch(combined, agent, **context)
    assert page.status_code == 200, page.text[:400]
    return page.text


@pytest.mark.api
def test_study_view_shows_the_proposal_and_its_gains_without_storing_anything(served):
    combined, loader = served
    before = loader.count("Appointment")
    panel = _section(_page(combined, study="sched"), "schedule-h")
    text = html_lib.unescape(re.sub(r"<[^>]+>", "", panel))
    assert f"{6 * N} upcoming visits of {N} participants" in text
    m = re.search(r"Expected missed visits: ([\d.]+) with the proposal against ([\d.]+) on the protocol's default "
                  r"days and modalities — (-?[\d.]+) fewer \(95% interval (-?[\d.]+) to (-?[\d.]+)\)", text)
    assert m, text
    proposal, default, gain, low, high = map(float, m.groups())
    assert gain == pytest.approx(default - proposal, abs=0.11) and low <= gain <= high
    assert 'id="schedule-changes"' in panel  # the 30-day spacing moves visits inside their windows
    assert loader.count("Appointment") == before  # persist=false: a page view stores nothing


@pytest.mark.api
def test_study_without_a_plan_gets_a_sentence(served):
    combined, _ = served
    panel = _section(_page(combined, study="tt-201"), "schedule-h")  # the demo's visits lie in the past (or are due)
    assert "HTTP" not in panel
    noplan = _section(_page(combined, study="no-such-plan-study"), "schedule-h")
    assert 'id="schedule-message"' in noplan and "HTTP" not in noplan


@pytest.mark.api
def test_participant_view_shows_the_stored_proposal_with_modality_and_dates(served):
    combined, loader = served
    empty = _section(_page(combined, patient="sched-p7"), "proposed-h")
    assert "No proposed visits" in empty
    r = loader.post("ResearchStudy/sched/$optimize-schedule", [{"name": "replicates", "valueInteger": 20}])
    assert r.status_code == 200, r.text[:400]
    panel = _section(_page(combined, patient="sched-p7"), "proposed-h")
    rows = re.findall(r"<tr><td>(Visit \d \(week \d+\))</td><td>([^<]+)</td><td>([^<]+)</td></tr>", panel)
    assert [v for v, _, _ in rows] == [f"Visit {k} (week {4 * k})" for k in range(1, 7)]
    assert {m for _, _, m in rows} <= {"In person", "Remote (virtual)"}
    assert rows[2][2] == "In person" and rows[5][2] == "In person"  # on-site PK sampling at weeks 12 and 24


@pytest.mark.browser
def test_the_schedule_panels_fit_400_px(browser, served):  # noqa: F811
    combined, loader = served
    r = loader.post("ResearchStudy/sched/$optimize-schedule", [{"name": "replicates", "valueInteger": 20}])
    assert r.status_code == 200, r.text[:400]
    context = browser.new_context(viewport={"width": 400, "height": 900})
    page = context.new_page()
    try:
        launch_from_simulator(page, combined, study="sched")
        assert page.locator("#schedule-summary").is_visible()
        assert page.locator("#schedule-changes tbody tr").count() >= 1
        assert page.evaluate("document.documentElement.scrollWidth") <= 400  # no sideways scroll
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#schedule").screenshot(path=str(ARTIFACTS / "study-schedule-400.png"))
        launch_from_simulator(page, combined, patient="sched-p3")
        assert page.url == f"{combined.base}/app/patient/sched-p3"
        assert page.locator("#proposed-table tbody tr").count() == 6
        assert page.evaluate("document.documentElement.scrollWidth") <= 400
    finally:
        context.close()
