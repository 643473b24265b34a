"""Search over HTTP on a store loaded with 1,000+ resources through one transaction; expectations are
computed from the generated data in Python, independently of the server's index."""
from __future__ import annotations

import random
from datetime import date, timedelta

import pytest

from tests.fhir_ops.conftest import error_id

pytestmark = pytest.mark.api

LOINC = "http://loinc.org"
CODES = ["4548-4", "1558-6", "29463-7", "8867-4"]
FAMILIES = ["Smith", "Smithers", "Müller", "Okafor", "Nakamura", "O'Brien", "Schmidt", "Garcia"]
N_PATIENTS, N_OBS = 60, 1200


def _dataset():
    rng = random.Random(201)
    patients, observations = [], []
    for i in range(N_PATIENTS):
        patients.append({
            "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}",
            "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:tt201:subject", "value": f"S{i:03d}"}],
                         "name": [{"family": FAMILIES[i % len(FAMILIES)], "given": [f"Given{i}"]}],
                         "gender": ["female", "male"][i % 2], "birthDate": f"{1950 + i % 40}-0{1 + i % 9}-15",
                         "active": i % 5 != 0},
            "request": {"method": "POST", "url": "Patient"}})
    start = date(2024, 1, 1)
    for j in range(N_OBS):
        p = rng.randrange(N_PATIENTS)
        code = CODES[j % len(CODES)]
        day = start + timedelta(days=rng.randrange(0, 366))
        value = round(rng.uniform(4.0, 12.0), 1)
        coding = [{"system": LOINC, "code": code}] if j % 50 else [{"code": "LOCAL-1"}]
        observations.append({
            "resource": {"resourceType": "Observation", "status": "final" if j % 7 else "amended",
                         "code": {"coding": coding},
                         "subject": {"reference": f"urn:uuid:00000000-0000-4000-8000-{p:012d}"},
                         "effectiveDateTime": f"{day.isoformat()}T08:30:00Z",
                         "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org",
                                           "code": "%"}},
            "request": {"method": "POST", "url": "Observation"},
            "_meta": {"patient": p, "code": coding[0]["code"], "system": coding[0].get("system"), "day": day,
                      "value": value, "status": "final" if j % 7 else "amended"}})
    subjects = [{"resource": {"resourceType": "ResearchSubject", "status": "on-study" if i % 6 else "withdrawn",
                              "study": {"reference": "urn:uuid:10000000-0000-4000-8000-000000000001"},
                              "individual": {"reference": f"urn:uuid:00000000-0000-4000-8000-{i:012d}"},
                              "period": {"start": f"2024-0{1 + i % 6}-01"}},
                 "request": {"method": "POST", "url": "ResearchSubject"}} for i in range(N_PATIENTS)]
    study = [{"fullUrl": "urn:uuid:10000000-0000-4000-8000-000000000001",
              "resource": {"resourceType": "ResearchStudy", "status": "active", "title": "TT-201",
                           "identifier": [{"system": "urn:studies", "value": "TT-201"}]},
              "request": {"method": "POST", "url": "ResearchStudy"}}]
    risks = [{"resource": {"resourceType": "RiskAssessment", "status": "final",
                           "subject": {"reference": f"urn:uuid:00000000-0000-4000-8000-{i:012d}"},
                           "prediction": [{"probabilityDecimal": round(i / N_PATIENTS, 3)}]},
              "request": {"method": "POST", "url": "RiskAssessment"}} for i in range(N_PATIENTS)]
    codesystem = [{"resource": {"resourceType": "CodeSystem", "status": "active", "content": "complete",
                                "url": "https://trialtwin.org/fhir/CodeSystem/test-assay", "name": "Assay",
                                "meta": {"profile": ["https://trialtwin.org/fhir/StructureDefinition/cs"]}},
                   "request": {"method": "POST", "url": "CodeSystem"}}]
    return patients, observations, subjects + study + risks + codesystem


@pytest.fixture(scope="module")
def loaded(module_fhir):
    patients, observations, others = _dataset()
    entries = patients + [{k: v for k, v in o.items() if k != "_meta"} for o in observations] + others
    resp = module_fhir.transaction(entries)
    assert resp.status_code == 200, resp.text[:500]
    ids = [e["response"]["location"].split("/")[1] for e in resp.json()["entry"][:N_PATIENTS]]
    meta = [o["_meta"] for o in observations]
    return module_fhir, ids, meta


def total(fhir, query):
    resp = fhir.get(query)
    assert resp.status_code == 200, resp.text
    return resp.json()["total"]


def test_reference_search_forms(loaded):
    fhir, pids, meta = loaded
    expected = sum(1 for m in meta if m["patient"] == 3)
    assert expected > 0
    assert total(fhir, f"Observation?subject=Patient/{pids[3]}") == expected
    assert total(fhir, f"Observation?patient={pids[3]}") == expected
    assert total(fhir, f"Observation?subject={pids[3]}") == expected
    assert total(fhir, f"Observation?subject:Patient={pids[3]}") == expected
    assert total(fhir, f"Observation?subject={fhir.base}/Patient/{pids[3]}") == expected
    assert total(fhir, f"Observation?subject=Group/{pids[3]}") == 0
    both = sum(1 for m in meta if m["patient"] in (3, 4))
    assert total(fhir, f"Observation?patient={pids[3]},{pids[4]}") == both
    assert total(fhir, f"ResearchSubject?individual={pids[7]}") == 1


def test_chained_search_one_level_typed_and_untyped(loaded):
    # What fhirpy and HAPI's client emit: Observation?subject:Patient.gender=female
    fhir, pids, meta = loaded
    female = sum(1 for m in meta if m["patient"] % 2 == 0)
    assert 0 < female < len(meta)
    assert total(fhir, "Observation?subject:Patient.gender=female") == female
    assert total(fhir, "Observation?subject.gender=female") == female  # Patient is the only target with gender
    assert total(fhir, "Observation?patient.gender=male") == len(meta) - female
    smithers = {i for i in range(N_PATIENTS) if FAMILIES[i % len(FAMILIES)] == "Smithers"}
    assert total(fhir, "Observation?subject:Patient.name:exact=Smithers") == sum(m["patient"] in smithers for m in meta)
    hba1c_female = sum(1 for m in meta if m["patient"] % 2 == 0 and m["code"] == "4548-4")
    assert total(fhir, f"Observation?subject:Patient.gender=female&code={LOINC}|4548-4") == hba1c_female
    assert total(fhir, "ResearchSubject?study:ResearchStudy.identifier=urn:studies|TT-201") == N_PATIENTS
    assert total(fhir, "ResearchSubject?study:ResearchStudy.identifier=urn:studies|TT-999") == 0


@pytest.mark.parametrize("query", ["Observation?subject:Patient.shoe-size=42",  # unknown chained parameter
                                   "Observation?subject:Patient.organization.name=x",  # two levels
                                   "Observation?code:Patient.gender=female"])  # not a reference
def test_unsupported_chains_are_refused_when_strict_and_warned_otherwise(loaded, query):
    fhir, _, meta = loaded
    strict = fhir.get(query, headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400 and error_id(strict) == "unknown-search-parameter"
    lenient = fhir.get(query).json()
    assert lenient["total"] == len(meta)  # the condition was dropped, and the answer says so
    outcome = [e["resource"] for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome and outcome[0]["issue"][0]["severity"] == "warning"
    assert query.split("?")[1].split("=")[0] in outcome[0]["issue"][0]["diagnostics"]


def test_token_search_forms(loaded):
    fhir, _, meta = loaded
    for code in CODES:
        n = sum(1 for m in meta if m["code"] == code)
        assert total(fhir, f"Observation?code={code}") == n
        assert total(fhir, f"Observation?code={LOINC}|{code}") == n
    assert total(fhir, "Observation?code=|LOCAL-1") == sum(1 for m in meta if m["code"] == "LOCAL-1")
    assert total(fhir, f"Observation?code=|{CODES[0]}") == 0
    assert total(fhir, f"Observation?code={LOINC}|") == sum(1 for m in meta if m["system"] == LOINC)
    assert total(fhir, "Observation?status=amended") == sum(1 for m in meta if m["status"] == "amended")
    assert total(fhir, "Observation?status:not=amended") == sum(1 for m in meta if m["status"] != "amended")
    assert total(fhir, "Patient?identifier=urn:tt201:subject|S007") == 1
    assert total(fhir, "Patient?identifier=S007") == 1
    assert total(fhir, "Patient?active=false") == N_PATIENTS // 5
    assert total(fhir, "Patient?gender=female") == N_PATIENTS // 2
    two = sum(1 for m in meta if m["code"] in CODES[:2])
    assert total(fhir, f"Observation?code={CODES[0]},{CODES[1]}") == two


def test_date_search_prefixes_and_partial_dates(loaded):
    fhir, _, meta = loaded
    days = [m["day"] for m in meta]
    d = days[0]
    assert total(fhir, f"Observation?date={d.isoformat()}") == sum(1 for x in days if x == d)
    assert total(fhir, f"Observation?date=eq{d.isoformat()}") == sum(1 for x in days if x == d)
    assert total(fhir, f"Observation?date=ne{d.isoformat()}") == sum(1 for x in days if x != d)
    assert total(fhir, "Observation?date=2024-03") == sum(1 for x in days if (x.year, x.month) == (2024, 3))
    assert total(fhir, "Observation?date=2024") == sum(1 for x in days if x.year == 2024)
    assert total(fhir, "Observation?date=ge2024-07-01") == sum(1 for x in days if x >= date(2024, 7, 1))
    assert total(fhir, "Observation?date=gt2024-07-01") == sum(1 for x in days if x > date(2024, 7, 1))
    assert total(fhir, "Observation?date=lt2024-07-01") == sum(1 for x in days if x < date(2024, 7, 1))
    assert total(fhir, "Observation?date=le2024-07-01") == sum(1 for x in days if x <= date(2024, 7, 1))
    assert total(fhir, "Observation?date=sa2024-07-01") == sum(1 for x in days if x > date(2024, 7, 1))
    assert total(fhir, "Observation?date=eb2024-07-01") == sum(1 for x in days if x < date(2024, 7, 1))
    rng = sum(1 for x in days if date(2024, 3, 1) <= x < date(2024, 4, 1))
    assert total(fhir, "Observation?date=ge2024-03-01&date=lt2024-04-01") == rng
    assert total(fhir, "Observation?date=ge2024-03-01T08:30:00Z&date=le2024-03-01T08:30:00Z") == \
        sum(1 for x in days if x == date(2024, 3, 1))
    assert total(fhir, "Patient?birthdate=1955") == sum(1 for i in range(N_PATIENTS) if 1950 + i % 40 == 1955)
    # a period: ResearchSubject.period starts on the 1st of months 1..6 and is open-ended
    assert total(fhir, "ResearchSubject?date=lt2024-02-01") == sum(1 for i in range(N_PATIENTS) if i % 6 == 0)
    assert total(fhir, "ResearchSubject?date=gt2030-01-01") == N_PATIENTS
    bad = fhir.get("Observation?date=last-tuesday")
    assert bad.status_code == 400 and error_id(bad) == "invalid-search-value"


def test_string_search_modes(loaded):
    fhir, _, _ = loaded
    per_family = {f: sum(1 for i in range(N_PATIENTS) if FAMILIES[i % len(FAMILIES)] == f) for f in FAMILIES}
    assert total(fhir, "Patient?family=smith") == per_family["Smith"] + per_family["Smithers"]
    assert total(fhir, "Patient?family:exact=Smith") == per_family["Smith"]
    assert total(fhir, "Patient?family:exact=smith") == 0
    assert total(fhir, "Patient?family=muller") == per_family["Müller"]
    assert total(fhir, "Patient?name:contains=ITHER") == per_family["Smithers"]
    assert total(fhir, "Patient?name=given1") == sum(1 for i in range(N_PATIENTS) if str(i).startswith("1"))
    assert total(fhir, "Patient?family=o'brien") == per_family["O'Brien"]
    assert total(fhir, "ResearchStudy?title=tt-2") == 1


def test_quantity_number_and_uri_search(loaded):
    fhir, _, meta = loaded
    assert total(fhir, "Observation?value-quantity=gt7.5") == sum(1 for m in meta if m["value"] > 7.5)
    assert total(fhir, "Observation?value-quantity=le5|http://unitsofmeasure.org|%") == \
        sum(1 for m in meta if m["value"] <= 5)
    assert total(fhir, "Observation?value-quantity=gt7.5||mg/dL") == 0
    v = meta[0]["value"]
    assert total(fhir, f"Observation?value-quantity={v}") == sum(1 for m in meta if abs(m["value"] - v) < 0.05)
    assert total(fhir, "RiskAssessment?probability=ge0.8") == sum(1 for i in range(N_PATIENTS) if i / N_PATIENTS >= 0.8)
    assert total(fhir, "CodeSystem?url=https://trialtwin.org/fhir/CodeSystem/test-assay") == 1
    assert total(fhir, "CodeSystem?url:below=https://trialtwin.org/fhir/") == 1
    assert total(fhir, "CodeSystem?_profile=https://trialtwin.org/fhir/StructureDefinition/cs") == 1


def test_id_and_last_updated(loaded):
    fhir, pids, _ = loaded
    assert total(fhir, f"Patient?_id={pids[0]},{pids[1]}") == 2
    assert total(fhir, "Patient?_lastUpdated=gt2020-01-01") == N_PATIENTS
    assert total(fhir, "Patient?_lastUpdated=gt2999-01-01") == 0


def test_repeated_parameters_are_anded(loaded):
    fhir, pids, meta = loaded
    n = sum(1 for m in meta if m["patient"] == 5 and m["code"] == CODES[0] and m["day"] >= date(2024, 6, 1))
    assert total(fhir, f"Observation?patient={pids[5]}&code={CODES[0]}&date=ge2024-06-01") == n


def test_paging_to_the_last_page(loaded):
    fhir, _, meta = loaded
    expected = sum(1 for m in meta if m["code"] == CODES[1])
    url = f"Observation?code={CODES[1]}&_count=37"
    seen, pages = [], 0
    first = fhir.get(url).json()
    last_url = next(link["url"] for link in first["link"] if link["relation"] == "last")
    bundle = first
    while True:
        pages += 1
        seen += [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            break
        bundle = fhir.get(nxt[0]).json()
    assert len(seen) == expected == len(set(seen))
    assert pages == -(-expected // 37)
    last = fhir.get(last_url).json()
    assert [e["resource"]["id"] for e in last["entry"]] == seen[(pages - 1) * 37:]
    assert any(link["relation"] == "previous" for link in last["link"])
    capped = fhir.get("Observation?_count=5000").json()
    assert len(capped["entry"]) == 1000 and capped["total"] == N_OBS


def test_sort_by_date_and_last_updated(loaded):
    fhir, pids, meta = loaded
    asc = fhir.get(f"Observation?patient={pids[2]}&_sort=date&_count=1000").json()
    dates = [e["resource"]["effectiveDateTime"] for e in asc["entry"]]
    assert dates == sorted(dates) and len(dates) == sum(1 for m in meta if m["patient"] == 2)
    desc = fhir.get(f"Observation?patient={pids[2]}&_sort=-date&_count=1000").json()
    assert [e["resource"]["effectiveDateTime"] for e in desc["entry"]] == sorted(dates, reverse=True)
    page2 = fhir.get("Observation?_sort=-date&_count=10&_offset=10").json()
    everything = sorted((m["day"] for m in meta), reverse=True)
    assert [e["resource"]["effectiveDateTime"][:10] for e in page2["entry"]] == \
        [d.isoformat() for d in everything[10:20]]
    lu = fhir.get("Patient?_sort=-_lastUpdated&_count=1000").json()
    stamps = [e["resource"]["meta"]["lastUpdated"] for e in lu["entry"]]
    assert stamps == sorted(stamps, reverse=True)


def test_include_and_revinclude(loaded):
    fhir, pids, meta = loaded
    bundle = fhir.get(f"Observation?patient={pids[9]}&_include=Observation:subject").json()
    included = [e for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert [e["resource"]["id"] for e in included] == [pids[9]]
    star = fhir.get(f"Observation?patient={pids[9]}&_include=*").json()
    assert sum(1 for e in star["entry"] if e["search"]["mode"] == "include") == 1
    rev = fhir.get(f"Patient?_id={pids[9]}&_revinclude=Observation:subject&_revinclude=ResearchSubject:individual").json()
    kinds = [e["resource"]["resourceType"] for e in rev["entry"] if e["search"]["mode"] == "include"]
    assert kinds.count("Observation") == sum(1 for m in meta if m["patient"] == 9)
    assert kinds.count("ResearchSubject") == 1
    assert rev["total"] == 1
    subj = fhir.get("ResearchSubject?status=withdrawn&_include=ResearchSubject:individual"
                    "&_include=ResearchSubject:study").json()
    types = [e["resource"]["resourceType"] for e in subj["entry"] if e["search"]["mode"] == "include"]
    assert types.count("Patient") == subj["total"] and types.count("ResearchStudy") == 1


def test_summary_count_and_post_search(loaded):
    fhir, pids, meta = loaded
    count = fhir.get(f"Observation?code={CODES[2]}&_summary=count").json()
    assert count["total"] == sum(1 for m in meta if m["code"] == CODES[2]) and "entry" not in count
    resp = fhir.http.post(fhir.url("Observation/_search"), data={"patient": pids[1], "_count": "3"}, timeout=30)
    assert resp.status_code == 200
    assert resp.json()["total"] == sum(1 for m in meta if m["patient"] == 1)
    assert len(resp.json()["entry"]) == min(3, resp.json()["total"])
