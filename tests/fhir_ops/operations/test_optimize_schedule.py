"""``$optimize-schedule`` over HTTP on the TT-201 demo study (its protocol PlanDefinition) and on bad inputs."""
from __future__ import annotations

import datetime as dt

import pytest

from fhir_ops import demo
from tests.fhir_ops.conftest import error_id

pytestmark = pytest.mark.api
#: the resource types $optimize-schedule reads; the demo's doses, labs and encounters are left out of the load
READ_TYPES = {"Organization", "Location", "PlanDefinition", "ResearchStudy", "Patient", "ResearchSubject",
              "Appointment"}
AS_OF = (demo.STUDY_START + dt.timedelta(days=demo.DATA_CUTOFF_DAY)).isoformat()
LATER_START = dt.date(2027, 3, 1)


def _put(r):
    return {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}


def _params(**kw):
    out = []
    for k, v in kw.items():
        if isinstance(v, dict):
            out.append({"name": k, "valueReference": v})
        else:
            key = {bool: "valueBoolean", int: "valueInteger", float: "valueDecimal"}.get(type(v), "valueDateTime")
            out.append({"name": k, key: v})
    return {"resourceType": "Parameters", "parameter": out}


def _one(body, name):
    return next((x for x in body["parameter"] if x["name"] == name), None)


def _parts(p):
    return {x["name"]: next(v for k, v in x.items() if k.startswith("value")) for x in p["part"]}


def _visits(body):
    return [_parts(p) for p in body["parameter"] if p["name"] == "visit"]


def _count(fhir, resource_type, **params):
    r = fhir.get(resource_type, params={**params, "_summary": "count"})
    assert r.status_code == 200, r.text[:300]
    return r.json()["total"]


@pytest.fixture(scope="module")
def study(module_fhir):
    fhir = module_fhir
    resources = [r for r in demo.build_demo_resources(demo.simulate_demo_records(seed=7, n=200))
                 if r["resourceType"] in READ_TYPES
                 or (r["resourceType"] == "Observation" and r["id"].endswith("-distance"))]
    for i in range(0, len(resources), 500):
        r = fhir.transaction([_put(x) for x in resources[i:i + 500]])
        assert r.status_code == 200, r.text[:400]
    plan = next(r for r in resources if r["resourceType"] == "PlanDefinition")
    tight = dict(plan, id="tight-plan", url="https://trialtwin.org/fhir/PlanDefinition/tight-plan")
    tight["action"] = [dict(a) for a in plan["action"]]
    # visit 2's window (week 8, days 49..63) cannot follow visit 1 (from day 21) by 45 days
    tight["extension"] = [{"url": plan["extension"][0]["url"], "extension": [
        plan["extension"][0]["extension"][0], {"url": "minSpacing", "valueDuration": {
            "value": 45, "unit": "d", "system": "http://unitsofmeasure.org", "code": "d"}}]}]
    # the plan itself gives a site capacity of 0 h/d (not the call's parameter)
    zero = dict(tight, id="zero-capacity-plan", url="https://trialtwin.org/fhir/PlanDefinition/zero-capacity-plan")
    zero["extension"] = [{"url": plan["extension"][0]["url"], "extension": [
        {"url": "siteCapacity", "valueQuantity": {"value": 0, "unit": "h/d", "system": "http://unitsofmeasure.org",
                                                  "code": "h/d"}}]}]
    extra = [_put({"resourceType": "ResearchStudy", "id": "noplan", "status": "active"}), _put(tight), _put(zero),
             _put({"resourceType": "ResearchStudy", "id": "zerocap", "status": "active",
                   "protocol": [{"reference": "PlanDefinition/zero-capacity-plan"}],
                   "site": [{"reference": "Location/tt201-loc-north"}]}),
             _put({"resourceType": "ResearchStudy", "id": "nosubjects", "status": "active",
                   "protocol": [{"reference": "PlanDefinition/tt201-visit-plan"}],
                   "site": [{"reference": "Location/tt201-loc-north"}]}),
             _put({"resourceType": "ResearchStudy", "id": "tight", "status": "active",
                   "protocol": [{"reference": "PlanDefinition/tight-plan"}],
                   "site": [{"reference": "Location/tt201-loc-north"}]}),
             _put({"resourceType": "ResearchSubject", "id": "tight-rs", "status": "on-study",
                   "study": {"reference": "ResearchStudy/tight"}, "individual": {"reference": "Patient/tt201-p001"},
                   "period": {"start": demo.STUDY_START.isoformat()}}),
             # a second study on the demo's plan, for the test that re-runs with a later cut
             _put({"resourceType": "ResearchStudy", "id": "later", "status": "active",
                   "protocol": [{"reference": "PlanDefinition/tt201-visit-plan"}],
                   "site": [{"reference": "Location/tt201-loc-north"}]}),
             _put({"resourceType": "ResearchSubject", "id": "later-rs", "status": "on-study",
                   "study": {"reference": "ResearchStudy/later"}, "individual": {"reference": "Patient/tt201-p001"},
                   "period": {"start": LATER_START.isoformat()}})]
    assert fhir.transaction(extra).status_code == 200
    return fhir


@pytest.fixture(scope="module")
def proposal(study):
    r = study.post("ResearchStudy/tt-201/$optimize-schedule", _params(asOf=AS_OF, replicates=200, seed=0))
    assert r.status_code == 200, r.text[:800]
    return r.json()


def test_demo_proposal_lowers_missed_visits_with_an_interval_excluding_zero(proposal):
    gain = _parts(_one(proposal, "expectedGain"))
    default, prop = _parts(_one(proposal, "protocolDefault")), _parts(_one(proposal, "proposal"))
    print(f"\ndemo: {_one(proposal, 'participants')['valueInteger']} participants, "
          f"{_one(proposal, 'visits')['valueInteger']} visits: missed {default['expectedMissedVisits']:.1f} (default) "
          f"vs {prop['expectedMissedVisits']:.1f} (proposal), gain {gain['missedVisits']:.2f} "
          f"(SE {gain['standardError']:.2f}, 95 % {gain['low95']:.2f} to {gain['high95']:.2f}); "
          f"site hours {default['siteHours']:.1f} vs {prop['siteHours']:.1f}")
    assert gain["low95"] > 0, gain
    assert gain["missedVisits"] == pytest.approx(default["expectedMissedVisits"] - prop["expectedMissedVisits"])
    assert _parts(_one(proposal, "solver"))["name"].startswith("scipy.optimize.milp")
    assert _one(proposal, "participants")["valueInteger"] >= 20


def test_reported_gain_agrees_with_an_independent_replay(study, proposal):
    # a second call with other random numbers replays the same (deterministic) proposal
    r = study.post("ResearchStudy/tt-201/$optimize-schedule",
                   _params(asOf=AS_OF, replicates=200, seed=12345, persist=False))
    assert r.status_code == 200, r.text[:500]
    assert _visits(r.json()) == [{k: v for k, v in p.items() if k != "appointment"} for p in _visits(proposal)]
    a, b = _parts(_one(proposal, "expectedGain")), _parts(_one(r.json(), "expectedGain"))
    print(f"\ndemo: reported gain {a['missedVisits']:.2f} (SE {a['standardError']:.2f}) vs replay with another seed "
          f"{b['missedVisits']:.2f} (SE {b['standardError']:.2f})")
    assert abs(a["missedVisits"] - b["missedVisits"]) < 3.5 * (a["standardError"] ** 2 + b["standardError"] ** 2) ** 0.5


def test_demo_proposal_keeps_every_hard_constraint(study, proposal):
    plan = study.get("PlanDefinition/tt201-visit-plan").json()
    window = {a["title"]: (a["timingRange"]["low"]["value"], a["timingRange"]["high"]["value"]) for a in plan["action"]}
    visits = _visits(proposal)
    assert visits
    by_subject: dict[str, list] = {}
    load: dict[tuple, float] = {}
    for v in visits:
        low, high = window[v["visit"]]
        assert low <= v["day"] <= high, v
        if v["onSite"]:
            assert v["modality"] == "in-person", v
        by_subject.setdefault(v["subject"]["reference"], []).append(v["day"])
    for days in by_subject.values():
        assert all(b - a >= demo.MIN_SPACING_DAYS for a, b in zip(days, days[1:])), days
    # capacity: the stored Appointments, per site Location and date
    for v in visits:
        appt = study.get(v["appointment"]["reference"]).json()
        assert appt["status"] == "proposed" and appt["start"].startswith(v["date"])
        loc = next(p["actor"]["reference"] for p in appt["participant"] if p["actor"]["reference"].startswith("Location/"))
        load[(loc, v["date"])] = load.get((loc, v["date"]), 0.0) + appt["minutesDuration"] / 60
    assert max(load.values()) <= demo.SITE_CAPACITY_HOURS


def test_care_plan_links_the_appointments_and_provenance_names_them(study, proposal):
    careplan_ref = _one(proposal, "carePlan")["valueReference"]["reference"]
    careplan = study.get(careplan_ref).json()
    assert careplan["status"] == "draft" and careplan["intent"] == "proposal"
    linked = {a["reference"]["reference"] for a in careplan["activity"]}
    mine = {v["appointment"]["reference"] for v in _visits(proposal) if v["subject"] == careplan["subject"]}
    assert linked == mine
    prov = study.get(_one(proposal, "provenance")["valueReference"]["reference"]).json()
    targets = {t["reference"].split("/_history")[0] for t in prov["target"]}
    assert careplan_ref in targets and mine <= targets
    assert any(e["what"]["reference"].startswith("PlanDefinition/tt201-visit-plan") for e in prov["entity"])


def test_rerun_with_the_same_inputs_writes_nothing(study, proposal):
    before = (_count(study, "Appointment", status="proposed"), _count(study, "CarePlan"), _count(study, "Provenance"))
    r = study.post("ResearchStudy/tt-201/$optimize-schedule", _params(asOf=AS_OF, replicates=200, seed=0))
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body and _one(body, "written")["valueInteger"] == 0
    assert _one(body, "unchanged")["valueInteger"] == _one(proposal, "participants")["valueInteger"]
    assert _one(body, "provenance") is None
    assert (_count(study, "Appointment", status="proposed"), _count(study, "CarePlan"),
            _count(study, "Provenance")) == before


def test_patient_level_schedules_that_participant_only(study, proposal):
    pid = _visits(proposal)[0]["subject"]["reference"].split("/")[1]
    r = study.post(f"Patient/{pid}/$optimize-schedule", _params(asOf=AS_OF, replicates=50, persist=False,
                                                                study={"reference": "ResearchStudy/tt-201"}))
    assert r.status_code == 200, r.text[:500]
    visits = _visits(r.json())
    assert visits and {v["subject"]["reference"] for v in visits} == {f"Patient/{pid}"}
    assert _one(r.json(), "participants")["valueInteger"] == 1


@pytest.mark.parametrize("target, params, status, eid, words", [
    ("ResearchStudy/noplan", {}, 422, "no-visit-plan", "no visit plan"),
    ("ResearchStudy/tight", {}, 422, "window-unsatisfiable", "Visit 2 (week 8)"),
    ("ResearchStudy/zerocap", {}, 422, "capacity-out-of-range", "PlanDefinition/zero-capacity-plan"),
    ("ResearchStudy/nosubjects", {}, 422, "no-subjects", "no participants"),
    ("ResearchStudy/tt-201", {"capacityHoursPerDay": 0.0}, 400, "capacity-out-of-range", "must be > 0"),
    ("ResearchStudy/tt-201", {"capacityHoursPerDay": -2.0}, 400, "capacity-out-of-range", "must be > 0"),
    ("ResearchStudy/tt-201", {"capacityHoursPerDay": 1.0}, 422, "capacity-infeasible", "capacity"),
    ("ResearchStudy/tt-201", {"minSpacingDays": 0}, 400, "spacing-out-of-range", "at least 1"),
    ("ResearchStudy/tt-201", {"replicates": 5}, 400, "replicates-out-of-range", "20..2000"),
    ("ResearchStudy/tt-201", {"asOf": "2027-12-01"}, 422, "nothing-to-schedule", "nothing to schedule"),
    ("ResearchStudy/tt-201", {"study": {"reference": "ResearchStudy/tt-201"}}, 400, "study-not-applicable", "study"),
    ("Patient/no-such-patient", {}, 404, None, None),
    ("ResearchStudy/no-such-study", {}, 404, None, None),
])
def test_bad_input_is_a_4xx_outcome_and_writes_nothing(study, target, params, status, eid, words):
    before = (_count(study, "Appointment"), _count(study, "CarePlan"), _count(study, "Provenance"))
    body = _params(**({"asOf": AS_OF, "replicates": 20} | params))
    r = study.post(f"{target}/$optimize-schedule", body)
    assert r.status_code == status, r.text[:500]
    if eid:
        assert error_id(r) == eid
        assert words in r.json()["issue"][0]["diagnostics"]
    if eid == "window-unsatisfiable":  # the answer names the visit, in words and as a FHIRPath to its action
        assert r.json()["issue"][0]["expression"] == ["PlanDefinition.action.where(title='Visit 2 (week 8)')"]
    if target == "ResearchStudy/zerocap":  # the plan's own capacity, not a parameter of the call
        assert r.json()["issue"][0]["expression"] == ["PlanDefinition.extension"]
    assert (_count(study, "Appointment"), _count(study, "CarePlan"), _count(study, "Provenance")) == before


def test_get_is_refused_because_the_operation_writes(study):
    r = study.get("ResearchStudy/tt-201/$optimize-schedule")
    assert r.status_code == 405 and r.headers["Allow"] == "POST"


def test_a_later_cut_cancels_proposals_it_no_longer_makes(study):
    # a study of its own: the tt-201 proposal stays as it is for the other tests
    body = lambda as_of: _params(asOf=as_of, replicates=20, study={"reference": "ResearchStudy/later"})  # noqa: E731
    early = study.post("Patient/tt201-p001/$optimize-schedule", body(LATER_START.isoformat()))
    assert early.status_code == 200, early.text[:500]
    first = {v["visit"]: v["appointment"]["reference"] for v in _visits(early.json())}
    assert len(first) == 6
    later = study.post("Patient/tt201-p001/$optimize-schedule",
                       body((LATER_START + dt.timedelta(days=60)).isoformat()))
    assert later.status_code == 200, later.text[:500]
    kept = {v["visit"] for v in _visits(later.json())}
    assert kept == set(list(first)[2:])  # weeks 4 and 8 lie before the new cut
    for visit, ref in first.items():
        assert study.get(ref).json()["status"] == ("proposed" if visit in kept else "cancelled")
    careplan = study.get(_one(later.json(), "carePlan")["valueReference"]["reference"]).json()
    assert {a["reference"]["reference"] for a in careplan["activity"]} == {first[v] for v in kept}


def test_visit_information_comes_from_the_study_models_marker(app):
    """The information value of a visit weighs the marker's residual SD against its drift, both read from
    the study's model definition (no assay constant in the operation): TT-201's HbA1c (SD 0.12 %, drift
    0.2 %/year), another definition's own residual error, flat weights for a model without a disease marker."""
    import copy

    import numpy as np

    from fhir_ops.mapping import model_definition as fm
    from fhir_ops.operations.optimize_schedule import _marker_noise
    from inference.model_definition import shipped_definition
    from tests.fhir_ops.operations.conftest import get_store_of

    store = get_store_of(app)

    def study(sid: str, raw: dict) -> None:
        model = fm.compile_definition(raw)
        library = fm.definition_library(model)
        store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [_put(library), _put({
            "resourceType": "ResearchStudy", "id": sid, "status": "active",
            "extension": [{"url": fm.STUDY_MODEL_EXTENSION, "valueCanonical": model.canonical}]})]})

    study("s-tt201", shipped_definition("tt201"))
    sigma, tau = _marker_noise(store, "s-tt201")
    assert sigma == pytest.approx(0.12) and tau == pytest.approx(0.2 / np.sqrt(365.25))
    noisier = copy.deepcopy(shipped_definition("tt201"))
    noisier.update(url="https://example.org/fhir/Library/noisier-assay", name="noisier")
    noisier["outputs"][2]["error"]["additive"] = 0.3
    study("s-noisier", noisier)
    assert _marker_noise(store, "s-noisier")[0] == pytest.approx(0.3)
    study("s-tgi", shipped_definition("tumour-growth"))  # SLD: combined error at the 70 mm baseline, KL x BASE
    sigma, tau = _marker_noise(store, "s-tgi")
    assert sigma == pytest.approx(np.hypot(2.0, 0.05 * 70.0)) and tau == pytest.approx(0.02 * 70 / 7 * np.sqrt(365.25))
    study("s-theoph", shipped_definition("theophylline"))  # PK only: every visit weighs the same
    assert _marker_noise(store, "s-theoph")[1] == 0.0
    assert _marker_noise(store, "no-such-study") == (1.0, 0.0)
