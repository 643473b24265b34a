"""Fixtures for SMART tests: the authorization server mounted at /auth beside a small FHIR app at /fhir,
served together on a real loopback socket, and drivers for registration and authorization.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask, jsonify, request
from joserfc.jwk import ECKey, RSAKey
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from fhir_ops.errors import FhirError
from smart_app.authz import create_app
from smart_app.discovery import capability_security, smart_configuration
from smart_app.resource_server import TokenValidator, patient_compartment_allows
from tests.live_server import serve

from .helpers import UserAgent, parse_forms, pkce_pair, submit

PATIENTS = [
    {"resourceType": "Patient", "id": "tt-001", "name": [{"given": ["Ana"], "family": "Silva"}]},
    {"resourceType": "Patient", "id": "tt-002", "name": [{"given": ["Ben"], "family": "Okoro"}]},
]
STUDIES = [{"resourceType": "ResearchStudy", "id": "tt-201", "status": "active", "title": "TT-201"}]

#: The initial access token the test servers are configured with (RFC 7591 §3), and its scope ceiling:
#: wide, because these tests exercise every kind of client; the ceiling itself is tested in test_registration.
TEST_REGISTRATION_TOKEN = "test-initial-access-token"
TEST_REGISTRATION_CEILING = ("launch launch/patient launch/encounter openid fhirUser profile offline_access "
                             "online_access patient/*.cruds user/*.cruds system/*.cruds")
#: Development features on (the servers listen on loopback) and limits high enough for a module of tests.
TEST_AUTH_CONFIG = {
    "DEV_LAUNCH_SIMULATOR": True, "REGISTRATION_ACCESS_TOKEN": TEST_REGISTRATION_TOKEN,
    "REGISTRATION_SCOPE_CEILING": TEST_REGISTRATION_CEILING, "REGISTRATIONS_PER_IP": "10000 per hour",
    "LOGIN_FAILURES_PER_IP": "1000 per 15 minutes",
}


def make_fhir_app(stack_base: str) -> Flask:
    """A small FHIR front that publishes SMART discovery and serves a patient list behind the token library.

    The authorization-server tests need no store, so they use this front (smart_app's own discovery
    functions and TokenValidator); the real fhir_ops app in smart mode is the ``combined`` fixture below.
    """
    app = Flask("fhir-front")
    auth = {"ISSUER": stack_base + "/auth"}
    validator = TokenValidator(issuer=stack_base + "/auth", audience=stack_base + "/fhir",
                               jwks_uri=stack_base + "/auth/.well-known/jwks.json")

    @app.errorhandler(FhirError)
    def _fhir_error(exc):
        return jsonify(exc.to_outcome()), exc.status, exc.headers

    @app.get("/.well-known/smart-configuration")
    def well_known():
        return jsonify(smart_configuration(auth))

    @app.get("/metadata")
    def metadata():
        return jsonify({
            "resourceType": "CapabilityStatement", "status": "active", "date": "2026-01-01", "kind": "instance",
            "fhirVersion": "4.0.1", "format": ["json"],
            "rest": [{"mode": "server", "security": capability_security(auth)}],
        })

    @app.get("/<rtype>")
    def search(rtype):
        access = validator.authenticate(request.headers.get("Authorization"))
        patient = access.require("s", rtype)
        pool = {"Patient": PATIENTS, "ResearchStudy": STUDIES}.get(rtype, [])
        hits = [r for r in pool if patient is None or patient_compartment_allows(r, patient)]
        return jsonify({"resourceType": "Bundle", "type": "searchset", "total": len(hits),
                        "entry": [{"resource": r} for r in hits]})

    return app


@dataclass
class Stack:
    base: str
    auth: str
    fhir: str
    auth_app: Flask

    @property
    def token_endpoint(self) -> str:
        return self.auth + "/token"

    def post_registration(self, body, token: str | None = TEST_REGISTRATION_TOKEN, **kwargs) -> requests.Response:
        """POST /register with the initial access token (None: without one); the raw answer."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(self.auth + "/register", headers=headers, timeout=10,
                             **({"json": body} if not isinstance(body, (str, bytes)) else {"data": body}), **kwargs)

    def register(self, **metadata) -> dict:
        response = self.post_registration(metadata)
        assert response.status_code == 201, response.text
        return response.json()

    def register_public_app(self, scope: str = "launch launch/patient openid fhirUser offline_access "
                            "patient/*.cruds user/*.cruds", **extra) -> dict:
        return self.register(client_name="Twin viewer", redirect_uris=["https://app.example/callback"],
                             launch_uri="https://app.example/launch", grant_types=["authorization_code", "refresh_token"],
                             token_endpoint_auth_method="none", scope=scope, **extra)

    def authorize_url_params(self, client_id: str, scope: str, *, launch: str | None = None,
                             redirect_uri: str = "https://app.example/callback", challenge: str | None = None,
                             method: str | None = "S256", state: str = "st-1", aud: str | None = None,
                             nonce: str | None = None) -> dict:
        params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "scope": scope,
                  "state": state, "aud": aud if aud is not None else self.fhir}
        if challenge is not None:
            params["code_challenge"] = challenge
        if method is not None:
            params["code_challenge_method"] = method
        if launch is not None:
            params["launch"] = launch
        if nonce is not None:
            params["nonce"] = nonce
        return params

    def authorize(self, agent: UserAgent, client_id: str, scope: str, *, launch: str | None = None,
                  patient: str | None = None, redirect_uri: str = "https://app.example/callback",
                  nonce: str | None = None, decision: str = "approve") -> tuple[dict, str]:
        """Run the front channel to the redirect; return (redirect query, code_verifier)."""
        verifier, challenge = pkce_pair()
        params = self.authorize_url_params(client_id, scope, launch=launch, redirect_uri=redirect_uri,
                                           challenge=challenge, nonce=nonce)
        first = agent.session.get(self.auth + "/authorize", params=params, allow_redirects=False)
        return agent.follow(first, redirect_uri, patient=patient, decision=decision), verifier

    def exchange(self, client_id: str, code: str, verifier: str,
                 redirect_uri: str = "https://app.example/callback", **extra) -> requests.Response:
        return requests.post(self.token_endpoint, data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "client_id": client_id, "code_verifier": verifier, **extra}, timeout=10)

    def simulate_launch(self, agent: UserAgent, client_id: str, **fields) -> dict:
        """Sign in (password) and submit the launch simulator form; return the query the app's launch URL receives."""
        page = agent.open(self.auth + "/launch-simulator")
        assert page.status_code == 200, page.text
        form = parse_forms(page.text)[0]
        response = submit(agent.session, page.url, form, {"client_id": client_id, **fields})
        assert response.status_code == 302, response.text
        location = response.headers["Location"]
        return {"url": location, **{k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}}


@pytest.fixture
def stack(tmp_path):
    auth_app = create_app({"DATA_DIR": str(tmp_path / "auth"), "TESTING": True, **TEST_AUTH_CONFIG})
    holder: dict = {}

    def fhir(environ, start_response):
        return holder["fhir"](environ, start_response)

    def not_found(environ, start_response):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]

    with serve(DispatcherMiddleware(not_found, {"/auth": auth_app, "/fhir": fhir})) as base:
        holder["fhir"] = make_fhir_app(base)
        yield Stack(base=base, auth=base + "/auth", fhir=base + "/fhir", auth_app=auth_app)


@pytest.fixture
def agent():
    return UserAgent()


@pytest.fixture
def rsa_key():
    return RSAKey.generate_key(2048, parameters={"kid": "backend-rsa", "alg": "RS384"})


@pytest.fixture
def ec_key():
    return ECKey.generate_key("P-384", parameters={"kid": "backend-ec", "alg": "ES384"})


@pytest.fixture
def backend_client(stack, rsa_key, ec_key):
    """A registered SMART Backend Services client holding an RS384 and an ES384 key."""
    return stack.register(
        client_name="EDC sync", grant_types=["client_credentials"], token_endpoint_auth_method="private_key_jwt",
        jwks={"keys": [rsa_key.as_dict(private=False), ec_key.as_dict(private=False)]},
        scope="system/Observation.cruds system/Patient.rs system/ResearchSubject.rs")


# --- the real combined server: fhir_ops in smart mode + /auth + /app, with the demo study -------------------

DEMO_PARTICIPANTS = 6


@dataclass
class Combined:
    """``trialtwin serve --auth smart`` as the CLI builds it, on a loopback port, with a small TT-201 demo."""

    base: str
    config: dict
    stack: Stack
    store: object = None  # the server's own store, for fixtures that add data next to the demo
    wsgi: object = None  # the served WSGI application (fhir_ops.wsgi.create_wsgi): its routes, for coverage checks

    @property
    def fhir(self) -> str:
        return self.base + "/fhir"

    def user_token(self, scope: str, patient: str | None = None) -> dict:
        """A real token from the real authorization server, by the standalone flow (patient picked on the page)."""
        client = self.stack.register_public_app(scope=f"launch/patient openid fhirUser {scope}")
        agent = UserAgent()
        wanted = f"{'launch/patient ' if patient else ''}openid fhirUser {scope}"
        query, verifier = self.stack.authorize(agent, client["client_id"], wanted, patient=patient)
        response = self.stack.exchange(client["client_id"], query["code"], verifier)
        assert response.status_code == 200, response.text
        return response.json()

    def backend_token(self, scope: str, key, alg: str = "RS384") -> dict:
        from .helpers import client_assertion

        client = self.stack.register(client_name="EDC sync", grant_types=["client_credentials"],
                                     token_endpoint_auth_method="private_key_jwt",
                                     jwks={"keys": [key.as_dict(private=False)]}, scope=scope)
        response = requests.post(self.stack.token_endpoint, data={
            "grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": client_assertion(key, client["client_id"], self.stack.token_endpoint, alg=alg)},
            timeout=10)
        assert response.status_code == 200, response.text
        return response.json()


def combined_config(base: str, data_dir, auth: str = "smart") -> dict:
    """The configuration ``trialtwin serve`` builds for a server reachable at ``base``."""
    import argparse

    from fhir_ops.commands.serve import build_config

    port = int(base.rsplit(":", 1)[1])
    config = build_config(argparse.Namespace(
        host="127.0.0.1", port=port, data_dir=str(data_dir), auth=auth, public_url=base,
        dev_launch_simulator=True, registration_token=TEST_REGISTRATION_TOKEN,
        registration_scope=TEST_REGISTRATION_CEILING, jwks_allow=None))
    # the background watchers (Subscriptions, the closed loop) have their own tests; here they would only
    # recalibrate twins behind the back of tests that count versions
    return {**config, **TEST_AUTH_CONFIG, "SUBSCRIPTIONS": False, "CLOSED_LOOP": False}


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    yield from combined_server(tmp_path_factory)


def combined_server(tmp_path_factory, participants: int = DEMO_PARTICIPANTS, seed: int = 5, **overrides):
    """Serve the combined server with a demo of ``participants`` simulated with ``seed`` (the small one unless
    told; ``overrides`` go into its config); yield a Combined."""
    from fhir_ops.commands.demo import create_demo
    from fhir_ops.wsgi import create_wsgi

    data_dir = tmp_path_factory.mktemp("combined")
    holder: dict = {}

    def app(environ, start_response):  # the port is known only once the socket is bound
        return holder["app"](environ, start_response)

    with serve(app) as base:
        config = {**combined_config(base, data_dir), **overrides}
        create_demo(config, participants, seed)
        holder["app"] = wsgi = create_wsgi(config)
        yield Combined(base, config, Stack(base=base, auth=base + "/auth", fhir=base + "/fhir",
                                           auth_app=wsgi.mounts["/auth"]), wsgi.app.extensions["trialtwin.store"], wsgi)
        wsgi.app.extensions["trialtwin.store"].close()
