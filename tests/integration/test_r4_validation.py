"""Validation agreement with HAPI FHIR's validator: a sample of the generated corpus through HAPI's $validate.

The same corpus as tests/fhir_ops/r4/test_agreement.py (one mutation per element rule and per required
binding of resources TrialTwin writes). HAPI checks more than the compiled validator (FHIRPath invariants,
extension definitions, references): where HAPI alone rejects, the reason must be one of those. Where the
compiled validator alone rejects, the case must be one of HAPI's documented leniencies listed below.
"""
from __future__ import annotations

import collections

import pytest
import requests

from fhir_ops.app import create_app
from fhir_ops.r4.validator import validate
from tests.app_config import open_config
from tests.live_server import serve
from tests.fhir_ops.r4.corpus import cases, demo_bases, hand_written_bases

# Every module that makes HAPI validate or load conformance resources shares one xdist group: HAPI's
# validator caches base definitions and builds snapshots on shared objects, and two workers doing it at
# once broke a CI run (duplicate fhir-type extensions in a snapshot, 409 on a first PUT).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hapi-validator")]

SAMPLE_EVERY = 9  # ~1 in 9 cases: a few hundred $validate calls, every rule represented


def _sample() -> list[tuple[str, dict]]:
    out = []
    for base in hand_written_bases() + demo_bases():
        all_cases = list(cases(base))
        by_rule: dict[str, list] = collections.defaultdict(list)
        for rule, resource in all_cases:
            by_rule[rule].append(resource)
        for rule, resources in sorted(by_rule.items()):
            out += [(rule, r) for r in resources[::SAMPLE_EVERY]]
    return out


def _hapi_errors(base_url: str, resource: dict) -> list[str]:
    r = requests.post(f"{base_url}/{resource['resourceType']}/$validate", json=resource,
                      headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}, timeout=120)
    body = r.json()
    if body.get("resourceType") != "OperationOutcome":
        return [f"HTTP {r.status_code}"]
    return [f"{i.get('expression') or i.get('location')}: {i.get('diagnostics')}" for i in body.get("issue", [])
            if i.get("severity") in ("error", "fatal")]


# What HAPI's validator checks beyond the compiled validator (so HAPI alone may reject): FHIRPath
# invariants, reference and fullUrl formats, absolute Coding/Identifier systems, codes of known code
# systems and required bindings of Coding/CodeableConcept elements, UCUM units, patterns of claimed profiles.
_HAPI_ONLY = ("constraint failed", "reference", "fullurl", "must be an absolute", "unknown code", "unit",
              "value set", "codesystem is unknown", "extension", "unable to resolve",
              "the pattern", "must be absolute", "invalid profile")  # a claimed profile's pattern[x] (the demo's model Library claims one)
# Where HAPI's JSON parser is lenient (so the compiled validator alone may reject).
_HAPI_LENIENT = ("empty", "must be a JSON", "not a valid uri", "not a valid url", "not a valid canonical")


def test_verdicts_agree_with_hapi_validate(hapi):
    sample = _sample()
    assert len(sample) >= 300
    agree = 0
    ours_only, hapi_only = [], []
    for rule, resource in sample:
        ours = validate(resource)
        theirs = _hapi_errors(hapi.base_url, resource)
        if bool(ours) == bool(theirs):
            agree += 1
        elif ours:
            ours_only.append((rule, [i.message for i in ours], theirs))
        else:
            hapi_only.append((rule, theirs))
    unexplained_hapi = [c for c in hapi_only if not all(any(k in e.lower() for k in _HAPI_ONLY) for e in c[1])]
    unexplained_ours = [c for c in ours_only if not any(any(m.startswith(k) or k in m for k in _HAPI_LENIENT)
                                                        for m in c[1])]
    assert not unexplained_hapi, unexplained_hapi[:5]
    assert not unexplained_ours, unexplained_ours[:5]
    assert agree >= 0.8 * len(sample), (agree, len(sample), len(ours_only), len(hapi_only))


def test_capability_statement_is_r4_by_hapi(hapi, tmp_path):
    """The server's resource type list is HAPI's R4 list, and HAPI's validator finds no error in the
    CapabilityStatement (it once reported 13 non-R4 types there, when the list came from R4B)."""
    app = create_app(open_config(DATA_DIR=str(tmp_path)))
    try:
        with serve(app) as base:
            ours = requests.get(f"{base}/fhir/metadata", headers={"Accept": "application/fhir+json"}, timeout=60).json()
    finally:
        app.extensions["trialtwin.store"].close()
    theirs = requests.get(f"{hapi.base_url}/metadata", headers={"Accept": "application/fhir+json"}, timeout=60).json()
    our_types = {r["type"] for r in ours["rest"][0]["resource"]}
    hapi_types = {r["type"] for r in theirs["rest"][0]["resource"]}
    assert our_types == hapi_types, (sorted(our_types - hapi_types), sorted(hapi_types - our_types))
    assert ours["fhirVersion"] == theirs["fhirVersion"] == "4.0.1"
    assert _hapi_errors(hapi.base_url, ours) == []
