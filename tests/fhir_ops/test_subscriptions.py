"""R4 rest-hook Subscriptions: a real loopback subscriber, the real watcher and outbox, over HTTP."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fhir_ops.app import create_app
from tests.app_config import open_config
from tests.fhir_ops.conftest import FhirClient, error_id
from tests.live_server import serve

pytestmark = pytest.mark.api


class Subscriber:
    """A loopback HTTP endpoint that records each POST (time, headers, body) and answers ``status``."""

    def __init__(self, status: int = 200):
        self.status = status
        self.received: list[tuple[float, dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.received.append((time.monotonic(), dict(self.headers), body))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def wait(self, n: int, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        while len(self.received) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(tmp_path):
    app = create_app(open_config(DATA_DIR=str(tmp_path), SUBSCRIPTIONS=True, SUBSCRIPTION_POLL=0.1,
                                 SUBSCRIPTION_ENDPOINT_ALLOW=["127.0.0.1"], SUBSCRIPTION_RETRY_DELAYS=(0.2, 0.4)))
    with serve(app) as base:
        yield FhirClient(base + "/fhir"), app.extensions["trialtwin.subscriptions"]
    app.extensions["trialtwin.subscriptions"].stop()
    app.extensions["trialtwin.store"].close()


@pytest.fixture
def subscriber():
    s = Subscriber()
    yield s
    s.close()


def subscription(endpoint: str, criteria: str = "RiskAssessment?probability=gt0.8", **channel) -> dict:
    return {"resourceType": "Subscription", "status": "requested", "reason": "flag likely dropouts to the EDC",
            "criteria": criteria,
            "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
                        "header": ["Authorization: Bearer edc-secret"], **channel}}


def risk(p: float) -> dict:
    return {"resourceType": "RiskAssessment", "status": "final", "subject": {"reference": "Patient/p1"},
            "prediction": [{"probabilityDecimal": p, "outcome": {"text": "misses the next visit"}}]}


def wait_status(fhir: FhirClient, sid: str, status: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        sub = fhir.get(f"Subscription/{sid}").json()
        if sub["status"] == status or time.monotonic() > deadline:
            return sub
        time.sleep(0.05)


def test_subscriber_is_notified_within_2_s_of_a_risk_above_threshold(server, subscriber):
    fhir, service = server
    resp = fhir.post("Subscription", subscription(subscriber.url))
    assert resp.status_code == 201, resp.text
    sid = resp.json()["id"]
    assert wait_status(fhir, sid, "active")["status"] == "active"
    assert fhir.post("RiskAssessment", risk(0.5)).status_code == 201  # below: no notification
    posted = time.monotonic()
    high = fhir.post("RiskAssessment", risk(0.93)).json()
    [(at, headers, body)] = subscriber.wait(1, timeout=60)
    assert at - posted < 2.0
    sent = json.loads(body)
    assert (sent["id"], sent["prediction"][0]["probabilityDecimal"]) == (high["id"], 0.93)
    assert headers["Authorization"] == "Bearer edc-secret" and headers["X-Subscription"] == f"Subscription/{sid}"
    time.sleep(0.5)
    assert len(subscriber.received) == 1  # once, and never for the 0.5
    [log] = service.deliveries(sid)
    assert (log["focus"], log["status"], log["attempts"]) == (f"RiskAssessment/{high['id']}", "delivered", 1)


def test_a_failing_subscriber_is_retried_then_the_subscription_is_in_error(server):
    fhir, service = server
    failing = Subscriber(status=500)
    try:
        sid = fhir.post("Subscription", subscription(failing.url)).json()["id"]
        wait_status(fhir, sid, "active")
        fhir.post("RiskAssessment", risk(0.99))
        sub = wait_status(fhir, sid, "error")
        assert sub["status"] == "error" and "failed 3 times" in sub["error"] and "HTTP 500" in sub["error"]
        assert len(failing.received) == 3  # the first try and two retries (delays 0.2 s, 0.4 s)
        gaps = [b[0] - a[0] for a, b in zip(failing.received, failing.received[1:])]
        assert gaps[0] >= 0.2 and gaps[1] >= 0.4
        [log] = service.deliveries(sid)
        assert (log["status"], log["attempts"], log["lastError"]) == ("failed", 3, "HTTP 500")
        # in error: later matches are not sent
        fhir.post("RiskAssessment", risk(0.97))
        time.sleep(0.5)
        assert len(failing.received) == 3
        # the subscriber is fixed and the Subscription set back to requested: active again, notified anew
        failing.status = 200
        assert fhir.put(f"Subscription/{sid}", {**sub, "status": "requested"}).status_code == 200
        assert wait_status(fhir, sid, "active")["status"] == "active"
        fhir.post("RiskAssessment", risk(0.95))
        assert json.loads(failing.wait(4, timeout=60)[-1][2])["prediction"][0]["probabilityDecimal"] == 0.95
    finally:
        failing.close()


def test_a_slow_subscriber_does_not_hold_back_the_server_or_other_subscribers(tmp_path, subscriber):
    # Decided by order of events, not by a clock (a busy machine stretches every duration): the slow
    # endpoint holds each POST until the test opens the gate, and the server's delivery timeout is longer
    # than the test, so the slow delivery is still in flight throughout.
    app = create_app(open_config(DATA_DIR=str(tmp_path), SUBSCRIPTIONS=True, SUBSCRIPTION_POLL=0.1,
                                 SUBSCRIPTION_ENDPOINT_ALLOW=["127.0.0.1"], SUBSCRIPTION_DELIVERY_TIMEOUT=600))
    slow = Subscriber()
    gate = threading.Event()
    original = slow.server.RequestHandlerClass.do_POST

    def slow_post(handler):
        gate.wait(600)
        original(handler)

    slow.server.RequestHandlerClass.do_POST = slow_post
    try:
        with serve(app) as base:
            fhir = FhirClient(base + "/fhir")
            for url in (slow.url, subscriber.url):
                sid = fhir.post("Subscription", subscription(url)).json()["id"]
                wait_status(fhir, sid, "active")
            # answered while the slow endpoint still holds its notification: delivery is not on the request path
            assert fhir.post("RiskAssessment", risk(0.9)).status_code == 201
            assert not slow.received
            # the quick endpoint is notified while the slow one is still held: not queued behind it
            assert len(subscriber.wait(1, timeout=60)) == 1 and not slow.received
            gate.set()
            assert len(slow.wait(1, timeout=60)) == 1
    finally:
        gate.set()
        slow.close()
        if "trialtwin.subscriptions" in app.extensions:
            app.extensions["trialtwin.subscriptions"].stop()
        app.extensions["trialtwin.store"].close()


@pytest.mark.parametrize("body, status, eid", [
    (subscription("http://10.1.2.3/hook"), 422, "endpoint-refused"),
    (subscription("http://169.254.169.254/latest/meta-data"), 422, "endpoint-refused"),
    (subscription("http://example.org/hook"), 422, "endpoint-refused"),
    (subscription("https://127.0.0.2/hook"), 422, "endpoint-refused"),
    (subscription("http://127.0.0.1:9/hook", type="email"), 422, "unsupported-channel"),
    (subscription("http://127.0.0.1:9/hook", criteria="RiskAssessment?nonsense=1"), 400, "invalid-criteria"),
    (subscription("http://127.0.0.1:9/hook", criteria="NoSuchType?x=1"), 400, "invalid-criteria"),
    (subscription("http://127.0.0.1:9/hook", criteria="RiskAssessment?_count=1"), 400, "invalid-criteria"),
    (subscription("http://127.0.0.1:9/hook", header=["X-Evil: a\r\nInjected: b"]), 400, "invalid-header"),
], ids=["private", "metadata", "plain-http", "loopback-not-allowed", "email", "unknown-param", "unknown-type", "paging-param",
        "header-injection"])
def test_subscriptions_the_server_would_not_honour_are_refused_and_not_stored(server, body, status, eid):
    fhir, _ = server
    resp = fhir.post("Subscription", body)
    assert resp.status_code == status, resp.text
    assert error_id(resp) == eid
    resp = fhir.transaction([{"resource": body, "request": {"method": "POST", "url": "Subscription"}}])
    assert resp.status_code == status
    assert fhir.get("Subscription?_summary=count").json()["total"] == 0


@pytest.fixture
def job_task_server(tmp_path):
    """As ``server``, with finished asynchronous jobs stored as Tasks (``trialtwin serve --job-tasks``)."""
    app = create_app(open_config(DATA_DIR=str(tmp_path), SUBSCRIPTIONS=True, SUBSCRIPTION_POLL=0.1, JOB_TASKS=True,
                                 SUBSCRIPTION_ENDPOINT_ALLOW=["127.0.0.1"], SUBSCRIPTION_RETRY_DELAYS=(0.2, 0.4)))
    with serve(app) as base:
        yield FhirClient(base + "/fhir")
    app.extensions["trialtwin.subscriptions"].stop()
    app.extensions["trialtwin.store"].close()


def run_async(fhir: FhirClient, path: str) -> str:
    """Start ``GET path`` as an asynchronous job; its polling URL once the job has finished."""
    started = fhir.get(path, headers={"Prefer": "respond-async"})
    assert started.status_code == 202, started.text
    location = started.headers["Content-Location"]
    deadline = time.monotonic() + 120
    while fhir.get(location).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.05)
    return location


def test_a_subscriber_hears_of_finished_jobs_with_their_outcome(job_task_server, subscriber):
    fhir = job_task_server
    validate_jobs = "Task?code=https://trialtwin.org/fhir/CodeSystem/operation|$validate"
    sid = fhir.post("Subscription", subscription(subscriber.url, criteria=validate_jobs)).json()["id"]
    assert wait_status(fhir, sid, "active")["status"] == "active"
    pid = fhir.post("Patient", {"resourceType": "Patient", "gender": "female"}).json()["id"]
    done = run_async(fhir, f"Patient/{pid}/$validate")
    failed = run_async(fhir, "Patient/no-such-patient/$validate")
    received = subscriber.wait(2, timeout=60)
    tasks = {json.loads(body)["output"][0]["valueUrl"]: json.loads(body) for _, _, body in received}
    assert set(tasks) == {done, failed}, list(tasks)
    ok, bad = tasks[done], tasks[failed]
    assert (ok["status"], ok["intent"], ok["businessStatus"]["text"]) == ("completed", "order", "HTTP 200")
    assert ok["code"]["coding"] == [{"system": "https://trialtwin.org/fhir/CodeSystem/operation", "code": "$validate"}]
    assert ok["focus"] == ok["for"] == {"reference": f"Patient/{pid}"}
    assert fhir.get(done).status_code == 200  # the URL in the Task answers with the job's result
    assert (bad["status"], bad["businessStatus"]["text"]) == ("failed", "HTTP 404")
    assert "no-such-patient" in bad["statusReason"]["text"]
    # stored like any resource, valid R4, and found by the same search the Subscription runs
    found = fhir.get("Task", params={"code": "https://trialtwin.org/fhir/CodeSystem/operation|$validate"}).json()
    assert found["total"] == 2
    stored = fhir.get(f"Task/{ok['id']}").json()
    assert fhir.post("Task/$validate", stored).json()["issue"][0]["severity"] == "information"
    # each finished job is notified once
    time.sleep(0.5)
    assert len(subscriber.received) == 2


def test_finished_jobs_are_not_stored_as_tasks_unless_asked(server):
    fhir, _ = server
    pid = fhir.post("Patient", {"resourceType": "Patient"}).json()["id"]
    run_async(fhir, f"Patient/{pid}/$validate")
    assert fhir.get("Task").json()["total"] == 0
