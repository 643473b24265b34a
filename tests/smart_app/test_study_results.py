"""The study view's trial-results panels over real HTTP: the enrollment forecast ($forecast-enrollment, persist=false)
and the stored treatment-effect reports ($estimate-effect), for an EDC launch with real tokens; and at 400 px in
Debian chromium.
"""
from __future__ import annotations

import base64
import datetime as dt
import html as html_lib
import re

import numpy as np
import pytest
import requests
from joserfc.jwk import RSAKey

from smart_app.study_results import observed_randomizations
from tests.fhir_ops.operations.test_estimate_effect import HBA1C, _people, _study_entries
from tests.fhir_ops.operations.test_forecast_enrollment import recruitment_entries

from .conftest import combined_server
from .helpers import UserAgent
from .test_browser import ARTIFACTS, _assert_fits_and_readable, browser, launch_from_simulator  # noqa: F401
from .test_clinician_app import launch

FHIR_JSON = "application/fhir+json"


class Loader:
    """A backend client with system scopes: puts the test studies in and runs the operations that store reports."""

    def __init__(self, combined):
        key = RSAKey.generate_key(2048, parameters={"kid": "loader", "alg": "RS384"})
        self.fhir = combined.fhir
        token = combined.backend_token("system/*.cruds", key)["access_token"]
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON, "Accept": FHIR_JSON}

    def transaction(self, entries, size=200):
        for i in range(0, len(entries), size):
            r = requests.post(self.fhir, json={"resourceType": "Bundle", "type": "transaction",
                                               "entry": entries[i:i + size]}, headers=self.headers, timeout=120)
            assert r.status_code == 200, r.text[:400]

    def post(self, path, parameters):
        return requests.post(f"{self.fhir}/{path}", json={"resourceType": "Parameters", "parameter": parameters},
                             headers=self.headers, timeout=300)

    def count(self, resource_type):
        r = requests.get(f"{self.fhir}/{resource_type}", params={"_summary": "count"}, headers=self.headers,
                         timeout=30)
        return r.json()["total"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    for combined in combined_server(tmp_path_factory):
        loader = Loader(combined)
        entries, times, ok = recruitment_entries("rec", sites=6, seed=4)
        randomized = int(sum(o.sum() for o in ok))
        # The planned population (R4: ResearchStudy.enrollment -> Group actual=false, quantity) gives the default target.
        for e in entries:
            if e["resource"]["resourceType"] == "ResearchStudy":
                e["resource"]["enrollment"] = [{"reference": "Group/rec-plan"}]
        entries.insert(0, {"resource": {"resourceType": "Group", "id": "rec-plan", "type": "person", "actual": False,
                                        "quantity": randomized + 40},
                           "request": {"method": "PUT", "url": "Group/rec-plan"}})
        loader.transaction(entries)
        rng = np.random.default_rng(7)
        trial = _people(rng, "ef", 40, effect=-0.6, treated=np.arange(40) % 2 == 0)
        loader.transaction(_study_entries("efx", trial, ["active", "placebo"]))
        base = [{"name": "endpoint", "valueString": HBA1C}, {"name": "timepointDays", "valueInteger": 168},
                {"name": "treatmentArm", "valueString": "active"}, {"name": "controlArm", "valueString": "placebo"}]
        for covariate in ("age", "baseline"):  # two reports; the second is the newest
            r = loader.post("ResearchStudy/efx/$estimate-effect", base + [{"name": "covariate", "valueString": covariate}])
            assert r.status_code == 200, r.text[:400]
        yield combined, loader, times, ok


def _study_page(combined, study, query=""):
    agent = UserAgent()
    page = launch(combined, agent, study=study)
    assert page.status_code == 200, page.text[:400]
    if query:
        page = agent.session.get(f"{combined.base}/app/study/{study}?{query}")
    return page


def _section(html, sid):
    start = html.index(f'<section aria-labelledby="{sid}"')
    return html[start:html.index("</section>", start)]


@pytest.mark.api
def test_enrollment_panel_draws_the_forecast_and_the_sites_without_storing_anything(served):
    combined, loader, times, ok = served
    reports_before = loader.count("MeasureReport")
    page = _study_page(combined, "rec")
    panel = _section(page.text, "recruit-h")
    randomized, screened = int(sum(o.sum() for o in ok)), sum(len(t) for t in times)
    # the default target is the study's planned population, labelled as such
    assert "(the study's plan)" in panel and f'value="{randomized + 40}"' in panel
    summary = html_lib.unescape(re.sub(r"<[^>]+>", "", panel[panel.index('id="enrollment-summary"'):]))
    assert f"{randomized} of {randomized + 40} participants randomized ({screened} screened)" in summary
    assert "40 to go" in summary
    # median and both intervals as calendar dates, in words
    assert re.search(r"reached around \d{1,2} \w{3} 20\d\d \(median\): with 80% probability between "
                     r"\d{1,2} \w{3} 20\d\d and \d{1,2} \w{3} 20\d\d, with 95% probability between", summary)
    for gid in ("enrollment-observed", "enrollment-expected", "enrollment-band-80", "enrollment-band-95"):
        assert f'id="{gid}"' in panel
    svg = panel[panel.index("<svg"):panel.index("</svg>")]
    assert "participants randomized" in svg and re.search(r">\d{1,2} \w{3}<", svg)  # y label, calendar ticks
    assert "width=" not in svg[:svg.index(">")]  # scales with the page
    # one row per site: screened and randomized as in the data, a positive rate per 30 days
    rows = re.findall(r"<tr><td>(Site \d)</td><td class=\"num\">(\d+)</td><td class=\"num\">(\d+)</td>"
                      r"<td class=\"num\">([\d.]+)</td></tr>", panel)
    assert [(name, int(s), int(r)) for name, s, r, _ in rows] == [
        (f"Site {i}", len(times[i]), int(ok[i].sum())) for i in range(6)]
    assert all(float(rate) > 0 for *_, rate in rows)
    assert loader.count("MeasureReport") == reports_before  # persist=false: a page view stores nothing


@pytest.mark.api
def test_a_target_from_the_form_and_the_operations_refusals_in_plain_words(served):
    combined, _, _, ok = served
    randomized = int(sum(o.sum() for o in ok))
    more = _section(_study_page(combined, "rec", f"target={randomized + 90}").text, "recruit-h")
    assert f"of {randomized + 90} participants randomized" in more and "(the study's plan)" not in more
    reached = _section(_study_page(combined, "rec", "target=3").text, "recruit-h")
    assert "already randomized at least as many participants as the target" in reached
    assert "HTTP 4" not in reached and 'id="enrollment-plot"' not in reached
    # a study without sites (422 no-sites) and without a planned size: the form asks, the refusal is a sentence
    plain = _section(_study_page(combined, "efx").text, "recruit-h")
    assert "does not say how many participants it plans to randomize: enter a target" in plain
    nosites = _section(_study_page(combined, "efx", "target=100").text, "recruit-h")
    assert "The study lists no sites" in nosites and "HTTP" not in nosites
    bad = _section(_study_page(combined, "rec", "target=%3Cb%3Ex").text, "recruit-h")
    assert "target: &#39;&lt;b&gt;x&#39; is not a number" in bad and "<b>x" not in bad
    assert "target must be between 1 and 100000" in _study_page(combined, "rec", "target=0").text


@pytest.mark.api
def test_effect_reports_are_listed_newest_first_with_the_newest_inline_and_sandboxed(served):
    combined, loader, _, _ = served
    html = _study_page(combined, "efx").text
    panel = _section(html, "effect-h")
    rows = re.findall(r"<tr><td>(\d{1,2} \w{3} 20\d\d \d\d:\d\d UTC)</td><td>(Effect of active vs placebo[^<]*)", panel)
    assert len(rows) == 2, panel[:600]
    frame = re.search(r'<iframe id="effect-report"[^>]*>', panel).group(0)
    assert 'sandbox=""' in frame  # no scripts, no same-origin access
    srcdoc = html_lib.unescape(re.search(r'srcdoc="([^"]*)"', frame).group(1))
    # the newest stored report, byte for byte
    found = requests.get(f"{loader.fhir}/DocumentReference", params={"_sort": "-_lastUpdated", "_count": 1},
                         headers=loader.headers, timeout=30).json()["entry"][0]["resource"]
    assert srcdoc == base64.b64decode(found["content"][0]["attachment"]["data"]).decode()
    assert "<svg" in srcdoc and "<script" not in srcdoc.lower()
    # another study's view lists none of them
    other = _section(_study_page(combined, "rec").text, "effect-h")
    assert "No treatment-effect reports for this study yet" in other and "<iframe" not in other


@pytest.mark.unit
def test_observed_curve_counts_randomizations_only_up_to_the_cut():
    rs = [{"status": "on-study", "period": {"start": d}} for d in ("2026-01-05", "2026-01-02", "2026-02-01")]
    rs += [{"status": "ineligible", "period": {"start": "2026-01-03"}}, {"status": "candidate", "period": {}}]
    assert observed_randomizations(rs, until=dt.date(2026, 1, 31)) == [(dt.date(2026, 1, 2), 1),
                                                                       (dt.date(2026, 1, 5), 2)]


@pytest.mark.browser
def test_the_results_panels_render_at_400_px(browser, served):  # noqa: F811
    combined, *_ = served
    context = browser.new_context(viewport={"width": 400, "height": 900})
    page = context.new_page()
    try:
        launch_from_simulator(page, combined, study="rec")
        assert page.url == f"{combined.base}/app/study/rec"
        assert page.locator("#enrollment-plot svg").is_visible()
        _assert_fits_and_readable(page, "#enrollment-plot svg", 1)  # no sideways scroll, text >= 8 px
        assert page.locator("#enrollment-sites tbody tr").count() == 6
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#enrollment").screenshot(path=str(ARTIFACTS / "study-enrollment-400.png"))
        page.goto(f"{combined.base}/app/study/efx")
        frame = page.frame_locator("#effect-report")
        assert frame.locator("svg").first.is_visible()  # the report's own plot, inside the sandbox
        assert page.evaluate("document.documentElement.scrollWidth") <= 400
        page.locator("#effects").screenshot(path=str(ARTIFACTS / "study-effects-400.png"))
    finally:
        context.close()


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """The same server, but the clinician app asks no read of DocumentReference."""
    from smart_app.app import SCOPES

    yield from combined_server(tmp_path_factory, SCOPES=SCOPES.replace(" user/DocumentReference.rs", ""))


@pytest.mark.api
def test_a_token_that_may_not_read_the_reports_gets_a_plain_sentence_and_the_rest_of_the_page(narrow):
    html = _study_page(narrow, "tt-201").text
    assert "Not allowed with this launch&#39;s access token to read the study&#39;s effect reports." in html
    assert "HTTP 403" not in html and "<iframe" not in html
    assert "Enrolment by arm" in html  # the rest of the view still renders
