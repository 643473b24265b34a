"""The map-update workflow against the embedded SQLite store: import, diff, preview, publish, rollback, audit."""
from __future__ import annotations

import pytest

from fhir_ops.errors import Conflict, InvalidRequest, PreconditionFailed, Unprocessable
from terminology import workflow
from terminology.catalog import LOINC, MDC
from terminology.harmonize import harmonize_resource

pytestmark = pytest.mark.unit

LAB_MAP = "https://trialtwin.org/fhir/ConceptMap/edc-lab-to-loinc"
EDC_LAB = "https://trialtwin.org/fhir/CodeSystem/edc-lab"
HEADER = "source_system,source_code,source_display,target_system,target_code,target_display,equivalence,comment\n"
# version 2 of the lab map: LAB-FPG now also gets the molar fasting-glucose code, LAB-EGFR is dropped
V2 = HEADER + (
    f"{EDC_LAB},LAB-HBA1C,HbA1c (central lab),{LOINC},4548-4,Hemoglobin A1c/Hemoglobin.total in Blood,equivalent,\n"
    f"{EDC_LAB},LAB-FPG,Fasting plasma glucose,{LOINC},1558-6,Fasting glucose [Mass/volume] in Serum or Plasma,equivalent,\n"
    f"{EDC_LAB},LAB-FPG,Fasting plasma glucose,{LOINC},14771-0,Fasting glucose [Moles/volume] in Serum or Plasma,equivalent,\"same analyte, molar\"\n"
)


def audits(store, subtype):
    found = store.search("AuditEvent", [("_count", "100")]).matches
    return [a for a in found if a["subtype"][0]["code"] == subtype]


def observation(system, code, value=None, unit=None):
    obs = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": system, "code": code}]}}
    if value is not None:
        obs["valueQuantity"] = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    return obs


@pytest.fixture
def seeded(store):
    workflow.seed(store)
    return store


def test_seed_stores_the_shipped_maps_once(seeded):
    assert {m["url"] for m in workflow.active_maps(seeded)} >= {LAB_MAP}
    assert workflow.seed(seeded) == []  # idempotent
    assert workflow.active_version(seeded, LAB_MAP)["version"] == "1.0.0"


def test_bad_csv_names_the_line_and_stores_nothing(seeded):
    before = seeded.search("ConceptMap", [("_count", "100")]).total
    bad = V2 + f"{EDC_LAB},LAB-EGFR,eGFR,{LOINC},62238-2,eGFR,equivalent,\n" + f"{EDC_LAB},LAB-X,x,{LOINC},4548-4,x,same,\n"
    with pytest.raises(InvalidRequest) as info:
        workflow.import_csv(seeded, bad, url=LAB_MAP, version="2.0.0")
    issues = info.value.to_outcome()["issue"][1:]
    # line 5: a LOINC code with a wrong check digit; line 6: an unknown equivalence and a local
    # code that the (complete) EDC code system does not have
    assert [i["expression"] for i in issues] == [["line[5]"], ["line[6]"], ["line[6]"]]
    assert "line 5" in issues[0]["diagnostics"] and "62238-2" in issues[0]["diagnostics"]
    assert "line 6" in issues[1]["diagnostics"] and "'same'" in issues[1]["diagnostics"]
    assert "LAB-X" in issues[2]["diagnostics"]
    assert seeded.search("ConceptMap", [("_count", "100")]).total == before
    assert audits(seeded, "import") == []


def test_full_cycle_import_diff_preview_publish_rollback(seeded):
    # stored data the new version would touch: 2 FPG observations, 1 eGFR observation
    for obs in (observation(EDC_LAB, "LAB-FPG", 100, "mg/dL"), observation(EDC_LAB, "LAB-FPG", 5.5, "mmol/L"),
                observation(EDC_LAB, "LAB-EGFR", 80, "mL/min/{1.73_m2}"), observation(MDC, "188736", 80, "kg")):
        seeded.create(harmonize_resource(obs)[0])

    draft = workflow.import_csv(seeded, V2, url=LAB_MAP, version="2.0.0", title="TT-201 lab map v2")
    assert draft["status"] == "draft" and draft["version"] == "2.0.0" and draft["id"]
    assert len(audits(seeded, "import")) == 1
    assert audits(seeded, "import")[0]["entity"][0]["what"]["reference"] == f"ConceptMap/{draft['id']}"
    with pytest.raises(Conflict):
        workflow.import_csv(seeded, V2, url=LAB_MAP, version="2.0.0")

    active = workflow.active_version(seeded, LAB_MAP)
    d = workflow.diff(active, draft)
    assert d["removed"] == [{"system": EDC_LAB, "code": "LAB-EGFR",
                             "before": [{"system": LOINC, "code": "62238-1", "equivalence": "equivalent"}]}]
    assert [c["code"] for c in d["changed"]] == ["LAB-FPG", "LAB-HBA1C"]
    assert d["added"] == [] and d["unchanged"] == 0

    p = workflow.preview(seeded, draft["id"])
    by_code = {c["code"]: c for c in p["codes"]}
    assert set(by_code) == {"LAB-FPG", "LAB-EGFR"}  # HbA1c's added coding (4548-4) does not change
    assert by_code["LAB-FPG"]["resources"]["Observation"]["count"] == 2
    assert len(by_code["LAB-FPG"]["resources"]["Observation"]["examples"]) == 2
    assert by_code["LAB-EGFR"]["resources"]["Observation"]["count"] == 1
    assert by_code["LAB-EGFR"]["after"] == []
    assert p["total"] == 3

    published = workflow.publish(seeded, draft["id"])
    assert published["status"] == "active"
    assert workflow.active_version(seeded, LAB_MAP)["version"] == "2.0.0"
    assert seeded.read("ConceptMap", active["id"])["status"] == "retired"
    assert len(audits(seeded, "publish")) == 1
    # ingest now follows version 2
    harmonizer = workflow.active_harmonizer(seeded)
    out, warnings = harmonize_resource(observation(EDC_LAB, "LAB-EGFR", 80, "mL/min/{1.73_m2}"), harmonizer=harmonizer)
    assert warnings and warnings[0]["details"]["coding"][0]["code"] == "unmapped-code"
    with pytest.raises(Unprocessable):
        workflow.publish(seeded, draft["id"])  # no longer a draft

    back = workflow.rollback(seeded, LAB_MAP)
    assert back["version"] == "1.0.0" and back["status"] == "active"
    assert seeded.read("ConceptMap", draft["id"])["status"] == "retired"
    assert len(audits(seeded, "rollback")) == 1
    out, warnings = harmonize_resource(observation(EDC_LAB, "LAB-EGFR", 80, "mL/min/{1.73_m2}"),
                                       harmonizer=workflow.active_harmonizer(seeded))
    assert warnings == [] and out["code"]["coding"][1]["code"] == "62238-1"
    with pytest.raises(Unprocessable):
        workflow.rollback(seeded, LAB_MAP)  # 1.0.0 is the first published version


def test_publish_is_all_or_nothing(seeded):
    draft = workflow.import_csv(seeded, V2, url=LAB_MAP, version="2.0.0")
    active = workflow.active_version(seeded, LAB_MAP)
    # someone changed the active version since it was read: the transaction's If-Match fails
    stale = dict(active)
    seeded.update("ConceptMap", active["id"], {**{k: v for k, v in active.items() if k != "meta"}, "title": "edited"})
    entries = [workflow._put(seeded.read("ConceptMap", draft["id"]), status="active"), workflow._put(stale, status="retired")]
    with pytest.raises(PreconditionFailed):
        seeded.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert seeded.read("ConceptMap", draft["id"])["status"] == "draft"
    assert workflow.active_version(seeded, LAB_MAP)["id"] == active["id"]


def test_import_concept_map_json(seeded, concept_maps):
    mdc = next(m for m in concept_maps if m["url"].endswith("mdc-to-loinc"))
    new = {**mdc, "version": "1.1.0", "status": "active"}
    draft = workflow.import_concept_map(seeded, new)
    assert draft["status"] == "draft" and draft["id"] != mdc["id"]
    broken = {**mdc, "version": "1.2.0"}
    broken["group"] = [{**mdc["group"][0], "element": [{"code": "188736", "target": [{"code": "29463-8", "equivalence": "equivalent"}]}]}]
    with pytest.raises(InvalidRequest) as info:
        workflow.import_concept_map(seeded, broken)
    assert info.value.to_outcome()["issue"][1]["expression"] == ["ConceptMap.group[0].element[0].target[0]"]


def test_transaction_ingest_with_the_harmonization_hook(seeded):
    """The hook as the transaction layer will call it: harmonize, apply atomically, attach warnings."""
    from terminology.harmonize import UnmappedReport, attach_outcomes, harmonize_bundle

    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": observation(EDC_LAB, "LAB-FPG", 7.0, "mmol/L"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": observation(EDC_LAB, "LAB-XYZ", 1, "mg/dL"), "request": {"method": "POST", "url": "Observation"}}]}
    report = UnmappedReport()
    ready, warnings = harmonize_bundle(bundle, harmonizer=workflow.active_harmonizer(seeded), report=report)
    response = attach_outcomes(seeded.transaction(ready), warnings)
    assert "outcome" not in response["entry"][0]["response"]
    outcome = response["entry"][1]["response"]["outcome"]
    assert outcome["issue"][0]["severity"] == "warning" and "LAB-XYZ" in outcome["issue"][0]["diagnostics"]
    assert report.to_dict()["unmapped"][0]["code"] == "LAB-XYZ"
    stored = seeded.search("Observation", [("code", f"{LOINC}|1558-6")]).matches
    assert len(stored) == 1 and stored[0]["valueQuantity"]["value"] == 126.1092  # 7.0 * 18.0156
    # the local coding is kept, so the resource is still found by its EDC code
    assert seeded.search("Observation", [("code", f"{EDC_LAB}|LAB-FPG")]).total == 1
