"""``ResearchStudy/{id}/$forecast-enrollment``: Poisson–gamma recruitment forecast, stored as a MeasureReport.

Reads per-site screening through :mod:`fhir_ops.mapping.enrollment`, fits and forecasts with
:mod:`inference.enrollment`, and writes the MeasureReport and its Provenance in one transaction.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import numpy as np

from fhir_ops.errors import FhirError, InvalidRequest, Unprocessable, outcome
from fhir_ops.mapping.enrollment import load_recruitment
from fhir_ops.mapping.model_device import ensure_model_device
from fhir_ops.mapping.participant import parse_datetime
from fhir_ops.mapping.provenance import build_provenance, requesting_agent
from fhir_ops.operations.registry import OperationContext, Writes, operation
from fhir_ops.store.bundle import put_entry
from inference.enrollment import fit_poisson_gamma, forecast_enrollment
from terminology.catalog import TRIALTWIN_CS

MEASURE = "https://trialtwin.org/fhir/Measure/enrollment-forecast"
PROFILE = "https://trialtwin.org/fhir/StructureDefinition/enrollment-forecast"
POPULATION_CS = "http://terminology.hl7.org/CodeSystem/measure-population"
ACTIVITY = "$forecast-enrollment"
METHOD_DEVICE = ("trialtwin-enrollment", "0.1.0")
DAY = timedelta(days=1)


def _bad(name: str, message: str, error_id: str) -> InvalidRequest:
    return InvalidRequest(message, error_id=error_id, expression=[f"Parameters.parameter:{name}"])


def _day(value: str) -> datetime:
    return parse_datetime(value)


def _activation(params: dict, rec, study_start: datetime | None) -> dict[str, datetime]:
    given: dict[str, datetime] = {}
    known = {s.location_id for s in rec.sites}
    for part in params.get("siteActivation", []) or []:
        ref = (part.get("site") or {}).get("reference", "")
        loc = ref.removeprefix("Location/")
        if not ref.startswith("Location/") or loc not in known:
            raise _bad("siteActivation", f"siteActivation names {ref!r}, which is not a site of the study "
                                         f"(sites: {', '.join(sorted(known))})", "unknown-site")
        given[loc] = _day(part["date"])
    out = {}
    for s in rec.sites:
        first = min(s.screened) if s.screened else None
        out[s.location_id] = given.get(s.location_id) or study_start or first
    return out


@operation("OperationDefinition-forecast-enrollment.json", async_allowed=True,
           writes=Writes(("MeasureReport", "Provenance"), flag="persist", default=True))
def handle(ctx: OperationContext, params: dict) -> dict:
    """Fit the study's recruitment and forecast the time to its target."""
    target = params["target"]
    if target < 1:
        raise _bad("target", f"'target' must be at least 1; got {target}", "target-out-of-range")
    horizon = params.get("horizonDays", 730)
    if not 1 <= horizon <= 3650:
        raise _bad("horizonDays", f"'horizonDays' must lie in 1..3650; got {horizon}", "horizon-out-of-range")
    store = ctx.store
    rec = load_recruitment(store, ctx.resource_id)
    study_ref = f"ResearchStudy/{ctx.resource_id}"
    start = (rec.study.get("period") or {}).get("start")
    study_start = _day(start) if start else None
    cut = parse_datetime(params["asOf"]) if params.get("asOf") else rec.last_screening
    if cut is None and rec.unassigned:
        raise Unprocessable(f"None of the {rec.unassigned} screened participant(s) of {study_ref} belongs to a study "
                            "site (their Patient.managingOrganization is no site Location's managingOrganization): "
                            "the per-site rates cannot be fitted", error_id="no-site-assignment",
                            expression=["ResearchStudy.site"])
    if cut is None:
        raise Unprocessable(f"No participant of {study_ref} has a screening date (ResearchSubject.period.start)",
                            error_id="no-subjects")
    for s in rec.sites:  # only what happened up to the cut
        s.screened = [d for d in s.screened if d <= cut]
        s.randomized = [d for d in s.randomized if d <= cut]
    randomized = rec.randomized
    if randomized >= target:
        raise Unprocessable(f"{study_ref} has already randomized {randomized} participants, at or above the target "
                            f"of {target}: there is nothing to forecast", error_id="target-reached",
                            expression=["Parameters.parameter:target"])
    activation = _activation(params, rec, study_start)
    active_sites = [s for s in rec.sites if activation[s.location_id] is not None]
    counts = np.array([len(s.screened) for s in active_sites], dtype=float)
    durations = np.array([max((cut - activation[s.location_id]) / DAY, 0.0) for s in active_sites])
    opened = durations > 0
    new_offsets, new_dates = [], []
    for part in params.get("newSite", []) or []:
        if part["count"] < 1:
            raise _bad("newSite", f"newSite.count must be at least 1; got {part['count']}", "count-out-of-range")
        when = _day(part["date"])
        if when < cut - DAY:
            raise _bad("newSite", f"newSite.date {part['date']} lies before the data cut {cut.date().isoformat()}",
                       "date-before-cut")
        new_offsets += [max((when - cut) / DAY, 0.0)] * part["count"]
        new_dates += [when] * part["count"]
    try:
        fit = fit_poisson_gamma(counts[opened], durations[opened])
        fc = forecast_enrollment(fit, counts, np.where(opened, durations, 1e-9), target - randomized,
                                 horizon_days=horizon,
                                 start_offsets=np.where(opened, 0.0, [max((activation[s.location_id] - cut) / DAY, 0)
                                                                        for s in active_sites]),
                                 new_site_offsets=new_offsets, screened=rec.screened, randomized=randomized,
                                 seed=params.get("seed", 0))
    except ValueError as exc:
        raise Unprocessable(f"The recruitment model could not be fitted for {study_ref}: {exc}",
                            error_id="fit-failed") from None

    def when(days: float) -> str | None:
        return None if not np.isfinite(days) else (cut + timedelta(days=float(days))).date().isoformat()

    issues = []
    if rec.unassigned:
        issues.append(outcome("warning", "incomplete", f"{rec.unassigned} screened participant(s) have no known site "
                              "(Patient.managingOrganization matches no study site); they count toward the target but "
                              "not toward any site's rate", error_id="participants-without-site"))
    idle = [s.name for s in active_sites if not s.screened]
    if idle:
        issues.append(outcome("information", "informational", f"Sites with no screening yet: {', '.join(idle)}",
                              error_id="sites-without-screening"))
    median = fc.quantile(0.5)
    ttt = {"medianDays": median if np.isfinite(median) else None, "median": when(median),
           "low80": when(fc.quantile(0.10)), "high80": when(fc.quantile(0.90)),
           "low95": when(fc.quantile(0.025)), "high95": when(fc.quantile(0.975)),
           "probabilityWithinHorizon": float(fc.cdf[-1])}
    rates = (fit.alpha + counts) / (fit.beta + np.where(opened, durations, 0.0))
    sites_out = []
    for i, s in enumerate(active_sites):
        sites_out.append({"site": {"reference": f"Location/{s.location_id}", "display": s.name}, "name": s.name,
                          "screened": len(s.screened), "randomized": len(s.randomized),
                          "activeDays": float(durations[i]), "ratePer30Days": float(30 * rates[i]),
                          "expectedRandomizedInHorizon": float(fc.expected_by_site[i, -1])})
    for j, d in enumerate(new_dates):
        sites_out.append({"name": f"planned site {j + 1} (opens {d.date().isoformat()})", "screened": 0,
                          "randomized": 0, "activeDays": 0.0, "ratePer30Days": float(30 * fit.mean_rate),
                          "expectedRandomizedInHorizon": float(fc.expected_by_site[len(active_sites) + j, -1])})
    curve = [{"date": when(float(d)), "expected": float(randomized + fc.expected[int(d)]),
              "low80": float(randomized + fc.band[1, int(d)]), "high80": float(randomized + fc.band[3, int(d)]),
              "low95": float(randomized + fc.band[0, int(d)]), "high95": float(randomized + fc.band[4, int(d)])}
             for d in fc.days[::7]]
    out = {"asOf": cut, "screened": rec.screened, "randomized": randomized, "remaining": target - randomized,
           "probabilityRandomized": fc.p_randomized,
           "alpha": {"estimate": fit.alpha, "ciLow": fit.alpha_ci[0], "ciHigh": fit.alpha_ci[1]},
           "beta": {"estimate": fit.beta, "ciLow": fit.beta_ci[0], "ciHigh": fit.beta_ci[1]},
           "timeToTarget": {k: v for k, v in ttt.items() if v is not None}, "site": sites_out, "curve": curve}
    if params.get("byDate"):
        out["probabilityByDate"] = fc.probability_by((_day(params["byDate"]) - cut) / DAY)
    if params.get("persist", True):
        out.update(_persist(ctx, study_ref, rec, cut, target, out, sites_out))
    if issues:
        out["issues"] = {"resourceType": "OperationOutcome", "issue": issues}
    return out


def _persist(ctx: OperationContext, study_ref: str, rec, cut: datetime, target: int, out: dict,
             sites_out: list[dict]) -> dict:
    store = ctx.store
    device = ensure_model_device(store, *METHOD_DEVICE,
                                 description="Poisson-gamma recruitment model (Anisimov & Fedorov 2007): per-site "
                                             "rates, time-to-target forecast, screen-failure thinning")
    now = datetime.now(timezone.utc)
    start = (rec.study.get("period") or {}).get("start") or cut.date().isoformat()

    def population(code: str, count: int) -> dict:
        return {"code": {"coding": [{"system": POPULATION_CS, "code": code}]}, "count": count}

    groups = []
    for s in sites_out:
        if "site" not in s:
            continue
        groups.append({"code": {"coding": [{"system": "https://trialtwin.org/fhir/sid/location",
                                            "code": s["site"]["reference"].split("/", 1)[1], "display": s["name"]}],
                                "text": s["name"]},
                       "population": [population("initial-population", s["screened"]),
                                      population("numerator", s["randomized"])],
                       "measureScore": {"value": round(s["ratePer30Days"], 6), "unit": "per 30 days",
                                        "system": "http://unitsofmeasure.org", "code": "/(30.d)"}})
    ttt = out["timeToTarget"]
    forecast_group = {"code": {"coding": [{"system": TRIALTWIN_CS, "code": "time-to-target",
                                           "display": "Days from the data cut to the enrollment target"}],
                               "text": f"Median days to randomize {target} (80 % interval "
                                       f"{ttt.get('low80', '-')} to {ttt.get('high80', '-')}; 95 % interval "
                                       f"{ttt.get('low95', '-')} to {ttt.get('high95', '-')})"},
                      "population": [population("initial-population", out["screened"]),
                                     population("numerator", out["randomized"]),
                                     population("denominator", target)]}
    if "medianDays" in ttt:
        forecast_group["measureScore"] = {"value": round(ttt["medianDays"], 3), "unit": "d",
                                          "system": "http://unitsofmeasure.org", "code": "d"}
    report = {"resourceType": "MeasureReport", "id": str(uuid.uuid4()), "meta": {"profile": [PROFILE]},
              "status": "complete", "type": "summary", "measure": MEASURE,
              "date": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
              "period": {"start": start, "end": cut.isoformat().replace("+00:00", "Z")},
              "improvementNotation": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/measure-improvement-notation",
                                                  "code": "increase"}]},
              "group": [forecast_group] + groups,
              "evaluatedResource": [{"reference": study_ref}]}
    target_ref = f"MeasureReport/{report['id']}/_history/1"
    prov = build_provenance([target_ref], rec.inputs, device, requesting_agent(ctx.headers), ACTIVITY, recorded=now)
    prov["id"] = str(uuid.uuid4())
    if ctx.cancelled():
        raise FhirError("The job was cancelled before anything was stored", status=409, code="conflict",
                        error_id="cancelled")
    store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [put_entry(report), put_entry(prov)]})
    return {"measureReport": {"reference": f"MeasureReport/{report['id']}"},
            "provenance": {"reference": f"Provenance/{prov['id']}"}}
