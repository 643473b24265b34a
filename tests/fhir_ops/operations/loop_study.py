"""A study whose participants behave differently from the world the committed dropout model was trained in,
simulated with the behaviour model and written as FHIR resources (what arrives at a server as a study runs).

Participants are randomized over ``enroll_days`` days, visit every week for 12 weeks, and the data are
cut on ``cut``: held visits are fulfilled or noshow, the next one is booked, nothing follows a withdrawal.
"""
from __future__ import annotations

import datetime as dt

import numpy as np

from inference.behaviour import BehaviourModel, VisitSchedule, simulate_behaviour
from inference.training.dropout import ARM_DOSE_MG, ARMS, TrainingDesign, _covariates, _exposure

CS = "https://trialtwin.org/fhir/CodeSystem/"
#: more no-shows and a stronger pull of distance than the committed model learned (BehaviourModel defaults
#: 3.5 and -0.25): the study's world has moved away from the simulator's
SHIFTED_BEHAVIOUR = BehaviourModel(attend_intercept=2.3, attend_in_person=1.0, attend_distance_per_10km=-0.45)
START = dt.date(2026, 1, 5)
INTERVAL, N_VISITS, N_DAYS = 7, 12, 85


def _instant(day: dt.date, offset_days: int, hour: float) -> str:
    when = dt.datetime.combine(day, dt.time()) + dt.timedelta(days=offset_days, hours=hour)
    return when.isoformat() + "Z"


def _ref(kind: str, rid: str) -> dict:
    return {"reference": f"{kind}/{rid}"}


def _quantity(value: float, code: str) -> dict:
    return {"value": round(float(value), 2), "unit": code, "system": "http://unitsofmeasure.org", "code": code}


def study_resources(study_id: str, n: int, seed: int, *, model: BehaviourModel = SHIFTED_BEHAVIOUR,
                    enroll_days: int = 150, cut: dt.date | None = None, prefix: str = "lp") -> list[dict]:
    """FHIR resources of ``n`` simulated participants of ResearchStudy ``study_id`` (and the study)."""
    rng = np.random.default_rng(seed)
    cov = _covariates(n, rng, TrainingDesign())
    arms = [ARMS[k] for k in rng.integers(0, len(ARMS), n)]
    remote = rng.random((n, N_VISITS)) < rng.random(n)[:, None]
    schedule = VisitSchedule.every(INTERVAL, N_VISITS, remote=remote)
    dose = np.array([ARM_DOSE_MG[a] for a in arms])
    res = simulate_behaviour(model, cov, schedule, N_DAYS, rng, dose_mg=dose, exposure=_exposure(cov, rng))
    enrolled = np.sort(rng.integers(0, enroll_days, n))
    cut = cut or START + dt.timedelta(days=enroll_days + 30)
    out = [{"resourceType": "ResearchStudy", "id": study_id, "status": "active",
            "title": "Learning-loop test study"}]
    for i in range(n):
        pid = f"{prefix}-{i:04d}"
        day0 = START + dt.timedelta(days=int(enrolled[i]))
        known = (cut - day0).days  # study days observed by the cut
        stop = int(res.dropout_day[i])
        withdrawn = stop < N_DAYS and stop <= known
        finished = not withdrawn and known >= N_DAYS
        subject = {"resourceType": "ResearchSubject", "id": f"{pid}-rs", "study": _ref("ResearchStudy", study_id),
                   "individual": _ref("Patient", pid), "assignedArm": arms[i],
                   "status": "withdrawn" if withdrawn else "off-study" if finished else "on-study-intervention",
                   "period": {"start": day0.isoformat()}}
        if withdrawn:
            subject["period"]["end"] = (day0 + dt.timedelta(days=stop)).isoformat()
        born = day0 - dt.timedelta(days=int(cov.age_y[i] * 365.25))
        out += [
            {"resourceType": "Patient", "id": pid, "gender": "female" if cov.sex_female[i] else "male",
             "birthDate": born.isoformat()},
            subject,
            {"resourceType": "Observation", "id": f"{pid}-weight", "status": "final", "subject": _ref("Patient", pid),
             "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
             "effectiveDateTime": _instant(day0, 0, 9), "valueQuantity": _quantity(cov.weight_kg[i], "kg")},
            {"resourceType": "Observation", "id": f"{pid}-egfr", "status": "final", "subject": _ref("Patient", pid),
             "code": {"coding": [{"system": "http://loinc.org", "code": "62238-1"}]},
             "effectiveDateTime": _instant(day0, 0, 9), "valueQuantity": _quantity(cov.egfr[i], "mL/min/{1.73_m2}")},
            {"resourceType": "Observation", "id": f"{pid}-distance", "status": "final",
             "subject": _ref("Patient", pid),
             "code": {"coding": [{"system": CS + "covariate", "code": "travel-distance"}]},
             "effectiveDateTime": _instant(day0, 0, 9), "valueQuantity": _quantity(cov.distance_km[i], "km")},
        ]
        visits = [(0, "fulfilled", False)]
        for v, day in enumerate(res.visit_days):
            day = int(day)
            if day >= stop and withdrawn:
                break
            if day >= known:
                if not withdrawn and not finished:
                    visits.append((day, "booked", bool(res.remote[i, v])))
                break
            visits.append((day, "fulfilled" if res.attended[i, v] else "noshow", bool(res.remote[i, v])))
        modality = {True: "virtual", False: "in-person"}
        for v, (day, status, is_remote) in enumerate(visits):
            out.append({"resourceType": "Appointment", "id": f"{pid}-v{v}", "status": status,
                        "serviceType": [{"coding": [{"system": CS + "visit-modality", "code": modality[is_remote]}]}],
                        "start": _instant(day0, day, 10), "end": _instant(day0, day, 10.5),
                        "participant": [{"actor": _ref("Patient", pid), "status": "accepted"}]})
        for day in np.flatnonzero(res.taken[i, :min(stop, known, N_DAYS)]):
            out.append({"resourceType": "MedicationAdministration", "id": f"{pid}-d{day}", "status": "completed",
                        "medicationCodeableConcept": {"text": "TTX-101"}, "subject": _ref("Patient", pid),
                        "effectiveDateTime": _instant(day0, int(day), 8),
                        "dosage": {"dose": _quantity(max(dose[i], 1.0), "mg")}})
        for k, day in enumerate(np.flatnonzero(res.ae[i, :min(stop, known, N_DAYS)])):
            out.append({"resourceType": "AdverseEvent", "id": f"{pid}-ae{k}", "actuality": "actual",
                        "subject": _ref("Patient", pid), "date": _instant(day0, int(day), 14),
                        "severity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/adverse-event-severity",
                                                 "code": "mild"}]}})
    return out


def post_resources(fhir, resources: list[dict], batch: int = 2500) -> None:
    """PUT the resources to the server in transactions (ids as given)."""
    for start in range(0, len(resources), batch):
        entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                   for r in resources[start:start + batch]]
        resp = fhir.transaction(entries)
        assert resp.status_code == 200, resp.text[:2000]
