"""ResearchStudy/$fit-population over real HTTP: Theoph loaded from its NONMEM file with the CLI, fitted
asynchronously with the shipped theophylline definition, compared with nlme's fm3Theo and with the
same fit in-process; what is stored (estimate, plots, Provenance, study prior) and the bad inputs."""
from __future__ import annotations

import base64
import json
import time
from importlib import resources

import pytest

from fhir_ops import jobs
from fhir_ops.app import create_app
from fhir_ops.cli import main
from fhir_ops.mapping import model_definition as fm
from fhir_ops.mapping import nonmem
from inference import model_definition as md
from inference.estimation import fit_population
from tests.app_config import open_config
from tests.fhir_ops.conftest import FhirClient, error_id
from tests.live_server import serve

pytestmark = pytest.mark.api

# Pinheiro & Bates (2000), fm3Theo (nlme, ML): the reference of the product SPEC
NLME = {"KE": -2.4547, "KA": 0.4657, "CL": -3.2272}
NLME_SIGMA = 0.709
DATA = resources.files("inference").joinpath("data")


def load_theoph(base: str, study_model: bool = True) -> None:
    mapping = json.loads(DATA.joinpath("theoph_nonmem.map.json").read_text("utf-8"))
    path = str(DATA.joinpath("theoph_nonmem.csv"))
    assert main(["model", "publish", "theophylline", "--url", base]) == 0
    if not study_model:
        mapping["study"].pop("model")
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(mapping, fh)
    assert main(["load", "--format", "nonmem", path, "--mapping", fh.name, "--url", base]) == 0


def run_async(fhir: FhirClient, path: str, body: dict, timeout_s: float = 600.0):
    resp = fhir.post(path, body, headers={"Prefer": "respond-async"})
    assert resp.status_code == 202, resp.text
    location = resp.headers["Content-Location"]
    seen = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        poll = fhir.get(location)
        if poll.status_code != 202:
            return poll, seen
        seen.add(poll.headers.get("X-Progress", ""))
        time.sleep(0.5)
    raise AssertionError(f"{path} did not finish in {timeout_s} s")


def params(body):
    out = {}
    for p in body["parameter"]:
        value = next((v for k, v in p.items() if k.startswith("value")), None)
        if "part" in p:
            out.setdefault(p["name"], []).append({q["name"]: next(v for k, v in q.items() if k.startswith("value"))
                                                  for q in p["part"]})
        else:
            out[p["name"]] = value
    return out


def in_process_fit():
    mapping = json.loads(DATA.joinpath("theoph_nonmem.map.json").read_text("utf-8"))
    model = md.load_definition(md.shipped_definition("theophylline"), fm.ucum_factor)
    subjects = nonmem.parse(DATA.joinpath("theoph_nonmem.csv").read_text("utf-8"), mapping)
    data = md.event_data(model, nonmem.subject_records(subjects, mapping, model))
    return model, fit_population(model.population_model(), model.structural, data)


def test_theoph_fit_over_http_gives_fm3theo_and_the_in_process_fit(fhir):
    load_theoph(fhir.base)
    resp, progress = run_async(fhir, "ResearchStudy/theoph/$fit-population",
                               {"resourceType": "Parameters", "parameter": [{"name": "vpcReplicates", "valueInteger": 50}]})
    assert resp.status_code == 200, resp.text
    out = params(resp.json())
    assert out["converged"] is True
    # which progress messages a poll every 0.5 s sees depends on timing (the FOCEI iterations take
    # ~0.05 s): the callback behind them is tested in tests/inference/test_estimation.py
    assert all(isinstance(p, str) for p in progress)
    estimates = {p["name"]: p for p in out["parameter"]}
    for name, want in NLME.items():
        assert abs(estimates[name]["estimate"] - want) < 0.05, (name, estimates[name])
    assert abs(estimates["sigma_additive(concentration)"]["estimate"] - NLME_SIGMA) < 0.05
    # the same data fitted in-process: the same estimates (the HTTP path only moves them through FHIR)
    model, fit = in_process_fit()
    for k, name in enumerate(model.parameter_names):
        assert estimates[name]["estimate"] == pytest.approx(fit.model.theta[k], abs=1e-6)
        assert estimates[name]["se"] == pytest.approx(fit.standard_errors[name], rel=1e-4)
    assert out["objective"] == pytest.approx(fit.objective, abs=1e-5)

    # the stored estimate: JSON document + GOF + VPC PNGs, versioned; the study points at it
    library = fhir.get(out["estimate"]["reference"]).json()
    assert library["meta"]["profile"] == [fm.ESTIMATE_PROFILE]
    kinds = [c["contentType"] for c in library["content"]]
    assert kinds == ["application/json", "image/png", "image/png"]
    assert all(base64.b64decode(c["data"])[:8] == b"\x89PNG\r\n\x1a\n" for c in library["content"][1:])
    doc = json.loads(base64.b64decode(library["content"][0]["data"]))
    assert doc["model"] == model.canonical and doc["subjects"] == 12 and doc["observations"] == 132
    assert set(doc["shrinkage"]["eta"]) == {"KA", "CL"} and doc["conditionNumber"] > 1
    study = fhir.get("ResearchStudy/theoph").json()
    assert fm.study_estimate_reference(study) == out["estimate"]["reference"]
    # Provenance pins the model, the study and every dose and observation read, each by version
    provenance = fhir.get(out["provenance"]["reference"]).json()
    pinned = [e["what"]["reference"] for e in provenance["entity"]]
    assert "Library/theophylline-1cmt-oral-1.1.0/_history/1" in pinned
    assert "ResearchStudy/theoph/_history/1" in pinned
    assert sum(r.startswith("Observation/") for r in pinned) == 132 + 12  # concentrations + weights
    assert all("/_history/" in r for r in pinned)
    assert out["estimate"]["reference"] in [t["reference"] for t in provenance["target"]]


def test_a_second_fit_is_a_new_version(fhir):
    load_theoph(fhir.base)
    body = {"resourceType": "Parameters", "parameter": [{"name": "vpcReplicates", "valueInteger": 0},
                                                        {"name": "standardErrors", "valueBoolean": False}]}
    first = params(fhir.post("ResearchStudy/theoph/$fit-population", body).json())
    second = params(fhir.post("ResearchStudy/theoph/$fit-population", body).json())
    assert first["estimate"]["reference"].endswith("/_history/1")
    assert second["estimate"]["reference"].endswith("/_history/2")
    assert fhir.get(second["estimate"]["reference"]).json()["version"] == "2"


def test_study_without_a_model_is_refused(fhir):
    load_theoph(fhir.base, study_model=False)
    resp = fhir.post("ResearchStudy/theoph/$fit-population", {"resourceType": "Parameters"})
    assert resp.status_code == 422 and error_id(resp) == "study-without-model"
    assert fhir.get("Library?type=asset-collection").json().get("total", 0) == 0


def test_get_is_refused_and_unknown_study_is_404(fhir):
    assert fhir.get("ResearchStudy/x/$fit-population").status_code == 405
    assert fhir.post("ResearchStudy/none/$fit-population", {"resourceType": "Parameters"}).status_code == 404


def test_an_output_code_no_observation_carries_leaves_nothing_to_fit(fhir):
    load_theoph(fhir.base, study_model=False)
    raw = md.shipped_definition("theophylline")
    raw["version"] = "1.0.1"
    raw["outputs"][0]["observation"]["codes"] = [{"system": "http://loinc.org", "code": "0000-0"}]
    library = fm.definition_library(fm.compile_definition(raw))
    assert fhir.put(f"Library/{library['id']}", library).status_code == 201
    body = {"resourceType": "Parameters", "parameter": [{"name": "model", "valueCanonical": f"{raw['url']}|1.0.1"}]}
    resp = fhir.post("ResearchStudy/theoph/$fit-population", body)
    assert resp.status_code == 422 and error_id(resp) == "too-few-subjects"
    assert "no observation of the model's outputs" in resp.json()["issue"][0]["diagnostics"]
    assert fhir.get("Library?type=asset-collection").json().get("total", 0) == 0


def test_a_definition_with_an_error_is_refused_naming_the_path(fhir):
    raw = md.shipped_definition("theophylline")
    library = fm.definition_library(fm.compile_definition(raw))
    raw["pk"]["compartments"] = 5
    library["content"][0]["data"] = base64.b64encode(json.dumps(raw).encode()).decode()
    resp = fhir.put(f"Library/{library['id']}", library)
    assert resp.status_code == 422 and error_id(resp) == "invalid-model-definition"
    assert resp.json()["issue"][0]["expression"] == ["$.pk.compartments"]
    assert fhir.get(f"Library/{library['id']}").status_code == 404
    resp = fhir.transaction([{"resource": library, "request": {"method": "PUT", "url": f"Library/{library['id']}"}}])
    assert resp.status_code == 422 and "Bundle.entry[0]" in resp.json()["issue"][0]["diagnostics"]
    assert fhir.get(f"Library/{library['id']}").status_code == 404


def test_a_definition_with_inconsistent_units_is_refused_naming_the_path(fhir):
    raw = md.shipped_definition("theophylline")
    library = fm.definition_library(fm.compile_definition(raw))
    raw["outputs"][0]["unit"] = "mmol/L"  # a molar concentration of a PK model in mg and L: needs a molar mass
    raw["dosing"][0]["unit"] = "mg"
    library["content"][0]["data"] = base64.b64encode(json.dumps(raw).encode()).decode()
    resp = fhir.put(f"Library/{library['id']}", library)
    assert resp.status_code == 422 and error_id(resp) == "invalid-model-definition"
    assert "$.outputs[0].unit" in [e for i in resp.json()["issue"] for e in i.get("expression", [])]
    assert fhir.get(f"Library/{library['id']}").status_code == 404


def test_an_observation_in_a_unit_that_does_not_convert_is_refused(fhir):
    """A stored concentration in kg (the definition's output is mg/L): calibrating that participant and
    fitting their study are refused naming the Observation; the fit stores nothing."""
    load_theoph(fhir.base)
    obs = {"resourceType": "Observation", "id": "theoph-2-kg", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "4049-3"}]},
           "subject": {"reference": "Patient/theoph-2"}, "effectiveDateTime": "2025-01-06T20:00:00Z",
           "valueQuantity": {"value": 3.1, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}}
    assert fhir.put("Observation/theoph-2-kg", obs).status_code == 201
    resp = fhir.post("Patient/theoph-2/$calibrate", {"resourceType": "Parameters"})
    assert resp.status_code == 422 and error_id(resp) == "observation-unit"
    assert "Observation/theoph-2-kg" in resp.json()["issue"][0]["diagnostics"]
    resp = fhir.post("ResearchStudy/theoph/$fit-population", {"resourceType": "Parameters", "parameter": [
        {"name": "vpcReplicates", "valueInteger": 0}, {"name": "standardErrors", "valueBoolean": False}]})
    assert resp.status_code == 422 and error_id(resp) == "observation-unit"
    assert fhir.get("Library?type=asset-collection").json().get("total", 0) == 0
    assert fhir.get("Provenance").json().get("total", 0) == 0


def test_definitions_are_read_by_canonical_url_and_version(fhir):
    assert main(["model", "publish", "theophylline", "--url", fhir.base]) == 0
    raw = md.shipped_definition("theophylline")
    shipped = raw["version"]
    raw["version"] = "2.0.0"
    library = fm.definition_library(fm.compile_definition(raw))
    assert fhir.put(f"Library/{library['id']}", library).status_code == 201
    found = fhir.get(f"Library?url={raw['url']}&version={shipped}").json()
    assert [e["resource"]["version"] for e in found["entry"]] == [shipped]
    assert fhir.get(f"Library?url={raw['url']}").json()["total"] == 2


def test_cancel_stores_nothing(tmp_path):
    app = create_app(open_config(DATA_DIR=str(tmp_path)))
    with serve(app) as base:
        fhir = FhirClient(base + "/fhir")
        load_theoph(fhir.base)
        resp = fhir.post("ResearchStudy/theoph/$fit-population", {"resourceType": "Parameters"},
                         headers={"Prefer": "respond-async"})
        assert resp.status_code == 202
        assert fhir.delete(resp.headers["Content-Location"]).status_code == 202
        jobs.manager(app).shutdown()  # waits for the worker to stop at its next cancel check
        assert fhir.get("Library?type=asset-collection").json().get("total", 0) == 0
        assert fm.study_estimate_reference(fhir.get("ResearchStudy/theoph").json()) is None
    app.extensions["trialtwin.store"].close()


def test_group_fit_uses_its_members_study_model_and_leaves_the_study_alone(fhir):
    load_theoph(fhir.base)
    group = {"resourceType": "Group", "id": "first-six", "type": "person", "actual": True,
             "member": [{"entity": {"reference": f"Patient/theoph-{i}"}} for i in range(1, 7)]}
    assert fhir.put("Group/first-six", group).status_code == 201
    body = {"resourceType": "Parameters", "parameter": [{"name": "vpcReplicates", "valueInteger": 0},
                                                        {"name": "standardErrors", "valueBoolean": False}]}
    resp = fhir.post("Group/first-six/$fit-population", body)
    assert resp.status_code == 200, resp.text
    out = params(resp.json())
    assert out["estimate"]["reference"] == "Library/group-first-six-population-estimate/_history/1"
    doc = json.loads(base64.b64decode(fhir.get(out["estimate"]["reference"]).json()["content"][0]["data"]))
    assert doc["subjects"] == 6 and doc["fittedTo"] == "Group/first-six"
    assert fm.study_estimate_reference(fhir.get("ResearchStudy/theoph").json()) is None


def test_a_participant_who_withdrew_secondary_use_consent_is_left_out_and_provenance_says_why(fhir):
    from fhir_ops.mapping import consent as cm

    load_theoph(fhir.base)
    group = {"resourceType": "Group", "id": "first-six", "type": "person", "actual": True,
             "member": [{"entity": {"reference": f"Patient/theoph-{i}"}} for i in range(1, 7)]}
    assert fhir.put("Group/first-six", group).status_code == 201
    for i in (2, 3):  # p2 consents, p3 withdrew consent to secondary use
        consent = cm.consent_resource(f"theoph-{i}-secondary", f"theoph-{i}", cm.SECONDARY_USE, "2026-01-01",
                                      withdrawn_on="2026-06-01" if i == 3 else None)
        assert fhir.put(f"Consent/{consent['id']}", consent).status_code == 201
    body = {"resourceType": "Parameters", "parameter": [{"name": "vpcReplicates", "valueInteger": 0},
                                                        {"name": "standardErrors", "valueBoolean": False}]}
    resp = fhir.post("Group/first-six/$fit-population", body)
    assert resp.status_code == 200, resp.text
    out = params(resp.json())
    doc = json.loads(base64.b64decode(fhir.get(out["estimate"]["reference"]).json()["content"][0]["data"]))
    assert doc["subjects"] == 5
    provenance = fhir.get(out["provenance"]["reference"]).json()
    why = [e["what"] for e in provenance["entity"] if e["what"]["reference"].startswith("Consent/")]
    assert why == [{"reference": "Consent/theoph-3-secondary/_history/1",
                    "display": "Patient/theoph-3 left out: secondary-use consent withdrawn "
                               "(Consent/theoph-3-secondary/_history/1)"}]
    read = {e["what"]["reference"].split("/_history")[0] for e in provenance["entity"]}
    assert not any(r.startswith("Observation/theoph-3-") for r in read)
    assert any(r.startswith("Observation/theoph-2-") for r in read)
    information = [i["diagnostics"] for i in resp.json()["parameter"] if i["name"] == "information"
                   for i in i["resource"]["issue"]]
    assert any("Patient/theoph-3 left out" in d for d in information)
