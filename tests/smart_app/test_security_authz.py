"""Regression tests of issue #11's authorization-server findings, over real HTTP with real signed tokens.

Finding 1 (open registration minted full access), 2 (passwordless sign-in, anonymous enrolment list),
6 (revoked tokens still accepted at /fhir), 8 (blind SSRF through a client's jwks_uri), 10 (/auth pages
frameable, cookie, registration limits, javascript: URIs, echoed client_id) and #12's discovery points.
Each test failed on the code before the fix.
"""
from __future__ import annotations

import argparse
import io
import json
import socket

import pytest
import requests
from flask import Flask, jsonify
from joserfc.jwk import RSAKey

from fhir_ops.cli import main
from fhir_ops.errors import FhirError
from smart_app.authz import create_app
from smart_app.outbound import AllowList, OutboundRefused, check_url, is_public_address
from smart_app.rfc7523 import ASSERTION_TYPE
from tests.live_server import serve

from .conftest import TEST_AUTH_CONFIG, TEST_REGISTRATION_TOKEN
from .helpers import UserAgent, client_assertion, parse_forms, submit

pytestmark = pytest.mark.api

FHIR_JSON = "application/fhir+json"
P1, P3 = "tt201-p001", "tt201-p003"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}", "Accept": FHIR_JSON}


def backend_client(auth: str, key, scope: str, token: str | None, **extra) -> requests.Response:
    body = {"client_name": "probe", "grant_types": ["client_credentials"], "token_endpoint_auth_method": "private_key_jwt",
            "scope": scope, **({"jwks": {"keys": [key.as_dict(private=False)]}} if "jwks_uri" not in extra else {}),
            **extra}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(auth + "/register", json=body, headers=headers, timeout=10)


def backend_token(auth: str, key, client_id: str, scope: str) -> requests.Response:
    return requests.post(auth + "/token", data={
        "grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(key, client_id, auth + "/token")}, timeout=10)


@pytest.fixture(scope="module")
def key():
    return RSAKey.generate_key(2048, parameters={"kid": "probe-1", "alg": "RS384"})


# --- finding 1: registration is closed; a registered client never exceeds the administrator's ceiling ---

@pytest.fixture
def production(tmp_path):
    """An authorization server as ``trialtwin serve`` configures it by default: no development features,
    no registration token."""
    app = create_app({"DATA_DIR": str(tmp_path)})
    with serve(app) as base:
        yield base, tmp_path


def test_registration_is_closed_by_default(production, key):
    base, _ = production
    response = backend_client(base, key, "system/*.cruds", None)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_token" and "initial access token" in response.json()["error_description"]
    assert backend_client(base, key, "system/*.cruds", "guessed").status_code == 401


def test_configured_token_caps_self_asserted_system_scopes(tmp_path, key):
    # The configured token's default ceiling is read-only user-facing access: no system/ scope at all.
    app = create_app({"DATA_DIR": str(tmp_path), "REGISTRATION_ACCESS_TOKEN": "open-sesame"})
    with serve(app) as base:
        refused = backend_client(base, key, "system/*.cruds", "open-sesame")
        app_client = requests.post(base + "/register", headers={"Authorization": "Bearer open-sesame"}, timeout=10,
                                   json={"redirect_uris": ["https://app.example/cb"], "token_endpoint_auth_method": "none",
                                         "scope": "launch openid patient/*.cruds user/*.cruds"})
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_client_metadata"
    assert "within what this initial access token allows" in refused.json()["error_description"]
    # A user-facing app asking for write access is cut down to the ceiling.
    assert app_client.status_code == 201, app_client.text
    assert app_client.json()["scope"] == "launch openid patient/*.rs user/*.rs"


def test_admin_token_carries_its_ceiling_to_fhir(combined, key, capsys):
    """An administrator mints a registration token limited to system/Observation.rs; a client that
    self-asserts system/*.cruds gets exactly that and cannot list Patients or delete Observations."""
    data_dir = combined.config["DATA_DIR"]
    assert main(["clients", "token", "--data-dir", data_dir, "--scope", "system/Observation.rs", "--label", "edc"]) == 0
    token = capsys.readouterr().out.strip()
    registered = backend_client(combined.stack.auth, key, "system/*.cruds", token)
    assert registered.status_code == 201, registered.text
    assert registered.json()["scope"] == "system/Observation.rs"
    issued = backend_token(combined.stack.auth, key, registered.json()["client_id"], "system/*.cruds")
    assert issued.status_code == 400 and issued.json()["error"] == "invalid_scope"
    access = backend_token(combined.stack.auth, key, registered.json()["client_id"], "system/Observation.rs").json()
    headers = bearer(access["access_token"])
    assert requests.get(f"{combined.fhir}/Observation?_count=1", headers=headers, timeout=30).status_code == 200
    assert requests.get(f"{combined.fhir}/Patient", headers=headers, timeout=30).status_code == 403
    some = requests.get(f"{combined.fhir}/Observation?_count=1", headers=headers, timeout=30).json()["entry"][0]
    gone = requests.delete(f"{combined.fhir}/Observation/{some['resource']['id']}", headers=headers, timeout=30)
    assert gone.status_code == 403


def test_admin_registers_and_revokes_a_client(combined, key, tmp_path, capsys):
    data_dir = combined.config["DATA_DIR"]
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    assert main(["clients", "register", "--data-dir", data_dir, "--name", "EDC nightly", "--backend",
                 "--scope", "system/Patient.rs", "--jwks", str(jwks)]) == 0
    client = json.loads(capsys.readouterr().out)
    assert client["scope"] == "system/Patient.rs"
    access = backend_token(combined.stack.auth, key, client["client_id"], "system/Patient.rs").json()["access_token"]
    assert requests.get(f"{combined.fhir}/Patient", headers=bearer(access), timeout=30).status_code == 200
    assert main(["clients", "list", "--data-dir", data_dir, "--json"]) == 0
    listed = {c["client_id"]: c for c in json.loads(capsys.readouterr().out)}
    assert listed[client["client_id"]]["registered_by"] == "administrator"
    assert main(["clients", "revoke", "--data-dir", data_dir, client["client_id"]]) == 0
    # Its live token stops working at once, and it cannot get another.
    after = requests.get(f"{combined.fhir}/Patient", headers=bearer(access), timeout=30)
    assert after.status_code == 401 and "revoked" in after.text
    assert backend_token(combined.stack.auth, key, client["client_id"], "system/Patient.rs").status_code == 401



def test_generated_client_ids_never_read_as_cli_options_and_a_dashed_id_revokes_after_dashdash(tmp_path, capsys):
    """An id starting with '-' once made `clients revoke <id>` an argparse error (1 run in ~64)."""
    from smart_app.db import AuthDB

    db = AuthDB(str(tmp_path / "smart-auth.sqlite"))
    generated = [db.add_client({"client_name": f"c{i}"}).client_id for i in range(300)]
    assert all(len(c) == 32 and all(ch in "0123456789abcdef" for ch in c) for c in generated)
    db.add_client({"client_name": "imported"}, client_id="-imported-from-elsewhere")
    assert main(["clients", "revoke", "--data-dir", str(tmp_path), "--", "-imported-from-elsewhere"]) == 0
    assert "revoked -imported-from-elsewhere" in capsys.readouterr().out
    assert main(["clients", "list", "--data-dir", str(tmp_path), "--all", "--json"]) == 0
    listed = {c["client_id"]: c for c in json.loads(capsys.readouterr().out)}
    assert listed["-imported-from-elsewhere"]["revoked"] is True
    assert not any(listed[c]["revoked"] for c in generated)

# --- finding 2: no passwordless sign-in, no anonymous enrolment list, throttled failures ---------------

def test_simulator_and_published_passwords_are_off_by_default(production):
    base, _ = production
    assert requests.get(base + "/launch-simulator", timeout=10).status_code == 404
    agent = UserAgent()
    page = agent.session.get(base + "/login")
    refused = submit(agent.session, page.url, parse_forms(page.text)[0], {"username": "dr.chen", "password": "trialtwin"})
    assert refused.status_code == 401 and "wrong password" in refused.text
    assert "dr.chen" not in page.text and "trialtwin" not in page.text


def test_a_user_the_administrator_added_signs_in_with_a_hashed_password(production, monkeypatch, capsys):
    base, data_dir = production
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    assert main(["users", "add", "dr.lee", "--data-dir", str(data_dir), "--fhir-user", "Practitioner/dr-lee",
                 "--password-stdin"]) == 0
    stored = (data_dir / "smart-auth.sqlite").read_bytes()
    assert b"correct horse battery" not in stored and b"scrypt:" in stored
    wrong = UserAgent("dr.lee", "incorrect horse")
    page = wrong.session.get(base + "/login")
    assert submit(wrong.session, page.url, parse_forms(page.text)[0],
                  {"username": "dr.lee", "password": "incorrect horse"}).status_code == 401
    right = UserAgent("dr.lee", "correct horse battery")
    page = right.session.get(base + "/login")
    signed_in = submit(right.session, page.url, parse_forms(page.text)[0],
                       {"username": "dr.lee", "password": "correct horse battery"})
    assert signed_in.status_code == 302


def test_simulator_needs_a_signed_in_user_and_posting_a_username_signs_nobody_in(stack):
    anonymous = requests.Session()
    page = anonymous.get(stack.auth + "/launch-simulator", allow_redirects=False)
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    assert "tt-001" not in page.text and "Ana" not in page.text
    # The old single sign-on field does nothing: the session is still anonymous afterwards.
    anonymous.post(stack.auth + "/launch-simulator", data={"username": "dr.chen", "patient": "tt-001"}, timeout=10)
    again = anonymous.get(stack.auth + "/launch-simulator", allow_redirects=False)
    assert again.status_code == 302 and "/login" in again.headers["Location"]


def _outside_address() -> str | None:
    """A non-loopback address of this machine, to reach the server from off loopback."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_simulator_refuses_requests_from_off_loopback_even_with_the_flag(tmp_path):
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    app = create_app({"DATA_DIR": str(tmp_path), **TEST_AUTH_CONFIG})
    with serve(app, host=address) as base:
        response = requests.get(base + "/launch-simulator", timeout=10)
    assert response.status_code == 403 and "loopback" in response.json()["error_description"]


def test_dev_features_are_refused_off_loopback_at_start_up(tmp_path):
    from fhir_ops.commands.serve import build_config

    args = argparse.Namespace(host="0.0.0.0", port=8080, data_dir=str(tmp_path), auth="smart", public_url=None,
                              dev_launch_simulator=True)
    with pytest.raises(FhirError, match="loopback"):
        build_config(args)
    args.host, args.public_url = "127.0.0.1", "https://trials.example.org"
    with pytest.raises(FhirError, match="loopback"):
        build_config(args)
    with pytest.raises(ValueError, match="loopback"):
        create_app({"DATA_DIR": str(tmp_path), "DEV_LAUNCH_SIMULATOR": True, "ISSUER": "https://trials.example.org/auth"})


def test_failed_logins_are_throttled_per_user_with_a_clear_429(tmp_path):
    app = create_app({"DATA_DIR": str(tmp_path), **TEST_AUTH_CONFIG, "LOGIN_FAILURES_PER_USER": "3 per 15 minutes"})
    with serve(app) as base:
        agent = UserAgent()
        statuses = []
        for password in ("a", "b", "c", "trialtwin"):
            page = agent.session.get(base + "/login")
            statuses.append(submit(agent.session, page.url, parse_forms(page.text)[0],
                                   {"username": "dr.chen", "password": password}))
        # Another account from the same address is not locked by dr.chen's failures.
        other = UserAgent("dr.okafor")
        page = other.session.get(base + "/login")
        okafor = submit(other.session, page.url, parse_forms(page.text)[0], {"username": "dr.okafor", "password": "trialtwin"})
    assert [r.status_code for r in statuses] == [401, 401, 401, 429]
    assert int(statuses[-1].headers["Retry-After"]) > 0 and "Too many failed sign-ins" in statuses[-1].text
    assert okafor.status_code == 302


def test_failed_logins_are_throttled_per_address(tmp_path):
    app = create_app({"DATA_DIR": str(tmp_path), **TEST_AUTH_CONFIG, "LOGIN_FAILURES_PER_IP": "4 per 15 minutes"})
    with serve(app) as base:
        agent = UserAgent()
        codes = []
        for user in ("u1", "u2", "u3", "u4", "dr.okafor"):
            page = agent.session.get(base + "/login")
            codes.append(submit(agent.session, page.url, parse_forms(page.text)[0],
                                {"username": user, "password": "x" if user != "dr.okafor" else "trialtwin"}).status_code)
    assert codes == [401, 401, 401, 401, 429]


# --- finding 6: revocation takes effect at /fhir and /inference --------------------------------------

def test_refresh_rotation_and_revoke_endpoint_take_effect_at_fhir(combined):
    tokens = combined.user_token("offline_access patient/*.rs", patient=P1)
    first = tokens["access_token"]
    assert requests.get(f"{combined.fhir}/Patient/{P1}", headers=bearer(first), timeout=30).status_code == 200
    client_id = _client_id(first)
    rotated = requests.post(combined.stack.token_endpoint, data={
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": client_id}, timeout=10)
    assert rotated.status_code == 200, rotated.text
    old = requests.get(f"{combined.fhir}/Patient/{P1}", headers=bearer(first), timeout=30)
    assert old.status_code == 401 and "revoked" in old.json()["issue"][0]["diagnostics"]
    second = rotated.json()["access_token"]
    assert requests.get(f"{combined.fhir}/Patient/{P1}", headers=bearer(second), timeout=30).status_code == 200
    # RFC 7009: the client revokes its access token; the FHIR server refuses it from the next request on.
    revoked = requests.post(combined.stack.auth + "/revoke", data={"token": second, "client_id": client_id}, timeout=10)
    assert revoked.status_code == 200, revoked.text
    assert requests.get(f"{combined.fhir}/Patient/{P1}", headers=bearer(second), timeout=30).status_code == 401
    # ... and the refresh token issued with it is dead too.
    again = requests.post(combined.stack.token_endpoint, data={
        "grant_type": "refresh_token", "refresh_token": rotated.json()["refresh_token"], "client_id": client_id},
        timeout=10)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def _client_id(token: str) -> str:
    import base64
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["client_id"]


def test_a_client_cannot_revoke_another_clients_token(combined):
    victim = combined.user_token("patient/*.rs", patient=P1)["access_token"]
    other = combined.stack.register_public_app()
    response = requests.post(combined.stack.auth + "/revoke", data={"token": victim, "client_id": other["client_id"]},
                             timeout=10)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    assert requests.get(f"{combined.fhir}/Patient/{P1}", headers=bearer(victim), timeout=30).status_code == 200


def test_revoked_token_is_refused_by_the_inference_service(combined, key):
    import numpy as np

    from inference.registry import default_registry

    access = combined.backend_token("system/RiskAssessment.rs", key)["access_token"]
    probe = np.load(default_registry().latest("dropout").onnx_path.with_suffix(".probe.npz"))
    url, body = f"{combined.base}/inference/predict/dropout", {"rows": probe["x"][:1].tolist()}
    assert requests.post(url, json=body, headers=bearer(access), timeout=30).status_code == 200
    client_id = _client_id(access)
    revoked = requests.post(combined.stack.auth + "/revoke", timeout=10, data={
        "token": access, "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(key, client_id, combined.stack.auth + "/revoke")})
    assert revoked.status_code == 200, revoked.text
    assert requests.post(url, json=body, headers=bearer(access), timeout=30).status_code == 401


def test_discovery_advertises_revocation_and_the_capability_statement_only_r4_oauth_uris(combined):
    doc = requests.get(f"{combined.fhir}/.well-known/smart-configuration", timeout=10).json()
    assert doc["revocation_endpoint"] == combined.stack.auth + "/revoke"
    assert "management_endpoint" not in doc  # no management UI is implemented
    metadata = requests.get(f"{combined.fhir}/metadata", headers={"Accept": FHIR_JSON}, timeout=60).json()
    oauth = metadata["rest"][0]["security"]["extension"][0]
    assert {e["url"] for e in oauth["extension"]} == {"authorize", "token", "register"}


def test_a_v1_scope_is_granted_as_v1_and_enforced_like_v2(combined):
    body = combined.user_token("patient/*.read", patient=P1)
    assert "patient/*.read" in body["scope"].split()
    headers = bearer(body["access_token"])
    assert requests.get(f"{combined.fhir}/Observation?_count=1", headers=headers, timeout=30).status_code == 200
    assert requests.get(f"{combined.fhir}/Patient/{P3}", headers=headers, timeout=30).status_code == 403
    write = requests.post(f"{combined.fhir}/Observation", headers={**headers, "Content-Type": FHIR_JSON}, timeout=30,
                          json={"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                "subject": {"reference": f"Patient/{P1}"}})
    assert write.status_code == 403


# --- finding 8: a client's jwks_uri cannot aim the server at its own network ------------------------

@pytest.fixture
def jwks_server(key):
    """A loopback, plain-http JWKS host that counts the requests it gets."""
    hits = []
    app = Flask("jwks-host")

    @app.get("/jwks")
    def jwks():
        hits.append(1)
        return jsonify({"keys": [key.as_dict(private=False)]})

    with serve(app) as base:
        yield base + "/jwks", hits


def test_loopback_http_jwks_uri_is_refused_by_default(stack, key, jwks_server):
    uri, hits = jwks_server
    response = backend_client(stack.auth, key, "system/*.rs", TEST_REGISTRATION_TOKEN, jwks_uri=uri)
    assert response.status_code == 400 and "https" in response.json()["error_description"]
    # Even written as https, a loopback address is never fetched: the token request fails, nothing reached the host.
    https_uri = uri.replace("http://", "https://")
    registered = backend_client(stack.auth, key, "system/*.rs", TEST_REGISTRATION_TOKEN, jwks_uri=https_uri)
    assert registered.status_code == 201, registered.text
    token = backend_token(stack.auth, key, registered.json()["client_id"], "system/*.rs")
    assert token.status_code == 401 and token.json()["error"] == "invalid_client"
    assert hits == []


def test_allow_listed_development_jwks_is_fetched_once_and_cached(tmp_path, key, jwks_server):
    uri, hits = jwks_server
    app = create_app({"DATA_DIR": str(tmp_path), **TEST_AUTH_CONFIG, "JWKS_FETCH_ALLOW": ["127.0.0.1/32"]})
    with serve(app) as base:
        registered = backend_client(base, key, "system/*.rs", TEST_REGISTRATION_TOKEN, jwks_uri=uri)
        assert registered.status_code == 201, registered.text
        for _ in range(3):
            issued = backend_token(base, key, registered.json()["client_id"], "system/*.rs")
            assert issued.status_code == 200, issued.text
    assert len(hits) == 1


@pytest.mark.parametrize("url", ["http://93.184.216.34/jwks", "https://127.0.0.1/jwks", "https://localhost/jwks",
                                 "https://10.0.0.7/jwks", "https://169.254.169.254/latest", "https://[::1]/jwks",
                                 "https://[::ffff:192.168.1.1]/jwks", "ftp://example.org/jwks", "https://0.0.0.0/"])
def test_outbound_rules_refuse_plain_http_and_non_public_addresses(url):
    with pytest.raises(OutboundRefused):
        check_url(url)


def test_outbound_allow_list_admits_only_what_it_names():
    allow = AllowList.parse("127.0.0.1/32")
    assert check_url("http://127.0.0.1:9/jwks", allow)[1] == "127.0.0.1"
    with pytest.raises(OutboundRefused):
        check_url("http://10.0.0.7/jwks", allow)
    assert is_public_address("8.8.8.8") and not is_public_address("100.64.0.1")


def test_oversized_jwks_answer_is_refused(tmp_path):
    from smart_app.outbound import fetch_json

    app = Flask("big")
    app.add_url_rule("/jwks", "jwks", lambda: jsonify({"keys": [], "pad": "x" * 200_000}))
    with serve(app) as base:
        with pytest.raises(OutboundRefused, match="larger"):
            fetch_json(base + "/jwks", allow=AllowList.parse("127.0.0.1/32"))


def test_a_dripping_jwks_host_is_cut_off(tmp_path):
    import time as clock

    from flask import Response

    from smart_app.outbound import fetch_json

    app = Flask("slow")

    @app.get("/jwks")
    def slow():
        def drip():
            for _ in range(40):
                clock.sleep(0.1)
                yield b" "
        return Response(drip(), mimetype="application/json")

    # 4 s of dripping, each byte well within the 0.5 s read timeout: only the whole-answer deadline stops it.
    with serve(app) as base:
        with pytest.raises(OutboundRefused, match="longer than"):
            fetch_json(base + "/jwks", allow=AllowList.parse("127.0.0.1/32"), timeout=0.5)


# --- finding 10: /auth hardening ------------------------------------------------------------------

def test_login_and_consent_pages_cannot_be_framed_and_the_cookie_is_named_and_locked(stack, agent):
    app = stack.register_public_app()
    page = agent.open(stack.auth + "/launch-simulator")
    login = agent.session.get(stack.auth + "/login")
    for response in (page, login):
        assert response.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
        assert response.headers["X-Frame-Options"] == "DENY"
    cookies = [c for c in agent.session.cookies if c.domain.startswith("127.0.0.1")]
    assert [c.name for c in cookies] == ["trialtwin_auth"]
    raw = requests.get(stack.auth + "/login", timeout=10).headers["Set-Cookie"]
    assert raw.startswith("trialtwin_auth=") and "HttpOnly" in raw and "SameSite=Lax" in raw and "Secure" not in raw
    consent_agent = UserAgent()
    launch = stack.simulate_launch(consent_agent, app["client_id"], patient="tt-001")
    params = stack.authorize_url_params(app["client_id"], "launch patient/*.rs", launch=launch["launch"],
                                        challenge="x" * 43)
    consent = consent_agent.session.get(stack.auth + "/authorize", params=params)
    assert "Approve" in consent.text and consent.headers["X-Frame-Options"] == "DENY"


def test_cookie_is_secure_behind_an_https_public_url(tmp_path):
    app = create_app({"DATA_DIR": str(tmp_path), "ISSUER": "https://trials.example.org/auth"})
    with serve(app) as base:
        raw = requests.get(base + "/login", timeout=10).headers["Set-Cookie"]
    assert "Secure" in raw and raw.startswith("trialtwin_auth=")


@pytest.mark.parametrize("field, value, fragment", [
    ("client_name", "x" * 201, "longer than 200"),
    ("redirect_uris", ["javascript:alert(1)//"], "https"),
    ("redirect_uris", ["data:text/html,hi"], "https"),
    ("redirect_uris", ["http://app.example/cb"], "http only on a loopback host"),
    ("logo_uri", "javascript:alert(1)", "https"),
    ("launch_uri", "vbscript:x", "https"),
    ("client_uri", "https://user:pw@app.example/", "credentials"),
])
def test_registration_refuses_oversized_fields_and_non_http_uris(stack, field, value, fragment):
    body = {"redirect_uris": ["https://app.example/cb"], "token_endpoint_auth_method": "none", field: value}
    response = stack.post_registration(body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error_description"]


def test_registration_body_size_is_limited(stack):
    response = stack.post_registration({"redirect_uris": ["https://app.example/cb"], "token_endpoint_auth_method": "none",
                                        "client_name": "x" * (10 * 1024 * 1024)})
    assert response.status_code == 413


def test_client_id_is_generated_never_echoed_and_unknown_fields_are_dropped(stack):
    response = stack.post_registration({"client_id": "trialtwin-clinician", "redirect_uris": ["http://127.0.0.1:5/cb"],
                                        "token_endpoint_auth_method": "none", "x-big": "y" * 1000})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["client_id"] != "trialtwin-clinician" and "x-big" not in body


def test_registration_is_rate_limited_per_address(tmp_path):
    app = create_app({"DATA_DIR": str(tmp_path), **TEST_AUTH_CONFIG, "REGISTRATIONS_PER_IP": "3 per hour"})
    body = {"redirect_uris": ["https://app.example/cb"], "token_endpoint_auth_method": "none"}
    with serve(app) as base:
        codes = [requests.post(base + "/register", json=body, timeout=10,
                               headers={"Authorization": f"Bearer {TEST_REGISTRATION_TOKEN}"}) for _ in range(4)]
    assert [c.status_code for c in codes] == [201, 201, 201, 429]
    assert int(codes[-1].headers["Retry-After"]) > 0


def test_client_name_is_escaped_on_the_consent_page(stack):
    app = stack.register(client_name='<img src=x onerror="alert(1)">', redirect_uris=["https://app.example/callback"],
                         token_endpoint_auth_method="none", scope="launch/patient patient/*.rs")
    agent = UserAgent()
    params = stack.authorize_url_params(app["client_id"], "launch/patient patient/*.rs", challenge="x" * 43)
    page = agent.open(stack.auth + "/authorize?" + requests.compat.urlencode(params))
    assert "<img src=x" not in page.text and "&lt;img src=x" in page.text


def test_keys_rotate_keeps_old_tokens_valid_until_retired(tmp_path, capsys):
    from smart_app.jwks import SigningKeys

    path = tmp_path / "smart-signing-keys.json"
    old = SigningKeys.load_or_create(path)
    assert main(["keys", "rotate", "--data-dir", str(tmp_path)]) == 0
    rotated = SigningKeys.load(path)
    assert rotated.key_for("RS256").kid != old.key_for("RS256").kid
    published = {k["kid"] for k in rotated.public_jwks()["keys"]}
    assert old.key_for("RS256").kid in published  # tokens signed before the rotation still verify
    assert main(["keys", "retire", "--data-dir", str(tmp_path)]) == 1  # too young: refused
    assert main(["keys", "retire", "--data-dir", str(tmp_path), "--min-age", "0"]) == 0
    assert old.key_for("RS256").kid not in {k["kid"] for k in SigningKeys.load(path).public_jwks()["keys"]}


# --- finding 9 at /auth and /app: non-ASCII secrets are a 4xx, never a 500 -------------------------------

def test_non_ascii_csrf_state_and_client_secret_are_refused_not_a_500(combined):
    """``secrets.compare_digest`` raises TypeError on a str with non-ASCII characters; found by the
    bad-input run once it reached /app: every comparison of a sent secret is made on bytes."""
    odd = "žž" * 8
    auth, app = combined.stack.auth, combined.base + "/app"
    confidential = combined.stack.register(
        client_name="confidential", redirect_uris=["https://app.example/callback"],
        grant_types=["authorization_code"], token_endpoint_auth_method="client_secret_post", scope="patient/*.rs")
    answers = {
        "login csrf": UserAgent().session.post(auth + "/login", timeout=10,
                                               data={"csrf_token": odd, "username": "dr.chen", "password": "x"}),
        "token client_secret": requests.post(auth + "/token", timeout=10, data={
            "grant_type": "authorization_code", "code": "x", "redirect_uri": "https://app.example/callback",
            "client_id": confidential["client_id"], "client_secret": odd}),
        "introspect client_secret": requests.post(auth + "/introspect", timeout=10, data={
            "token": "x", "client_id": confidential["client_id"], "client_secret": odd}),
        "app callback state": requests.get(app + "/callback", params={"state": odd, "code": "x"}, timeout=10),
    }
    # the app's own form, with a signed-in session of a p001 launch
    from tests.smart_app.test_clinician_app import launch

    agent = UserAgent()
    assert launch(combined, agent, patient=P1).status_code == 200
    answers["app predict-dropout csrf"] = agent.session.post(f"{app}/patient/{P1}/predict-dropout",
                                                             data={"csrf_token": odd}, timeout=30,
                                                             allow_redirects=False)
    statuses = {name: r.status_code for name, r in answers.items()}
    assert all(400 <= s < 500 for s in statuses.values()), statuses
    assert answers["token client_secret"].json()["error"] == "invalid_client"
