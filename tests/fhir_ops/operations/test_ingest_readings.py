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


# -- Open mHealth -----------------------------------------------------------------------------------
def omh_point(schema: str, minute: int, body: dict, *, interval: bool = False, point_id: str | None = None) -> dict:
    when = (START + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z")
    frame = ({"time_interval": {"start_date_time": when,
                                "end_date_time": (START + timedelta(minutes=minute + 60)).isoformat()}}
             if interval else {"date_time": when})
    return {"header": {"id": point_id or f"{schema}-{minute}", "creation_date_time": when,
                       "schema_id": {"namespace": "omh", "name": schema, "version": "1.0"},
                       "acquisition_provenance": {"source_name": "a wearable", "modality": "sensed"}},
            "body": {**body, "effective_time_frame": frame}}


def ingest_omh(fhir: FhirClient, points, *, subject="Patient/p5", device="Device/watch-5", status=200, **params):
    import base64
    import json

    data = base64.b64encode(json.dumps(points).encode()).decode()
    parameter = [{"name": "openMHealth", "valueAttachment": {"contentType": "application/json", "data": data}}]
    if subject:
        parameter.append({"name": "subject", "valueReference": {"reference": subject}})
    if device:
        parameter.append({"name": "device", "valueReference": {"reference": device}})
    parameter += [{"name": k, "valueInteger": v} for k, v in params.items()]
    resp = fhir.post("Observation/$ingest-readings", {"resourceType": "Parameters", "parameter": parameter})
    assert resp.status_code == status, resp.text
    return resp.json()


def test_open_mhealth_data_points_follow_the_same_rules_as_gateway_observations(fhir):
    rng = random.Random(5)
    hr = [omh_point("heart-rate", m, {"heart_rate": {"value": 55 + rng.randrange(40), "unit": "beats/min"}})
          for m in range(200)]
    stream_ = list(hr)
    for k in (3, 50, 120):  # sent again
        stream_.insert(k + 7, dict(hr[k]))
    for _ in range(10):  # out of order
        i = rng.randrange(0, len(stream_) - 20)
        stream_.insert(i + rng.randrange(5, 20), stream_.pop(i))
    bp = [omh_point("blood-pressure", 10, {"systolic_blood_pressure": {"value": 128, "unit": "mmHg"},
                                            "diastolic_blood_pressure": {"value": 82, "unit": "mmHg"}}),
          omh_point("blood-pressure", 20, {"systolic_blood_pressure": {"value": 16.0, "unit": "kPa"},  # drift
                                            "diastolic_blood_pressure": {"value": 10.4, "unit": "kPa"}})]
    weight = [omh_point("body-weight", 0, {"body_weight": {"value": 180, "unit": "lb"}})]
    steps = [omh_point("step-count", 0, {"step_count": 4210}, interval=True),
             omh_point("step-count", 60, {"step_count": {"value": 388, "unit": "steps"}}, interval=True)]
    body = ingest_omh(fhir, stream_ + bp + weight + steps)
    assert single(body, "received") == 208 and single(body, "rejected") == 0
    assert (single(body, "stored"), single(body, "duplicates")) == (205, 3)
    assert single(body, "outOfOrder") > 0 and single(body, "unitConverted") == 2  # kPa and lb
    assert count(fhir, "&code=http://loinc.org|8867-4&subject=Patient/p5") == 200
    # the same points as gateway Observations of the same device: already there
    again = ingest(fhir, [reading("p5", "watch-5", 7, float(hr[7]["body"]["heart_rate"]["value"]))])
    assert (single(again, "stored"), single(again, "duplicates")) == (0, 1)
    # ... and resending the whole Open mHealth batch stores nothing
    body = ingest_omh(fhir, stream_ + bp + weight + steps)
    assert (single(body, "stored"), single(body, "duplicates")) == (0, 208)
    # the MDC compound stays MDC (the shipped map calls the LOINC panel wider); its parts gain LOINC codes
    pressures = fhir.get(f"Observation?code={MDC}|150020&_sort=date").json()["entry"]
    assert count(fhir, "&component-code=http://loinc.org|8480-6&subject=Patient/p5") == 2
    assert [p["resource"]["effectiveDateTime"] for p in pressures] == ["2026-11-01T00:10:00Z", "2026-11-01T00:20:00Z"]
    assert [c["valueQuantity"] for c in pressures[0]["resource"]["component"]] == [
        {"value": 128, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
        {"value": 82, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}]
    comps = [c["valueQuantity"] for c in pressures[1]["resource"]["component"]]
    assert [c["code"] for c in comps] == ["mm[Hg]", "mm[Hg]"]
    # UCUM (ucum-essence.xml) defines m[Hg] as 133.3220 kPa, so 1 mm[Hg] = 133.3220 Pa
    assert comps[0]["value"] == pytest.approx(16.0 * 1000 / 133.3220, rel=1e-12)
    [w] = fhir.get("Observation?code=http://loinc.org|29463-7&subject=Patient/p5").json()["entry"]
    assert w["resource"]["valueQuantity"]["value"] == pytest.approx(180 * 0.45359237, rel=1e-12)
    found = fhir.get("Observation?code=http://loinc.org|55423-8&_sort=date").json()["entry"]
    assert [e["resource"]["valueQuantity"]["value"] for e in found] == [4210, 388]
    assert found[0]["resource"]["effectivePeriod"]["start"] == "2026-11-01T00:00:00Z"
    assert found[0]["resource"]["device"] == {"reference": "Device/watch-5"}


def test_bad_open_mhealth_points_are_rejected_alone_and_bad_calls_refused(fhir):
    good = omh_point("heart-rate", 0, {"heart_rate": {"value": 60, "unit": "beats/min"}})
    body = ingest_omh(fhir, [good,
                             omh_point("heart-rate", 1, {"heart_rate": {"value": 60, "unit": "furlongs"}}),
                             omh_point("sleep-duration", 2, {"sleep_duration": {"value": 7, "unit": "h"}}),
                             {"header": {"schema_id": {"namespace": "omh", "name": "heart-rate"}},
                              "body": {"heart_rate": {"value": 61, "unit": "beats/min"}}},
                             "not a data point"], subject="Patient/p6")
    assert (single(body, "stored"), single(body, "rejected")) == (1, 4)
    issues = next(p["resource"] for p in body["parameter"] if p["name"] == "outcome")["issue"]
    assert [i["expression"][0] for i in issues] == [
        "openMHealth[1].body.heart_rate.unit", "openMHealth[2].header.schema_id.name",
        "openMHealth[3].body.effective_time_frame", "openMHealth[4].header.schema_id"]
    assert count(fhir, "&subject=Patient/p6") == 1
    # the call itself is wrong: nothing is stored
    for kwargs, where in (({"subject": None}, "subject"), ({"device": None}, "device"),
                          ({"subject": "Group/g1"}, "subject")):
        out = ingest_omh(fhir, [omh_point("heart-rate", 9, {"heart_rate": {"value": 60, "unit": "beats/min"}})],
                         status=400, **kwargs)
        assert out["resourceType"] == "OperationOutcome" and out["issue"][0]["expression"] == [where]
    resp = fhir.post("Observation/$ingest-readings", {"resourceType": "Parameters", "parameter": [
        {"name": "openMHealth", "valueAttachment": {"contentType": "application/json", "data": "bm90IGpzb24="}},
        {"name": "subject", "valueReference": {"reference": "Patient/p6"}},
        {"name": "device", "valueReference": {"reference": "Device/d"}}]})
    assert resp.status_code == 400 and resp.json()["issue"][0]["expression"] == ["openMHealth.data"]
    resp = fhir.post("Observation/$ingest-readings", {"resourceType": "Parameters", "parameter": []})
    assert resp.status_code == 400
    assert count(fhir, "&subject=Patient/p6") == 1


def test_a_bare_bundle_of_readings_is_still_taken_as_the_body(fhir):
    resp = fhir.post("Observation/$ingest-readings", {"resourceType": "Bundle", "type": "collection",
                                                      "entry": [{"resource": reading("p7", "hr-7", 0, 64.0)}]})
    assert resp.status_code == 200, resp.text
    assert single(resp.json(), "stored") == 1 and count(fhir, "&subject=Patient/p7") == 1


# -- gaps ------------------------------------------------------------------------------------------
def at(minute: int) -> str:
    return (START + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z")


def gaps(body: dict) -> list[dict]:
    """The ``gap`` outputs as {part: value}, after checking that ``gaps`` counts them."""
    found = [{q["name"]: next(v for k, v in q.items() if k.startswith("value")) for q in p["part"]}
             for p in body["parameter"] if p["name"] == "gap"]
    assert single(body, "gaps") == len(found)
    return found


def gap(device: str, start: int, end: int) -> dict:
    return {"device": {"reference": f"Device/{device}"}, "code": {"system": MDC, "code": "147842"},
            "start": at(start), "end": at(end), "minutes": float(end - start)}


def test_a_hole_in_a_stream_is_reported_as_one_gap_and_a_whole_stream_as_none(fhir):
    holed = [reading("p8", "hr-8", m, 70.0) for m in range(0, 600, 5) if not 120 < m < 300]
    whole = [reading("p9", "hr-9", m, 70.0) for m in range(0, 600, 5)]
    batch = holed + whole
    random.Random(3).shuffle(batch)  # gaps are between instants, not between neighbours in the batch
    body = ingest(fhir, batch, gapAfterMinutes=30)
    assert single(body, "stored") == len(batch)
    assert gaps(body) == [gap("hr-8", 120, 300)]


def test_a_late_reading_inside_a_gap_splits_it_in_the_next_answer(fhir):
    ingest(fhir, [reading("p8", "hr-8", m, 70.0) for m in range(0, 600, 5) if not 120 < m < 300],
           gapAfterMinutes=30)
    late = ingest(fhir, [reading("p8", "hr-8", 210, 71.0)], gapAfterMinutes=30)
    assert (single(late, "stored"), single(late, "duplicates")) == (1, 0)
    assert gaps(late) == [gap("hr-8", 120, 210), gap("hr-8", 210, 300)]
    # both halves are shorter than 100 minutes: no gap left (the stored neighbours lie in the window)
    again = ingest(fhir, [reading("p8", "hr-8", 210, 71.0)], gapAfterMinutes=100)
    assert (single(again, "stored"), single(again, "duplicates")) == (0, 1)
    assert gaps(again) == [] and single(again, "gaps") == 0


def test_stored_readings_before_the_batch_bound_its_first_gap(fhir):
    ingest(fhir, [reading("p8", "hr-8", m, 70.0) for m in range(0, 65, 5)])  # ends at minute 60
    body = ingest(fhir, [reading("p8", "hr-8", m, 70.0) for m in range(180, 245, 5)], gapAfterMinutes=30)
    assert gaps(body) == [gap("hr-8", 60, 180)]
    # an earlier batch sent afterwards: its gap ends at the stored readings that follow it
    body = ingest(fhir, [reading("p8", "hr-8", m, 70.0) for m in range(-120, -85, 5)], gapAfterMinutes=30)
    assert gaps(body) == [gap("hr-8", -90, 0)]
    # a batch spanning stored readings: only the stored silence between its readings is a gap
    body = ingest(fhir, [reading("p8", "hr-8", m, 70.0) for m in (30, 210)], gapAfterMinutes=30)
    assert single(body, "duplicates") == 2 and gaps(body) == [gap("hr-8", 60, 180)]


def test_another_participants_readings_on_the_same_device_neither_fill_nor_reveal_gaps(fhir):
    # the device went from p10 to p11: p10's readings, every 5 minutes through p11's silence, are not p11's
    ingest(fhir, [reading("p10", "hr-10", m, 70.0) for m in range(0, 600, 5)])
    # (a minute later: a reading is one device, code and instant, whoever it is for)
    body = ingest(fhir, [reading("p11", "hr-10", m + 1, 70.0) for m in range(0, 600, 5) if not 120 < m < 300],
                  gapAfterMinutes=30)
    assert single(body, "stored") == len([m for m in range(0, 600, 5) if not 120 < m < 300])
    assert gaps(body) == [gap("hr-10", 121, 301)]
    # nor does p10's stream end at p11's readings: p10's first batch bounds p10's gaps alone
    later = ingest(fhir, [reading("p10", "hr-10", m, 70.0) for m in range(700, 730, 5)], gapAfterMinutes=30)
    assert gaps(later) == [gap("hr-10", 595, 700)]


@pytest.mark.parametrize("minutes", [0, -5])
def test_a_gap_threshold_below_one_minute_is_refused_and_nothing_stored(fhir, minutes):
    resp = fhir.post("Observation/$ingest-readings", {"resourceType": "Parameters", "parameter": [
        {"name": "readings", "resource": {"resourceType": "Bundle", "type": "collection",
                                          "entry": [{"resource": reading("p8", "hr-8", 0, 70.0)}]}},
        {"name": "gapAfterMinutes", "valueInteger": minutes}]})
    assert resp.status_code == 400
    issue = resp.json()["issue"][0]
    assert resp.json()["resourceType"] == "OperationOutcome" and issue["expression"] == ["gapAfterMinutes"]
    assert "gapAfterMinutes" in issue["diagnostics"]
    assert count(fhir) == 0


def test_without_a_gap_threshold_the_answer_has_no_gaps(fhir):
    body = ingest(fhir, [reading("p8", "hr-8", m, 70.0) for m in (0, 5, 300)], lateAfterMinutes=60)
    assert single(body, "stored") == 3
    assert {p["name"] for p in body["parameter"]}.isdisjoint({"gaps", "gap"})
