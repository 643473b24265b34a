"""``$estimate-effect`` over HTTP: a randomized study with a known effect, historical controls for
PROCOVA, confounded external controls; every number checked against statsmodels on the same rows."""
from __future__ import annotations

import base64
import datetime as dt

import numpy as np
import pytest
import statsmodels.api as sm

from tests.fhir_ops.conftest import error_id

pytestmark = pytest.mark.api

LOINC = "http://loinc.org"
HBA1C = f"{LOINC}|4548-4"
START = dt.date(2026, 1, 5)
TRUE_EFFECT = -0.6
DAY = 168


def _obs(oid, pid, day0, day, value, unit="%", code="4548-4"):
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code}]}, "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": (day0 + dt.timedelta(days=day)).isoformat() + "T09:00:00Z",
            "valueQuantity": {"value": round(float(value), 4), "unit": unit, "system": "http://unitsofmeasure.org",
                              "code": unit}}


def _put(resource):
    return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


def _people(rng, prefix, n, *, age_mu=55.0, base_mu=8.0, effect=0.0, treated=None):
    """Patients with baseline HbA1c and age; day-168 HbA1c = 1.0 + 0.85 baseline + 0.01 age + effect·treated + noise."""
    age = rng.normal(age_mu, 9.0, n)
    base = rng.normal(base_mu, 0.8, n)
    t = np.zeros(n, bool) if treated is None else treated
    y = 1.0 + 0.85 * base + 0.01 * age + effect * t + rng.normal(0, 0.35, n)
    rows = []
    for i in range(n):
        pid = f"{prefix}-{i:03d}"
        day0 = START + dt.timedelta(days=int(i % 60))
        born = dt.date(day0.year - int(age[i]), 6, 1)
        rows.append((pid, day0, born, base[i], y[i], bool(t[i])))
    return rows


def _study_entries(study_id, rows, arms):
    entries = [_put({"resourceType": "ResearchStudy", "id": study_id, "status": "active",
                     "arm": [{"name": a} for a in arms]})]
    for pid, day0, born, base, y, treated in rows:
        entries.append(_put({"resourceType": "Patient", "id": pid, "birthDate": born.isoformat(),
                             "gender": "female" if int(pid[-3:]) % 2 else "male"}))
        entries.append(_put({"resourceType": "ResearchSubject", "id": f"rs-{pid}", "status": "on-study",
                             "study": {"reference": f"ResearchStudy/{study_id}"},
                             "individual": {"reference": f"Patient/{pid}"},
                             "assignedArm": arms[0] if treated else arms[-1],
                             "period": {"start": day0.isoformat()}}))
        entries.append(_put(_obs(f"b-{pid}", pid, day0, 0, base)))
        entries.append(_put(_obs(f"y-{pid}", pid, day0, DAY, y)))
    return entries


def _group_entries(group_id, rows):
    entries = []
    for pid, day0, born, base, y, _ in rows:
        entries.append(_put({"resourceType": "Patient", "id": pid, "birthDate": born.isoformat()}))
        entries.append(_put(_obs(f"b-{pid}", pid, day0, 0, base)))
        entries.append(_put(_obs(f"y-{pid}", pid, day0, DAY, y)))
    entries.append(_put({"resourceType": "Group", "id": group_id, "type": "person", "actual": True,
                         "member": [{"entity": {"reference": f"Patient/{pid}"},
                                     "period": {"start": day0.isoformat()}} for pid, day0, *_ in rows]}))
    return entries


def _load(fhir, entries, size=150):
    for i in range(0, len(entries), size):
        r = fhir.transaction(entries[i:i + size])
        assert r.status_code == 200, r.text[:500]


@pytest.fixture(scope="module")
def studies(module_fhir):
    rng = np.random.default_rng(20261202)
    n = 160
    trial = _people(rng, "tr", n, effect=TRUE_EFFECT, treated=rng.permutation(np.arange(n) % 2 == 0))
    _load(module_fhir, _study_entries("trial", trial, ["active", "placebo"]))
    hist = _people(rng, "hi", 240)
    _load(module_fhir, _study_entries("history", hist, ["placebo"]))
    # External (real-world) controls: younger and less sick than the trial's participants.
    ext = _people(rng, "rw", 500, age_mu=50.0, base_mu=7.6)
    _load(module_fhir, _group_entries("rwd", ext))
    # One trial participant without the day-168 record: left out and counted.
    assert module_fhir.delete("Observation/y-tr-007").status_code in (200, 204)
    return module_fhir, {r[0]: r for r in trial}, hist, ext


def _params(**kw):
    out = [{"name": "endpoint", "valueString": HBA1C}, {"name": "timepointDays", "valueInteger": DAY},
           {"name": "treatmentArm", "valueString": "active"}, {"name": "controlArm", "valueString": "placebo"}]
    for k, v in kw.items():
        for item in (v if isinstance(v, list) else [v]):
            key = {bool: "valueBoolean", int: "valueInteger", float: "valueDecimal"}.get(type(item), "valueString")
            if isinstance(item, dict):
                key = "valueReference"
            out.append({"name": k, key: item})
    return {"resourceType": "Parameters", "parameter": out}


def _get(body, name):
    return [p for p in body["parameter"] if p["name"] == name]


def _parts(param):
    return {p["name"]: next(v for k, v in p.items() if k.startswith("value") or k == "part") for p in param["part"]}


def _effects(body):
    return {(_parts(e))["method"]: _parts(e) for e in _get(body, "effect")}


def _trial_arrays(rows):
    keep = [r for r in rows.values() if r[0] != "tr-007"]
    y = np.array([r[4] for r in keep])
    t = np.array([r[5] for r in keep])
    base = np.array([r[3] for r in keep])
    return y, t, base


def test_procova_over_http_matches_statsmodels_and_stores_scores_report_and_provenance(studies):
    fhir, rows, *_ = studies
    r = fhir.post("ResearchStudy/trial/$estimate-effect",
                  _params(covariate=["baseline"], historicalControl={"reference": "ResearchStudy/history"}))
    assert r.status_code == 200, r.text[:800]
    body = r.json()
    eff = _effects(body)
    assert set(eff) == {"unadjusted", "ancova", "procova"}
    assert _get(body, "excluded")[0]["valueInteger"] == 1
    # The same rows through statsmodels directly (values as stored, rounded to 4 decimals).
    y, t, base = _trial_arrays(rows)
    y, base = np.round(y, 4), np.round(base, 4)
    ref = sm.OLS(y, sm.add_constant(np.column_stack([t.astype(float), base]))).fit(cov_type="HC3")
    assert eff["ancova"]["estimate"] == pytest.approx(ref.params[1], abs=1e-8)
    assert eff["ancova"]["standardError"] == pytest.approx(ref.bse[1], abs=1e-8)
    un = sm.OLS(y, sm.add_constant(t.astype(float))).fit(cov_type="HC3")
    assert eff["unadjusted"]["estimate"] == pytest.approx(un.params[1], abs=1e-8)
    # PROCOVA is close to the truth, and tighter than the unadjusted estimate as rho predicts.
    pro = eff["procova"]
    assert pro["ciLow"] <= TRUE_EFFECT <= pro["ciHigh"]
    rho = _get(body, "rho")[0]["valueDecimal"]
    assert rho > 0.8
    assert pro["standardError"] < 0.7 * eff["unadjusted"]["standardError"]
    assert _get(body, "equivalentSampleSize")[0]["valueDecimal"] > 2 * pro["n"]
    pm = _parts(_get(body, "prognosticModel")[0])
    assert pm["r2"] > 0.7 and pm["nTest"] == 72
    # Scores: one per analysed participant, re-runs update them instead of duplicating.
    scores = fhir.get("Observation", params={"category": "https://trialtwin.org/fhir/CodeSystem/trialtwin|prognostic-score",
                                             "_summary": "count"}).json()["total"]
    assert scores == pro["n"]
    report_ref = _get(body, "report")[0]["valueReference"]["reference"]
    doc = fhir.get(report_ref).json()
    html = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert "PROCOVA" in html and "<svg" in html
    prov = fhir.get(_get(body, "provenance")[0]["valueReference"]["reference"]).json()
    targets = {t["reference"].split("/_history/")[0] for t in prov["target"]}
    assert report_ref in targets and len(targets) == scores + 1
    sources = {e["what"]["reference"] for e in prov["entity"]}
    assert "Observation/y-tr-000/_history/1" in sources and any(s.startswith("Observation/y-hi-") for s in sources)
    again = fhir.post("ResearchStudy/trial/$estimate-effect",
                      _params(covariate=["baseline"], historicalControl={"reference": "ResearchStudy/history"}))
    assert again.status_code == 200
    assert fhir.get("Observation", params={"category": "https://trialtwin.org/fhir/CodeSystem/trialtwin|prognostic-score",
                                           "_summary": "count"}).json()["total"] == scores


def test_external_controls_are_weighted_to_balance_and_borrowed(studies):
    fhir, *_ = studies
    r = fhir.post("ResearchStudy/trial/$estimate-effect",
                  _params(covariate=["baseline", "age"], externalControl={"reference": "Group/rwd"}, persist=False))
    assert r.status_code == 200, r.text[:800]
    body = r.json()
    eff = _effects(body)
    balance = [_parts(b) for b in _get(body, "balance")]
    assert {b["covariate"] for b in balance} == {"baseline", "age"}
    assert max(abs(b["smdBefore"]) for b in balance) > 0.3
    assert all(abs(b["smdAfter"]) < 0.1 for b in balance)
    # Naive comparison with the (healthier) external controls is biased; weighting removes most of it.
    w = eff["external-weighted"]["estimate"]
    assert abs(w - TRUE_EFFECT) < 0.15
    assert "hybrid-test-then-pool" in eff
    assert 0 < _get(body, "effectiveSampleSize")[0]["valueDecimal"] < 500
    assert not _get(body, "report")  # persist=false stores nothing


@pytest.mark.parametrize("change, status, eid", [
    ({"endpoint": "http://loinc.org|0000-0"}, 422, "no-endpoint-data"),
    ({"endpoint": "not-a-token"}, 400, "invalid-token"),
    ({"controlArm": "active"}, 400, "single-arm"),
    ({"treatmentArm": "nobody"}, 422, "arm-too-small"),
    ({"trim": 0.4}, 400, "trim-out-of-range"),
    ({"borrowing": "magic"}, 400, "unknown-code"),
])
def test_bad_input_is_a_4xx_outcome_and_stores_nothing(studies, change, status, eid):
    fhir, *_ = studies
    before = fhir.get("DocumentReference", params={"_summary": "count"}).json()["total"]
    body = _params()
    for p in body["parameter"]:
        if p["name"] in change:
            key = next(k for k in p if k.startswith("value"))
            p[key] = change.pop(p["name"])
    for k, v in change.items():
        key = "valueDecimal" if isinstance(v, float) else ("valueCode" if k in ("borrowing", "weighting") else "valueString")
        body["parameter"].append({"name": k, key: v})
    r = fhir.post("ResearchStudy/trial/$estimate-effect", body)
    assert r.status_code == status, r.text[:500]
    assert error_id(r) == eid
    assert fhir.get("DocumentReference", params={"_summary": "count"}).json()["total"] == before


def test_external_controls_without_the_covariates_and_without_overlap_are_refused(studies):
    fhir, *_ = studies
    r = fhir.post("ResearchStudy/trial/$estimate-effect",
                  _params(covariate=["baseline", "sex"], externalControl={"reference": "Group/rwd"},
                          persist=False))  # the external patients carry no gender
    assert r.status_code == 422 and error_id(r) == "external-covariates-missing", r.text[:400]
    assert "sex" in r.json()["issue"][0]["diagnostics"]
    # External patients of their own (the shared historical ones stay as they are for the other tests) with a
    # sharply different baseline: no overlap.
    far = _group_entries("far", [(f"far-{i:03d}", START + dt.timedelta(days=i % 60), dt.date(1970, 6, 1),
                                  20.0 + i * 0.01, 18.0, False) for i in range(40)])
    r = fhir.transaction(far)
    assert r.status_code == 200
    r = fhir.post("ResearchStudy/trial/$estimate-effect",
                  _params(covariate=["baseline"], externalControl={"reference": "Group/far"}, persist=False))
    assert r.status_code == 422 and error_id(r) == "no-overlap", r.text[:400]
    assert "overlap" in r.json()["issue"][0]["diagnostics"]


def _age(row) -> float:
    """Age in years at time zero, as the operation reads it (ResearchSubject/Group period start vs birthDate)."""
    _, day0, born, *_ = row
    return (day0 - born).days / 365.25


def _as_stored(rows, drop=()):
    """(outcome, treated, baseline, age) of ``rows`` as the server stores them (values rounded to 4 decimals)."""
    keep = [r for r in rows if r[0] not in drop]
    return (np.round([r[4] for r in keep], 4), np.array([r[5] for r in keep]), np.round([r[3] for r in keep], 4),
            np.array([_age(r) for r in keep]))


def _assert_coefficients(effect, ref, names):
    got = dict(_coefficient(c) for c in effect["coefficient"])
    assert list(got) == names
    np.testing.assert_allclose([got[n][0] for n in names], ref.params, rtol=0, atol=1e-8)
    np.testing.assert_allclose([got[n][1] for n in names], ref.bse, rtol=0, atol=1e-8)
    assert effect["estimate"] == pytest.approx(ref.params[1], abs=1e-8)
    assert effect["standardError"] == pytest.approx(ref.bse[1], abs=1e-8)
    assert effect["pValue"] == pytest.approx(ref.pvalues[1], abs=1e-8)
    assert (effect["ciLow"], effect["ciHigh"]) == pytest.approx(tuple(ref.conf_int()[1]), abs=1e-8)


def _coefficient(parts):
    p = {x["name"]: next(v for k, v in x.items() if k.startswith("value")) for x in parts}
    return p["term"], (p["value"], p["standardError"])


def test_every_coefficient_over_http_equals_a_direct_statsmodels_call(studies):
    """Issue 16 acceptance 3 over the wire: every coefficient and HC3 SE of the unadjusted, ANCOVA, PROCOVA and
    external-weighted fits equals statsmodels on the same rows to 1e-8 (PROCOVA's score refitted here by OLS on
    the historical controls; the external weights from statsmodels' Logit with the default 0.05 trimming)."""
    fhir, rows, hist, ext = studies
    r = fhir.post("ResearchStudy/trial/$estimate-effect",
                  _params(covariate=["baseline", "age"], historicalControl={"reference": "ResearchStudy/history"},
                          externalControl={"reference": "Group/rwd"}, persist=False))
    assert r.status_code == 200, r.text[:800]
    eff = {k: dict(v, coefficient=[p["part"] for p in _get_effect(r.json(), k)]) for k, v in _effects(r.json()).items()}
    y, t, base, age = _as_stored(rows.values(), drop={"tr-007"})
    const = lambda *cols: sm.add_constant(np.column_stack([np.asarray(c, float) for c in cols]))  # noqa: E731
    _assert_coefficients(eff["unadjusted"], sm.OLS(y, const(t)).fit(cov_type="HC3"), ["const", "treated"])
    _assert_coefficients(eff["ancova"], sm.OLS(y, const(t, base, age)).fit(cov_type="HC3"),
                         ["const", "treated", "baseline", "age"])
    yh, _, bh, ah = _as_stored(hist)
    prognostic = sm.OLS(yh, const(bh, ah)).fit()
    score = const(base, age) @ prognostic.params
    _assert_coefficients(eff["procova"], sm.OLS(y, const(t, score)).fit(cov_type="HC3"),
                         ["const", "treated", "prognosticScore"])
    ye, _, be, ae = _as_stored(ext)
    yy, tt = np.r_[y[t], ye], np.r_[np.ones(int(t.sum())), np.zeros(ye.size)]
    x = const(np.r_[base[t], be], np.r_[age[t], ae])
    e = sm.Logit(tt, x).fit(disp=0, method="newton").predict(x)
    w = np.where(tt == 1, 1.0, e / (1 - e)) * ((e >= 0.05) & (e <= 0.95))
    k = w > 0
    _assert_coefficients(eff["external-weighted"], sm.WLS(yy[k], const(tt[k]), weights=w[k]).fit(cov_type="HC3"),
                         ["const", "treated"])


def _get_effect(body, method):
    effect = next(e for e in _get(body, "effect") if _parts(e)["method"] == method)
    return [p for p in effect["part"] if p["name"] == "coefficient"]


def test_weighting_over_http_removes_most_of_the_naive_bias(studies):
    """Issue 16 acceptance 2 over the wire: the weighted estimate removes >= 80 % of the naive bias of
    comparing the treated with the (younger, less sick) external controls, and every |SMD| after is < 0.1."""
    fhir, rows, _, ext = studies
    r = fhir.post("ResearchStudy/trial/$estimate-effect",
                  _params(covariate=["baseline", "age"], externalControl={"reference": "Group/rwd"}, persist=False))
    assert r.status_code == 200, r.text[:800]
    y, t, *_ = _as_stored(rows.values(), drop={"tr-007"})
    naive = y[t].mean() - _as_stored(ext)[0].mean()
    weighted = _effects(r.json())["external-weighted"]["estimate"]
    removed = 1 - abs(weighted - TRUE_EFFECT) / abs(naive - TRUE_EFFECT)
    print(f"\nover HTTP: naive {naive:+.3f}, weighted {weighted:+.3f}, truth {TRUE_EFFECT}: "
          f"{removed:.0%} of the bias removed")
    assert removed >= 0.80
    assert all(abs(_parts(b)["smdAfter"]) < 0.1 for b in _get(r.json(), "balance"))


def test_prognostic_model_reports_its_validation_and_says_when_participants_lie_outside_its_range(studies):
    """Issue 16 acceptance 5: R², RMSE and the calibration line on held-out historical controls come with the
    result; trained on historical controls whose baseline spans only 7.7-8.3 %, the trial participants outside
    that range are counted in prognosticModel.outOfRange and named in a score-out-of-range warning."""
    fhir, rows, hist, _ = studies
    narrow = [h for h in hist if 7.7 <= round(h[3], 4) <= 8.3]
    group = {"resourceType": "Group", "id": "hist-narrow", "type": "person", "actual": True,
             "member": [{"entity": {"reference": f"Patient/{h[0]}"}, "period": {"start": h[1].isoformat()}}
                        for h in narrow]}
    assert fhir.transaction([_put(group)]).status_code == 200
    r = fhir.post("ResearchStudy/trial/$estimate-effect",
                  _params(covariate=["baseline"], historicalControl={"reference": "Group/hist-narrow"}, persist=False))
    assert r.status_code == 200, r.text[:800]
    body = r.json()
    pm = _parts(_get(body, "prognosticModel")[0])
    assert pm["nTrain"] + pm["nTest"] == len(narrow) and pm["nTest"] == round(0.3 * len(narrow))
    assert 0.0 < pm["r2"] <= 1.0 and pm["rmse"] > 0
    assert np.isfinite(pm["calibrationSlope"]) and np.isfinite(pm["calibrationIntercept"])
    _, _, base, _ = _as_stored(rows.values(), drop={"tr-007"})
    lo, hi = min(round(h[3], 4) for h in narrow), max(round(h[3], 4) for h in narrow)
    outside = int(np.sum((base < lo) | (base > hi)))
    assert outside > 10
    assert pm["outOfRange"] == f"baseline: {outside} participant(s)"
    warnings = [i for i in _get(body, "issues")[0]["resource"]["issue"]
                if i["details"]["coding"][0]["code"] == "score-out-of-range"]
    assert len(warnings) == 1 and f"baseline ({outside})" in warnings[0]["diagnostics"]
    # trained on the whole history (baseline range about 5.6-10.6 %), far fewer lie outside
    r = fhir.post("ResearchStudy/trial/$estimate-effect", _params(
        covariate=["baseline"], historicalControl={"reference": "ResearchStudy/history"}, persist=False))
    pm = _parts(_get(r.json(), "prognosticModel")[0])
    # the linear model is the true one and the range is wide: R² high, the calibration line near y = x
    print(f"\nprognostic model on the history: R² {pm['r2']:.3f}, RMSE {pm['rmse']:.3f}, calibration "
          f"{pm['calibrationIntercept']:+.3f} + {pm['calibrationSlope']:.3f} x predicted (n test {pm['nTest']})")
    assert pm["nTest"] == 72 and pm["r2"] > 0.7
    wide = [round(h[3], 4) for h in hist]
    beyond = int(np.sum((base < min(wide)) | (base > max(wide))))
    assert beyond < outside
    assert pm.get("outOfRange") == (f"baseline: {beyond} participant(s)" if beyond else None)
    assert pm["calibrationSlope"] == pytest.approx(1.0, abs=0.2)
    # calibration in the large: at the typical predicted value (~8.35 %) the line is within 0.15 of y = x
    # (about 3.5 standard errors of a mean of 72 held-out residuals with SD 0.35)
    assert abs(pm["calibrationIntercept"] + (pm["calibrationSlope"] - 1.0) * 8.35) < 0.15


def test_a_study_with_a_single_arm_is_refused(studies):
    """Issue 16 acceptance 4: the historical study has only its placebo arm; asking for an effect there names
    the empty arm (422) and stores nothing."""
    fhir, *_ = studies
    before = fhir.get("DocumentReference", params={"_summary": "count"}).json()["total"]
    r = fhir.post("ResearchStudy/history/$estimate-effect", _params())
    assert r.status_code == 422 and error_id(r) == "arm-too-small", r.text[:400]
    issue = r.json()["issue"][0]
    assert "'active'" in issue["diagnostics"] and issue["expression"] == ["Parameters.parameter:treatmentArm"]
    assert fhir.get("DocumentReference", params={"_summary": "count"}).json()["total"] == before


def test_historical_controls_from_a_nonmem_file_give_the_same_procova(studies, tmp_path):
    """Issue 16 build item 1 (history from a NONMEM/CSV file): the historical controls written as a NONMEM data
    set, loaded by ``trialtwin load --format nonmem`` over HTTP into a ResearchStudy, give the same prognostic
    model and PROCOVA fit as the same rows loaded as FHIR (coefficients and HC3 SEs to 1e-8)."""
    import json

    from fhir_ops.cli import main

    fhir, _, hist, _ = studies
    lines = ["ID,TIME,DV,AMT,EVID,MDV,CMT,ARM"]
    for k, (_, _, _, base, y, _) in enumerate(hist, start=1):
        lines += [f"{k},0,{round(base, 4)},.,0,0,2,placebo", f"{k},{DAY},{round(y, 4)},.,0,0,2,placebo"]
    (tmp_path / "history.csv").write_text("\n".join(lines) + "\n")
    mapping = {"study": {"id": "nm-history", "title": "Historical controls (NONMEM)", "armColumn": "ARM"},
               "timeUnit": "d", "start": "2025-03-03T08:00:00Z",
               "doses": [{"cmt": 1, "medication": {"system": "https://example.org/med", "code": "none"},
                          "unit": "mg", "route": "oral"}],
               "observations": [{"cmt": 2, "code": {"system": LOINC, "code": "4548-4"}, "unit": "%"}]}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    assert main(["load", str(tmp_path / "history.csv"), "--format", "nonmem", "--mapping", str(tmp_path / "map.json"),
                 "--url", fhir.base]) == 0

    def procova(reference):
        r = fhir.post("ResearchStudy/trial/$estimate-effect",
                      _params(covariate=["baseline"], historicalControl={"reference": reference}, persist=False))
        assert r.status_code == 200, r.text[:600]
        pm = _parts(_get(r.json(), "prognosticModel")[0])
        coefficients = dict(_coefficient(p["part"]) for p in _get_effect(r.json(), "procova"))
        return pm, coefficients

    pm_nm, from_nonmem = procova("ResearchStudy/nm-history")
    pm_fhir, from_fhir = procova("ResearchStudy/history")
    assert pm_nm["nTrain"] + pm_nm["nTest"] == pm_fhir["nTrain"] + pm_fhir["nTest"] == len(hist)
    assert list(from_nonmem) == list(from_fhir) == ["const", "treated", "prognosticScore"]
    for term in from_fhir:
        assert from_nonmem[term] == pytest.approx(from_fhir[term], abs=1e-8), term


TGI_SLD = "https://trialtwin.org/fhir/CodeSystem/assay|SLD"


@pytest.fixture(scope="module")
def twin_study(studies):
    """A tumour-growth study whose ResearchStudy references the shipped tumour-growth twin model: 80 participants
    with a baseline SLD and the week-12 SLD drawn from the model's own population (BASE, KL log-normal), the
    active arm shrinking the week-12 SLD by 25 %; each also has an HbA1c pair the model does not predict."""
    from fhir_ops.mapping import model_definition as fm
    from inference.model_definition import shipped_definition

    fhir, *_ = studies
    model = fm.compile_definition(shipped_definition("tumour-growth"))
    rng = np.random.default_rng(77)
    n = 80
    treated = rng.permutation(np.arange(n) % 2 == 0)
    base = 70.0 * np.exp(0.4 * rng.normal(size=n))
    kl = 0.02 * np.exp(0.3 * rng.normal(size=n))
    noise = lambda f: f + rng.normal(size=f.size) * np.sqrt(2.0 ** 2 + (0.05 * f) ** 2)  # noqa: E731
    y0, y12 = noise(base), noise(base * np.exp(kl * 12) * np.where(treated, 0.75, 1.0))
    entries = [_put(fm.definition_library(model)),
               _put({"resourceType": "ResearchStudy", "id": "tgi", "status": "active",
                     "arm": [{"name": "active"}, {"name": "control"}],
                     "extension": [{"url": fm.STUDY_MODEL_EXTENSION, "valueCanonical": model.canonical}]})]
    for i in range(n):
        pid, day0 = f"tg-{i:03d}", START + dt.timedelta(days=i % 30)
        entries += [_put({"resourceType": "Patient", "id": pid, "birthDate": "1960-06-01"}),
                    _put({"resourceType": "ResearchSubject", "id": f"rs-{pid}", "status": "on-study",
                          "study": {"reference": "ResearchStudy/tgi"}, "individual": {"reference": f"Patient/{pid}"},
                          "assignedArm": "active" if treated[i] else "control", "period": {"start": day0.isoformat()}})]
        for day, value in ((0, y0[i]), (84, y12[i])):
            sld = _obs(f"sld{day}-{pid}", pid, day0, day, value, unit="mm", code="SLD")
            sld["code"]["coding"][0]["system"] = "https://trialtwin.org/fhir/CodeSystem/assay"
            entries += [_put(sld), _put(_obs(f"a1c{day}-{pid}", pid, day0, day, 8.0 + rng.normal()))]
    # one more control whose first SLD is on day 3: a baseline covariate (within the 14-day window) but nothing
    # for the twin to start from before treatment (records up to day 1): left out and counted
    late = START + dt.timedelta(days=5)
    sld = [_obs(f"sld{day}-tg-late", "tg-late", late, day, 75.0, unit="mm", code="SLD") for day in (3, 84)]
    for o in sld:
        o["code"]["coding"][0]["system"] = "https://trialtwin.org/fhir/CodeSystem/assay"
    entries += [_put({"resourceType": "Patient", "id": "tg-late"}), *map(_put, sld),
                _put({"resourceType": "ResearchSubject", "id": "rs-tg-late", "status": "on-study",
                      "study": {"reference": "ResearchStudy/tgi"}, "individual": {"reference": "Patient/tg-late"},
                      "assignedArm": "control", "period": {"start": late.isoformat()}})]
    _load(fhir, entries)
    return fhir, model, {f"tg-{i:03d}": round(float(y0[i]), 4) for i in range(n)}, treated


def _twin_params(**kw):
    body = _params(**kw)
    for p in body["parameter"]:
        p.update({"endpoint": {"valueString": TGI_SLD}, "timepointDays": {"valueInteger": 84},
                  "controlArm": {"valueString": "control"}}.get(p["name"], {}))
    body["parameter"].append({"name": "prognosticSource", "valueCode": "twin"})
    return body


def test_prognostic_scores_from_the_twin_model(twin_study):
    """Issue 16 build item 1 (scores from the study's twin): each participant's twin, calibrated on the baseline
    SLD only, predicts the week-12 SLD without treatment; the stored score equals the engine's
    control_prediction on the same record; PROCOVA on it is much tighter than the unadjusted estimate; the
    validation on the control arm is reported."""
    from inference.model_definition import SubjectRecord, control_prediction

    fhir, model, baselines, treated = twin_study
    r = fhir.post("ResearchStudy/tgi/$estimate-effect", _twin_params(covariate=["baseline"]))
    assert r.status_code == 200, r.text[:800]
    body = r.json()
    pm = _parts(_get(body, "prognosticModel")[0])
    assert pm["trainedOn"]["reference"].startswith("Library/") and pm["nTrain"] == 0
    assert pm["nTest"] == int((~treated).sum())
    assert _get(body, "excluded")[0]["valueInteger"] == 1
    assert any("up to day 1" in i["diagnostics"] for i in _get(body, "issues")[0]["resource"]["issue"])
    eff, rho = _effects(body), _get(body, "rho")[0]["valueDecimal"]
    print(f"\ntwin scores: rho {rho:.3f}, control-arm R² {pm['r2']:.3f}, calibration {pm['calibrationIntercept']:+.2f}"
          f" + {pm['calibrationSlope']:.3f} x; SE procova {eff['procova']['standardError']:.3f} vs unadjusted "
          f"{eff['unadjusted']['standardError']:.3f}")
    assert rho > 0.9 and pm["r2"] > 0.8
    doc = fhir.get(_get(body, "report")[0]["valueReference"]["reference"]).json()
    html = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert "Scores from the twin model Library/" in html and "held-out" not in html
    assert eff["procova"]["standardError"] < 0.5 * eff["unadjusted"]["standardError"]
    score = fhir.get("Observation", params={
        "subject": "Patient/tg-005", "category": "https://trialtwin.org/fhir/CodeSystem/trialtwin|prognostic-score"})
    stored = score.json()["entry"][0]["resource"]["valueQuantity"]
    record = SubjectRecord("tg-005", (), ((9.0 / 168.0, "sld", baselines["tg-005"]),), {})
    assert stored["unit"] == "mm"
    assert stored["value"] == pytest.approx(control_prediction(model, model.population_model(), record, "sld",
                                                               12.0), abs=1e-6)


@pytest.mark.parametrize("study_id, change, status, eid", [
    ("trial", {}, 422, "study-without-model"),
    ("tgi", {"endpoint": HBA1C}, 422, "endpoint-not-in-model"),
    ("tgi", {"historicalControl": {"reference": "ResearchStudy/history"}}, 400, "prognostic-source-conflict"),
])
def test_twin_scores_refuse_what_the_twin_cannot_score(twin_study, study_id, change, status, eid):
    fhir, *_ = twin_study
    before = fhir.get("DocumentReference", params={"_summary": "count"}).json()["total"]
    body = _twin_params() if study_id == "tgi" else _params(prognosticSource="twin")
    if study_id != "tgi":
        body["parameter"][-1] = {"name": "prognosticSource", "valueCode": "twin"}
    for p in body["parameter"]:
        if p["name"] == "endpoint" and "endpoint" in change:
            p["valueString"] = change["endpoint"]
    if "historicalControl" in change:
        body["parameter"].append({"name": "historicalControl", "valueReference": change["historicalControl"]})
    r = fhir.post(f"ResearchStudy/{study_id}/$estimate-effect", body)
    assert r.status_code == status, r.text[:500]
    assert error_id(r) == eid
    assert fhir.get("DocumentReference", params={"_summary": "count"}).json()["total"] == before
