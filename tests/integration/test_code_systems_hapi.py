"""HAPI FHIR reads TrialTwin's own code systems and knows the codes the embedded server writes with them.

profiles/ is loaded into HAPI (conftest ``profiles_on_hapi``); HAPI's ``CodeSystem/$validate-code`` then
answers for the codes found in real answers of the embedded server (an OperationOutcome's error id, an
AuditEvent's operation) and for every concept of the smaller systems, and refuses a code that is not there.
"""
from __future__ import annotations

import pytest
import requests

import profiles
from fhir_ops.app import create_app
from fhir_ops.errors import ERROR_SYSTEM
from tests.app_config import open_config
from tests.fhir_ops.conftest import FhirClient
from tests.fhir_ops.test_code_systems import PUBLISHED
from tests.live_server import serve

# loads profiles/ into HAPI like the other modules of this group (see test_profiles_hapi.py)
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hapi-validator")]


def _known(base: str, url: str, code: str) -> bool:
    answer = requests.get(f"{base}/CodeSystem/$validate-code", params={"url": url, "code": code},
                          headers={"Accept": "application/fhir+json"}, timeout=120)
    assert answer.status_code == 200, answer.text[:300]
    return next(p["valueBoolean"] for p in answer.json()["parameter"] if p["name"] == "result")


@pytest.fixture
def fhir(tmp_path):
    """The embedded server (open mode, empty store), whose error answers are checked."""
    app = create_app(open_config(DATA_DIR=str(tmp_path)))
    with serve(app) as base:
        yield FhirClient(base + "/fhir")
    app.extensions["trialtwin.store"].close()


def test_hapi_knows_the_error_ids_the_server_answers_with(profiles_on_hapi, fhir):
    answers = [fhir.get("NoSuchType/1"), fhir.get("Patient/nope"), fhir.get("Patient", params={"_count": "x"}),
               fhir.post("Patient", b"{not json"), fhir.get("Patient/$no-such-operation")]
    ids = {c["code"] for a in answers for i in a.json()["issue"] for c in i["details"]["coding"]
           if c["system"] == ERROR_SYSTEM}
    assert ids == {"unknown-resource-type", "unknown-id", "invalid-search-value", "malformed-json", "unknown-operation"}
    for code in sorted(ids):
        assert _known(profiles_on_hapi, ERROR_SYSTEM, code), code
    assert not _known(profiles_on_hapi, ERROR_SYSTEM, "no-such-error-id")


@pytest.mark.parametrize("file_name", sorted(set(PUBLISHED) - {"CodeSystem-error.json"}))
def test_hapi_knows_every_concept_of_the_smaller_systems(file_name, profiles_on_hapi):
    cs = profiles.load(file_name)
    for concept in cs["concept"]:
        assert _known(profiles_on_hapi, cs["url"], concept["code"]), concept["code"]
    assert not _known(profiles_on_hapi, cs["url"], "not-a-" + cs["id"])
