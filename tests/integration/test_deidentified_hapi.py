"""De-identified resources are still valid R4 for an outside validator: HAPI's base R4 ``$validate`` checks one
example of each coded variant of the demo study after Safe Harbor, in both date modes."""
from __future__ import annotations

import json
from datetime import date

import pytest
import requests

from fhir_ops.auth import compartment_patients
from fhir_ops.deidentify import SafeHarbor
from fhir_ops.demo import build_demo_resources, simulate_demo_records

from .test_demo_codes_hapi import FHIR_JSON, _representatives

# shares the validator group with the other modules that make HAPI validate (see test_demo_codes_hapi)
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hapi-validator")]


@pytest.mark.parametrize("mode", ["year", "shift"])
def test_deidentified_demo_resources_are_valid_r4(hapi, mode, profiles_on_hapi):
    sh = SafeHarbor(b"integration-key-0123456789", mode, date(2026, 12, 1))
    samples = _representatives(build_demo_resources(simulate_demo_records(seed=7, n=24)))
    problems = []
    with requests.Session() as http:
        for resource in samples:
            out = sh.apply(resource, compartment_patients(resource))
            r = http.post(f"{hapi.base_url}/{out['resourceType']}/$validate", data=json.dumps(out),
                          headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=120)
            problems += [f"{out['resourceType']} ({resource['id']}): {i.get('diagnostics')} "
                         f"@ {i.get('expression') or i.get('location')}"
                         for i in r.json().get("issue", []) if i.get("severity") in ("error", "fatal")]
    assert sh.report()["changes"]["ids-pseudonymized"] == len(samples)
    assert not problems, "\n".join(problems)
