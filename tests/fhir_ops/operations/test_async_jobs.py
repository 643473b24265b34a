"""The FHIR async request pattern over real HTTP: 202 + Content-Location, progress, result, cancel."""
from __future__ import annotations

import pytest
import requests

from tests.fhir_ops.operations.conftest import wait_for

pytestmark = pytest.mark.api

ASYNC = {"Prefer": "respond-async"}


def poll_until_done(location):
    # a Response is falsy for 4xx, so wait on a tuple
    return wait_for(lambda: (r := requests.get(location)).status_code != 202 and (r,))[0]


def start(base_url, steps=3, fail=False):
    response = requests.get(base_url + "/fhir/$test-slow", params={"steps": str(steps), "fail": str(fail).lower()},
                            headers=ASYNC)
    assert response.status_code == 202, response.text
    location = response.headers["Content-Location"]
    assert location.startswith(base_url + "/fhir/_jobs/")
    return location


def test_job_reports_progress_then_result(base_url, test_operations):
    location = start(base_url, steps=3)
    first = requests.get(location)
    assert first.status_code == 202
    assert first.headers["X-Progress"] in ("queued", "running")
    assert first.headers["Retry-After"] == "1"
    test_operations.gate.release()
    wait_for(lambda: test_operations.steps_run == 1)
    poll = requests.get(location)
    assert poll.status_code == 202 and poll.headers["X-Progress"] == "33%: step 1 of 3"
    test_operations.gate.release()
    test_operations.gate.release()
    done = poll_until_done(location)
    assert done.status_code == 200
    assert done.json() == {"resourceType": "Parameters", "parameter": [{"name": "done", "valueInteger": 3}]}
    assert requests.get(location).status_code == 200  # the result stays for later polls


def test_same_handler_answers_synchronously_without_prefer(base_url, test_operations):
    response = requests.get(base_url + "/fhir/$test-slow", params={"steps": "2"})
    assert response.status_code == 200
    assert response.json()["parameter"] == [{"name": "done", "valueInteger": 2}]


def test_failed_job_returns_its_error_with_status(base_url, test_operations):
    location = start(base_url, steps=2, fail=True)
    test_operations.gate.release()
    failed = poll_until_done(location)
    assert failed.status_code == 422
    assert failed.json()["issue"][0]["details"]["coding"][0]["code"] == "failed-step"


def test_cancel_stops_the_worker_and_forgets_the_job(base_url, test_operations):
    location = start(base_url, steps=5)
    test_operations.gate.release()
    wait_for(lambda: test_operations.steps_run == 1)
    response = requests.delete(location)
    assert response.status_code == 202
    test_operations.gate.release()  # let the worker reach its next check
    assert test_operations.stopped.wait(5)
    assert test_operations.steps_run == 1
    gone = requests.get(location)
    assert gone.status_code == 404


def test_unknown_job_is_404_outcome(base_url, test_operations):
    for method in (requests.get, requests.delete):
        response = method(base_url + "/fhir/_jobs/0123456789abcdef")
        assert response.status_code == 404
        assert response.headers["Content-Type"].startswith("application/fhir+json")
        assert response.json()["issue"][0]["details"]["coding"][0]["code"] == "unknown-job"


def test_prefer_async_on_an_operation_without_async_runs_synchronously(base_url, test_operations):
    response = requests.get(base_url + "/fhir/Patient/$test-echo", params={"count": "1"}, headers=ASYNC)
    assert response.status_code == 200


def test_too_many_pending_jobs_is_429(app, base_url, test_operations):
    app.config["JOBS_MAX_PENDING"] = 1
    location = start(base_url, steps=1)
    refused = requests.get(base_url + "/fhir/$test-slow", params={"steps": "1"}, headers=ASYNC)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "10"
    assert refused.json()["issue"][0]["details"]["coding"][0]["code"] == "too-many-jobs"
    test_operations.gate.release()
    assert poll_until_done(location).status_code == 200
    assert requests.get(base_url + "/fhir/$test-slow", params={"steps": "1"}, headers=ASYNC).status_code == 202
    test_operations.gate.release()
