"""The demo study TT-201: a seeded, decentralized Phase II trial simulated by the twin engine.

``simulate_demo_records`` is pure numerics (engine models, plain arrays); ``build_demo_resources``
turns those records into FHIR R4 resources; ``ensure_demo_study`` loads them into a store once.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from fhir_ops.mapping import model_definition as fm
from fhir_ops.mapping import consent as cm
from inference.behaviour import VisitSchedule
from inference.cohort import Scenario, sample_covariates, simulate_cohort
from inference.dosing import DoseRecord
from inference.model_definition import shipped_definition
from inference.pk import OneCompartment, concentration
from terminology.catalog import LOINC, MDC, SNOMED, UCUM

# ----------------------------------------------------------------------------- study design

STUDY_ID = "tt-201"
STUDY_IDENTIFIER = "TT-201"
STUDY_START = dt.date(2026, 5, 4)
DATA_CUTOFF_DAY = 200  # study day of the data cut (2026-11-20): later enrollees are still on study
ENROLLMENT_DAYS = 112  # participants are randomized over the first 16 weeks
N_DAYS = 169  # day 0 = randomization; daily dosing on days 0..168, the last one on the week-24 visit day
#: the twin model that generates the data: the shipped TT-201 definition (parameters, variability,
#: covariate distribution, arms); the ResearchStudy references it, so every twin of the study uses it
MODEL_DEFINITION = fm.compile_definition(shipped_definition("tt201"), "the TT-201 definition")
MODEL = MODEL_DEFINITION.regimen
ARMS = ("placebo", "50 mg", "100 mg")
ARM_DOSE_MG = tuple(MODEL.arms[a] for a in ARMS)
VISIT_DAYS = (0, 28, 56, 84, 112, 140, 168)  # day 0 is the baseline visit
VISIT_REMOTE = (False, True, True, False, True, True, False)
HOME_DAYS = tuple(range(7, 169, 7))
SITES = (
    ("north", "TrialTwin Research Center North", "Boston", "MA", "02115"),
    ("central", "TrialTwin Research Center Central", "Chicago", "IL", "60611"),
    ("south", "TrialTwin Research Center South", "Austin", "TX", "78701"),
)
MMOL_SITE = 2  # this site's lab reports fasting glucose in mmol/L
AE_TERMS = (  # SNOMED CT: nausea, headache, diarrhoea, hypoglycaemia
    ("422587007", "Nausea"), ("25064002", "Headache"), ("62315008", "Diarrhea"), ("302866003", "Hypoglycemia"))
AE_TERM_P = (0.35, 0.25, 0.20, 0.20)
AE_SEVERITY = ("mild", "moderate", "severe")
AE_SEVERITY_P = (0.65, 0.30, 0.05)

COVARIATES = MODEL.covariate_model
_TYPICAL = MODEL.natural(np.asarray(MODEL.population.theta)[None, :])
#: the protocol's visit plan (PlanDefinition tt201-visit-plan, read by $optimize-schedule): a window of
#: +-7 days around each visit after baseline; PK sampling at week 12 and the end-of-treatment visit
#: (week 24) must be done at the site; site staff hours per visit in person / remotely; per site and day
#: SITE_CAPACITY_HOURS staff hours; MIN_SPACING_DAYS between two visits of one participant
PLAN_ID = "tt201-visit-plan"
VISIT_WINDOW_DAYS = 7
ON_SITE_VISITS = (3, 6)
SITE_HOURS = (1.5, 0.5)
SITE_CAPACITY_HOURS = 6.0
MIN_SPACING_DAYS = 14

SCHEDULE = VisitSchedule(days=np.asarray(VISIT_DAYS[1:]), remote=np.asarray(VISIT_REMOTE[1:]))
# observation model on top of the twin: assay and device noise
PK_PROP_ERROR = 0.15
FPG_ASSAY_SD = 8.0  # mg/dL
HBA1C_ASSAY_SD = 0.12  # %


@dataclass(frozen=True, eq=False)
class DemoRecords:
    """Simulated TT-201 data for ``n`` participants as plain arrays (no FHIR).

    Days are study days of each participant (0 = randomization); ``observed_days`` is how many of
    them lie before the data cut, so anything on a day ``>= min(observed_days, dropout_day)`` did not
    happen (yet). Arrays over visits follow ``VISIT_DAYS``, over home readings ``HOME_DAYS``.
    """

    seed: int
    n: int
    site: np.ndarray
    arm: np.ndarray
    dose_mg: np.ndarray
    age_y: np.ndarray
    sex_female: np.ndarray
    weight_kg: np.ndarray
    egfr: np.ndarray
    distance_km: np.ndarray
    birth_day_of_year: np.ndarray
    enroll_day: np.ndarray
    observed_days: np.ndarray
    dropout_day: np.ndarray
    taken: np.ndarray
    dose_hour: np.ndarray
    ae: np.ndarray
    ae_term: np.ndarray
    ae_severity: np.ndarray
    attended: np.ndarray
    fpg_mg_dl: np.ndarray
    hba1c_pct: np.ndarray
    pk_hours: np.ndarray
    pk_ng_ml: np.ndarray
    home_reported: np.ndarray
    home_weight_kg: np.ndarray
    home_hr: np.ndarray
    home_sbp: np.ndarray
    weight_in_lb: np.ndarray

    @property
    def last_day(self) -> np.ndarray:
        """First day of each participant that is not in the data (data cut or dropout)."""
        return np.minimum(self.observed_days, self.dropout_day)

    @property
    def withdrawn(self) -> np.ndarray:
        """Dropped out before the data cut."""
        return self.dropout_day < np.minimum(self.observed_days, N_DAYS)

    @property
    def completed(self) -> np.ndarray:
        """On study through the last visit, before the data cut."""
        return (self.observed_days >= N_DAYS) & (self.dropout_day >= N_DAYS)


def _block_randomize(rng: np.random.Generator, n: int) -> np.ndarray:
    blocks = [rng.permutation(np.repeat(np.arange(len(ARMS)), 2)) for _ in range(-(-n // (2 * len(ARMS))))]
    return np.concatenate(blocks)[:n]


def simulate_demo_records(seed: int = 7, n: int = 200) -> DemoRecords:
    """Simulate the TT-201 demo study with the twin engine (pure: same seed, same arrays).

    Covariates come from the TT-201 definition's virtual population; each arm is a cohort twin
    (``inference.cohort.simulate_cohort``: PK -> Emax on fasting glucose -> HbA1c, with adherence,
    adverse events, attendance and dropout); assay noise, sparse PK sampling, home readings and the
    data cut are added here.

    Parameters
    ----------
    seed : int
        Seed of everything (non-negative).
    n : int
        Number of randomized participants.

    Returns
    -------
    DemoRecords

    Examples
    --------
    >>> rec = simulate_demo_records(seed=1, n=12)
    >>> rec.taken.shape, sorted(set(rec.arm.tolist()))
    ((12, 169), [0, 1, 2])
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    if seed < 0:
        raise ValueError("seed must be a non-negative integer")
    rng = np.random.default_rng(seed)
    cov = sample_covariates(COVARIATES, n, rng)
    birth_doy = rng.integers(0, 365, n)
    enroll = np.sort(rng.integers(0, ENROLLMENT_DAYS + 1, n))
    arm = _block_randomize(rng, n)
    dose = np.asarray(ARM_DOSE_MG)[arm]
    observed = np.minimum(DATA_CUTOFF_DAY - enroll, N_DAYS)

    taken = np.zeros((n, N_DAYS), dtype=bool)
    ae = np.zeros((n, N_DAYS), dtype=bool)
    fpg_true = np.zeros((n, N_DAYS))
    a1c_true = np.zeros((n, N_DAYS))
    attended = np.ones((n, len(VISIT_DAYS)), dtype=bool)  # the baseline visit randomizes: attended
    dropout = np.zeros(n, dtype=np.int64)
    pk_params = {k: np.zeros(n) for k in ("CL", "V", "KA")}
    arm_seeds = np.random.SeedSequence(seed).generate_state(len(ARMS))
    for a, arm_dose in enumerate(ARM_DOSE_MG):
        idx = np.flatnonzero(arm == a)
        if idx.size == 0:
            continue
        twin = simulate_cohort(Scenario(dose_mg=arm_dose, n_days=N_DAYS, schedule=SCHEDULE, name=ARMS[a]),
                               covariates=cov.take(idx), seed=int(arm_seeds[a]), model=MODEL,
                               trajectories=True)
        traj = twin.trajectories
        taken[idx], ae[idx] = traj["taken"], traj["ae"]
        fpg_true[idx], a1c_true[idx] = traj["fpg"], traj["hba1c"]
        attended[idx, 1:] = traj["attended"]
        dropout[idx] = twin.summary["dropout_day"]
        for k in pk_params:
            pk_params[k][idx] = twin.summary[k]

    # the data cut: what lies beyond it has not happened yet, so the records do not hold it
    in_data = np.arange(N_DAYS)[None, :] < observed[:, None]
    taken &= in_data
    ae &= in_data
    attended &= np.asarray(VISIT_DAYS)[None, :] < np.minimum(observed, dropout)[:, None]

    vd = np.asarray(VISIT_DAYS)
    fpg = fpg_true[:, vd] + rng.normal(0.0, FPG_ASSAY_SD, (n, vd.size))
    a1c = a1c_true[:, vd] + rng.normal(0.0, HBA1C_ASSAY_SD, (n, vd.size))

    # sparse PK at visits: concentration some hours after that morning's dose
    pk_hours = rng.uniform(1.0, 10.0, (n, vd.size))
    one_cpt = OneCompartment(cl=pk_params["CL"], v=pk_params["V"], ka=pk_params["KA"],
                             tlag=float(_TYPICAL["tlag"][0]), f=float(_TYPICAL["f"][0]))
    doses = DoseRecord(times=24.0 * np.arange(N_DAYS), amounts=np.where(taken, dose[:, None], 0.0))
    pk_mg_l = concentration(one_cpt, doses, 24.0 * vd[None, :] + pk_hours)
    pk_ng_ml = 1000.0 * pk_mg_l * np.exp(rng.normal(0.0, PK_PROP_ERROR, pk_mg_l.shape))

    # home devices: not part of the twin; weight drifts down a little with glycaemic control
    hd = np.asarray(HOME_DAYS)
    glucose_drop = np.clip((fpg_true[:, [0]] - fpg_true[:, hd]) / 45.0, 0.0, 1.0)
    home_weight = (cov.weight_kg[:, None] - 1.5 * glucose_drop * hd[None, :] / 168.0
                   + rng.normal(0.0, 0.6, (n, hd.size)))
    home_hr = 72.0 + rng.normal(0.0, 6.0, (n, 1)) + rng.normal(0.0, 4.0, (n, hd.size))
    home_sbp = 132.0 + rng.normal(0.0, 10.0, (n, 1)) - 3.0 * glucose_drop + rng.normal(0.0, 7.0, (n, hd.size))

    return DemoRecords(
        seed=seed, n=n, site=cov.site.astype(int), arm=arm, dose_mg=dose, age_y=cov.age_y,
        sex_female=cov.sex_female.astype(int), weight_kg=cov.weight_kg, egfr=cov.egfr,
        distance_km=cov.distance_km, birth_day_of_year=birth_doy, enroll_day=enroll, observed_days=observed,
        dropout_day=dropout, taken=taken, dose_hour=np.clip(rng.normal(8.0, 1.0, (n, N_DAYS)), 5.0, 12.0),
        ae=ae, ae_term=rng.choice(len(AE_TERMS), size=(n, N_DAYS), p=AE_TERM_P),
        ae_severity=rng.choice(len(AE_SEVERITY), size=(n, N_DAYS), p=AE_SEVERITY_P),
        attended=attended, fpg_mg_dl=fpg, hba1c_pct=a1c, pk_hours=pk_hours, pk_ng_ml=pk_ng_ml,
        home_reported=rng.random((n, hd.size)) < 0.85, home_weight_kg=home_weight, home_hr=home_hr,
        home_sbp=home_sbp, weight_in_lb=rng.random(n) < 0.2,
    )


# ------------------------------------------------------------------------------ FHIR building

CS = "https://trialtwin.org/fhir/CodeSystem/"
EDC_LAB = CS + "edc-lab"
SYNTHETIC_TAG = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST",
                 "display": "test health data"}
SUBJECT_ID_SYSTEM = "https://trialtwin.org/fhir/sid/tt-201-subject"
MEASURES = {
    # key: (LOINC, display, extra coding (system, code, display) or None, category)
    "hba1c": ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", (EDC_LAB, "LAB-HBA1C", "HbA1c"), "laboratory"),
    "fpg": ("1558-6", "Fasting glucose [Mass/volume] in Serum or Plasma", (EDC_LAB, "LAB-FPG", "Fasting glucose"),
            "laboratory"),
    "egfr": ("62238-1", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or "
             "Blood by Creatinine-based formula (CKD-EPI)", (EDC_LAB, "LAB-EGFR", "eGFR"), "laboratory"),
    "weight": ("29463-7", "Body weight", (MDC, "188736", "MDC_MASS_BODY_ACTUAL"), "vital-signs"),
    "hr": ("8867-4", "Heart rate", (MDC, "147842", "MDC_ECG_HEART_RATE"), "vital-signs"),
    "sbp": ("8480-6", "Systolic blood pressure", (MDC, "150021", "MDC_PRESS_BLD_NONINV_SYS"), "vital-signs"),
}
UNITS = {"%": "%", "mg/dL": "mg/dL", "mmol/L": "mmol/L", "kg": "kg", "[lb_av]": "lb", "/min": "beats/minute",
         "mm[Hg]": "mmHg", "mL/min/{1.73_m2}": "mL/min/1.73m2", "ng/mL": "ng/mL", "km": "km"}
MG_DL_PER_MMOL_L = 18.016  # glucose, molar mass 180.16 g/mol
LB_PER_KG = 2.2046226218


def _ref(resource_type: str, resource_id: str) -> dict:
    return {"reference": f"{resource_type}/{resource_id}"}


def _instant(day: dt.date, hours: float) -> str:
    moment = dt.datetime.combine(day, dt.time()) + dt.timedelta(hours=float(hours))
    return moment.replace(microsecond=0).isoformat() + "Z"


def _quantity(value: float, ucum: str, decimals: int) -> dict:
    return {"value": round(float(value), decimals), "unit": UNITS[ucum], "system": UCUM, "code": ucum}


def _cc(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _meta() -> dict:
    return {"tag": [dict(SYNTHETIC_TAG)]}


def _organizations_and_locations() -> list[dict]:
    resources = [{
        "resourceType": "Organization", "id": "tt201-sponsor", "meta": _meta(), "active": True,
        "name": "TrialTwin Therapeutics (demo sponsor)",
        "type": [_cc("http://terminology.hl7.org/CodeSystem/organization-type", "bus", "Non-Healthcare Business")]}]
    for key, name, city, state, postal in SITES:
        resources.append({
            "resourceType": "Organization", "id": f"tt201-site-{key}", "meta": _meta(), "active": True, "name": name,
            "type": [_cc("http://terminology.hl7.org/CodeSystem/organization-type", "prov", "Healthcare Provider")],
            "address": [{"city": city, "state": state, "postalCode": postal, "country": "US"}]})
        resources.append({
            "resourceType": "Location", "id": f"tt201-loc-{key}", "meta": _meta(), "status": "active",
            "mode": "instance", "name": f"{name} clinic",
            "address": {"city": city, "state": state, "postalCode": postal, "country": "US"},
            "managingOrganization": _ref("Organization", f"tt201-site-{key}")})
    return resources


#: The demo's clinical users (smart_app.authz's development users) and what they may see: Dr. Chen
#: monitors the study (every site), Dr. Okafor is an investigator at one site and sees its participants only.
STAFF = (
    ("dr-chen", "Chen", "Mei", "monitor", "Clinical research monitor", None),
    ("dr-okafor", "Okafor", "Ada", "site-investigator", "Site investigator", "north"),
)


def _staff() -> list[dict]:
    """Practitioner and PractitionerRole per user: the role's code and site drive site-level access."""
    resources = []
    for pid, family, given, code, display, site in STAFF:
        resources.append({"resourceType": "Practitioner", "id": pid, "meta": _meta(), "active": True,
                          "name": [{"family": family, "given": [given], "prefix": ["Dr."]}]})
        role = {"resourceType": "PractitionerRole", "id": f"tt201-role-{pid}", "meta": _meta(), "active": True,
                "practitioner": _ref("Practitioner", pid),
                "code": [_cc(CS + "trial-role", code, display)]}
        if site is None:
            role["organization"] = _ref("Organization", "tt201-sponsor")
        else:
            role["organization"] = _ref("Organization", f"tt201-site-{site}")
            role["location"] = [_ref("Location", f"tt201-loc-{site}")]
        resources.append(role)
    return resources


def _study(rec: DemoRecords) -> dict:
    return {
        "resourceType": "ResearchStudy", "id": STUDY_ID, "meta": _meta(),
        "extension": [{"url": fm.STUDY_MODEL_EXTENSION, "valueCanonical": MODEL_DEFINITION.canonical}],
        "identifier": [{"system": "https://trialtwin.org/fhir/sid/study", "value": STUDY_IDENTIFIER}],
        "title": "TT-201: TTX-101 once daily in type 2 diabetes, a decentralized Phase II study",
        "status": "active",
        "primaryPurposeType": _cc("http://terminology.hl7.org/CodeSystem/research-study-prim-purp-type",
                                  "treatment", "Treatment"),
        "phase": _cc("http://terminology.hl7.org/CodeSystem/research-study-phase", "phase-2", "Phase 2"),
        "condition": [_cc(SNOMED, "44054006", "Diabetes mellitus type 2")],
        "period": {"start": STUDY_START.isoformat()},
        "sponsor": _ref("Organization", "tt201-sponsor"),
        "site": [_ref("Location", f"tt201-loc-{key}") for key, *_ in SITES],
        "protocol": [_ref("PlanDefinition", PLAN_ID)],
        "description": (f"Synthetic demo study: {rec.n} participants randomized 1:1:1 to placebo, 50 mg or "
                        f"100 mg TTX-101 once daily for 24 weeks; monthly visits in person or virtual; "
                        f"home scale, wearable and home blood-pressure readings. Simulated by the TrialTwin "
                        f"engine with seed {rec.seed}."),
        "arm": [{"name": name, "type": _cc("http://terminology.hl7.org/CodeSystem/research-study-arm-type",
                                           "placebo-comparator" if i == 0 else "experimental",
                                           "Placebo Comparator" if i == 0 else "Experimental"),
                 "description": "Matching placebo once daily" if i == 0 else f"TTX-101 {name} orally once daily"}
                for i, name in enumerate(ARMS)],
    }


def _visit_plan() -> dict:
    """The protocol's visit plan as a PlanDefinition (profiles: visit-scheduling, visit-plan-constraints)."""
    sd = "https://trialtwin.org/fhir/StructureDefinition/"
    modality = CS + "visit-modality"
    days = {"unit": "d", "system": UCUM, "code": "d"}
    hours = {"unit": "h", "system": UCUM, "code": "h"}
    actions = []
    for v, day in enumerate(VISIT_DAYS):
        if v == 0:
            continue  # the baseline visit randomizes: it is never rescheduled
        on_site = v in ON_SITE_VISITS
        allowed = ("in-person",) if on_site else ("in-person", "virtual")
        assessments = [{"id": f"v{v}-hba1c", "title": "HbA1c and fasting glucose (home kit or site lab)",
                        "code": [_cc(LOINC, "4548-4", MEASURES["hba1c"][1])]}]
        if on_site:
            assessments.append({
                "id": f"v{v}-pk", "title": "TTX-101 plasma concentration (site draw, timed after the dose)",
                "code": [_cc(CS + "assay", "TTX101-PK", "TTX-101 plasma concentration")],
                "extension": [{"url": sd + "on-site-required", "valueBoolean": True}]})
        actions.append({
            "id": f"v{v}", "title": f"Visit {v} (week {day // 7})",
            "extension": [{"url": sd + "visit-scheduling", "extension": [
                {"url": "targetDay", "valueDuration": {"value": day, **days}},
                *({"url": "modality", "valueCoding": {"system": modality, "code": m}} for m in allowed),
                {"url": "defaultModality", "valueCoding": {
                    "system": modality, "code": "virtual" if VISIT_REMOTE[v] else "in-person"}},
                {"url": "siteHours", "valueQuantity": {"value": SITE_HOURS[0], **hours}},
                {"url": "remoteSiteHours", "valueQuantity": {"value": SITE_HOURS[1], **hours}}]}],
            "timingRange": {"low": {"value": max(day - VISIT_WINDOW_DAYS, 0), **days},
                            "high": {"value": day + VISIT_WINDOW_DAYS, **days}},
            "action": assessments})
    return {
        "resourceType": "PlanDefinition", "id": PLAN_ID, "meta": _meta(),
        "url": f"https://trialtwin.org/fhir/PlanDefinition/{PLAN_ID}", "version": "1",
        "name": "TT201VisitPlan", "title": "TT-201 visit schedule", "status": "active",
        "type": _cc("http://terminology.hl7.org/CodeSystem/plan-definition-type", "clinical-protocol",
                    "Clinical Protocol"),
        "extension": [{"url": sd + "visit-plan-constraints", "extension": [
            {"url": "siteCapacity", "valueQuantity": {"value": SITE_CAPACITY_HOURS, "unit": "h/d", "system": UCUM,
                                                      "code": "h/d"}},
            {"url": "minSpacing", "valueDuration": {"value": MIN_SPACING_DAYS, **days}}]}],
        "description": "Monthly visits for 24 weeks after the baseline visit; each may move within its window "
                       "and, unless an on-site assessment is due, be done remotely.",
        "action": actions}


def _observation(oid: str, key: str, patient: str, when: str, quantity: dict, *,
                 encounter: str | None = None, extra_code: bool = True, method: str | None = None) -> dict:
    loinc, display, extra, category = MEASURES[key]
    coding = [{"system": LOINC, "code": loinc, "display": display}]
    if extra_code:
        coding.append({"system": extra[0], "code": extra[1], "display": extra[2]})
    obs = {
        "resourceType": "Observation", "id": oid, "meta": _meta(), "status": "final",
        "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", category,
                         "Laboratory" if category == "laboratory" else "Vital Signs")],
        "code": {"coding": coding, "text": display}, "subject": _ref("Patient", patient),
        "effectiveDateTime": when, "valueQuantity": quantity}
    if encounter:
        obs["encounter"] = _ref("Encounter", encounter)
    if method:
        obs["method"] = {"text": method}
    return obs


def iter_demo_resources(rec: DemoRecords) -> Iterator[dict]:
    """Yield the FHIR R4 resources of the simulated study; the ResearchStudy comes last.

    Ids are derived from the participant and day, so the same records always give the same
    resources (and loading them with PUT twice changes nothing but versions).
    """
    yield fm.definition_library(MODEL_DEFINITION)
    yield from _organizations_and_locations()
    yield _visit_plan()
    yield from _staff()
    product = _cc(CS + "investigational-product", "TTX-101", "TTX-101")
    placebo = _cc(CS + "investigational-product", "TTX-101-PBO", "TTX-101 matching placebo")
    oral = _cc(SNOMED, "26643006", "Oral route")
    for i in range(rec.n):
        pid = f"tt201-p{i + 1:03d}"
        dose = ({"value": 1, "unit": "tablet", "system": UCUM, "code": "{tbl}"} if rec.arm[i] == 0
                else {"value": float(rec.dose_mg[i]), "unit": "mg", "system": UCUM, "code": "mg"})
        site_key = SITES[rec.site[i]][0]
        enroll_date = STUDY_START + dt.timedelta(days=int(rec.enroll_day[i]))
        last = int(rec.last_day[i])
        birth = dt.date(enroll_date.year - int(rec.age_y[i]), 1, 1) - dt.timedelta(days=int(rec.birth_day_of_year[i]))
        yield {"resourceType": "Patient", "id": pid, "meta": _meta(),
               "identifier": [{"system": SUBJECT_ID_SYSTEM, "value": f"TT201-{i + 1:03d}"}],
               "active": True, "gender": "female" if rec.sex_female[i] else "male",
               "birthDate": birth.isoformat(),
               "managingOrganization": _ref("Organization", f"tt201-site-{site_key}")}
        if rec.withdrawn[i]:
            status = "withdrawn"
        elif rec.completed[i]:
            status = "off-study"
        else:
            status = "on-study-intervention"
        subject = {"resourceType": "ResearchSubject", "id": f"tt201-rs{i + 1:03d}", "meta": _meta(),
                   "identifier": [{"system": SUBJECT_ID_SYSTEM, "value": f"TT201-{i + 1:03d}"}],
                   "status": status, "study": _ref("ResearchStudy", STUDY_ID), "individual": _ref("Patient", pid),
                   "assignedArm": ARMS[rec.arm[i]], "actualArm": ARMS[rec.arm[i]],
                   "period": {"start": enroll_date.isoformat()}}
        if status != "on-study-intervention":
            subject["period"]["end"] = (enroll_date + dt.timedelta(days=last)).isoformat()
        yield subject
        yield from _consents(pid, enroll_date, subject["period"].get("end") if status == "withdrawn" else None,
                             withdrew_secondary=bool(rec.withdrawn[i]) and int(rec.withdrawn[:i].sum()) % 2 == 0)
        yield {"resourceType": "Observation", "id": f"{pid}-distance", "meta": _meta(), "status": "final",
               "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "social-history",
                                "Social History")],
               "code": _cc(CS + "covariate", "travel-distance", "Travel distance from home to trial site"),
               "subject": _ref("Patient", pid), "effectiveDateTime": _instant(enroll_date, 9),
               "valueQuantity": _quantity(rec.distance_km[i], "km", 1)}

        # daily doses actually taken (missed doses leave no record, as in an e-diary)
        for day in np.flatnonzero(rec.taken[i, :last]):
            day = int(day)
            yield {"resourceType": "MedicationAdministration", "id": f"{pid}-dose-d{day:03d}", "meta": _meta(),
                   "status": "completed", "medicationCodeableConcept": placebo if rec.arm[i] == 0 else product,
                   "subject": _ref("Patient", pid),
                   "effectiveDateTime": _instant(enroll_date + dt.timedelta(days=day), rec.dose_hour[i, day]),
                   "dosage": {"route": oral,
                              "dose": dose}}

        yield from _visits(rec, i, pid, site_key, enroll_date, last)
        yield from _home_readings(rec, i, pid, enroll_date, last)

        for day in np.flatnonzero(rec.ae[i, :last]):
            day = int(day)
            code, display = AE_TERMS[rec.ae_term[i, day]]
            severity = AE_SEVERITY[rec.ae_severity[i, day]]
            yield {"resourceType": "AdverseEvent", "id": f"{pid}-ae-d{day:03d}", "meta": _meta(),
                   "actuality": "actual", "event": _cc(SNOMED, code, display), "subject": _ref("Patient", pid),
                   "date": _instant(enroll_date + dt.timedelta(days=day), 14),
                   "seriousness": _cc("http://terminology.hl7.org/CodeSystem/adverse-event-seriousness",
                                      "Non-serious" if severity != "severe" else "Serious",
                                      "Non-serious" if severity != "severe" else "Serious"),
                   "severity": _cc("http://terminology.hl7.org/CodeSystem/adverse-event-severity", severity,
                                   severity.capitalize()),
                   "study": [_ref("ResearchStudy", STUDY_ID)]}
    yield _study(rec)


def _consents(pid: str, enroll_date: dt.date, withdrawn_on: str | None, withdrew_secondary: bool) -> Iterator[dict]:
    """The participant's three Consents, signed at enrolment. A participant who withdrew from the trial
    withdrew participation; every other one of them also withdrew consent to secondary use of their data,
    which keeps them in the trial's own data but out of population fits and secondary exports."""
    signed = enroll_date.isoformat()
    for kind in (cm.RESEARCH_PARTICIPATION, cm.SECONDARY_USE, cm.SPONSOR_SHARING):
        ends = withdrawn_on if kind == cm.RESEARCH_PARTICIPATION or (kind == cm.SECONDARY_USE and withdrew_secondary) \
            else None
        yield cm.consent_resource(f"{pid}-consent-{kind}", pid, kind, signed, withdrawn_on=ends, meta=_meta())


def _visits(rec: DemoRecords, i: int, pid: str, site_key: str, enroll_date: dt.date, last: int) -> Iterator[dict]:
    in_person = _cc(CS + "visit-modality", "in-person", "In-person visit")
    virtual = _cc(CS + "visit-modality", "virtual", "Virtual visit")
    next_booked = False
    for v, day in enumerate(VISIT_DAYS):
        remote = VISIT_REMOTE[v]
        date = enroll_date + dt.timedelta(days=day)
        aid = f"{pid}-v{v}"
        if day >= last:
            # at the data cut, the next visit of a participant still on study is booked (a dropout
            # that happens after the cut is not known yet); nothing follows a withdrawal
            if rec.withdrawn[i] or next_booked:
                return
            next_booked = True
            status = "booked"
        else:
            status = "fulfilled" if rec.attended[i, v] else "noshow"
        label = "Baseline visit" if v == 0 else f"Visit {v} (week {day // 7})"
        yield {"resourceType": "Appointment", "id": aid, "meta": _meta(), "status": status,
               "serviceType": [virtual if remote else in_person], "description": label,
               "start": _instant(date, 10), "end": _instant(date, 10.5),
               "participant": [{"actor": _ref("Patient", pid), "status": "accepted"},
                               {"actor": _ref("Location", f"tt201-loc-{site_key}"), "status": "accepted"}]}
        if status != "fulfilled":
            continue
        eid = f"{pid}-e{v}"
        encounter = {"resourceType": "Encounter", "id": eid, "meta": _meta(), "status": "finished",
                     "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                               "code": "VR" if remote else "AMB", "display": "virtual" if remote else "ambulatory"},
                     "serviceType": virtual if remote else in_person,
                     "subject": _ref("Patient", pid), "appointment": [_ref("Appointment", aid)],
                     "period": {"start": _instant(date, 10), "end": _instant(date, 10.5)},
                     "serviceProvider": _ref("Organization", f"tt201-site-{site_key}")}
        if not remote:
            encounter["location"] = [{"location": _ref("Location", f"tt201-loc-{site_key}")}]
        yield encounter
        drawn = _instant(date, 10.25)
        method = "home collection kit" if remote else None
        yield _observation(f"{pid}-hba1c-v{v}", "hba1c", pid, drawn, _quantity(rec.hba1c_pct[i, v], "%", 1),
                           encounter=eid, method=method)
        fpg = rec.fpg_mg_dl[i, v]
        value = (_quantity(fpg / MG_DL_PER_MMOL_L, "mmol/L", 1) if rec.site[i] == MMOL_SITE
                 else _quantity(fpg, "mg/dL", 0))
        yield _observation(f"{pid}-fpg-v{v}", "fpg", pid, drawn, value, encounter=eid, method=method)
        if v == 0:
            yield _observation(f"{pid}-egfr-v0", "egfr", pid, drawn,
                               _quantity(rec.egfr[i], "mL/min/{1.73_m2}", 0), encounter=eid)
            yield _weight(rec, i, f"{pid}-weight-v0", pid, drawn, rec.weight_kg[i], encounter=eid)
        if not remote and v > 0 and rec.arm[i] != 0:
            sampled = _instant(date, float(rec.dose_hour[i, day]) + rec.pk_hours[i, v])
            yield {"resourceType": "Observation", "id": f"{pid}-pk-v{v}", "meta": _meta(), "status": "final",
                   "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory",
                                    "Laboratory")],
                   "code": _cc(CS + "assay", "TTX101-PK", "TTX-101 plasma concentration"),
                   "subject": _ref("Patient", pid), "encounter": _ref("Encounter", eid),
                   "effectiveDateTime": sampled, "valueQuantity": _quantity(rec.pk_ng_ml[i, v], "ng/mL", 1),
                   "note": [{"text": f"Sampled {rec.pk_hours[i, v]:.1f} h after the morning dose"}]}


def _weight(rec: DemoRecords, i: int, oid: str, pid: str, when: str, kg: float, encounter: str | None = None) -> dict:
    value = _quantity(kg * LB_PER_KG, "[lb_av]", 1) if rec.weight_in_lb[i] else _quantity(kg, "kg", 1)
    return _observation(oid, "weight", pid, when, value, encounter=encounter, extra_code=encounter is None)


def _home_readings(rec: DemoRecords, i: int, pid: str, enroll_date: dt.date, last: int) -> Iterator[dict]:
    for w, day in enumerate(HOME_DAYS):
        if day >= last or not rec.home_reported[i, w]:
            continue
        when = _instant(enroll_date + dt.timedelta(days=day), 7.5)
        yield _weight(rec, i, f"{pid}-wt-d{day:03d}", pid, when, rec.home_weight_kg[i, w])
        yield _observation(f"{pid}-hr-d{day:03d}", "hr", pid, when, _quantity(rec.home_hr[i, w], "/min", 0))
        yield _observation(f"{pid}-sbp-d{day:03d}", "sbp", pid, when, _quantity(rec.home_sbp[i, w], "mm[Hg]", 0))


def build_demo_resources(rec: DemoRecords) -> list[dict]:
    """All resources of the simulated study as a list (see :func:`iter_demo_resources`)."""
    return list(iter_demo_resources(rec))


def demo_transactions(resources: list[dict], batch_size: int = 2000) -> Iterator[dict]:
    """Split resources into ``transaction`` Bundles of PUTs (ids are fixed, so loading is repeatable)."""
    for start in range(0, len(resources), batch_size):
        chunk = resources[start:start + batch_size]
        yield {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in chunk]}


def demo_study_exists(store) -> bool:
    """True when the store already holds the complete demo study (its ResearchStudy is loaded last)."""
    from fhir_ops.errors import Gone, NotFound

    try:
        store.read("ResearchStudy", STUDY_ID)
    except (NotFound, Gone):
        return False
    return True


def _ensure_demo_model(store) -> int:
    """A demo study loaded before its model became a definition gets the definition Library and the
    ResearchStudy extension that references it (there is no built-in twin any more). Returns the
    number of resources written (0 when the study already references the definition)."""
    study = store.read("ResearchStudy", STUDY_ID)
    if fm.study_model_canonical(study) == MODEL_DEFINITION.canonical:
        return 0
    library = fm.definition_library(MODEL_DEFINITION)
    entries = [{"resource": library, "request": {"method": "PUT", "url": f"Library/{library['id']}"}},
               {"resource": fm.with_study_model(study, MODEL_DEFINITION.canonical),
                "request": {"method": "PUT", "url": f"ResearchStudy/{STUDY_ID}"}}]
    store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return len(entries)


def ensure_demo_study(store, participants: int = 200, seed: int = 7, batch_size: int = 2000,
                      progress: Callable[[int, int], None] | None = None) -> int:
    """Simulate and load TT-201 into ``store`` unless it is already there.

    Parameters
    ----------
    store : fhir_ops.store.Store
        Where to load the study.
    participants, seed : int
        Size and seed of the simulation.
    batch_size : int
        Resources per transaction Bundle.
    progress : callable, optional
        Called with (resources loaded so far, total) after each transaction.

    Returns
    -------
    int
        Number of resources loaded; 0 when the study was already present (2 when an existing demo
        study only needed its model definition).
    """
    if demo_study_exists(store):
        return _ensure_demo_model(store)
    resources = build_demo_resources(simulate_demo_records(seed=seed, n=participants))
    loaded = 0
    for bundle in demo_transactions(resources, batch_size):
        store.transaction(bundle)
        loaded += len(bundle["entry"])
        if progress is not None:
            progress(loaded, len(resources))
    return loaded
