"""Profiles validated on a real validator: HAPI loads our conformance resources and runs $validate.

Uses scripts/hapi_validate.py as CI does; the small test profile in data/ proves that an uploaded
differential-only StructureDefinition really drives validation, before the project's own profiles exist.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import hapi_validate

# Every module that makes HAPI validate or load conformance resources shares one xdist group: HAPI's
# validator caches base definitions and builds snapshots on shared objects, and two workers doing it at
# once broke a CI run (duplicate fhir-type extensions in a snapshot, 409 on a first PUT).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hapi-validator")]

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"

PROFILE = "https://trialtwin.org/fhir/test/StructureDefinition/tt-test-timed-observation"


def test_uploaded_profile_accepts_a_conforming_observation(hapi):
    report = hapi_validate.run(hapi.base_url, [DATA / "conformance"], [DATA / "examples"])
    assert report.problems == []
    assert report.loaded == ["StructureDefinition/tt-test-timed-observation"]
    assert report.validated == [f"observation-timed-hba1c.json against {PROFILE}"]


def test_uploaded_profile_rejects_an_observation_without_subject_and_time(hapi):
    report = hapi_validate.run(hapi.base_url, [DATA / "conformance"], [DATA / "invalid"])
    assert len(report.problems) == 2, report.problems
    assert any("Observation.subject: minimum required = 1" in p for p in report.problems)
    assert any("Observation.effective[x]: minimum required = 1" in p for p in report.problems)
    # The plain R4 Observation accepts the same resource, so the errors come from our profile.
    example = json.loads((DATA / "invalid" / "observation-without-subject-or-time.json").read_text())
    example.pop("meta")
    base = requests.post(f"{hapi.base_url}/Observation/$validate", json=example,
                         headers={"Content-Type": "application/fhir+json"}, timeout=60).json()
    assert not [i for i in base["issue"] if i["severity"] in ("error", "fatal")]


def test_a_malformed_profile_is_a_load_failure(hapi, tmp_path):
    broken = json.loads((DATA / "conformance" / "StructureDefinition-tt-test-timed-observation.json").read_text())
    broken.update(id=f"tt-broken-{uuid.uuid4().hex[:8]}", kind="not-a-kind")
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    report = hapi_validate.run(hapi.base_url, [tmp_path], [])
    assert len(report.problems) == 1 and "loading StructureDefinition/tt-broken-" in report.problems[0]
    assert report.loaded == []


def test_example_without_a_profile_is_reported(hapi, tmp_path):
    example = json.loads((DATA / "examples" / "observation-timed-hba1c.json").read_text())
    example.pop("meta")
    (tmp_path / "unprofiled.json").write_text(json.dumps(example))
    report = hapi_validate.run(hapi.base_url, [], [tmp_path])
    assert report.problems == [f"{tmp_path / 'unprofiled.json'}: example names no profile in meta.profile"]


def test_project_profiles_load_and_their_examples_validate(hapi):
    # Picks up whatever profiles/ holds (the project's profiles arrive with issue 4); every example
    # in profiles/examples must be validated against the profile it names, without errors.
    examples = hapi_validate.find_examples([ROOT / "profiles" / "examples"])
    report = hapi_validate.run(hapi.base_url, [ROOT / "profiles"], [ROOT / "profiles" / "examples"])
    assert report.problems == []
    assert len(report.loaded) == len(hapi_validate.find_conformance([ROOT / "profiles"]))
    assert len(report.validated) == sum(len(r.get("meta", {}).get("profile", [])) for _, r in examples)


def test_a_differential_naming_a_missing_element_is_a_load_failure(hapi, tmp_path):
    # HAPI stores such a profile without complaint; validating the definition itself catches it.
    sd = json.loads((DATA / "conformance" / "StructureDefinition-tt-test-timed-observation.json").read_text())
    sd.update(id="tt-test-bad-path", url=PROFILE.replace("timed-observation", "bad-path"))
    sd["differential"]["element"].append({"id": "Observation.shoeSize", "path": "Observation.shoeSize", "min": 1})
    (tmp_path / "bad-path.json").write_text(json.dumps(sd))
    report = hapi_validate.run(hapi.base_url, [tmp_path], [])
    assert report.loaded == ["StructureDefinition/tt-test-bad-path"]
    assert report.problems and all("Observation.shoeSize" in p for p in report.problems), report.problems


def test_an_extension_definition_loads_and_checks_extension_values(hapi, tmp_path):
    url = "https://trialtwin.org/fhir/test/StructureDefinition/tt-test-interval-level"
    extension = {
        "resourceType": "StructureDefinition", "id": "tt-test-interval-level", "url": url,
        "name": "TTTestIntervalLevel", "status": "draft", "fhirVersion": "4.0.1", "kind": "complex-type",
        "abstract": False, "context": [{"type": "element", "expression": "Observation.component"}],
        "type": "Extension", "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Extension",
        "derivation": "constraint", "differential": {"element": [
            {"id": "Extension", "path": "Extension"},
            {"id": "Extension.extension", "path": "Extension.extension", "max": "0"},
            {"id": "Extension.url", "path": "Extension.url", "fixedUri": url},
            {"id": "Extension.value[x]", "path": "Extension.value[x]", "min": 1, "type": [{"code": "decimal"}]}]}}
    (tmp_path / "conformance").mkdir()
    (tmp_path / "conformance" / "ext.json").write_text(json.dumps(extension))
    report = hapi_validate.run(hapi.base_url, [tmp_path / "conformance"], [])
    assert report.problems == [] and report.loaded == ["StructureDefinition/tt-test-interval-level"]
    observation = json.loads((DATA / "examples" / "observation-timed-hba1c.json").read_text())
    observation["component"] = [{"code": {"text": "upper bound"}, "valueQuantity": {"value": 8.1},
                                 "extension": [{"url": url, "valueString": "ninety"}]}]
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "obs.json").write_text(json.dumps(observation))
    report = hapi_validate.run(hapi.base_url, [tmp_path / "conformance"], [tmp_path / "examples"])
    assert any("allows for the types [decimal] but found type string" in p for p in report.problems), report.problems
