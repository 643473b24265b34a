"""Who may create a Subscription: it delivers matches of every patient, so a broad search scope on its criteria type."""
from __future__ import annotations

import pytest
from joserfc.jwk import RSAKey

from tests.smart_app.test_fhir_enforcement import P1, call, outcome_id

pytestmark = pytest.mark.api


def subscription(criteria: str = "RiskAssessment?probability=gt0.8") -> dict:
    return {"resourceType": "Subscription", "status": "requested", "reason": "test", "criteria": criteria,
            "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook"}}


def backend(combined, scope: str, kid: str) -> str:
    key = RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS384"})
    return combined.backend_token(scope, key)["access_token"]


def test_a_patient_scoped_token_cannot_subscribe(combined):
    token = combined.user_token("patient/*.cruds", patient=P1)["access_token"]
    resp = call("POST", f"{combined.stack.fhir}/Subscription", token, json=subscription())
    assert resp.status_code == 403 and outcome_id(resp) == "subscription-needs-broad-scope"
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": subscription(), "request": {"method": "POST", "url": "Subscription"}}]}
    resp = call("POST", combined.stack.fhir, token, json=bundle)
    assert resp.status_code == 403


def test_a_system_token_needs_search_on_the_criteria_type(combined):
    narrow = backend(combined, "system/Subscription.cruds system/Observation.rs", "sub-narrow")
    resp = call("POST", f"{combined.stack.fhir}/Subscription", narrow, json=subscription())
    assert resp.status_code == 403 and outcome_id(resp) == "insufficient-scope"
    broad = backend(combined, "system/Subscription.cruds system/RiskAssessment.rs", "sub-broad")
    resp = call("POST", f"{combined.stack.fhir}/Subscription", broad, json=subscription())
    # past the access checks; the server itself refuses a loopback endpoint unless allowed by configuration
    assert resp.status_code == 422 and outcome_id(resp) == "endpoint-refused"
