"""The reference SMART JavaScript client (npm ``fhirclient``) served from another origin launches against this server
in Chromium: an EHR launch (launch simulator) and a standalone launch (patient picker), each reading the patient.

The app lives on ``http://localhost:<port>`` while the server is ``http://127.0.0.1:<port>``: every call the client
makes (discovery, token, FHIR reads with ``Authorization``) is cross-origin and needs the server's CORS answers.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from werkzeug.wrappers import Request, Response

from tests.live_server import serve

from .test_browser import browser  # noqa: F401  (the shared Chromium fixture)

pytestmark = pytest.mark.browser

CLIENT_JS = Path(__file__).resolve().parent / "js" / "node_modules" / "fhirclient" / "build" / "fhir-client.js"
PATIENT = "tt201-p004"
EHR_SCOPE = "launch openid fhirUser patient/Patient.rs patient/Observation.rs"
STANDALONE_SCOPE = "launch/patient openid fhirUser patient/Patient.rs patient/Observation.rs"

LAUNCH_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>launching</title>
<script src="fhir-client.js"></script></head><body><p id="status">launching</p><script>
FHIR.oauth2.authorize({clientId: %(client)s, scope: %(scope)s, redirectUri: "index.html"})
  .catch(function (e) { document.getElementById("status").textContent = "error: " + e; });
</script></body></html>"""

INDEX_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>app</title>
<script src="fhir-client.js"></script></head><body><pre id="result">waiting</pre><script>
FHIR.oauth2.ready().then(function (client) {
  return Promise.all([client.patient.read(), client.request("Observation?patient=" + client.patient.id + "&_count=5")])
    .then(function (both) {
      document.getElementById("result").textContent = JSON.stringify({
        patient: both[0].id, resourceType: both[0].resourceType, observations: both[1].resourceType,
        origin: location.origin, server: client.state.serverUrl});
    });
}).catch(function (e) { document.getElementById("result").textContent = "error: " + e; });
</script></body></html>"""


def _app_server(client_id: str, scope: str):
    """A static web app (the launch and redirect pages + the fhirclient browser build) as a WSGI callable."""
    pages = {"/launch.html": LAUNCH_PAGE % {"client": json.dumps(client_id), "scope": json.dumps(scope)},
             "/index.html": INDEX_PAGE}

    def app(environ, start_response):
        path = Request(environ).path
        if path == "/fhir-client.js":
            response = Response(CLIENT_JS.read_bytes(), mimetype="text/javascript")
        elif path in pages:
            response = Response(pages[path], mimetype="text/html")
        else:
            response = Response("not found", status=404)
        return response(environ, start_response)

    return app


@pytest.fixture(scope="module")
def client_js():
    # scripts/test.sh runs `npm ci` in tests/smart_app/js; a missing build is a broken set-up, not a skip
    if not CLIENT_JS.exists():
        pytest.fail(f"{CLIENT_JS} is missing: run `npm ci` in tests/smart_app/js (scripts/test.sh does)")
    return CLIENT_JS


# --- registration and sign-in: the only parts that depend on how the authorization server admits people ------

def register_js_app(combined, origin: str, scope: str) -> str:
    """Register the JavaScript app as a public client whose pages live on ``origin``; return its client id."""
    client = combined.stack.register(
        client_name="fhirclient.js test app", redirect_uris=[f"{origin}/index.html"],
        launch_uri=f"{origin}/launch.html", grant_types=["authorization_code"], token_endpoint_auth_method="none",
        scope=f"{scope} launch launch/patient")
    return client["client_id"]


def sign_in(page, username: str = "dr.chen", password: str = "trialtwin") -> None:
    """Answer the authorization server's sign-in page, when it shows one."""
    if page.locator("#password").count():
        page.fill("#username", username)
        page.fill("#password", password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_load_state("load")


def ehr_launch(page, combined, client_id: str, patient: str) -> None:
    """Play the EHR: the launch simulator opens the app's launch URL with ``iss`` and ``launch``."""
    page.goto(f"{combined.base}/auth/launch-simulator")
    sign_in(page)  # the simulator is a development feature behind a password sign-in
    page.select_option("#client_id", client_id)
    page.fill("#patient", patient)
    page.get_by_role("button", name="Launch").click()
    page.wait_for_load_state("load")


# --- the launches ---------------------------------------------------------------------------------------------

def _at_authorization_server(page, combined) -> None:
    """Wait until fhirclient has discovered the endpoints and sent the browser to /auth (or reported why not)."""
    page.wait_for_function(
        "location.href.startsWith(%s) || ((document.getElementById('status') || {}).textContent || '')"
        ".startsWith('error')" % json.dumps(combined.base + "/auth/"), timeout=60000)
    assert page.url.startswith(combined.base + "/auth/"), page.locator("#status").inner_text()


def _result(page) -> dict:
    result = page.locator("#result")
    page.wait_for_function("document.getElementById('result') && "
                           "document.getElementById('result').textContent !== 'waiting'", timeout=60000)
    text = result.inner_text()
    assert not text.startswith("error"), text
    return json.loads(text)


@contextmanager
def _app_on_another_origin(browser, combined, scope: str):  # noqa: F811
    """The JS app served from another origin (another port, and "localhost" rather than the server's
    "127.0.0.1": another origin twice over), registered for ``scope``; yields (origin, client_id, page)."""
    holder: dict = {}
    with serve(lambda e, s: holder["app"](e, s), host="127.0.0.1") as app_base:
        origin = f"http://localhost:{app_base.rsplit(':', 1)[1]}"
        client_id = register_js_app(combined, origin, scope)
        holder["app"] = _app_server(client_id, scope)
        context = browser.new_context()
        try:
            yield origin, client_id, context.new_page()
        finally:
            context.close()


def test_fhirclient_ehr_launch_from_another_origin(browser, combined, client_js):  # noqa: F811
    with _app_on_another_origin(browser, combined, EHR_SCOPE) as (origin, client_id, page):
        ehr_launch(page, combined, client_id, PATIENT)
        _at_authorization_server(page, combined)
        sign_in(page)
        page.get_by_role("button", name="Approve").click()
        answer = _result(page)
    assert answer == {"patient": PATIENT, "resourceType": "Patient", "observations": "Bundle", "origin": origin,
                      "server": combined.fhir}


def test_fhirclient_standalone_launch_from_another_origin(browser, combined, client_js):  # noqa: F811
    with _app_on_another_origin(browser, combined, STANDALONE_SCOPE) as (origin, _, page):
        page.goto(f"{origin}/launch.html?iss={combined.fhir}")
        _at_authorization_server(page, combined)
        sign_in(page)
        page.select_option("#selected_patient", PATIENT)
        page.get_by_role("button", name="Continue").click()
        page.get_by_role("button", name="Approve").click()
        answer = _result(page)
    assert answer == {"patient": PATIENT, "resourceType": "Patient", "observations": "Bundle", "origin": origin,
                      "server": combined.fhir}


@pytest.fixture(scope="module")
def combined_without_cors(tmp_path_factory):
    """The same combined server with CORS off (``--cors-origin none``)."""
    from tests.smart_app.conftest import combined_server

    yield from combined_server(tmp_path_factory, CORS_ORIGINS=[])


def test_without_cors_the_same_launch_stops_at_discovery(browser, combined_without_cors, client_js):  # noqa: F811
    # The control for the two launches above: they pass because the server answers cross-origin requests,
    # not because the browser lets these pages read another origin anyway.
    combined = combined_without_cors
    with _app_on_another_origin(browser, combined, STANDALONE_SCOPE) as (origin, _, page):
        page.goto(f"{origin}/launch.html?iss={combined.fhir}")
        page.wait_for_function(
            "location.href.startsWith(%s) || ((document.getElementById('status') || {}).textContent || '')"
            ".startsWith('error')" % json.dumps(combined.base + "/auth/"), timeout=60000)
        status = page.locator("#status").inner_text() if page.url.startswith(origin) else page.url
    assert status.startswith("error"), status
