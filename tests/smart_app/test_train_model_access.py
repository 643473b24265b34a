"""``$train-model`` with real tokens: training is secondary use of a whole study's data and writes model
Devices and Provenance, so it needs user/ or system/ scopes that may create and update both; read-only,
patient-limited and site-limited tokens are refused before anything is read."""
from __future__ import annotations

import pytest

from tests.smart_app.test_fhir_enforcement import call, outcome_id

pytestmark = pytest.mark.api
EMPTY = {"resourceType": "Parameters"}


def _backend(combined, scope: str, kid: str) -> str:
    from joserfc.jwk import ECKey

    key = ECKey.generate_key("P-384", parameters={"kid": kid, "alg": "ES384"})
    return combined.backend_token(scope, key, alg="ES384")["access_token"]


def test_train_model_needs_broad_write_scopes_on_device_and_provenance(combined):
    url = f"{combined.fhir}/ResearchStudy/tt-201/$train-model"
    read_only = _backend(combined, "system/*.rs", "train-read")
    refused = call("POST", url, read_only, json=EMPTY)
    assert refused.status_code == 403 and outcome_id(refused) == "insufficient-scope"
    assert "Device" in refused.json()["issue"][0]["diagnostics"]
    patient = combined.user_token("patient/*.cruds", patient="tt201-p001")["access_token"]
    assert call("POST", url, patient, json=EMPTY).status_code == 403
    # with the scopes it needs, the call is authorized and reaches the data: the small demo (6 participants)
    # has too few labelled visits to train on, which is the answer that comes after authorization
    writer = _backend(combined, "system/*.rs system/Device.cu system/Provenance.cu", "train-write")
    answered = call("POST", url, writer, json=EMPTY)
    assert answered.status_code == 422 and outcome_id(answered) == "too-little-data", answered.text
    assert call("GET", f"{combined.fhir}/Device", read_only, params={"_summary": "count"}).json()["total"] == 0
