"""Every resource type TrialTwin generates, validated by HAPI FHIR against the profile it claims.

Real operations ($calibrate, $simulate, $predict-dropout, $import-map, publish) run on the embedded
store; profiles/ is loaded into HAPI (as scripts/hapi_validate.py does) and each output goes through
``POST [type]/$validate?profile=<meta.profile>``. Any error or fatal issue fails.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from fhir_ops.app import create_app
from tests.fhir_ops.conftest import FhirClient
from tests.fhir_ops.test_predict_dropout import AS_OF, high_risk, low_risk, parameters
from tests.live_server import serve
from tests.integration.conftest import hapi_validate

# Both modules upload profiles/ into the one HAPI server; run concurrently (pytest -n), one could
# validate a definition while the other re-uploads it, and HAPI then fails to build its snapshot.
# Every module that makes HAPI validate or load conformance resources shares one xdist group: HAPI's
# validator caches base definitions and builds snapshots on shared objects, and two workers doing it at
# once broke a CI run (duplicate fhir-type extensions in a snapshot, 409 on a first PUT).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hapi-validator")]

ROOT = Path(__file__).resolve().parents[2]
SD = "https://trialtwin.org/fhir/StructureDefinition/"
FHIR_JSON = "application/fhir+json"

#: (resource type, profile it must claim or None for base R4, the operation that wrote it)
GENERATED = [
    ("Basic", SD + "twin-state", "$calibrate"),
    ("Provenance", SD + "twin-provenance", "$calibrate"),
    ("Observation", SD + "simulated-forecast", "$simulate"),
    ("Provenance", SD + "twin-provenance", "$simulate"),
    ("Device", SD + "twin-model-device", "$simulate"),
    ("RiskAssessment", SD + "dropout-risk", "$predict-dropout"),
    ("Task", SD + "outreach-task", "$predict-dropout"),
    ("Provenance", SD + "twin-provenance", "$predict-dropout"),
    ("Device", SD + "twin-model-device", "$predict-dropout"),
    ("ConceptMap", None, "$import-map"),
    ("AuditEvent", None, "$import-map"),
    ("AuditEvent", None, "terminology publish"),
    ("Observation", SD + "prognostic-score", "$estimate-effect"),
    ("DocumentReference", SD + "effect-report", "$estimate-effect"),
    ("Provenance", SD + "twin-provenance", "$estimate-effect"),
    ("MeasureReport", SD + "enrollment-forecast", "$forecast-enrollment"),
    ("Provenance", SD + "twin-provenance", "$forecast-enrollment"),
    ("Library", SD + "twin-model-definition", "model publish"),
    ("Library", SD + "population-estimate", "$fit-population"),
    ("PlanDefinition", None, "demo visit plan"),
    ("Appointment", None, "$optimize-schedule"),
    ("CarePlan", None, "$optimize-schedule"),
    ("Provenance", SD + "twin-provenance", "$optimize-schedule"),
    ("Group", SD + "stratum", "$stratify"),
    ("Provenance", SD + "twin-provenance", "$stratify"),
    ("MeasureReport", SD + "safety-signal-report", "$safety-signal"),
    ("DetectedIssue", SD + "safety-signal-issue", "$safety-signal"),
    ("Task", SD + "safety-review-task", "$safety-signal"),
    ("Provenance", SD + "twin-provenance", "$safety-signal"),
    ("RiskAssessment", SD + "dropout-risk", "$predict-dropout withdrawal"),
    ("ResearchStudy", None, "outreach policy"),
]


def _key(item) -> str:
    rtype, profile, operation = item
    return f"{rtype}-{profile.rsplit('/', 1)[1] if profile else 'base'}-by-{operation.strip('$').replace(' ', '-')}"


def _value(body: dict, name: str):
    for p in body.get("parameter") or body.get("part") or []:
        if p["name"] == name:
            return p.get("valueReference") or next(v for k, v in p.items() if k.startswith("value"))
    return None


def _get(client: FhirClient, reference: str) -> dict:
    answer = client.get(reference)
    assert answer.status_code == 200, (reference, answer.text)
    return answer.json()


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, dict]:
    """One real instance of each generated type, written by the real operations on the embedded store."""
    from fhir_ops.demo import build_demo_resources, simulate_demo_records

    app = create_app({"DATA_DIR": str(tmp_path_factory.mktemp("generated")), "AUTH_MODE": "open"})
    out: dict[str, dict] = {}
    with serve(app) as base:
        client = FhirClient(base + "/fhir")
        study = build_demo_resources(simulate_demo_records(seed=7, n=3))
        purpose_built = [{"resourceType": "ResearchStudy", "id": "pd-study", "status": "active"},
                         *high_risk()[0], *low_risk()[0]]
        loaded = client.transaction([{"resource": r, "request": {"method": "PUT",
                                                                 "url": f"{r['resourceType']}/{r['id']}"}}
                                     for r in study + purpose_built])
        assert loaded.status_code == 200, loaded.text
        pid = next(r["individual"]["reference"] for r in study
                   if r["resourceType"] == "ResearchSubject" and r["status"] == "on-study-intervention")

        calibrated = client.post(f"{pid}/$calibrate", {"resourceType": "Parameters", "parameter": []})
        assert calibrated.status_code == 200, calibrated.text
        out[_key(GENERATED[0])] = _get(client, _value(calibrated.json(), "twinState")["reference"])
        out[_key(GENERATED[1])] = _get(client, _value(calibrated.json(), "provenance")["reference"])

        simulated = client.post(f"{pid}/$simulate", {"resourceType": "Parameters", "parameter": [
            {"name": "persist", "valueBoolean": True}, {"name": "horizonDays", "valueInteger": 3}]})
        assert simulated.status_code == 200, simulated.text
        forecast = _get(client, _value(simulated.json(), "forecastObservation")["reference"])
        out[_key(GENERATED[2])] = forecast
        out[_key(GENERATED[3])] = _get(client, _value(simulated.json(), "provenance")["reference"])
        out[_key(GENERATED[4])] = _get(client, forecast["device"]["reference"])

        predicted = client.post("Patient/pd-high/$predict-dropout", parameters(threshold=0.5, asOf=AS_OF))
        assert predicted.status_code == 200, predicted.text
        prediction = next(p for p in predicted.json()["parameter"] if p["name"] == "prediction")
        out[_key(GENERATED[5])] = _get(client, _value(prediction, "riskAssessment")["reference"])
        out[_key(GENERATED[6])] = _get(client, _value(prediction, "task")["reference"])
        out[_key(GENERATED[7])] = _get(client, _value(prediction, "provenance")["reference"])
        out[_key(GENERATED[8])] = _get(client, _value(predicted.json(), "modelDevice")["reference"])

        url = "https://trialtwin.org/fhir/ConceptMap/edc-lab-to-loinc"
        csv_text = ("source_system,source_code,target_system,target_code,equivalence\n"
                    "https://trialtwin.org/fhir/CodeSystem/edc-lab,LAB-HBA1C,http://loinc.org,4548-4,equivalent\n")
        imported = client.post("ConceptMap/$import-map", {"resourceType": "Parameters", "parameter": [
            {"name": "csv", "valueString": csv_text}, {"name": "url", "valueUri": url},
            {"name": "version", "valueString": "9.0.0"}]})
        assert imported.status_code == 201, imported.text
        out[_key(GENERATED[9])] = _get(client, f"ConceptMap/{imported.json()['id']}")
        from terminology import workflow

        with app.app_context():
            workflow.publish(app.extensions["trialtwin.store"], imported.json()["id"], agent="profile-test")
        audits = client.get("AuditEvent", params={"_count": "50"}).json()["entry"]
        by_action = {e["resource"]["subtype"][0]["code"]: e["resource"] for e in audits}
        out[_key(GENERATED[10])] = by_action["import"]
        out[_key(GENERATED[11])] = by_action["publish"]

        # $estimate-effect with historical controls: prognostic scores, the report, their Provenance
        import numpy as np

        from tests.fhir_ops.operations.test_estimate_effect import _params as effect_params
        from tests.fhir_ops.operations.test_estimate_effect import _people, _study_entries
        from tests.fhir_ops.operations.test_forecast_enrollment import recruitment_entries
        rng = np.random.default_rng(5)
        entries = (_study_entries("ee-trial", _people(rng, "eet", 40, effect=-0.5, treated=np.arange(40) % 2 == 0),
                                  ["active", "placebo"])
                   + _study_entries("ee-history", _people(rng, "eeh", 60), ["placebo"]))
        for i in range(0, len(entries), 150):
            assert client.transaction(entries[i:i + 150]).status_code == 200
        effect = client.post("ResearchStudy/ee-trial/$estimate-effect",
                             effect_params(covariate=["baseline"],
                                           historicalControl={"reference": "ResearchStudy/ee-history"}))
        assert effect.status_code == 200, effect.text[:500]
        prov = _get(client, _value(effect.json(), "provenance")["reference"])
        score_ref = next(t["reference"] for t in prov["target"] if t["reference"].startswith("Observation/"))
        out[_key(GENERATED[12])] = _get(client, score_ref.split("/_history/")[0])
        out[_key(GENERATED[13])] = _get(client, _value(effect.json(), "report")["reference"])
        out[_key(GENERATED[14])] = prov

        entries, _, _ = recruitment_entries("fe-study", sites=4)
        for i in range(0, len(entries), 150):
            assert client.transaction(entries[i:i + 150]).status_code == 200
        forecast = client.post("ResearchStudy/fe-study/$forecast-enrollment", {"resourceType": "Parameters", "parameter": [
            {"name": "target", "valueInteger": 500}]})
        assert forecast.status_code == 200, forecast.text[:500]
        out[_key(GENERATED[15])] = _get(client, _value(forecast.json(), "measureReport")["reference"])
        out[_key(GENERATED[16])] = _get(client, _value(forecast.json(), "provenance")["reference"])

        # a published twin model definition and the population estimate $fit-population stores
        from tests.fhir_ops.operations.test_fit_population import load_theoph
        load_theoph(client.base)
        definitions = client.get("Library", params={"_profile": SD + "twin-model-definition"}).json()
        out[_key(GENERATED[17])] = definitions["entry"][0]["resource"]
        fitted = client.post("ResearchStudy/theoph/$fit-population", {"resourceType": "Parameters", "parameter": [
            {"name": "vpcReplicates", "valueInteger": 10}]})
        assert fitted.status_code == 200, fitted.text[:500]
        out[_key(GENERATED[18])] = _get(client, _value(fitted.json(), "estimate")["reference"])

        # the demo's visit plan (its extensions checked against their definitions) and a schedule proposal;
        # at the study's start every visit of the participants on study is still to come
        from fhir_ops.demo import STUDY_START
        out[_key(GENERATED[19])] = next(r for r in study if r["resourceType"] == "PlanDefinition")
        scheduled = client.post("ResearchStudy/tt-201/$optimize-schedule", {"resourceType": "Parameters", "parameter": [
            {"name": "asOf", "valueDateTime": STUDY_START.isoformat()}, {"name": "replicates", "valueInteger": 20}]})
        assert scheduled.status_code == 200, scheduled.text[:500]
        careplan = _get(client, _value(scheduled.json(), "carePlan")["reference"])
        out[_key(GENERATED[20])] = _get(client, careplan["activity"][0]["reference"]["reference"])
        out[_key(GENERATED[21])] = careplan
        out[_key(GENERATED[22])] = _get(client, _value(scheduled.json(), "provenance")["reference"])

        # $stratify on the demo study (20 participants, 13 on a dosed arm with data: stratification needs at least
        # 10 whose data inform their twins, which placebo's do not), $safety-signal with a planted adverse event
        # so a DetectedIssue and its review Task exist
        study = build_demo_resources(simulate_demo_records(seed=7, n=20))
        for i in range(0, len(study), 500):
            assert client.transaction([{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                                       for r in study[i:i + 500]]).status_code == 200
        strata = client.post("ResearchStudy/tt-201/$stratify", {"resourceType": "Parameters", "parameter": [
            {"name": "bootstrap", "valueInteger": 2}]})
        assert strata.status_code == 200, strata.text[:500]
        first = next(p for p in strata.json()["parameter"] if p["name"] == "stratum")
        out[_key(GENERATED[23])] = _get(client, _value(first, "group")["reference"])
        out[_key(GENERATED[24])] = _get(client, _value(strata.json(), "provenance")["reference"])
        subjects = [r for r in study if r["resourceType"] == "ResearchSubject" and r["assignedArm"] == "100 mg"]
        planted = [{"resource": {"resourceType": "AdverseEvent", "id": f"hapi-planted-{i}-{j}", "actuality": "actual",
                                 "event": {"coding": [{"system": "http://snomed.info/sct", "code": "25064002",
                                                       "display": "Headache"}]},
                                 "subject": s["individual"], "date": s["period"]["start"] + f"T1{j}:00:00Z",
                                 "study": [{"reference": "ResearchStudy/tt-201"}]},
                    "request": {"method": "PUT", "url": f"AdverseEvent/hapi-planted-{i}-{j}"}}
                   for i, s in enumerate(subjects) for j in range(6)]
        assert client.transaction(planted).status_code == 200
        safety = client.post("ResearchStudy/tt-201/$safety-signal", {"resourceType": "Parameters", "parameter": [
            {"name": "term", "valueString": "http://snomed.info/sct|25064002"}]})
        assert safety.status_code == 200, safety.text[:500]
        out[_key(GENERATED[25])] = _get(client, _value(safety.json(), "measureReport")["reference"])
        out[_key(GENERATED[26])] = _get(client, _value(safety.json(), "detectedIssue")["reference"])
        out[_key(GENERATED[27])] = _get(client, _value(safety.json(), "task")["reference"])
        out[_key(GENERATED[28])] = _get(client, _value(safety.json(), "provenance")["reference"])

        from fhir_ops.mapping.outreach_policy import policy_extension
        from inference.outreach import OutreachTarget

        policy_study = {"resourceType": "ResearchStudy", "id": "pd-study", "status": "active",
                        "extension": [policy_extension("withdrawal", OutreachTarget("precision", 0.3))]}
        assert client.put("ResearchStudy/pd-study", policy_study).status_code == 200
        withdrawal = client.post("Patient/pd-high/$predict-dropout", {"resourceType": "Parameters", "parameter": [
            {"name": "outcome", "valueCode": "withdrawal"}, {"name": "asOf", "valueDateTime": AS_OF}]})
        assert withdrawal.status_code == 200, withdrawal.text
        prediction = next(p for p in withdrawal.json()["parameter"] if p["name"] == "prediction")
        out[_key(GENERATED[29])] = _get(client, _value(prediction, "riskAssessment")["reference"])
        out[_key(GENERATED[30])] = _get(client, "ResearchStudy/pd-study")
        client.http.close()
    app.extensions["trialtwin.store"].close()
    return out


@pytest.mark.parametrize("item", GENERATED, ids=_key)
def test_generated_resource_validates_on_hapi_against_its_profile(item, generated, profiles_on_hapi):
    rtype, profile, _ = item
    resource = generated[_key(item)]
    assert resource["resourceType"] == rtype
    claimed = (resource.get("meta") or {}).get("profile") or []
    if profile is None:
        assert not [p for p in claimed if p.startswith(SD)], claimed  # no TrialTwin profile: base R4 applies
        params = {}
    else:
        assert profile in claimed, f"{rtype} from {item[2]} claims {claimed}, not {profile}"
        params = {"profile": profile}
    answer = requests.post(f"{profiles_on_hapi}/{rtype}/$validate", params=params, data=json.dumps(resource),
                           headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=180)
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome", answer.text[:500]
    problems = [i for i in outcome.get("issue", []) if i.get("severity") in ("error", "fatal")]
    assert problems == [], json.dumps(problems, indent=1)[:4000]
    assert answer.status_code == 200


def test_every_resource_profile_in_profiles_has_a_generated_instance():
    # a resource profile without a generator here would go unchecked: list it, or add its operation
    resource_profiles = {sd["url"] for _, sd in hapi_validate.find_conformance([ROOT / "profiles"])
                         if sd["resourceType"] == "StructureDefinition" and sd.get("kind") == "resource"}
    assert resource_profiles == {profile for _, profile, _ in GENERATED if profile}


@pytest.mark.parametrize("item, drop", [
    (GENERATED[2], "extension"),  # a forecast that no longer names its twin state
    (GENERATED[5], "performer"),  # a risk that no longer names its model
], ids=["forecast-without-twin-state", "risk-without-model"])
def test_the_same_check_catches_an_instance_that_breaks_its_profile(item, drop, generated, profiles_on_hapi):
    rtype, profile, _ = item
    broken = {k: v for k, v in generated[_key(item)].items() if k != drop}
    outcome = requests.post(f"{profiles_on_hapi}/{rtype}/$validate", params={"profile": profile},
                            data=json.dumps(broken), headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
                            timeout=180).json()
    errors = [i["diagnostics"] for i in outcome["issue"] if i["severity"] in ("error", "fatal")]
    assert errors and all(profile in e or drop in e for e in errors), errors


def test_hapi_checks_the_visit_plan_extensions_against_their_definitions(generated, profiles_on_hapi):
    import copy

    plan = copy.deepcopy(generated[_key(GENERATED[19])])
    scheduling = plan["action"][0]["extension"][0]["extension"]
    target = next(e for e in scheduling if e["url"] == "targetDay")
    target.pop("valueDuration")
    target["valueString"] = "day 28"  # the profile allows a Duration only
    outcome = requests.post(f"{profiles_on_hapi}/PlanDefinition/$validate", data=json.dumps(plan),
                            headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=180).json()
    errors = [i["diagnostics"] for i in outcome["issue"] if i["severity"] in ("error", "fatal")]
    assert errors and all("visit-scheduling" in e and "Duration" in e for e in errors), errors


def test_hapi_checks_the_outreach_policy_against_its_definition(generated, profiles_on_hapi):
    import copy

    study = copy.deepcopy(generated[_key(GENERATED[30])])
    value = next(e for e in study["extension"][0]["extension"] if e["url"] == "value")
    value.pop("valueDecimal")
    value["valueString"] = "30 %"  # the definition allows a decimal only
    outcome = requests.post(f"{profiles_on_hapi}/ResearchStudy/$validate", data=json.dumps(study),
                            headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=180).json()
    errors = [i["diagnostics"] for i in outcome["issue"] if i["severity"] in ("error", "fatal")]
    assert errors and all("outreach-policy" in e or "decimal" in e.lower() for e in errors), errors


def _extended_resources() -> dict[str, dict]:
    """One resource per TrialTwin extension that has no profile of its own, carrying it as the code writes it."""
    from fhir_ops.audit.chain import GENESIS
    from fhir_ops.closed_loop import CLOSED_LOOP_EXTENSION
    from fhir_ops.deidentify import AGE_EXTENSION
    from fhir_ops.mapping.audit_event import chained_resource
    from terminology.harmonize import ORIGINAL_QUANTITY

    event = chained_resource(1, {"resourceType": "AuditEvent",
                                 "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                                          "code": "rest"},
                                 "action": "R", "recorded": "2026-11-20T10:00:00Z", "outcome": "0",
                                 "agent": [{"who": {"display": "dr.chen"}, "requestor": True}],
                                 "source": {"observer": {"display": "TrialTwin"}}}, GENESIS, "ab" * 32)
    return {
        "original-quantity": {"resourceType": "Observation", "status": "final",
                              "code": {"coding": [{"system": "http://loinc.org", "code": "1558-6"}]},
                              "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-11-20",
                              "valueQuantity": {"value": 126.1, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                                                "code": "mg/dL", "extension": [{"url": ORIGINAL_QUANTITY,
                                                                                "valueQuantity": {"value": 7.0,
                                                                                                  "unit": "mmol/L"}}]}},
        "age-90-or-older": {"resourceType": "Patient", "gender": "female",
                            "extension": [{"url": AGE_EXTENSION, "valueBoolean": True}]},
        "twin-closed-loop": {"resourceType": "ResearchStudy", "status": "active",
                             "extension": [{"url": CLOSED_LOOP_EXTENSION, "valueBoolean": False}]},
        "audit-chain": event,
    }


@pytest.mark.parametrize("name", ["original-quantity", "age-90-or-older", "twin-closed-loop", "audit-chain"])
def test_hapi_resolves_the_extensions_the_code_writes_and_checks_them(name, profiles_on_hapi):
    import copy

    resource = _extended_resources()[name]

    def errors(body: dict) -> list[str]:
        outcome = requests.post(f"{profiles_on_hapi}/{body['resourceType']}/$validate", data=json.dumps(body),
                                headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout=180).json()
        return [f"{i.get('expression')}: {i['diagnostics']}" for i in outcome["issue"]
                if i["severity"] in ("error", "fatal")]

    assert errors(resource) == []
    # the same extension with a value of the wrong type: HAPI knows the definition, so it says so
    broken = copy.deepcopy(resource)
    holder = broken["valueQuantity"] if name == "original-quantity" else broken
    ext = next(e for e in holder["extension"] if e["url"].endswith("/" + name))
    if name == "audit-chain":
        part = next(p for p in ext["extension"] if p["url"] == "sequence")
        part.pop("valueInteger")
        part["valueString"] = "one"
    else:
        ext.pop(next(k for k in ext if k.startswith("value")))
        ext["valueString"] = "not the defined type"
    found = errors(broken)
    assert found and any(name in e or "valueString" in e or "string" in e.lower() for e in found), found
