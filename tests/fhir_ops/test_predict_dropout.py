"""``$predict-dropout`` over real HTTP: RiskAssessments, outreach Tasks, Provenance, study runs and errors.

Purpose-built participants are written as FHIR resources here and, independently, as the
``ParticipantHistory`` they should map to; the served probability must equal the in-process model's.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from fhir_ops.conformance import check
from fhir_ops.mapping.risk_drivers import describe
from inference.dropout_risk import assess_dropout_risk
from inference.features import AdverseEventRecord, Dose, ParticipantHistory, Visit
from inference.registry import default_registry
from inference.service import InferenceService
from tests.fhir_ops.conftest import error_id

pytestmark = pytest.mark.api

STUDY = "pd-study"
RANDOMIZED = dt.date(2026, 1, 5)
CS = "https://trialtwin.org/fhir/CodeSystem/"
AS_OF = "2026-04-25T00:30:00Z"  # study day 110, before that day's dose
AS_OF_DAY = 110
OP = "$predict-dropout"


def _instant(day: int, hour: float) -> str:
    when = dt.datetime.combine(RANDOMIZED, dt.time()) + dt.timedelta(days=day, hours=hour)
    return when.isoformat() + "Z"


def _ref(kind: str, rid: str) -> dict:
    return {"reference": f"{kind}/{rid}"}


def _quantity(value: float, code: str) -> dict:
    return {"value": value, "unit": code, "system": "http://unitsofmeasure.org", "code": code}


def participant(pid: str, *, visits, taken_days, aes=(), travel_km: float, age_days: int, female: bool,
                weight_kg: float, egfr: float, arm: str = "50 mg", status: str = "on-study-intervention"):
    """FHIR resources of one participant, and the ParticipantHistory the model should see.

    ``visits`` are (day, "fulfilled" | "noshow" | "booked", remote); ``aes`` are (day, severity code).
    """
    born = RANDOMIZED - dt.timedelta(days=age_days)
    res = [
        {"resourceType": "Patient", "id": pid, "gender": "female" if female else "male",
         "birthDate": born.isoformat()},
        {"resourceType": "ResearchSubject", "id": f"{pid}-rs", "status": status, "study": _ref("ResearchStudy", STUDY),
         "individual": _ref("Patient", pid), "assignedArm": arm, "period": {"start": RANDOMIZED.isoformat()}},
        {"resourceType": "Observation", "id": f"{pid}-weight", "status": "final", "subject": _ref("Patient", pid),
         "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
         "effectiveDateTime": _instant(0, 9), "valueQuantity": _quantity(weight_kg, "kg")},
        {"resourceType": "Observation", "id": f"{pid}-egfr", "status": "final", "subject": _ref("Patient", pid),
         "code": {"coding": [{"system": "http://loinc.org", "code": "62238-1"}]},
         "effectiveDateTime": _instant(0, 9), "valueQuantity": _quantity(egfr, "mL/min/{1.73_m2}")},
        {"resourceType": "Observation", "id": f"{pid}-distance", "status": "final", "subject": _ref("Patient", pid),
         "code": {"coding": [{"system": CS + "covariate", "code": "travel-distance"}]},
         "effectiveDateTime": _instant(0, 9), "valueQuantity": _quantity(travel_km, "km")},
    ]
    modality = {True: ("virtual", "remote"), False: ("in-person", "in-person")}
    for v, (day, status_, remote) in enumerate(visits):
        res.append({"resourceType": "Appointment", "id": f"{pid}-v{v}", "status": status_,
                    "serviceType": [{"coding": [{"system": CS + "visit-modality", "code": modality[remote][0]}]}],
                    "start": _instant(day, 10), "end": _instant(day, 10.5),
                    "participant": [{"actor": _ref("Patient", pid), "status": "accepted"}]})
    for day in taken_days:
        res.append({"resourceType": "MedicationAdministration", "id": f"{pid}-d{day}", "status": "completed",
                    "medicationCodeableConcept": {"text": "TTX-101"}, "subject": _ref("Patient", pid),
                    "effectiveDateTime": _instant(day, 8), "dosage": {"dose": _quantity(50, "mg")}})
    for i, (day, severity) in enumerate(aes):
        res.append({"resourceType": "AdverseEvent", "id": f"{pid}-ae{i}", "actuality": "actual",
                    "subject": _ref("Patient", pid), "date": _instant(day, 14),
                    "severity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/adverse-event-severity",
                                             "code": severity}]}})
    grade = {"mild": 1, "moderate": 2, "severe": 3}
    history = ParticipantHistory(
        visits=tuple(Visit(day, None if s == "booked" else s == "fulfilled", modality[r][1]) for day, s, r in visits),
        # doses are due on every study day before the as-of day (that day's dose is not taken yet)
        doses=tuple(Dose(day, day in set(taken_days)) for day in range(AS_OF_DAY)),
        adverse_events=tuple(AdverseEventRecord(day, grade[s]) for day, s in aes),
        age_years=age_days / 365.25, sex="female" if female else "male", weight_kg=weight_kg, egfr=egfr,
        travel_distance_km=travel_km, site_id="unknown", arm=arm, participant_id=pid)
    return res, history


def high_risk():
    # three no-shows in a row, the next visit in person 150 km away, poor adherence, recent severe AE
    return participant("pd-high", visits=[(0, "fulfilled", False), (28, "noshow", True), (56, "noshow", True),
                                          (84, "noshow", False), (112, "booked", False)],
                       taken_days=[d for d in range(AS_OF_DAY) if d % 5 in (0, 1)],
                       aes=[(100, "severe"), (104, "moderate")], travel_km=150.0, age_days=int(29 * 365.25),
                       female=False, weight_kg=96.0, egfr=70.0)


def low_risk():
    return participant("pd-low", visits=[(0, "fulfilled", False), (28, "fulfilled", True), (56, "fulfilled", True),
                                         (84, "fulfilled", False), (112, "booked", True)],
                       taken_days=list(range(AS_OF_DAY)), travel_km=2.0, age_days=int(63 * 365.25),
                       female=True, weight_kg=70.0, egfr=95.0)


def load(fhir, resources) -> None:
    resp = fhir.transaction([{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                             for r in resources])
    assert resp.status_code == 200, resp.text


def study_resources() -> list[dict]:
    return [{"resourceType": "ResearchStudy", "id": STUDY, "status": "active", "title": "Purpose-built study"}]


def parameters(**values) -> dict:
    kinds = {"threshold": "valueDecimal", "horizonDays": "valueInteger", "asOf": "valueDateTime",
             "model": "valueString", "persist": "valueBoolean", "createTasks": "valueBoolean"}
    return {"resourceType": "Parameters",
            "parameter": [{"name": k, kinds[k]: v} for k, v in values.items()]}


def out(body: dict, name: str):
    return [p for p in body["parameter"] if p["name"] == name]


def value(body_or_parts, name: str):
    parts = body_or_parts["parameter"] if "parameter" in body_or_parts else body_or_parts["part"]
    found = [p for p in parts if p["name"] == name]
    if not found:
        return None
    p = found[0]
    return p["resource"] if "resource" in p else next(v for k, v in p.items() if k.startswith("value"))


def predictions(body: dict) -> dict[str, dict]:
    return {value(p, "subject")["reference"].split("/")[1]: p for p in out(body, "prediction")}


@pytest.fixture(scope="module")
def expected():
    """In-process probabilities of the purpose-built participants (same model, no FHIR, no HTTP)."""
    svc = InferenceService(micro_batching=False, force_cpu=True)
    hi, lo = assess_dropout_risk([high_risk()[1], low_risk()[1]], AS_OF_DAY, service=svc)
    svc.close()
    assert hi.probability > 0.8 > 0.2 > lo.probability, (hi.probability, lo.probability)
    return {"pd-high": hi.probability, "pd-low": lo.probability,
            "threshold": round((hi.probability + lo.probability) / 2, 4)}


@pytest.fixture
def seeded(fhir):
    load(fhir, study_resources() + high_risk()[0] + low_risk()[0])
    return fhir


def run(fhir, target: str, **params):
    return fhir.post(f"{target}/{OP}", parameters(**params))


def search(fhir, query: str) -> list[dict]:
    resp = fhir.get(query)
    assert resp.status_code == 200, resp.text
    return [e["resource"] for e in resp.json().get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]


# ----------------------------------------------------------------------------------- patient level

def test_high_risk_participant_gets_a_conforming_risk_assessment_and_task(seeded, expected):
    resp = run(seeded, "Patient/pd-high", threshold=expected["threshold"], asOf=AS_OF)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    pred = predictions(body)["pd-high"]
    assert value(pred, "probability") == pytest.approx(expected["pd-high"], abs=1e-5)
    assert value(pred, "flagged") is True
    assert value(body, "evaluated") == 1 and value(body, "flagged") == 1 and value(body, "tasksCreated") == 1
    assert value(body, "model") == f"dropout@{default_registry().latest('dropout').version}"

    ra = seeded.get(value(pred, "riskAssessment")["reference"]).json()
    assert check(ra) == []
    assert ra["prediction"][0]["probabilityDecimal"] == pytest.approx(expected["pd-high"], abs=1e-5)
    assert ra["prediction"][0]["outcome"]["coding"][0]["code"] == "missed-next-visit"
    assert ra["prediction"][0]["whenPeriod"] == {"start": "2026-04-25T00:30:00Z", "end": _instant(112, 10)}
    assert ra["subject"] == {"reference": "Patient/pd-high"}
    drivers = {e["extension"][0]["valueCode"] for e in ra["extension"] if e["url"].endswith("/risk-driver")}
    assert drivers and drivers <= {d["part"][0]["valueCode"] for d in out({"parameter": pred["part"]}, "driver")}
    # each driver says what it is and its value in words, from the model's label table (data)
    for ext in (e for e in ra["extension"] if e["url"].endswith("/risk-driver")):
        parts = {p["url"]: next(v for k, v in p.items() if k.startswith("value")) for p in ext["extension"]}
        assert (parts["label"], parts["valueText"]) == describe(parts["feature"], parts["value"])
        assert parts["label"] != parts["feature"]
    # basis: only what the features used, up to asOf (and the booked next visit), at exact versions
    basis = {b["reference"].split("/_history/")[0] for b in ra["basis"]}
    assert {"Patient/pd-high", "ResearchSubject/pd-high-rs", "Appointment/pd-high-v4",
            "Observation/pd-high-weight", "Observation/pd-high-distance", "AdverseEvent/pd-high-ae1"} <= basis
    assert all("/_history/" in b["reference"] for b in ra["basis"])

    task = seeded.get(value(pred, "task")["reference"]).json()
    assert check(task) == []
    assert (task["status"], task["intent"]) == ("requested", "proposal")
    assert task["focus"] == {"reference": value(pred, "riskAssessment")["reference"]}
    assert task["for"] == {"reference": "Patient/pd-high"}
    assert f"{expected['pd-high']:.2f}" in task["description"] and "2026-04-27" in task["description"]


def test_low_risk_participant_gets_no_task(seeded, expected):
    resp = run(seeded, "Patient/pd-low", threshold=expected["threshold"], asOf=AS_OF)
    assert resp.status_code == 200, resp.text
    pred = predictions(resp.json())["pd-low"]
    assert value(pred, "probability") == pytest.approx(expected["pd-low"], abs=1e-5)
    assert value(pred, "flagged") is False and value(pred, "task") is None
    assert check(seeded.get(value(pred, "riskAssessment")["reference"]).json()) == []
    assert search(seeded, "Task?patient=Patient/pd-low") == []


def test_threshold_decides_the_task(seeded, expected):
    # the low-risk participant is flagged once the threshold sits below its probability
    resp = run(seeded, "Patient/pd-low", threshold=expected["pd-low"] * 0.9, asOf=AS_OF)
    assert value(predictions(resp.json())["pd-low"], "flagged") is True
    assert len(search(seeded, "Task?patient=Patient/pd-low")) == 1


def test_as_of_uses_only_earlier_data(seeded):
    # as of day 70 the third no-show (day 84) has not happened: the next visit is day 84
    resp = run(seeded, "Patient/pd-high", asOf="2026-03-16T00:30:00Z", persist=False)
    assert resp.status_code == 200, resp.text
    pred = predictions(resp.json())["pd-high"]
    history = high_risk()[1]
    history = history.replace(doses=tuple(d for d in history.doses if d.day < 70))
    svc = InferenceService(micro_batching=False, force_cpu=True)
    [risk] = assess_dropout_risk([history], 70, service=svc)
    svc.close()
    assert value(pred, "nextVisit") == _instant(84, 10)
    assert value(pred, "probability") == pytest.approx(risk.probability, abs=1e-5)


def test_default_as_of_is_the_last_recorded_data(seeded):
    resp = run(seeded, "Patient/pd-low", persist=False)
    pred = predictions(resp.json())["pd-low"]
    assert value(pred, "asOf") == _instant(AS_OF_DAY - 1, 8)  # the last dose


def test_rerun_refreshes_the_open_task_instead_of_duplicating_it(seeded, expected):
    first = run(seeded, "Patient/pd-high", threshold=expected["threshold"], asOf=AS_OF).json()
    second = run(seeded, "Patient/pd-high", threshold=expected["threshold"], asOf=AS_OF).json()
    assert (value(second, "tasksCreated"), value(second, "tasksUpdated")) == (0, 1)
    p1, p2 = predictions(first)["pd-high"], predictions(second)["pd-high"]
    assert value(p1, "task") == value(p2, "task")
    assert value(p2, "taskAction") == "updated"
    tasks = search(seeded, "Task?patient=Patient/pd-high")
    assert len(tasks) == 1 and tasks[0]["meta"]["versionId"] == "2"
    assert tasks[0]["focus"] == value(p2, "riskAssessment")  # points at the newest assessment
    assert check(tasks[0]) == []
    assert len(search(seeded, "RiskAssessment?subject=Patient/pd-high")) == 2

    # staff work on it: still open, so a re-run keeps their status and does not add a Task
    task = dict(tasks[0], status="in-progress")
    assert seeded.put(f"Task/{task['id']}", task).status_code == 200
    third = run(seeded, "Patient/pd-high", threshold=expected["threshold"], asOf=AS_OF).json()
    assert value(third, "tasksUpdated") == 1
    [task] = search(seeded, "Task?patient=Patient/pd-high")
    assert task["status"] == "in-progress"

    # once done, a new risk gets a new Task
    assert seeded.put(f"Task/{task['id']}", dict(task, status="completed")).status_code == 200
    fourth = run(seeded, "Patient/pd-high", threshold=expected["threshold"], asOf=AS_OF).json()
    assert value(fourth, "tasksCreated") == 1
    statuses = sorted(t["status"] for t in search(seeded, "Task?patient=Patient/pd-high"))
    assert statuses == ["completed", "requested"]


def test_concurrent_runs_leave_one_open_task(seeded, expected):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: run(seeded, "Patient/pd-high", threshold=expected["threshold"],
                                              asOf=AS_OF), range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert sorted(value(a.json(), "tasksCreated") for a in answers) == [0, 0, 0, 1]
    [task] = search(seeded, "Task?patient=Patient/pd-high")
    assert task["meta"]["versionId"] == "4"
    assert len(search(seeded, "RiskAssessment?subject=Patient/pd-high")) == 4


def test_provenance_links_exact_input_versions_the_model_device_and_the_agent(seeded, expected):
    resp = seeded.post(f"Patient/pd-high/{OP}", parameters(threshold=expected["threshold"], asOf=AS_OF),
                       headers={"X-Requesting-Agent": "Practitioner/coordinator-7"})
    pred = predictions(resp.json())["pd-high"]
    prov = seeded.get(value(pred, "provenance")["reference"]).json()
    assert check(prov) == []
    targets = [t["reference"] for t in prov["target"]]
    ra_ref, task_ref = value(pred, "riskAssessment")["reference"], value(pred, "task")["reference"]
    assert targets == [f"{ra_ref}/_history/1", f"{task_ref}/_history/1"]
    for target in targets:
        assert seeded.get(target).status_code == 200

    ra = seeded.get(ra_ref).json()
    entities = [e["what"]["reference"] for e in prov["entity"]]
    assert entities == [b["reference"] for b in ra["basis"]]
    assert {e["role"] for e in prov["entity"]} == {"source"}
    for ref in entities:  # every input version can be read back exactly
        got = seeded.get(ref)
        assert got.status_code == 200, ref
        assert ref.endswith(f"/_history/{got.json()['meta']['versionId']}")

    by_type = {a["type"]["coding"][0]["code"]: a["who"] for a in prov["agent"]}
    assert by_type["author"]["reference"] == "Practitioner/coordinator-7"
    assert "not authenticated" in by_type["author"]["display"]
    device = seeded.get(by_type["assembler"]["reference"]).json()
    entry = default_registry().latest("dropout")
    assert check(device) == []
    assert device["version"][0]["value"] == entry.version
    assert {"system": "https://trialtwin.org/fhir/sid/model-sha256", "value": entry.metadata["sha256"]} \
        in device["identifier"]
    assert ra["performer"]["reference"] == by_type["assembler"]["reference"]

    # a changed input: the old Provenance keeps naming the old version, a new run names the new one
    appt = seeded.get("Appointment/pd-high-v3").json()
    old_ref = next(e for e in entities if e.startswith("Appointment/pd-high-v3/"))
    assert seeded.put("Appointment/pd-high-v3", dict(appt, comment="no-show confirmed by phone")).status_code == 200
    again = predictions(run(seeded, "Patient/pd-high", threshold=expected["threshold"], asOf=AS_OF).json())["pd-high"]
    prov2 = seeded.get(value(again, "provenance")["reference"]).json()
    new_ref = next(e["what"]["reference"] for e in prov2["entity"] if e["what"]["reference"].startswith(
        "Appointment/pd-high-v3/"))
    assert (old_ref, new_ref) == ("Appointment/pd-high-v3/_history/1", "Appointment/pd-high-v3/_history/2")
    assert seeded.get(old_ref).status_code == 200
    # one Device per model version, however many runs
    assert len(search(seeded, "Device?identifier=https://trialtwin.org/fhir/sid/model|"
                              f"dropout@{entry.version}")) == 1


def test_persist_false_writes_nothing_and_create_tasks_false_writes_no_task(seeded, expected):
    resp = run(seeded, "Patient/pd-high", threshold=expected["threshold"], asOf=AS_OF, persist=False)
    pred = predictions(resp.json())["pd-high"]
    assert value(pred, "flagged") is True and value(pred, "riskAssessment") is None
    for kind in ("RiskAssessment", "Task", "Provenance", "Device"):
        assert search(seeded, kind) == [], kind
    resp = run(seeded, "Patient/pd-high", threshold=expected["threshold"], asOf=AS_OF, createTasks=False)
    assert value(predictions(resp.json())["pd-high"], "task") is None
    assert len(search(seeded, "RiskAssessment")) == 1 and search(seeded, "Task") == []


def test_study_run_may_be_asynchronous(seeded, expected):
    import time

    resp = seeded.post(f"ResearchStudy/{STUDY}/{OP}", parameters(threshold=expected["threshold"], asOf=AS_OF),
                       headers={"Prefer": "respond-async"})
    assert resp.status_code == 202, resp.text
    location = resp.headers["Content-Location"]
    deadline = time.time() + 300  # generous: a busy CI machine
    while (done := seeded.get(location)).status_code == 202 and time.time() < deadline:
        time.sleep(0.05)
    assert done.status_code == 200, done.text
    result = done.json()  # this server answers a finished job with the operation's own result
    assert result["resourceType"] == "Parameters"
    assert value(result, "evaluated") == 2 and value(result, "tasksCreated") == 1
    assert len(search(seeded, "Task")) == 1


def test_horizon_leaves_far_visits_unassessed(seeded):
    resp = run(seeded, "Patient/pd-high", asOf=AS_OF, horizonDays=1)
    body = resp.json()
    assert resp.status_code == 200 and value(body, "evaluated") == 0 and out(body, "prediction") == []
    issue = value(body, "issues")["issue"][0]
    assert issue["details"]["coding"][0]["code"] == "next-visit-beyond-horizon"
    assert search(seeded, "RiskAssessment") == []


# ------------------------------------------------------------------------------------- study level

def test_study_level_assesses_on_study_participants_and_reports_the_rest(seeded, expected):
    withdrawn, _ = participant("pd-gone", visits=[(0, "fulfilled", False), (28, "noshow", False)],
                               taken_days=range(20), travel_km=80.0, age_days=15000, female=True, weight_kg=60,
                               egfr=90, status="withdrawn")
    load(seeded, withdrawn + [
        {"resourceType": "Patient", "id": "pd-empty", "gender": "male", "birthDate": "1970-01-01"},
        {"resourceType": "ResearchSubject", "id": "pd-empty-rs", "status": "on-study",
         "study": _ref("ResearchStudy", STUDY), "individual": _ref("Patient", "pd-empty"),
         "assignedArm": "placebo", "period": {"start": RANDOMIZED.isoformat()}}])
    resp = run(seeded, f"ResearchStudy/{STUDY}", threshold=expected["threshold"], asOf=AS_OF)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    preds = predictions(body)
    assert set(preds) == {"pd-high", "pd-low"}
    assert value(preds["pd-high"], "probability") == pytest.approx(expected["pd-high"], abs=1e-5)
    assert value(preds["pd-low"], "probability") == pytest.approx(expected["pd-low"], abs=1e-5)
    assert (value(body, "evaluated"), value(body, "flagged"), value(body, "tasksCreated"),
            value(body, "skipped"), value(body, "notAssessed")) == (2, 1, 1, 1, 1)
    issues = {i["details"]["coding"][0]["code"]: i for i in value(body, "issues")["issue"]}
    assert issues["participant-without-history"]["severity"] == "warning"
    assert "Patient/pd-empty" in issues["participant-without-history"]["diagnostics"]
    assert "1 withdrawn" in issues["participants-skipped"]["diagnostics"]
    assert len(search(seeded, "Task")) == 1
    assert len(search(seeded, "Provenance")) == 2


def test_study_level_on_the_demo_study(module_fhir):
    from fhir_ops.demo import STUDY_ID, build_demo_resources, simulate_demo_records

    resources = build_demo_resources(simulate_demo_records(seed=7, n=24))
    for start in range(0, len(resources), 500):  # the test server takes bodies up to 1 MiB
        load(module_fhir, resources[start:start + 500])
    subjects = search(module_fhir, f"ResearchSubject?study=ResearchStudy/{STUDY_ID}&_count=500")
    ended = sum(s["status"] in ("withdrawn", "off-study") for s in subjects)
    # a dry run gives the probabilities; a threshold between them makes some participants flagged
    dry = run(module_fhir, f"ResearchStudy/{STUDY_ID}", persist=False).json()
    probs = np.array([value(p, "probability") for p in out(dry, "prediction")])
    assert probs.size > 0 and np.all((probs > 0) & (probs < 1))
    ordered = np.sort(probs)
    k = (3 * probs.size) // 4  # midway between two probabilities: rounding in the output cannot matter
    threshold = float(ordered[k - 1] + ordered[k]) / 2
    assert search(module_fhir, "RiskAssessment") == []
    resp = run(module_fhir, f"ResearchStudy/{STUDY_ID}", threshold=threshold)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    evaluated, flagged = value(body, "evaluated"), value(body, "flagged")
    assert evaluated == probs.size and flagged == int(np.sum(probs >= threshold)) > 0
    assert value(body, "skipped") == ended
    assert evaluated + value(body, "skipped") + value(body, "notAssessed") == len(subjects)
    ras = search(module_fhir, "RiskAssessment?_count=500")
    tasks = search(module_fhir, "Task?_count=500")
    provs = search(module_fhir, "Provenance?_count=500")
    assert (len(ras), len(tasks), len(provs)) == (evaluated, flagged, evaluated)
    for resource in [*ras, *tasks, *provs]:
        assert check(resource) == [], resource["resourceType"]
    assert sorted(r["prediction"][0]["probabilityDecimal"] for r in ras) == pytest.approx(sorted(probs), abs=1e-6)
    assert {t["for"]["reference"] for t in tasks} == {value(p, "subject")["reference"] for p in out(body, "prediction")
                                                     if value(p, "flagged")}
    # a second run refreshes every open Task and adds none
    again = run(module_fhir, f"ResearchStudy/{STUDY_ID}", threshold=threshold).json()
    assert (value(again, "tasksCreated"), value(again, "tasksUpdated")) == (0, flagged)
    assert len(search(module_fhir, "Task?_count=500")) == flagged


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("params, status, eid", [
    ({"model": "no-such-model"}, 404, "unknown-model"),
    ({"model": "dropout@9.9.9"}, 404, "unknown-model"),
    ({"model": "dropout@"}, 400, "invalid-model"),
    ({"threshold": 1.0}, 400, "threshold-out-of-range"),
    ({"threshold": 0.0}, 400, "threshold-out-of-range"),
    ({"threshold": 1.5}, 400, "threshold-out-of-range"),
    ({"horizonDays": 0}, 400, "horizon-out-of-range"),
    ({"asOf": "2025-01-01T00:00:00Z"}, 422, "as-of-before-randomization"),
])
def test_bad_parameters_are_clear_outcomes_and_write_nothing(seeded, params, status, eid):
    resp = run(seeded, "Patient/pd-high", **params)
    assert resp.status_code == status, resp.text
    assert error_id(resp) == eid
    for kind in ("RiskAssessment", "Task", "Provenance"):
        assert search(seeded, kind) == []


@pytest.mark.parametrize("parameter", [
    {"name": "threshold", "valueString": "high"},
    {"name": "threshold", "valueDecimal": "0.5"},
    {"name": "persist", "valueBoolean": "yes"},
    {"name": "horizonDays", "valueInteger": 2.5},
])
def test_wrong_types_are_400(seeded, parameter):
    resp = seeded.post(f"Patient/pd-high/{OP}", {"resourceType": "Parameters", "parameter": [parameter]})
    assert resp.status_code == 400, resp.text
    assert error_id(resp) == "wrong-type"
    assert parameter["name"] in resp.json()["issue"][0]["diagnostics"]


def test_unknown_parameter_is_400(seeded):
    resp = seeded.post(f"Patient/pd-high/{OP}", parameters() | {"parameter": [{"name": "cutoff", "valueDecimal": 0.5}]})
    assert (resp.status_code, error_id(resp)) == (400, "unknown-parameter")


def test_get_is_405_because_it_stores_results(seeded):
    resp = seeded.get(f"Patient/pd-high/{OP}?threshold=0.5")
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "POST"
    assert error_id(resp) == "method-not-allowed"


def test_participant_without_history_is_422(seeded):
    load(seeded, [{"resourceType": "Patient", "id": "pd-new", "gender": "female", "birthDate": "1980-02-02"}])
    resp = run(seeded, "Patient/pd-new")
    assert resp.status_code == 422
    assert error_id(resp) == "participant-without-history"
    assert "Patient/pd-new" in resp.json()["issue"][0]["diagnostics"]


def test_unknown_targets(seeded):
    resp = run(seeded, "Patient/nobody")
    assert (resp.status_code, error_id(resp)) == (404, "unknown-id")
    resp = run(seeded, "ResearchStudy/no-study")
    assert (resp.status_code, error_id(resp)) == (404, "unknown-id")
    resp = run(seeded, "Observation/pd-high-weight")
    assert resp.status_code == 400
    assert error_id(resp) == "operation-not-supported-here"
    assert resp.json()["issue"][0]["code"] == "not-supported"
    resp = run(seeded, "Patient")  # type level is not defined
    assert (resp.status_code, error_id(resp)) == (400, "operation-not-supported-here")


def test_operation_is_published(seeded):
    definition = seeded.get("OperationDefinition/predict-dropout").json()
    assert definition["url"] == "https://trialtwin.org/fhir/OperationDefinition/predict-dropout"
    assert definition["affectsState"] is True and definition["instance"] is True
    metadata = seeded.get("metadata").json()
    by_type = {r["type"]: {o["name"] for o in r.get("operation", [])} for r in metadata["rest"][0]["resource"]}
    assert "predict-dropout" in by_type["Patient"] and "predict-dropout" in by_type["ResearchStudy"]
