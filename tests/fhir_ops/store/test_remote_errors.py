"""RemoteStore's error mapping, over real HTTP to a small FHIR-ish server with scripted answers.

The live-HAPI tier (tests/integration) covers what HAPI really says; this covers what a server may
say that HAPI rarely does (5xx, HTML, non-JSON, several issues) and a server that is not there.
"""
from __future__ import annotations

import pytest
from flask import Flask, Response, request

from fhir_ops.errors import Conflict, FhirError, InvalidRequest, PreconditionFailed
from fhir_ops.store.remote import RemoteStore
from tests.live_server import serve

pytestmark = pytest.mark.api

FHIR_JSON = "application/fhir+json"


def _outcome(*messages: str, severity: str = "error") -> dict:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": "processing", "diagnostics": m} for m in messages]}


def _scripted_server() -> Flask:
    app = Flask(__name__)
    seen: list[dict] = []
    app.config["SEEN"] = seen

    @app.route("/fhir/Patient/<rid>", methods=["GET", "PUT"])
    def patient(rid):
        seen.append({"method": request.method, "if_match": request.headers.get("If-Match"),
                     "authorization": request.headers.get("Authorization")})
        if rid == "boom":
            return Response("<html>Internal error</html>", 500, content_type="text/html")
        if rid == "garbled":
            return Response("not json", 200, content_type=FHIR_JSON)
        if rid == "unprocessable":
            return _outcome("Patient.gender: unknown code 'x'", "Patient.birthDate: bad date"), 422
        if rid == "locked":
            return _outcome("token expired"), 401
        if rid == "conflict":
            return _outcome("version conflict"), 409
        return {"resourceType": "Patient", "id": rid, "meta": {"versionId": "1"}}

    return app


@pytest.fixture
def scripted():
    app = _scripted_server()
    with serve(app) as base:
        yield RemoteStore(f"{base}/fhir", headers={"Authorization": "Bearer t0k3n"}), app.config["SEEN"]


def test_server_failure_is_a_502_naming_the_request(scripted):
    store, _ = scripted
    with pytest.raises(FhirError) as err:
        store.read("Patient", "boom")
    assert err.value.status == 502 and err.value.error_id == "store-upstream-error"
    assert "GET" in err.value.message and "Patient/boom" in err.value.message


def test_store_refusing_our_credentials_is_a_502_not_the_callers_401(scripted):
    store, _ = scripted
    with pytest.raises(FhirError) as err:
        store.read("Patient", "locked")
    assert err.value.status == 502 and err.value.error_id == "store-unauthorized"
    assert "token expired" in err.value.message


def test_non_json_answer_is_a_502(scripted):
    store, _ = scripted
    with pytest.raises(FhirError) as err:
        store.read("Patient", "garbled")
    assert err.value.status == 502


def test_422_is_invalid_request_carrying_every_error_issue(scripted):
    store, _ = scripted
    with pytest.raises(InvalidRequest) as err:
        store.read("Patient", "unprocessable")
    assert err.value.status == 422
    assert err.value.message == "Patient.gender: unknown code 'x'; Patient.birthDate: bad date"
    outcome = err.value.to_outcome()
    assert [i["diagnostics"] for i in outcome["issue"]][1:] == ["Patient.birthDate: bad date"]


def test_409_is_412_only_when_the_caller_sent_if_match(scripted):
    store, seen = scripted
    patient = {"resourceType": "Patient", "id": "conflict"}
    with pytest.raises(Conflict) as plain:
        store.update("Patient", "conflict", patient)
    assert not isinstance(plain.value, PreconditionFailed)
    with pytest.raises(PreconditionFailed) as guarded:
        store.update("Patient", "conflict", patient, if_match='"7"')
    assert guarded.value.status == 412
    assert [s["if_match"] for s in seen] == [None, 'W/"7"']  # ETag normalized to the weak form


def test_extra_headers_reach_the_server(scripted):
    store, seen = scripted
    assert store.read("Patient", "p1")["id"] == "p1"
    assert seen[-1]["authorization"] == "Bearer t0k3n"


def test_unreachable_server_is_a_503_store_error():
    # Port 9 (discard) has no listener here: the refused connection must not leak a requests error.
    store = RemoteStore("http://127.0.0.1:9/fhir", timeout=2)
    with pytest.raises(FhirError) as err:
        store.read("Patient", "x")
    assert err.value.status == 503 and err.value.error_id == "store-unavailable"
