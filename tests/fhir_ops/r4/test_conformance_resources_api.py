"""Over HTTP: every conformance resource TrialTwin ships is readable and searchable; map versions appear too."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import profiles
from fhir_ops.shipped import CONFORMANCE_TYPES, all_shipped
from fhir_ops.validation import validate_resource
from tests.fhir_ops.conftest import error_id

pytestmark = pytest.mark.api

LAB_MAP = "https://trialtwin.org/fhir/ConceptMap/edc-lab-to-loinc"
ROOT = Path(__file__).resolve().parents[3]


def _shipped_files() -> list[dict]:
    """Every conformance resource file under profiles/ and terminology/data/ (subfolders included), found on
    disk rather than through the code that serves them: a file added anywhere there must be served."""
    files = []
    for folder in (ROOT / "profiles", ROOT / "terminology" / "data"):
        for path in sorted(folder.rglob("*.json")):
            resource = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(resource, dict) and resource.get("resourceType") in CONFORMANCE_TYPES:
                files.append(resource)
    assert any(r["id"] == "omop-to-standard" for r in files)  # the OMOP import's map, in its own folder
    return files


def _ids(bundle: dict) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


@pytest.mark.unit
def test_every_shipped_file_is_served_and_valid_r4():
    assert {(r["resourceType"], r["id"]) for r in all_shipped()} == \
        {(r["resourceType"], r["id"]) for r in _shipped_files()}
    for r in all_shipped():
        validate_resource(r)


def test_each_is_readable_and_found_by_url_version_name_and_status(fhir):
    for r in _shipped_files():
        t = r["resourceType"]
        read = fhir.get(f"{t}/{r['id']}")
        assert read.status_code == 200 and read.json()["url"] == r["url"], r["id"]
        assert read.headers["ETag"] == 'W/"1"'
        assert fhir.get(f"{t}/{r['id']}/_history/1").json()["url"] == r["url"]
        for params in ({"url": r["url"]}, {"url": r["url"], "version": r["version"]},
                       {"name": r["name"]}, {"status": r["status"], "_count": "200"}):
            assert r["id"] in _ids(fhir.get(t, params=params).json()), (t, params)
        assert r["id"] not in _ids(fhir.get(t, params={"url": r["url"], "version": "0.0.0-no"}).json())
    assert _ids(fhir.get("StructureDefinition", params={"url": f"{profiles.CANONICAL_BASE}/StructureDefinition/"
                                                               "twin-state"}).json()) == ["twin-state"]


def test_paging_counts_shipped_and_stored_together(fhir):
    stored = fhir.post("ValueSet", {"resourceType": "ValueSet", "status": "draft", "url": "http://example.org/vs",
                                    "name": "Mine"})
    assert stored.status_code == 201
    every = fhir.get("ValueSet", params={"_count": "100"}).json()
    n = len([r for r in _shipped_files() if r["resourceType"] == "ValueSet"]) + 1
    assert len(_ids(every)) == n
    seen, url = [], "ValueSet?_count=3"
    while url:
        page = fhir.get(url).json()
        seen += _ids(page)
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert sorted(seen) == sorted(_ids(every)) and len(seen) == n


def test_shipped_resources_are_read_only(fhir):
    twin_state = fhir.get("StructureDefinition/twin-state").json()
    put = fhir.put("StructureDefinition/twin-state", {**twin_state, "status": "retired"})
    assert put.status_code == 405 and error_id(put) == "read-only-resource"
    assert fhir.delete("StructureDefinition/twin-state").status_code == 405
    dup = fhir.post("StructureDefinition", {k: v for k, v in twin_state.items() if k not in ("id", "meta")})
    assert dup.status_code == 409 and error_id(dup) == "duplicate-canonical"
    tx = fhir.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "ConceptMap/edc-lab-to-loinc"}}]})
    assert tx.status_code == 405
    assert fhir.get("StructureDefinition/twin-state").json()["status"] == "active"


def test_translate_names_a_source_map_that_resolves(fhir):
    answer = fhir.get("ConceptMap/$translate", params={
        "system": "https://trialtwin.org/fhir/CodeSystem/edc-lab", "code": "LAB-HBA1C",
        "targetsystem": "http://loinc.org"}).json()
    sources = [p["valueUri"] if "valueUri" in p else p.get("valueCanonical")
               for param in answer["parameter"] if param["name"] == "match"
               for p in param["part"] if p["name"] == "source"]
    assert sources, answer
    for source in sources:
        url, _, version = source.partition("|")
        params = {"url": url, **({"version": version} if version else {})}
        found = fhir.get("ConceptMap", params=params).json()
        assert _ids(found), source


def test_map_workflow_versions_appear_with_their_status(fhir):
    shipped_map = fhir.get("ConceptMap/edc-lab-to-loinc").json()
    draft = {k: v for k, v in shipped_map.items() if k not in ("id", "meta")}
    draft["version"] = "1.1.0"
    imported = fhir.post("ConceptMap/$import-map", {"resourceType": "Parameters", "parameter": [
        {"name": "conceptMap", "resource": draft}]})
    assert imported.status_code in (200, 201), imported.text[:400]
    versions = fhir.get("ConceptMap", params={"url": LAB_MAP}).json()
    found = {(e["resource"]["version"], e["resource"]["status"]) for e in versions["entry"]
             if e["search"]["mode"] == "match"}
    assert ("1.0.0", "active") in found and ("1.1.0", "draft") in found
    only = fhir.get("ConceptMap", params={"url": LAB_MAP, "version": "1.1.0"}).json()
    assert [e["resource"]["status"] for e in only["entry"] if e["search"]["mode"] == "match"] == ["draft"]


#: canonicals in the code that are not FHIR definitions: the Bulk Data manifest's "extension" object is keyed
#: by a URL but is not a FHIR Extension
NOT_DEFINITIONS = {"https://trialtwin.org/fhir/StructureDefinition/export-report"}


@pytest.mark.unit
def test_every_definition_the_code_or_files_name_is_served():
    # A validator that resolves meta.profile, extension urls, bindings and operation definitions against the
    # server must find each TrialTwin canonical the server writes or its files reference.
    import re

    kinds = r"(?:StructureDefinition|OperationDefinition|SearchParameter|CodeSystem|ValueSet|ConceptMap)"
    pattern = re.compile(rf"https://trialtwin\.org/fhir/{kinds}/[A-Za-z0-9.\-]+")
    # a module may name a base once (CS = "https://trialtwin.org/fhir/CodeSystem/") and add the name to it
    base_constant = re.compile(rf"^(\w+)\s*=\s*\"(https://trialtwin\.org/fhir/{kinds}/)\"", re.MULTILINE)
    sources = [p for folder in ("fhir_ops", "smart_app", "terminology", "inference", "profiles")
               for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".json") and p.is_file()]
    named: dict[str, str] = {}
    for path in sources:
        text = path.read_text(encoding="utf-8", errors="ignore")
        urls = [m.group(0) for m in pattern.finditer(text)]
        for constant, base in base_constant.findall(text):
            urls += [base + name for name in re.findall(rf"\b{constant}\s*\+\s*\"([A-Za-z0-9.\-]+)\"", text)]
        for url in urls:
            named.setdefault(url.rstrip("."), str(path.relative_to(ROOT)))
    served = {r["url"] for r in all_shipped()}
    missing = {url: where for url, where in named.items() if url not in served and url not in NOT_DEFINITIONS}
    assert len(named) > 50 and not missing, missing
    # the code systems TrialTwin codes with, also where a module joins a base and a name
    code_systems = {url for url in named if "/CodeSystem/" in url}
    assert {f"{profiles.CANONICAL_BASE}/CodeSystem/{name}"
            for name in ("error", "trial-role", "edc-lab")} <= code_systems
