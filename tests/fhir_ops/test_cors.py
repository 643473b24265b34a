"""CORS for browser SMART apps on other origins: which origins, which paths, preflights, and the default per mode.

Over real HTTP against ``trialtwin serve``'s WSGI stack (FHIR app, /auth, /inference) in smart mode.
"""
from __future__ import annotations

import argparse

import pytest
import requests

from fhir_ops import cors
from fhir_ops.commands.serve import build_config, cors_origins
from fhir_ops.errors import FhirError
from tests.live_server import serve

ALLOWED = "https://app.example:8443"
OTHER = "https://evil.example"


def _args(**kw):
    base = dict(host="127.0.0.1", port=8080, data_dir="unused", auth="smart", public_url=None, cors_origin=None)
    base.update(kw)
    return argparse.Namespace(**base)


# --- configuration ------------------------------------------------------------------------------------

@pytest.mark.unit
def test_origins_are_parsed_and_checked():
    assert cors.parse_origins(["https://a.example, http://127.0.0.1:9000/", "https://a.example"]) == [
        "https://a.example", "http://127.0.0.1:9000"]
    for bad in ("*", "https://a.example/path", "a.example", "ftp://a.example"):
        with pytest.raises(ValueError, match="not an origin"):
            cors.parse_origins(bad)


@pytest.mark.unit
def test_default_is_loopback_in_development_and_none_in_production(monkeypatch):
    monkeypatch.delenv("TRIALTWIN_CORS_ORIGINS", raising=False)
    dev = cors_origins(_args(), "http://127.0.0.1:8080")
    assert dev == [cors.LOOPBACK_ORIGINS]
    assert cors.LOOPBACK_ORIGINS.match("http://localhost:5173") and cors.LOOPBACK_ORIGINS.match("http://[::1]:3000")
    assert not cors.LOOPBACK_ORIGINS.match("http://localhost.evil.example")
    assert cors_origins(_args(host="0.0.0.0"), "http://127.0.0.1:8080") == []
    # on loopback behind a public name (reverse proxy): production
    assert cors_origins(_args(), "https://twin.example") == []
    assert cors_origins(_args(cors_origin=[ALLOWED]), "https://twin.example") == [ALLOWED]
    assert cors_origins(_args(cors_origin=["none"]), "http://127.0.0.1:8080") == []
    monkeypatch.setenv("TRIALTWIN_CORS_ORIGINS", f"{ALLOWED},https://b.example")
    assert cors_origins(_args(host="0.0.0.0"), "https://twin.example") == [ALLOWED, "https://b.example"]
    monkeypatch.setenv("TRIALTWIN_CORS_ORIGINS", "none")
    assert cors_origins(_args(), "http://127.0.0.1:8080") == []
    assert cors.configured_origins({}) == []
    with pytest.raises(FhirError) as info:
        cors_origins(_args(cors_origin=["*"]), "https://twin.example")
    assert info.value.status == 400 and info.value.error_id == "bad-cors-origin"


# --- over HTTP ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``serve --cors-origin https://app.example:8443`` on loopback, smart mode."""
    from fhir_ops.wsgi import create_wsgi

    data_dir = tmp_path_factory.mktemp("cors")
    holder: dict = {}

    def app(environ, start_response):
        return holder["app"](environ, start_response)

    with serve(app) as base:
        port = int(base.rsplit(":", 1)[1])
        config = build_config(_args(port=port, data_dir=str(data_dir), public_url=base, cors_origin=[ALLOWED]))
        config.update(SUBSCRIPTIONS=False, CLOSED_LOOP=False)  # no background watchers in a CORS test
        holder["app"] = wsgi = create_wsgi(config)
        yield base
        wsgi.app.extensions["trialtwin.store"].close()


PATHS = ("/fhir/.well-known/smart-configuration", "/fhir/metadata", "/fhir/Patient", "/auth/.well-known/jwks.json",
         "/inference/models")


@pytest.mark.api
@pytest.mark.parametrize("path", PATHS)
def test_allowed_origin_gets_headers_and_others_none(server, path):
    ok = requests.get(server + path, headers={"Origin": ALLOWED}, timeout=30)
    assert ok.headers["Access-Control-Allow-Origin"] == ALLOWED  # echoed, never "*"
    assert "Origin" in ok.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in ok.headers
    other = requests.get(server + path, headers={"Origin": OTHER}, timeout=30)
    assert other.status_code == ok.status_code
    assert not any(h.lower().startswith("access-control-") for h in other.headers)


@pytest.mark.api
def test_refusals_carry_cors_headers_so_the_app_can_read_them(server):
    # a browser app must be able to read the 401 OperationOutcome (and WWW-Authenticate) of a missing token
    refused = requests.get(server + "/fhir/Patient", headers={"Origin": ALLOWED}, timeout=30)
    assert refused.status_code == 401 and refused.json()["resourceType"] == "OperationOutcome"
    assert refused.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "WWW-Authenticate" in refused.headers["Access-Control-Expose-Headers"]
    token = requests.post(server + "/auth/token", data={"grant_type": "authorization_code", "code": "nope"},
                          headers={"Origin": ALLOWED}, timeout=30)
    assert token.status_code in (400, 401) and token.headers["Access-Control-Allow-Origin"] == ALLOWED


@pytest.mark.api
@pytest.mark.parametrize("path,method", [("/fhir/Patient", "GET"), ("/fhir/Observation", "POST"),
                                         ("/fhir/Patient/p1", "PUT"), ("/fhir/metadata", "GET"),
                                         ("/fhir/.well-known/smart-configuration", "GET"), ("/auth/token", "POST"),
                                         ("/auth/introspect", "POST"), ("/inference/predict/dropout", "POST")])
def test_preflight_allows_the_method_and_authorization(server, path, method):
    pre = requests.options(server + path, timeout=30, headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert 200 <= pre.status_code < 300, pre.text
    assert pre.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert method in pre.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "Origin" in pre.headers["Vary"] and "Access-Control-Allow-Credentials" not in pre.headers
    refused = requests.options(server + path, timeout=30, headers={
        "Origin": OTHER, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": "authorization"})
    assert "Access-Control-Allow-Origin" not in refused.headers


@pytest.mark.api
def test_capability_statement_tells_whether_cors_is_on(server, tmp_path):
    sec = requests.get(server + "/fhir/metadata", timeout=60).json()["rest"][0]["security"]
    assert sec["cors"] is True
    from fhir_ops.wsgi import create_wsgi

    holder: dict = {}
    with serve(lambda e, s: holder["app"](e, s)) as base:
        port = int(base.rsplit(":", 1)[1])
        config = build_config(_args(host="0.0.0.0", port=port, data_dir=str(tmp_path), public_url=base))
        config.update(SUBSCRIPTIONS=False, CLOSED_LOOP=False)  # no background watchers in a CORS test
        holder["app"] = wsgi = create_wsgi(config)
        try:
            answer = requests.get(base + "/fhir/metadata", headers={"Origin": "http://127.0.0.1:9"}, timeout=60)
            assert answer.json()["rest"][0]["security"]["cors"] is False
            assert "Access-Control-Allow-Origin" not in answer.headers  # production default: none
        finally:
            wsgi.app.extensions["trialtwin.store"].close()


@pytest.mark.unit
def test_the_serve_command_takes_the_flag_and_lists_its_urls(tmp_path):
    from types import SimpleNamespace

    from fhir_ops.cli import build_parser
    from fhir_ops.commands.serve import urls

    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--cors-origin", ALLOWED,
                                      "--cors-origin", "https://b.example"])
    assert args.cors_origin == [ALLOWED, "https://b.example"]
    assert build_config(args)["CORS_ORIGINS"] == [ALLOWED, "https://b.example"]
    listed = dict(urls(args, SimpleNamespace(mounts={"/auth": None})))
    assert listed["FHIR server (CapabilityStatement)"] == "http://127.0.0.1:8080/fhir/metadata"
