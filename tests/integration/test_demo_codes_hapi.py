"""The demo study speaks R4's own vocabulary: HAPI's R4 validator checks every kind of resource it contains.

One example of each distinct shape (resource type and the coded values it carries) from a small demo
population goes through HAPI's base R4 ``$validate``, which knows the HL7 code systems (adverse-event
seriousness, observation category, research-study phase, ...) and the required value-set bindings.
"""
from __future__ import annotations

import json

import pytest
import requests

from fhir_ops.demo import build_demo_resources, simulate_demo_records

# Every module that makes HAPI validate or load conformance resources shares one xdist group: HAPI's
# validator caches base definitions and builds snapshots on shared objects, and two workers doing it at
# once broke a CI run (duplicate fhir-type extensions in a snapshot, 409 on a first PUT).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hapi-validator")]

FHIR_JSON = "application/fhir+json"
HL7 = "http://terminology.hl7.org/CodeSystem/"


def _codings(node, found: set) -> set:
    if isinstance(node, dict):
        if "system" in node and "code" in node and str(node["system"]).startswith(HL7):
            found.add((node["system"], node["code"]))
        for value in node.values():
            _codings(value, found)
    elif isinstance(node, list):
        for value in node:
            _codings(value, found)
    return found


def _representatives(resources: list[dict]) -> list[dict]:
    """One resource per (type, set of HL7 codes, set of status-like codes): every coded variant once."""
    chosen: dict[tuple, dict] = {}
    for resource in resources:
        simple = tuple(sorted((k, v) for k, v in resource.items() if isinstance(v, str) and k != "id"
                              and k in ("status", "gender", "actuality", "intent", "mode")))
        key = (resource["resourceType"], tuple(sorted(_codings(resource, set()))), simple)
        chosen.setdefault(key, resource)
    return list(chosen.values())


def test_every_coded_variant_of_the_demo_is_valid_r4(hapi, profiles_on_hapi):
    resources = build_demo_resources(simulate_demo_records(seed=7, n=24))
    assert any(r["resourceType"] == "AdverseEvent" for r in resources)  # the seriousness codes are exercised
    samples = _representatives(resources)
    assert {s["resourceType"] for s in samples} >= {"Patient", "ResearchSubject", "ResearchStudy", "Observation",
                                                      "AdverseEvent", "Appointment", "Encounter", "Organization",
                                                      "Location", "MedicationAdministration"}
    problems = []
    with requests.Session() as http:
        for resource in samples:
            r = http.post(f"{hapi.base_url}/{resource['resourceType']}/$validate", data=json.dumps(resource),
                          headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=120)
            issues = r.json().get("issue", [])
            problems += [f"{resource['resourceType']}/{resource['id']}: {i.get('diagnostics')} "
                         f"@ {i.get('expression') or i.get('location')}"
                         for i in issues if i.get("severity") in ("error", "fatal")]
    assert not problems, "\n".join(problems)
