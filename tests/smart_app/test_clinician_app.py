"""The clinician app over real HTTP: EHR launch through the launch simulator, the patient and EDC study views,
$predict-dropout from the page, degraded sections for missing operations, and the launch's security checks.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest

from fhir_ops.mapping.risk_drivers import label_table
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
    assert "50 mg" in html and "On study, receiving the intervention" in html and "Site" in html
    if registry.get("simulate") is None:
        assert "does not offer $simulate yet" in html
        assert "<svg" not in html
    else:
        for output in ("hba1c", "fpg", "concentration"):  # one figure per output the server forecast
            figure = html[html.index(f'id="forecast-{output}"'):]
            figure = figure[:figure.index("</figure>")]
            assert f'id="forecast-band-{output}"' in figure and "viewBox" in figure
        assert 'id="observed-hba1c"' in html
        assert "Hemoglobin A1c" in html and "date (2026, UTC)" in html  # the server's label; calendar dates
        assert "assumes a dose of 50 mg per administration" in html
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
    drivers = after.text[after.text.index('<table id="drivers">'):]
    drivers = drivers[:drivers.index("</table>")]
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td class=\"num\">(raises|lowers) ([-+]\d+\.\d\d)</td>",
                      drivers)
    assert rows, drivers
    labels = {f["label"] for f in label_table().values()}
    for label, value, verb, effect in rows:  # plain-language labels from the model's label table, values in words
        assert label in labels and "_" not in label
        assert (verb == "raises") == (float(effect) > 0)
    # a form without the page's CSRF token is refused
    forged = agent.session.post(f"{combined.base}/app/patient/{PATIENT}/predict-dropout", data={"csrf_token": "x"},
                                allow_redirects=False)
    assert forged.status_code == 400


def test_the_notice_shows_fixed_texts_only(combined):
    agent = UserAgent()
    launch(combined, agent, patient=PATIENT)
    crafted = "Your session expired: call +1 555 0100 and give your password"
    page = agent.session.get(f"{combined.base}/app/patient/{PATIENT}",
                             params={"message": crafted, "notice": crafted})
    assert page.status_code == 200 and "555 0100" not in page.text
    known = agent.session.get(f"{combined.base}/app/patient/{PATIENT}", params={"notice": "risk-no-next-visit"})
    assert "there is no next visit to assess" in known.text


@pytest.mark.parametrize("participant,status", [("tt201-p001", "Off study"), ("tt201-p005", "Withdrawn")])
def test_a_participant_off_study_gets_no_doses_after_the_last_and_no_raw_error(combined, participant, status):
    agent = UserAgent()
    page = launch(combined, agent, patient=participant)
    assert page.status_code == 200, page.text
    html = page.text
    assert f'<p class="notice" role="status" id="off-study"><span>{status}:</span>' in html
    assert "receives no more study doses" in html and "left the study on" in html
    assert "HTTP 4" not in html and "no-next-visit</" not in html  # no raw server error in a banner
    assert 'id="no-next-visit"' in html and "/predict-dropout" not in html  # nothing to assess, no button
    assert 'name="dose"' not in html  # no dosing scenario for someone who takes no more doses
    if registry.get("simulate") is not None:
        # the server's own account of the forecast it made: dose 0 after the forecast start
        assert "Forecast without further doses" in html and "assumes no further doses" in html
        assert "last dose" in html  # marked on the time axis


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
    assert '<td title="on-study-intervention">On study, receiving the intervention</td><td class="num">3</td>' in html
    if registry.get("simulate") is None:
        assert "does not offer $simulate on ResearchStudy yet" in html
    else:
        assert 'id="arm-band-hba1c-0"' in html
        assert "Simulated course by arm from randomization" in html
        for label, unit in (("Hemoglobin A1c", "%"), ("Fasting glucose", "mg/dL")):  # units from the server
            figure = html[html.index(f"<svg role=\"img\" aria-label=\"Simulated {label} ({unit})"):]
            assert f">{unit}<" in figure[:figure.index("</svg>")]  # the y-axis label
        assert "days since randomization" not in html and "date (2026, UTC)" in html  # calendar dates
        assert re.search(r"the first participant, randomized on \d{1,2} \w{3} 2026 \(the participants were "
                         r"randomized between \d{1,2} \w{3} 2026 and \d{1,2} \w{3} 2026", html)
    assert "None of the 1 assessed" not in html


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
