"""Every conformance resource in profiles/ parses as R4, and the structural checker enforces them."""
import copy

import pytest
from fhir.resources.R4B import get_fhir_model_class

import profiles
from fhir_ops import conformance

pytestmark = pytest.mark.unit

SD = "https://trialtwin.org/fhir/StructureDefinition"
CS = "https://trialtwin.org/fhir/CodeSystem/trialtwin"


@pytest.mark.parametrize("resource", profiles.all_resources(), ids=lambda r: f"{r['resourceType']}-{r['id']}")
def test_profile_file_parses_as_r4(resource):
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    assert resource["url"].startswith("https://trialtwin.org/fhir/")
    if resource["resourceType"] == "StructureDefinition":
        assert resource["fhirVersion"] == "4.0.1"
        assert resource["derivation"] == "constraint"


def forecast():
    return {
        "resourceType": "Observation",
        "meta": {"profile": [f"{SD}/simulated-forecast"]},
        "status": "preliminary",
        "category": [{"coding": [{"system": CS, "code": "simulated-forecast"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2026-01-01T00:00:00Z",
        "valueQuantity": {"value": 7.1, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
        "method": {"coding": [{"system": CS, "code": "twin-simulation"}]},
        "device": {"reference": "Device/m1"},
        "extension": [{"url": f"{SD}/twin-state-reference", "valueReference": {"reference": "Basic/t1/_history/2"}}],
        "component": [{
            "extension": [{"url": f"{SD}/interval-level", "valueDecimal": 0.9}],
            "code": {"coding": [{"system": CS, "code": "prediction-interval"}]},
            "valueRange": {"low": {"value": 6.5}, "high": {"value": 7.8}},
        }],
    }


def test_conforming_forecast_passes():
    assert conformance.check(forecast()) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r.pop("device"), "Observation.device: at least 1"),
    (lambda r: r.update(status="final"), "must be 'preliminary'"),
    (lambda r: r.update(method={"coding": [{"system": "x", "code": "y"}]}), "Observation.method: does not match"),
    (lambda r: r.update(valueString="7"), "type not allowed"),
    (lambda r: r["component"][0].pop("extension"), "extension:level: at least 1"),
    (lambda r: r.pop("extension"), "extension:twinState: at least 1"),
    (lambda r: r.pop("meta"), "names no TrialTwin profile"),
])
def test_checker_catches_each_violation(mutate, expected):
    resource = copy.deepcopy(forecast())
    mutate(resource)
    problems = conformance.check(resource)
    assert any(expected in p for p in problems), problems


def test_complex_extension_sub_slices_are_checked():
    twin = {
        "resourceType": "Basic",
        "meta": {"profile": [f"{SD}/twin-state"]},
        "code": {"coding": [{"system": CS, "code": "twin-state"}]},
        "subject": {"reference": "Patient/p1"},
        "created": "2026-01-01",
        "extension": [
            {"url": f"{SD}/twin-model", "valueReference": {"reference": "Device/m1"}},
            {"url": f"{SD}/twin-parameter", "extension": [
                {"url": "name", "valueCode": "CL"}, {"url": "mean", "valueDecimal": 1.2},
                {"url": "scale", "valueCode": "log"}]},
        ],
    }
    assert conformance.check(twin) == []
    twin["extension"][1]["extension"].pop(0)
    assert any("sub-extension 'name' required" in p for p in conformance.check(twin))


def _element_exists(path: str) -> bool:
    """Does an element path of a differential (``Observation.component.code``) exist in R4?"""
    import typing

    from fhir.resources.R4B import get_fhir_model_class

    parts = path.split(".")
    model = get_fhir_model_class(parts[0])
    for i, part in enumerate(parts[1:]):
        if part.endswith("[x]"):
            stem = part[:-3]
            if not any(k.startswith(stem) and k[len(stem):][:1].isupper() for k in model.model_fields):
                return False
            return i == len(parts) - 2  # nothing below a choice in our differentials
        field = model.model_fields.get(part) or model.model_fields.get(f"{part}__fhir__")
        if field is None:
            field = next((f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return False
        if i == len(parts) - 2:
            return True
        annotation = field.annotation
        while typing.get_args(annotation):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        type_name = getattr(annotation, "__name__", str(annotation)).removesuffix("Type")
        model = get_fhir_model_class(type_name)
    return True


@pytest.mark.parametrize("profile", [r for r in profiles.all_resources() if r["resourceType"] == "StructureDefinition"],
                         ids=lambda r: r["id"])
def test_every_constrained_element_exists_in_r4(profile):
    """A differential may only constrain elements of the base resource (HAPI found
    ``RiskAssessment.device`` once; this keeps such mistakes in the unit tier)."""
    if profile["type"] == "Extension":
        return
    missing = [e["path"] for e in profile["differential"]["element"] if not _element_exists(e["path"])]
    assert missing == []


@pytest.mark.parametrize("profile", [r for r in profiles.all_resources() if r["resourceType"] == "StructureDefinition"
                                     and r["type"] != "Extension"], ids=lambda r: r["id"])
def test_differential_follows_base_element_order(profile):
    """HAPI's snapshot generator requires differential elements in the base resource's order."""
    from fhir.resources.R4B import get_fhir_model_class

    sequence = get_fhir_model_class(profile["type"]).elements_sequence()

    def position(element):
        top = element["path"].split(".")[1].removesuffix("[x]")
        return next(i for i, name in enumerate(sequence) if name == top or name.startswith(top))

    positions = [position(e) for e in profile["differential"]["element"][1:]]
    assert positions == sorted(positions)


EXAMPLES = sorted((profiles.PROFILES_DIR / "examples").glob("*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_profile_examples_parse_as_r4_and_conform(path):
    import json

    resource = json.loads(path.read_text(encoding="utf-8"))
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    assert resource["meta"]["profile"][0].startswith(SD)
    assert conformance.check(resource) == []


@pytest.mark.parametrize("example, mutate, expected", [
    ("Group-stratum", lambda r: r.pop("member"), "Group.member: at least 1"),
    ("Group-stratum", lambda r: r.update(code={"coding": [{"system": CS, "code": "outreach"}]}), "Group.code"),
    ("DetectedIssue-safety-signal-issue", lambda r: r.update(status="final"), "must be 'preliminary'"),
    ("Task-safety-review-task", lambda r: r.pop("focus"), "Task.focus: at least 1"),
    ("MeasureReport-safety-signal-report", lambda r: r.pop("evaluatedResource"), "evaluatedResource: at least 1"),
])
def test_checker_catches_violations_of_the_issue_17_profiles(example, mutate, expected):
    import json

    resource = json.loads((profiles.PROFILES_DIR / "examples" / f"{example}.json").read_text(encoding="utf-8"))
    mutate(resource)
    problems = conformance.check(resource)
    assert any(expected in p for p in problems), problems
