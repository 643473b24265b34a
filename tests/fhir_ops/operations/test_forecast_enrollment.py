"""``$forecast-enrollment`` over HTTP on a simulated multi-site study with known recruitment rates."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from inference.enrollment import fit_poisson_gamma, simulate_recruitment
from tests.fhir_ops.conftest import error_id

pytestmark = pytest.mark.api
START = dt.date(2026, 1, 1)
SITES = 8
CUT_DAY = 150


def _put(r):
    return {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}


def recruitment_entries(study_id: str = "rec", sites: int = SITES, seed: int = 3):
    """A study whose sites recruited at known rates up to day CUT_DAY: (transaction entries, times, randomized)."""
    times, ok = simulate_recruitment(2.0, 20.0, sites, activation=np.zeros(sites), until=CUT_DAY,
                                     p_randomized=0.8, seed=seed)
    entries = []
    for s in range(sites):
        entries.append(_put({"resourceType": "Organization", "id": f"org-{s}", "name": f"Site {s}"}))
        entries.append(_put({"resourceType": "Location", "id": f"loc-{s}", "name": f"Site {s}",
                             "managingOrganization": {"reference": f"Organization/org-{s}"}}))
    entries.append(_put({"resourceType": "ResearchStudy", "id": study_id, "status": "active",
                         "period": {"start": START.isoformat()},
                         "site": [{"reference": f"Location/loc-{s}"} for s in range(sites)]}))
    n = 0
    for s in range(sites):
        for t, randomized in zip(times[s], ok[s]):
            pid = f"rp{n:04d}"
            n += 1
            entries.append(_put({"resourceType": "Patient", "id": pid,
                                 "managingOrganization": {"reference": f"Organization/org-{s}"}}))
            entries.append(_put({"resourceType": "ResearchSubject", "id": f"rs-{pid}",
                                 "status": "on-study" if randomized else "ineligible",
                                 "study": {"reference": f"ResearchStudy/{study_id}"},
                                 "individual": {"reference": f"Patient/{pid}"},
                                 "period": {"start": (START + dt.timedelta(days=float(t))).isoformat()}}))
    return entries, times, ok


@pytest.fixture(scope="module")
def study(module_fhir):
    fhir = module_fhir
    entries, times, ok = recruitment_entries()
    for i in range(0, len(entries), 200):
        r = fhir.transaction(entries[i:i + 200])
        assert r.status_code == 200, r.text[:400]
    entries = [_put({"resourceType": "ResearchStudy", "id": "nosites", "status": "active"}),
               _put({"resourceType": "ResearchStudy", "id": "nosubjects", "status": "active",
                     "site": [{"reference": "Location/loc-0"}]}),
               # one site: a between-site distribution cannot be fitted from it
               _put({"resourceType": "ResearchStudy", "id": "onesite", "status": "active",
                     "period": {"start": START.isoformat()}, "site": [{"reference": "Location/loc-0"}]}),
               # two sites, but none of the participants belongs to either: no site has recruited
               _put({"resourceType": "ResearchStudy", "id": "unplaced", "status": "active",
                     "period": {"start": START.isoformat()},
                     "site": [{"reference": "Location/loc-0"}, {"reference": "Location/loc-1"}]}),
               _put({"resourceType": "Patient", "id": "nowhere"})]
    for i in range(3):
        entries.append(_put({"resourceType": "ResearchSubject", "id": f"one-{i}", "status": "on-study",
                             "study": {"reference": "ResearchStudy/onesite"},
                             "individual": {"reference": "Patient/rp0000"},
                             "period": {"start": (START + dt.timedelta(days=10 * i + 5)).isoformat()}}))
        entries.append(_put({"resourceType": "ResearchSubject", "id": f"unplaced-{i}", "status": "on-study",
                             "study": {"reference": "ResearchStudy/unplaced"},
                             "individual": {"reference": "Patient/nowhere"},
                             "period": {"start": (START + dt.timedelta(days=10 * i + 5)).isoformat()}}))
    assert fhir.transaction(entries).status_code == 200
    return fhir, times, ok


def _params(**kw):
    out = []
    for k, v in kw.items():
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, dict) and "part" in item:
                out.append({"name": k, "part": item["part"]})
            else:
                key = {bool: "valueBoolean", int: "valueInteger", float: "valueDecimal"}.get(type(item), "valueDate")
                out.append({"name": k, key: item})
    return {"resourceType": "Parameters", "parameter": out}


def _one(body, name):
    p = [x for x in body["parameter"] if x["name"] == name]
    return p[0] if p else None


def _parts(p):
    return {x["name"]: next(v for k, v in x.items() if k.startswith("value")) for x in p["part"]}


def test_forecast_matches_the_in_process_fit_and_stores_a_measure_report(study):
    fhir, times, ok = study
    screened = sum(len(t) for t in times)
    randomized = int(sum(o.sum() for o in ok))
    r = fhir.post("ResearchStudy/rec/$forecast-enrollment", _params(target=randomized + 60, byDate="2026-12-31"))
    assert r.status_code == 200, r.text[:600]
    body = r.json()
    assert _one(body, "screened")["valueInteger"] == screened
    assert _one(body, "randomized")["valueInteger"] == randomized
    # The same fit in-process on the same counts and active days (data cut = the last screening).
    cut = max(float(t[-1]) for t in times if len(t))
    cut = (dt.datetime.combine(START, dt.time()) + dt.timedelta(days=cut))
    cut_days = (dt.datetime.combine(cut.date(), dt.time()) - dt.datetime.combine(START, dt.time())).days
    k = np.array([len(t) for t in times])
    fit = fit_poisson_gamma(k, np.full(SITES, float(cut_days)))
    assert _parts(_one(body, "alpha"))["estimate"] == pytest.approx(fit.alpha, rel=1e-6)
    assert _parts(_one(body, "beta"))["estimate"] == pytest.approx(fit.beta, rel=1e-6)
    ttt = _parts(_one(body, "timeToTarget"))
    assert ttt["low95"] <= ttt["low80"] <= ttt["median"] <= ttt["high80"] <= ttt["high95"]
    # 60 more at ~0.8 x 8 sites x 0.1/day ~ 0.64/day: about three months.
    assert 40 < ttt["medianDays"] < 200
    assert 0.0 <= _one(body, "probabilityByDate")["valueDecimal"] <= 1.0
    sites = [_parts(s) for s in body["parameter"] if s["name"] == "site"]
    assert [s["screened"] for s in sites] == list(k)
    report = fhir.get(_one(body, "measureReport")["valueReference"]["reference"]).json()
    assert report["resourceType"] == "MeasureReport" and len(report["group"]) == SITES + 1
    assert report["group"][0]["population"][1]["count"] == randomized
    prov = fhir.get(_one(body, "provenance")["valueReference"]["reference"]).json()
    assert prov["target"][0]["reference"].startswith("MeasureReport/")
    assert any(e["what"]["reference"].startswith("ResearchSubject/") for e in prov["entity"])


def test_adding_sites_brings_the_target_forward(study):
    fhir, _, ok = study
    target = int(sum(o.sum() for o in ok)) + 80
    base = fhir.post("ResearchStudy/rec/$forecast-enrollment", _params(target=target, persist=False)).json()
    more = fhir.post("ResearchStudy/rec/$forecast-enrollment",
                     _params(target=target, persist=False,
                             newSite={"part": [{"name": "count", "valueInteger": 6},
                                               {"name": "date", "valueDate": "2026-06-01"}]})).json()
    assert _parts(_one(more, "timeToTarget"))["medianDays"] < _parts(_one(base, "timeToTarget"))["medianDays"]
    assert len([p for p in more["parameter"] if p["name"] == "site"]) == SITES + 6
    assert _one(base, "measureReport") is None


@pytest.mark.parametrize("study_id, params, status, eid", [
    ("nosites", {"target": 10}, 422, "no-sites"),
    ("nosubjects", {"target": 10}, 422, "no-subjects"),
    ("rec", {"target": 1}, 422, "target-reached"),
    ("onesite", {"target": 10}, 422, "fit-failed"),
    ("unplaced", {"target": 10}, 422, "no-site-assignment"),
    ("rec", {"target": 0}, 400, "target-out-of-range"),
    ("rec", {"target": 5000, "horizonDays": 0}, 400, "horizon-out-of-range"),
    ("rec", {"target": 5000, "newSite": {"part": [{"name": "count", "valueInteger": 0},
                                                  {"name": "date", "valueDate": "2026-09-01"}]}}, 400,
     "count-out-of-range"),
    ("rec", {"target": 5000, "siteActivation": {"part": [{"name": "site", "valueReference": {"reference": "Location/x"}},
                                                         {"name": "date", "valueDate": "2026-01-01"}]}}, 400,
     "unknown-site"),
])
def test_bad_input_is_a_4xx_outcome_and_stores_nothing(study, study_id, params, status, eid):
    fhir, *_ = study
    before = fhir.get("MeasureReport", params={"_summary": "count"}).json()["total"]
    r = fhir.post(f"ResearchStudy/{study_id}/$forecast-enrollment", _params(**params))
    assert r.status_code == status, r.text[:400]
    assert error_id(r) == eid
    print(f"\n{study_id} {params}: {r.status_code} {eid}: {r.json()['issue'][0]['diagnostics']}")
    assert fhir.get("MeasureReport", params={"_summary": "count"}).json()["total"] == before
