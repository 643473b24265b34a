"""The clinician app over real HTTP: EHR launch through the launch simulator, the patient and EDC study views,
$predict-dropout from the page, degraded sections for missing operations, and the launch's security checks.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest

from fhir_ops.operations import registry
from smart_app.app import CLIENT_ID

from .helpers import UserAgent, parse_forms, submit

pytestmark = pytest.mark.api

PATIENT = "tt201-p003"  # on study in the 6-participant demo (seed 5)


def launch(combined, agent: UserAgent, **context):
    """Play the EHR: simulator → app launch URL → authorize (SSO, approve) → callback → the app's landing page."""
    launched = combined.stack.simulate_launch(agent, CLIENT_ID, **context)
    assert launched["url"].startswith(combined.base + "/app/launch?")
    assert launched["iss"] == combined.fhir
    first = agent.session.get(launched["url"], allow_redirects=False)
    assert first.status_code == 302 and first.headers["Location"].startswith(combined.base + "/auth/authorize?")
    sent = parse_qs(urlsplit(first.headers["Location"]).query)
    assert sent["code_challenge_method"] == ["S256"] and sent["aud"] == [combined.fhir]
    assert sent["launch"] == [launched["launch"]]
    agent.follow(first, combined.base + "/app/callback")
    return agent.session.get(agent.last_redirect)


def test_ehr_launch_lands_on_the_patient_view(combined):
    agent = UserAgent()
    page = launch(combined, agent, patient=PATIENT)
    assert page.status_code == 200, page.text
    assert page.url == f"{combined.base}/app/patient/{PATIENT}"
    html = page.text
    assert f"<h1>{PATIENT}</h1>" in html  # the demo's participants carry no names
    assert "50 mg" in html and "on-study-intervention" in html and "Site" in html
    if registry.get("simulate") is None:
        assert "does not offer $simulate yet" in html
        assert "<svg" not in html
    else:
        svg = html[html.index("<svg"):html.index("</svg>")]
        assert 'id="forecast-band-hba1c"' in svg and 'id="observed-hba1c"' in svg
    # the rest of the page works without the forecast: the risk section and its action are there
    assert "Risk of missing the next visit" in html and "$predict-dropout" in html
    assert "frame-ancestors 'self'" in page.headers["Content-Security-Policy"]
    cookie = next(c for c in agent.session.cookies if c.name == "trialtwin_app")
    assert cookie.has_nonstandard_attr("HttpOnly") and not cookie.secure  # http demo: Lax, not Secure


def test_predict_dropout_from_the_page_shows_risk_and_drivers(combined):
    agent = UserAgent()
    page = launch(combined, agent, patient=PATIENT)
    form = next(f for f in parse_forms(page.text) if f.action.endswith("/predict-dropout"))
    ran = submit(agent.session, page.url, form)
    assert ran.status_code == 302
    after = agent.session.get(urljoin(page.url, ran.headers["Location"]))
    assert "Dropout risk updated." in after.text, after.text[:2000]
    percent = re.search(r'<span class="risk[^"]*">(\d+)%</span>', after.text)
    assert percent and 0 <= int(percent.group(1)) <= 100
    assert "Main drivers" in after.text
    # a form without the page's CSRF token is refused
    forged = agent.session.post(f"{combined.base}/app/patient/{PATIENT}/predict-dropout", data={"csrf_token": "x"},
                                allow_redirects=False)
    assert forged.status_code == 400


def test_what_if_form_validates_its_inputs(combined):
    agent = UserAgent()
    launch(combined, agent, patient=PATIENT)
    page = agent.session.get(f"{combined.base}/app/patient/{PATIENT}",
                             params={"dose": "lots", "adherence": "1.5", "missed": "3, x"})
    assert page.status_code == 200
    for message in ("dose: 'lots' is not a number", "adherence must be between 0 and 1",
                    "missed-dose days: 'x' is not a whole number"):
        assert message in page.text.replace("&#39;", "'")


def test_edc_launch_shows_the_study_view(combined):
    agent = UserAgent()
    page = launch(combined, agent, study="tt-201")
    assert page.status_code == 200, page.text
    assert page.url == f"{combined.base}/app/study/tt-201"
    html = page.text
    assert "TT-201" in html
    for arm in ("placebo", "50 mg", "100 mg"):
        assert f"<td>{arm}</td><td class=\"num\">2</td>" in html
    assert '<th scope="row">Total</th><td class="num">6</td>' in html
    assert "<td>on-study-intervention</td><td class=\"num\">3</td>" in html
    if registry.get("simulate") is None:
        assert "does not offer $simulate on ResearchStudy yet" in html
    else:
        assert 'id="arm-band-hba1c-0"' in html


def test_patient_token_of_the_app_cannot_open_another_patient(combined):
    agent = UserAgent()
    launch(combined, agent, patient=PATIENT)
    other = agent.session.get(f"{combined.base}/app/patient/tt201-p004")
    assert other.status_code == 200  # the page renders, every section says it is not allowed
    assert other.text.count("Not allowed with this launch") >= 2
    assert "is not in the compartment of Patient/tt201-p003" in other.text


def test_launch_security_checks(combined):
    agent = UserAgent()
    untrusted = agent.session.get(f"{combined.base}/app/launch", params={"iss": "http://evil.example/fhir",
                                                                          "launch": "x"})
    assert untrusted.status_code == 400 and "not configured to trust" in untrusted.text
    assert agent.session.get(f"{combined.base}/app/callback", params={"code": "c", "state": "forged"}).status_code == 400
    assert agent.session.get(f"{combined.base}/app/patient/{PATIENT}").status_code == 401


def test_standalone_launch_asks_for_a_patient(combined):
    agent = UserAgent()
    start = agent.session.get(f"{combined.base}/app/")
    assert start.status_code == 200 and combined.fhir in start.text
    form = parse_forms(start.text)[0]
    first = agent.session.get(f"{combined.base}/app/launch", params={"iss": combined.fhir}, allow_redirects=False)
    assert form.action.endswith("/app/launch") and first.status_code == 302
    assert "launch%2Fpatient" in first.headers["Location"] or "launch/patient" in first.headers["Location"]
    agent.follow(first, combined.base + "/app/callback", patient="tt201-p006")
    page = agent.session.get(agent.last_redirect)
    assert page.url == f"{combined.base}/app/patient/tt201-p006" and "<h1>tt201-p006</h1>" in page.text
