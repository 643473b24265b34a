"""``$safety-signal`` over HTTP on a seeded demo study: rates and posterior probabilities checked
against an independent count and the Beta closed form, then a planted exposure-dependent adverse
event arriving in two batches (the continuous learning loop: no signal, a signal with its
DetectedIssue and review Task, a new issue version without a second Task), idempotent re-runs,
and 4xx for bad input with nothing stored."""
from __future__ import annotations

import datetime as dt

import pytest
import requests
from scipy import special

from fhir_ops import conformance
from tests.fhir_ops.operations.twin_client import HEADERS, entries, error_id, single

pytestmark = pytest.mark.api
SNOMED = "http://snomed.info/sct"
NAUSEA = f"{SNOMED}|422587007"


def _params(**values) -> dict:
    out = []
    for name, value in values.items():
        for v in value if isinstance(value, list) else [value]:
            key = ("valueBoolean" if isinstance(v, bool) else "valueInteger" if isinstance(v, int)
                   else "valueDecimal" if isinstance(v, float) else "valueReference" if isinstance(v, dict)
                   else "valueCode" if name == "exposure" else "valueDateTime" if name == "asOf" else "valueString")
            out.append({"name": name, key: v})
    return {"resourceType": "Parameters", "parameter": out}


def _signal(base, study="tt-201", body=None):
    return requests.post(f"{base}/ResearchStudy/{study}/$safety-signal", json=body or _params(), headers=HEADERS,
                         timeout=300)


def _all(base, rtype, **query):
    out, url, q = [], f"{base}/{rtype}", {**query, "_count": 1000}
    while url:
        b = requests.get(url, params=q, timeout=60).json()
        out += [e["resource"] for e in b.get("entry", [])]
        url = next((lk["url"] for lk in b.get("link", []) if lk["relation"] == "next"), None)
        q = None
    return out


def _count(base, rtype):
    return requests.get(f"{base}/{rtype}", params={"_summary": "count"}, timeout=30).json()["total"]


def _when(value: str) -> dt.datetime:
    d = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)


def _independent_rates(base, cut: dt.datetime):
    """Events and person-years per arm and term, counted here from the stored resources."""
    subjects = {s["individual"]["reference"]: s for s in _all(base, "ResearchSubject", study="ResearchStudy/tt-201")}
    years = {}
    for ref, s in subjects.items():
        start = _when(s["period"]["start"])
        end = min(_when(s["period"]["end"]), cut) if s["period"].get("end") else cut
        years.setdefault(s["assignedArm"], 0.0)
        years[s["assignedArm"]] += max((end - start).total_seconds(), 0) / 86400 / 365.25
    events = {}
    for ae in _all(base, "AdverseEvent", study="ResearchStudy/tt-201"):
        s = subjects[ae["subject"]["reference"]]
        if _when(ae["date"]) <= cut:
            key = (s["assignedArm"], f"{SNOMED}|{ae['event']['coding'][0]['code']}")
            events[key] = events.get(key, 0) + 1
    return events, years


def _rates(body):
    return {(r["arm"], r["term"]): r for r in entries(body, "rate")}


def test_rates_and_probabilities_match_an_independent_count_and_the_beta_closed_form(twin_server):
    base, _ = twin_server
    r = _signal(base, body=_params(persist=False))
    assert r.status_code == 200, r.text[:800]
    body = r.json()
    assert single(body, "controlArm") == "placebo"
    events, years = _independent_rates(base, _when(single(body, "asOf")))
    rates = _rates(body)
    assert {a for a, _ in rates} == {"placebo", "50 mg", "100 mg"}
    for (arm, term), row in rates.items():
        assert row["events"] == events.get((arm, term), 0)
        assert row["personYears"] == pytest.approx(years[arm], rel=1e-9)
        if arm == "placebo":
            assert "probabilityExceeds" not in row
            continue
        # Gamma(0.5 + y, 0.1 + E) posteriors; P(arm > control) = I_x(a_c, a_t), x = b_c / (b_t + b_c)
        a_t, b_t = 0.5 + row["events"], 0.1 + years[arm]
        a_c, b_c = 0.5 + events.get(("placebo", term), 0), 0.1 + years["placebo"]
        assert row["probabilityExceeds"] == pytest.approx(special.betainc(a_c, a_t, b_c / (b_t + b_c)), abs=1e-9)


def _planted_events(base, batch: int, per_participant: int) -> int:
    """Nausea on the 100 mg arm, more for participants with higher twin exposure (lower eGFR, weight)."""
    subjects = [s for s in _all(base, "ResearchSubject", study="ResearchStudy/tt-201") if s["assignedArm"] == "100 mg"]
    entries_ = []
    for s in subjects:
        pid = s["individual"]["reference"].split("/")[1]
        start = _when(s["period"]["start"])
        for j in range(per_participant):
            when = start + dt.timedelta(days=3 + 2 * j + batch)
            entries_.append({"resource": {
                "resourceType": "AdverseEvent", "id": f"{pid}-planted-{batch}-{j}", "actuality": "actual",
                "event": {"coding": [{"system": SNOMED, "code": "422587007", "display": "Nausea"}]},
                "subject": {"reference": f"Patient/{pid}"}, "date": when.isoformat().replace("+00:00", "Z"),
                "study": [{"reference": "ResearchStudy/tt-201"}]},
                "request": {"method": "PUT", "url": f"AdverseEvent/{pid}-planted-{batch}-{j}"}})
    r = requests.post(base, json={"resourceType": "Bundle", "type": "transaction", "entry": entries_},
                      headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text[:400]
    return len(entries_)


def test_signal_evolves_with_new_adverse_events_without_duplicates(twin_server):
    base, _ = twin_server
    cut = "2026-11-20T23:00:00Z"  # a fixed data cut, so planted events count and re-runs are comparable
    body = _params(asOf=cut, term=NAUSEA, reviewer={"reference": "Practitioner/safety-officer"})
    first = _signal(base, body=body)
    assert first.status_code == 200, first.text[:800]
    issues_before, tasks_before = _count(base, "DetectedIssue"), _count(base, "Task")
    p0 = _rates(first.json())[("100 mg", NAUSEA)]["probabilityExceeds"]
    # unchanged inputs: nothing new
    reports = _count(base, "MeasureReport")
    again = _signal(base, body=body)
    assert single(again.json(), "created") == 0 and _count(base, "MeasureReport") == reports
    assert single(again.json(), "measureReport") == single(first.json(), "measureReport")

    _planted_events(base, 0, 3)
    second = _signal(base, body=body).json()
    row = _rates(second)[("100 mg", NAUSEA)]
    assert row["probabilityExceeds"] > max(p0, 0.99) and row["signal"] is True
    issue_ref = single(second, "detectedIssue")["reference"]
    issue = requests.get(f"{base}/{issue_ref}", timeout=30).json()
    task = requests.get(f"{base}/{single(second, 'task')['reference']}", timeout=30).json()
    report = requests.get(f"{base}/{single(second, 'measureReport')['reference']}", timeout=30).json()
    for resource in (issue, task, report):
        assert conformance.check(resource) == [], resource["resourceType"]
    assert task["focus"]["reference"] == issue_ref and task["owner"]["reference"] == "Practitioner/safety-officer"
    assert "Nausea" in issue["detail"] and issue["meta"]["versionId"] == "1"
    fc = next(f for f in entries(second, "forecast") if f["term"] == NAUSEA)
    assert fc["low80"] <= fc["expected"] <= fc["high80"] and fc["participantsOnStudy"] > 0
    prov = requests.get(f"{base}/{single(second, 'provenance')['reference']}", timeout=30).json()
    sources = {e["what"]["reference"] for e in prov["entity"]}
    assert any("-planted-0-" in s for s in sources)
    # unchanged inputs with a signal standing: no new report, issue version, Task or Provenance
    stored = {t: _count(base, t) for t in ("MeasureReport", "DetectedIssue", "Task", "Provenance")}
    repeat = _signal(base, body=body)
    assert repeat.status_code == 200 and single(repeat.json(), "created") == 0
    assert single(repeat.json(), "measureReport") == single(second, "measureReport")
    assert {t: _count(base, t) for t in stored} == stored
    assert requests.get(f"{base}/{issue_ref}", timeout=30).json()["meta"]["versionId"] == "1"
    assert requests.get(f"{base}/{single(second, 'task')['reference']}", timeout=30).json()["meta"]["versionId"] == "1"

    _planted_events(base, 1, 2)
    third = _signal(base, body=body).json()
    assert single(third, "measureReport") != single(second, "measureReport")
    issue2 = requests.get(f"{base}/{issue_ref}", timeout=30).json()
    assert issue2["meta"]["versionId"] == "2" and issue2["detail"] != issue["detail"]
    assert _count(base, "DetectedIssue") == issues_before + 1  # one issue per arm and term, updated
    assert _count(base, "Task") == tasks_before + 1            # one review task, never duplicated
    prov3 = requests.get(f"{base}/{single(third, 'provenance')['reference']}", timeout=30).json()
    assert any("-planted-1-" in e["what"]["reference"] for e in prov3["entity"])


@pytest.mark.parametrize("body, status, eid", [
    (_params(term=f"{SNOMED}|999999999"), 400, "unknown-code"),
    (_params(term="no-bar"), 400, "invalid-token"),
    (_params(controlArm="nobody"), 400, "unknown-arm"),
    (_params(threshold=1.5), 400, "parameter-out-of-range"),
    (_params(exposure="tmax"), 400, "unknown-code"),
])
def test_bad_input_is_a_4xx_outcome_and_stores_nothing(twin_server, body, status, eid):
    base, _ = twin_server
    before = (_count(base, "MeasureReport"), _count(base, "DetectedIssue"), _count(base, "Provenance"))
    r = _signal(base, body=body)
    assert r.status_code == status, r.text[:400]
    assert error_id(r) == eid
    assert (_count(base, "MeasureReport"), _count(base, "DetectedIssue"), _count(base, "Provenance")) == before


def test_a_study_without_adverse_events_or_with_one_arm_is_refused(twin_server):
    base, _ = twin_server
    entries_ = [{"resource": {"resourceType": "ResearchStudy", "id": "quiet", "status": "active"},
                 "request": {"method": "PUT", "url": "ResearchStudy/quiet"}}]
    for i, arm in enumerate(["placebo", "50 mg", "placebo", "50 mg"]):
        entries_.append({"resource": {"resourceType": "ResearchSubject", "id": f"quiet-{i}", "status": "on-study",
                                      "study": {"reference": "ResearchStudy/quiet"},
                                      "individual": {"reference": f"Patient/tt201-p{i + 1:03d}"},
                                      "assignedArm": arm, "period": {"start": "2026-06-01"}},
                         "request": {"method": "PUT", "url": f"ResearchSubject/quiet-{i}"}})
    assert requests.post(base, json={"resourceType": "Bundle", "type": "transaction", "entry": entries_},
                         headers=HEADERS, timeout=60).status_code == 200
    stored = {t: _count(base, t) for t in ("MeasureReport", "DetectedIssue", "Task", "Provenance")}
    r = _signal(base, "quiet")
    assert r.status_code == 422 and error_id(r) == "no-adverse-events"
    ae = {"resourceType": "AdverseEvent", "id": "quiet-ae", "actuality": "actual",
          "event": {"coding": [{"system": SNOMED, "code": "25064002"}]}, "subject": {"reference": "Patient/tt201-p001"},
          "date": "2026-07-01T10:00:00Z", "study": [{"reference": "ResearchStudy/quiet"}]}
    assert requests.put(f"{base}/AdverseEvent/quiet-ae", json=ae, headers=HEADERS, timeout=30).status_code in (200, 201)
    for i in (1, 3):  # everyone on placebo: one arm
        requests.delete(f"{base}/ResearchSubject/quiet-{i}", timeout=30)
    r = _signal(base, "quiet")
    assert r.status_code == 422 and error_id(r) == "single-arm"
    assert r.headers["Content-Type"].startswith("application/fhir+json")
    assert {t: _count(base, t) for t in stored} == stored  # nothing written by either refusal
    assert _signal(base, "nope").status_code == 404
    assert requests.get(f"{base}/ResearchStudy/tt-201/$safety-signal", timeout=30).status_code == 405


def test_local_edc_codes_are_monitored_as_snomed_through_the_terminology_maps(twin_server):
    base, _ = twin_server
    before = _rates(_signal(base, body=_params(persist=False, term=NAUSEA)).json())
    # an EDC adverse event with only its local code: the shipped map (edc-ae -> SNOMED CT) adds Nausea on ingest
    subject = next(s for s in _all(base, "ResearchSubject", study="ResearchStudy/tt-201") if s["assignedArm"] == "placebo")
    ae = {"resourceType": "AdverseEvent", "id": "edc-local-nausea", "actuality": "actual",
          "event": {"coding": [{"system": "https://trialtwin.org/fhir/CodeSystem/edc-ae", "code": "AE-NAUSEA"}]},
          "subject": subject["individual"], "date": subject["period"]["start"] + "T12:00:00Z",
          "study": [{"reference": "ResearchStudy/tt-201"}]}
    assert requests.put(f"{base}/AdverseEvent/edc-local-nausea", json=ae, headers=HEADERS,
                        timeout=30).status_code in (200, 201)
    # ... and a term asked for by its local code is the same SNOMED CT term
    r = _signal(base, body=_params(persist=False, term="https://trialtwin.org/fhir/CodeSystem/edc-ae|AE-NAUSEA"))
    assert r.status_code == 200, r.text[:400]
    after = _rates(r.json())
    assert set(after) == set(before) == {(a, NAUSEA) for a in ("placebo", "50 mg", "100 mg")}
    assert after[("placebo", NAUSEA)]["events"] == before[("placebo", NAUSEA)]["events"] + 1
    notes = next(p["resource"] for p in r.json()["parameter"] if p["name"] == "issues")["issue"]
    assert any(i["details"]["coding"][0]["code"] == "term-translated" for i in notes)
