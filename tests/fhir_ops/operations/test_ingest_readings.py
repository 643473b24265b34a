"""``Observation/$ingest-readings`` over real HTTP: duplicates, order, lateness and unit drift."""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest

from tests.fhir_ops.conftest import FhirClient
from tests.fhir_ops.operations.twin_client import single

pytestmark = pytest.mark.api
MDC = "urn:iso:std:iso:11073:10101"
START = datetime(2026, 11, 1, tzinfo=timezone.utc)


def reading(patient: str, device: str, minute: int, value: float, *, code: str = "147842", unit: str = "/min",
            **extra) -> dict:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": MDC, "code": code}]},
            "subject": {"reference": f"Patient/{patient}"}, "device": {"reference": f"Device/{device}"},
            "effectiveDateTime": (START + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z"),
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
            **extra}


def stream(n: int, seed: int = 11) -> tuple[list[dict], int]:
    """``n`` readings of 10 devices with 1 % duplicates and 5 % displaced out of order; (readings, unique)."""
    rng = random.Random(seed)
    unique = [reading(f"p{k % 10}", f"hr-{k % 10}", k // 10, 60 + rng.random() * 40) for k in range(n)]
    out = list(unique)
    for k in rng.sample(range(n), n // 100):  # 1 % sent again (a gateway retrying)
        out.insert(rng.randrange(k, len(out)), dict(unique[k]))
    for _ in range(n // 20):  # 5 % arrive late, after later readings
        i = rng.randrange(0, len(out) - 50)
        out.insert(i + rng.randrange(10, 50), out.pop(i))
    return out, n


def ingest(fhir: FhirClient, readings: list[dict], **params) -> dict:
    parameter = [{"name": "readings", "resource": {"resourceType": "Bundle", "type": "collection",
                                                    "entry": [{"resource": r} for r in readings]}}]
    parameter += [{"name": k, "valueInteger": v} for k, v in params.items()]
    resp = fhir.post("Observation/$ingest-readings", {"resourceType": "Parameters", "parameter": parameter})
    assert resp.status_code == 200, resp.text
    return resp.json()


def count(fhir: FhirClient, query: str = "") -> int:
    return fhir.get(f"Observation?_summary=count{query}").json()["total"]


def test_duplicates_and_out_of_order_readings_store_exactly_the_unique_ones(fhir):
    readings, unique = stream(10_000)
    totals = dict.fromkeys(("stored", "duplicates", "outOfOrder", "rejected"), 0)
    for start in range(0, len(readings), 1000):
        body = ingest(fhir, readings[start:start + 1000])
        for k in totals:
            totals[k] += single(body, k)
    assert totals["stored"] == unique == count(fhir)
    assert totals["duplicates"] == len(readings) - unique and totals["rejected"] == 0
    assert totals["outOfOrder"] > 0
    # the whole stream again (a gateway replaying its buffer): nothing new
    again = ingest(fhir, readings[:1000])
    assert (single(again, "stored"), single(again, "duplicates")) == (0, 1000)
    assert count(fhir) == unique
    # searchable as LOINC heart rate, by time, per participant
    assert count(fhir, "&code=http://loinc.org|8867-4&subject=Patient/p3") == unique // 10


def test_unit_drift_is_converted_and_an_unconvertible_unit_rejects_only_that_reading(fhir):
    weight = "188736"  # MDC_MASS_BODY_ACTUAL -> LOINC 29463-7, canonical kg
    body = ingest(fhir, [reading("p1", "scale-1", 0, 70.0, code=weight, unit="kg"),
                         reading("p1", "scale-1", 1440, 150.0, code=weight, unit="[lb_av]"),  # scale set to lb
                         reading("p1", "scale-1", 2880, 70.0, code=weight, unit="mm[Hg]"),
                         {**reading("p1", "x", 10, 61.0), "device": None}])
    assert (single(body, "stored"), single(body, "unitConverted"), single(body, "rejected")) == (2, 1, 2)
    issues = next(p["resource"] for p in body["parameter"] if p["name"] == "outcome")["issue"]
    assert issues[0]["expression"] == ["readings.entry[2].resource.valueQuantity"]
    assert issues[1]["expression"] == ["readings.entry[3].resource.device"]
    found = fhir.get("Observation?code=http://loinc.org|29463-7&_sort=date").json()["entry"]
    values = [e["resource"]["valueQuantity"] for e in found]
    assert [v["code"] for v in values] == ["kg", "kg"]
    assert values[1]["value"] == pytest.approx(150 * 0.45359237, rel=1e-12)


def test_late_readings_are_counted_and_stored_at_their_own_time(fhir):
    now = datetime.now(timezone.utc)
    minutes_ago = [5, 30, 200, 2000]
    readings = [{**reading("p2", "bp-1", 0, 70.0),
                 "effectiveDateTime": (now - timedelta(minutes=m)).isoformat()} for m in minutes_ago]
    body = ingest(fhir, readings, lateAfterMinutes=60)
    assert (single(body, "stored"), single(body, "late"), single(body, "outOfOrder")) == (4, 2, 3)


def test_a_bundle_that_is_not_readings_is_refused(fhir):
    resp = fhir.post("Observation/$ingest-readings", {"resourceType": "Parameters", "parameter": [
        {"name": "readings", "resource": {"resourceType": "Patient"}}]})
    assert resp.status_code == 400
