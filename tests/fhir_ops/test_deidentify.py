"""HIPAA Safe Harbor de-identification (fhir_ops.deidentify): every identifier kind planted, none found after;
dates reduced to the year or shifted per participant with intervals kept; keyed pseudonyms; valid R4 output."""
from __future__ import annotations

import json
import re
from datetime import date, datetime

import pytest

from fhir_ops.auth import compartment_patients
from fhir_ops.deidentify import AGE_EXTENSION, DeidentifyError, SafeHarbor
from fhir_ops.validation import problems

pytestmark = pytest.mark.unit
KEY = b"sponsor-key-0123456789abcdef"
TODAY = date(2026, 12, 1)

#: what is planted, by Safe Harbor identifier kind (45 CFR 164.514(b)(2)(i)(A)-(R))
PLANTED = {
    "names": ["Josephine", "Quackenbush", "Rupert Quackenbush", "Dr Amelia Fairweather"],
    "geography": ["12 Elm Street", "Apt 4B", "Springfield", "Hampden County", "02134", "03601"],
    "dates": ["1930-05-06", "2026-03-14", "2026-03-15", "2026-04-02", "2026-07-30"],
    "phone": ["+1-617-555-0134"], "fax": ["+1-617-555-0199"], "email": ["josephine@example.org"],
    "ssn": ["078-05-1120"], "mrn": ["MRN-99812"], "health-plan": ["HP-55501234"], "account": ["ACCT-7734"],
    "licence": ["DL-S530-4411"], "vehicle": ["7ABC123"], "device": ["SN-PUMP-88231", "(01)00844588003288"],
    "url": ["https://josephine.example.org/blog"], "ip": ["203.0.113.77"],
    "biometric": ["ZmluZ2VycHJpbnQ="], "photo": ["cGhvdG8tb2YtZmFjZQ=="],
    "other": ["tt201-p001", "TT201-001", "Garden gnome collector", "left-handed twin of the mayor"],
}


def _ident(system: str, value: str) -> dict:
    return {"system": system, "value": value}


def planted_resources() -> list[dict]:
    patient = {
        "resourceType": "Patient", "id": "tt201-p001",
        "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Josephine Quackenbush, "
                                               "SSN 078-05-1120, Garden gnome collector</div>"},
        "contained": [{"resourceType": "RelatedPerson", "id": "son", "patient": {"reference": "#"},
                       "name": [{"text": "Rupert Quackenbush"}],
                       "telecom": [{"system": "phone", "value": "+1-617-555-0134"}]}],
        "extension": [
            {"url": "http://example.org/nickname", "valueString": "left-handed twin of the mayor"},
            {"url": "http://example.org/birth-place", "valueAddress": {"city": "Springfield", "state": "MA",
                                                                        "postalCode": "02134"}},
            {"url": "http://example.org/emergency", "extension": [
                {"url": "name", "valueHumanName": {"family": "Quackenbush", "given": ["Rupert"]}},
                {"url": "phone", "valueContactPoint": {"system": "phone", "value": "+1-617-555-0134"}},
                {"url": "licence", "valueIdentifier": _ident("urn:dmv", "DL-S530-4411")},
                {"url": "homepage", "valueUrl": "https://josephine.example.org/blog"},
                {"url": "since", "valueDate": "2026-03-14"}]},
        ],
        "modifierExtension": [{"url": "http://example.org/alias", "valueString": "Josephine"}],
        "identifier": [_ident("http://hl7.org/fhir/sid/us-ssn", "078-05-1120"),
                       _ident("urn:hospital:mrn", "MRN-99812"), _ident("urn:plan", "HP-55501234"),
                       _ident("urn:account", "ACCT-7734"), _ident("urn:dmv", "DL-S530-4411"),
                       _ident("urn:vehicle-plate", "7ABC123"), _ident("https://trialtwin.org/fhir/sid/subject",
                                                                     "TT201-001")],
        "active": True,
        "name": [{"family": "Quackenbush", "given": ["Josephine"]}],
        "telecom": [{"system": "phone", "value": "+1-617-555-0134"}, {"system": "fax", "value": "+1-617-555-0199"},
                    {"system": "email", "value": "josephine@example.org"},
                    {"system": "url", "value": "https://josephine.example.org/blog"}],
        "gender": "female", "birthDate": "1930-05-06",
        "_birthDate": {"extension": [{"url": "http://example.org/birth-time", "valueDateTime": "1930-05-06T04:05:00Z"}]},
        "address": [{"line": ["12 Elm Street", "Apt 4B"], "city": "Springfield", "district": "Hampden County",
                     "state": "MA", "postalCode": "02134", "country": "US"},
                    {"line": ["1 Pine Road"], "city": "Somewhere", "state": "NH", "postalCode": "03601"}],
        "photo": [{"contentType": "image/jpeg", "data": "cGhvdG8tb2YtZmFjZQ=="}],
        "contact": [{"name": {"text": "Rupert Quackenbush"}, "telecom": [{"system": "phone", "value": "+1-617-555-0134"}]}],
        "generalPractitioner": [{"reference": "Practitioner/gp1", "display": "Dr Amelia Fairweather"}],
    }
    observation = {
        "resourceType": "Observation", "id": "tt201-p001-hba1c-v1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "Hemoglobin A1c"}],
                 "text": "HbA1c"},
        "subject": {"reference": "Patient/tt201-p001", "display": "Josephine Quackenbush"},
        "performer": [{"reference": "Practitioner/gp1", "display": "Dr Amelia Fairweather"}],
        "effectiveDateTime": "2026-03-15T10:15:00+01:00", "issued": "2026-03-15T12:00:00Z",
        "valueQuantity": {"value": 7.1, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
        "note": [{"text": "Josephine said her son Rupert drove her (plate 7ABC123); call +1-617-555-0134"}],
    }
    device = {"resourceType": "Device", "id": "pump", "patient": {"reference": "Patient/tt201-p001"},
              "serialNumber": "SN-PUMP-88231", "udiCarrier": [{"deviceIdentifier": "(01)00844588003288"}],
              "identifier": [_ident("urn:device", "SN-PUMP-88231")]}
    media = {"resourceType": "Media", "id": "fp", "status": "completed", "subject": {"reference": "Patient/tt201-p001"},
             "createdDateTime": "2026-04-02", "content": {"contentType": "image/png", "data": "ZmluZ2VycHJpbnQ="}}
    audit = {"resourceType": "AuditEvent", "id": "a1", "type": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                                                                 "code": "110110"},
             "recorded": "2026-07-30T08:00:00Z",
             "agent": [{"requestor": True, "who": {"display": "Josephine Quackenbush"},
                        "network": {"address": "203.0.113.77", "type": "2"}}],
             "source": {"observer": {"display": "portal"}},
             "entity": [{"what": {"reference": "Patient/tt201-p001"}}]}
    coverage = {"resourceType": "Coverage", "id": "cov", "status": "active", "subscriberId": "HP-55501234",
                "beneficiary": {"reference": "Patient/tt201-p001"}, "payor": [{"display": "Acme Health"}],
                "period": {"start": "2026-03-14", "end": "2026-07-30"}}
    document = {"resourceType": "DocumentReference", "id": "doc", "status": "current",
                "subject": {"reference": "Patient/tt201-p001"}, "date": "2026-04-02T09:00:00Z",
                "description": "Letter to Josephine Quackenbush",
                "content": [{"attachment": {"contentType": "text/html", "url": "https://josephine.example.org/blog"}}]}
    return [patient, observation, device, media, audit, coverage, document]


def deidentify(sh: SafeHarbor, resources: list[dict]) -> list[dict]:
    return [sh.apply(r, compartment_patients(r)) for r in resources]


@pytest.mark.parametrize("mode", ["year", "shift"])
def test_no_planted_identifier_survives(mode):
    sh = SafeHarbor(KEY, mode, TODAY)
    out = deidentify(sh, planted_resources())
    text = json.dumps(out)
    for kind, values in PLANTED.items():
        for value in values:
            assert value not in text, f"{kind}: {value!r} survived {mode}"
    # no full date of the source remains, and no date that reveals an age over 89
    assert "1930" not in text
    patient = out[0]
    assert {"url": AGE_EXTENSION, "valueBoolean": True} in patient["extension"]
    assert patient["address"] == [{"state": "MA", "postalCode": "021", "country": "US"},
                                  {"state": "NH", "postalCode": "000"}]
    assert "text" not in patient and "name" not in patient and "telecom" not in patient and "photo" not in patient
    changes = sh.report()["changes"]
    for rule in ("names-removed", "telecom-removed", "addresses-generalized", "zip3-restricted",
                 "identifiers-pseudonymized", "ids-pseudonymized", "narratives-removed", "free-text-removed",
                 "extensions-removed", "attachments-removed", "device-identifiers-removed",
                 "network-addresses-removed", "ages-over-89-aggregated", "photos-removed", "contacts-removed",
                 "identifiers-removed", "references-rewritten"):
        assert changes.get(rule, 0) > 0, rule
    assert changes.get("dates-shifted" if mode == "shift" else "dates-reduced-to-year", 0) > 0
    for resource in out:  # still valid R4: a receiving server stores it
        assert problems(resource) == [], (resource["resourceType"], problems(resource))


def test_year_mode_keeps_only_years():
    out = deidentify(SafeHarbor(KEY, "year", TODAY), planted_resources())
    obs = out[1]
    assert obs["effectiveDateTime"] == "2026-01-01T00:00:00Z" and obs["issued"] == "2026-01-01T00:00:00Z"
    assert out[5]["period"] == {"start": "2026", "end": "2026"}
    young = SafeHarbor(KEY, "year", TODAY).apply({"resourceType": "Patient", "id": "y", "birthDate": "1961-04-12"})
    assert young["birthDate"] == "1961"


def _dates(resource: dict) -> list[datetime]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str) and re.match(r"^\d{4}-\d{2}-\d{2}", v) and k not in ("birthDate",):
                    found.append(datetime.fromisoformat(v.replace("Z", "+00:00")) if "T" in v
                                 else datetime.fromisoformat(v + "T00:00:00+00:00"))
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(resource)
    return found


def two_participants() -> list[dict]:
    out = []
    for pid, days in (("p1", ("2026-01-05", "2026-02-02T09:30:00Z", "2026-03-30")),
                      ("p2", ("2026-06-01", "2026-06-29T14:00:00+02:00", "2026-11-20"))):
        out.append({"resourceType": "ResearchSubject", "id": f"rs-{pid}", "status": "on-study",
                    "study": {"reference": "ResearchStudy/s"}, "individual": {"reference": f"Patient/{pid}"},
                    "period": {"start": days[0], "end": days[2]}})
        out.append({"resourceType": "Encounter", "id": f"e-{pid}", "status": "finished",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                    "subject": {"reference": f"Patient/{pid}"}, "period": {"start": days[1], "end": days[1]}})
    return out


def test_shift_moves_every_date_of_a_participant_by_one_keyed_amount():
    sh = SafeHarbor(KEY, "shift", TODAY)
    source = two_participants()
    out = deidentify(sh, source)
    deltas = {}
    for before, after in zip(source, out):
        pid = sorted(compartment_patients(before))[0]
        for a, b in zip(_dates(before), _dates(after)):
            deltas.setdefault(pid, set()).add((b - a).days)
            assert (b - a).seconds == 0  # whole days: times of day and time zones are kept
    assert deltas == {"p1": {sh.shift_days("p1")}, "p2": {sh.shift_days("p2")}}
    assert 0 not in (sh.shift_days("p1"), sh.shift_days("p2"))
    # intervals within a participant are exactly those of the source
    for pid in ("p1", "p2"):
        src = sorted(d for r in source if pid in compartment_patients(r) for d in _dates(r))
        dst = sorted(d for r, o in zip(source, out) if pid in compartment_patients(r) for d in _dates(o))
        assert [b - a for a, b in zip(src, src[1:])] == [b - a for a, b in zip(dst, dst[1:])]
    # the same key shifts the same participant the same way in another run
    assert SafeHarbor(KEY, "shift", TODAY).shift_days("p1") == sh.shift_days("p1")


def test_pseudonyms_are_keyed_and_consistent_across_resources_and_runs():
    one = deidentify(SafeHarbor(KEY, "year", TODAY), planted_resources())
    again = deidentify(SafeHarbor(KEY, "year", TODAY), planted_resources())
    other = deidentify(SafeHarbor(b"another-sponsor-key-987654321", "year", TODAY), planted_resources())
    assert one == again
    pid = one[0]["id"]
    assert pid != other[0]["id"] and pid != "tt201-p001"
    assert one[1]["subject"]["reference"] == f"Patient/{pid}" and one[2]["patient"]["reference"] == f"Patient/{pid}"
    assert one[0]["identifier"] != other[0]["identifier"]
    assert {i["value"] for i in one[0]["identifier"]} == {i["value"] for i in again[0]["identifier"]}


def test_resources_about_no_person_keep_their_content():
    study = {"resourceType": "ResearchStudy", "id": "tt-201", "status": "active", "title": "TT-201 trial",
             "period": {"start": "2026-01-05"}, "text": {"status": "generated", "div": "<div>x</div>"}}
    out = SafeHarbor(KEY, "year", TODAY).apply(study)
    assert out["title"] == "TT-201 trial" and out["period"] == {"start": "2026-01-05"} and "text" not in out
    assert out["id"] == SafeHarbor(KEY, "year", TODAY).pseudonym("ResearchStudy", "tt-201")


def test_bad_keys_and_modes_are_refused():
    with pytest.raises(DeidentifyError):
        SafeHarbor(b"short", "year", TODAY)
    with pytest.raises(DeidentifyError):
        SafeHarbor(KEY, "month", TODAY)
