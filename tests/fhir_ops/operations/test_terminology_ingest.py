"""Harmonization on ingest over real HTTP: transaction and batch Bundles and single creates."""
from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.api
FHIR_JSON = {"Content-Type": "application/fhir+json"}
EDC_LAB = "https://trialtwin.org/fhir/CodeSystem/edc-lab"
MDC = "urn:iso:std:iso:11073:10101"
LOINC = "http://loinc.org"


def obs(system, code, value, unit):
    return {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": system, "code": code}]},
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_bundle_ingest_adds_standard_codes_converts_units_and_warns(fhir_server, kind):
    base, store = fhir_server
    bundle = {"resourceType": "Bundle", "type": kind, "entry": [
        {"resource": obs(EDC_LAB, "LAB-FPG", 5.5, "mmol/L"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs(MDC, "188736", 200, "[lb_av]"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs("https://site-7.example.org/lab", "GLU-F", 101, "mg/dL"),
         "request": {"method": "POST", "url": "Observation"}}]}
    r = requests.post(base, json=bundle, headers=FHIR_JSON, timeout=10)
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert [("outcome" in e["response"]) for e in entries] == [False, False, True]
    issue = entries[2]["response"]["outcome"]["issue"][0]
    assert issue["severity"] == "warning" and issue["details"]["coding"][0]["code"] == "unmapped-code"
    assert "GLU-F" in issue["diagnostics"]
    glucose = requests.get(f"{base}/Observation", params={"code": f"{LOINC}|1558-6"}, timeout=10).json()["entry"]
    assert len(glucose) == 1
    stored = glucose[0]["resource"]
    assert stored["code"]["coding"][0] == {"system": EDC_LAB, "code": "LAB-FPG"}  # original kept
    assert stored["valueQuantity"]["value"] == 99.0858 and stored["valueQuantity"]["code"] == "mg/dL"
    weight = requests.get(f"{base}/Observation", params={"code": f"{LOINC}|29463-7"}, timeout=10).json()["entry"]
    assert weight[0]["resource"]["valueQuantity"]["value"] == 90.718474  # 200 * 0.45359237


def test_single_create_is_harmonized(fhir_server):
    base, _ = fhir_server
    r = requests.post(f"{base}/Observation", json=obs(MDC, "147842", 72, "/min"), headers=FHIR_JSON, timeout=10)
    assert r.status_code == 201
    created = requests.get(f"{base}/Observation/{r.json()['id']}", timeout=10).json()
    assert [c["code"] for c in created["code"]["coding"]] == ["147842", "8867-4"]
