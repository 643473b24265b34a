"""Interoperability: the Python SMART client library (fhirclient) completes an EHR launch against this server."""
from __future__ import annotations

import pytest
import requests
from fhirclient import client

pytestmark = pytest.mark.api


def test_fhirclient_ehr_launch(stack, agent):
    app = stack.register_public_app(scope="launch launch/patient openid profile fhirUser user/*.cruds patient/*.rs")
    launch = stack.simulate_launch(agent, app["client_id"], patient="tt-001")

    smart = client.FHIRClient(settings={
        "app_id": app["client_id"], "api_base": launch["iss"], "redirect_uri": "https://app.example/callback",
        "launch_token": launch["launch"]})
    # fhirclient discovers the endpoints from /fhir/metadata (the oauth-uris extension from capability_security).
    authorize_url = smart.authorize_url
    assert authorize_url.startswith(stack.auth + "/authorize?")
    assert "code_challenge_method=S256" in authorize_url

    agent.follow(agent.session.get(authorize_url, allow_redirects=False), "https://app.example/callback")
    smart.handle_callback(agent.last_redirect)

    assert smart.ready
    assert smart.patient_id == "tt-001"
    assert smart.launch_context["need_patient_banner"] is True
    token = smart.server.auth.access_token
    assert token and token.count(".") == 2
    # The token fhirclient holds is accepted by the FHIR front (through smart_app.resource_server).
    bundle = requests.get(stack.fhir + "/Patient", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["tt-001", "tt-002"]  # user/*.cruds: not confined


def test_fhirclient_against_the_real_fhir_server(combined):
    """Discovery from fhir_ops' own /metadata, then the token is confined to the launch patient there."""
    from .helpers import UserAgent

    agent = UserAgent()
    app = combined.stack.register_public_app(scope="launch openid fhirUser patient/*.rs")
    launch = combined.stack.simulate_launch(agent, app["client_id"], patient="tt201-p004")
    smart = client.FHIRClient(settings={
        "app_id": app["client_id"], "api_base": launch["iss"], "redirect_uri": "https://app.example/callback",
        "launch_token": launch["launch"]})
    assert smart.authorize_url.startswith(combined.base + "/auth/authorize?")
    agent.follow(agent.session.get(smart.authorize_url, allow_redirects=False), "https://app.example/callback")
    smart.handle_callback(agent.last_redirect)
    assert smart.ready and smart.patient_id == "tt201-p004"
    headers = {"Authorization": f"Bearer {smart.server.auth.access_token}"}
    bundle = requests.get(combined.fhir + "/Patient", headers=headers, timeout=10).json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["tt201-p004"]
