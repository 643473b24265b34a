"""``$export`` and ``$deidentify`` over real HTTP on a small demo study: the Bulk Data flow (kick-off, 202,
polling with progress, manifest, NDJSON per type, DELETE), files that load back with ``trialtwin load`` to
the same counts, ``_type`` / ``_since`` / ``_typeFilter``, de-identification, consent and the bad inputs."""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import requests

from fhir_ops import jobs
from fhir_ops.app import create_app, get_store
from fhir_ops.cli import main
from fhir_ops.demo import ensure_demo_study
from fhir_ops.mapping import consent as cm
from fhir_ops.store.sqlite import SQLiteStore
from tests.app_config import open_config
from tests.fhir_ops.conftest import FhirClient, error_id
from tests.live_server import serve

pytestmark = pytest.mark.api
PARTICIPANTS = 8
KEYS = {"default": "k" * 32, "other": "o" * 32}
REPORT = "https://trialtwin.org/fhir/StructureDefinition/export-report"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data = tmp_path_factory.mktemp("export-src")
    app = create_app(open_config(DATA_DIR=str(data), DEIDENTIFY_KEYS=KEYS))
    with app.app_context():
        ensure_demo_study(get_store(), participants=PARTICIPANTS, seed=5)
    with serve(app) as base:
        yield app, FhirClient(base + "/fhir")
    jobs.manager(app).shutdown()
    app.extensions["trialtwin.store"].close()


def kick_off(fhir: FhirClient, path: str, body: dict | None = None):
    headers = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
    resp = fhir.post(path, body, headers=headers) if body is not None else fhir.get(path, headers=headers)
    assert resp.status_code == 202, resp.text
    return resp.headers["Content-Location"]


def finish(fhir: FhirClient, location: str, timeout_s: float = 300.0):
    progress = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        poll = fhir.get(location)
        if poll.status_code != 202:
            return poll, progress
        progress.append(poll.headers["X-Progress"])
        time.sleep(0.1)
    raise AssertionError(f"export {location} did not finish in {timeout_s} s")


def export(fhir: FhirClient, path: str, body: dict | None = None) -> dict:
    poll, _ = finish(fhir, kick_off(fhir, path, body))
    assert poll.status_code == 200, poll.text
    return poll.json()


def lines(fhir: FhirClient, manifest: dict) -> dict[str, list[dict]]:
    out = {}
    for item in manifest["output"]:
        resp = fhir.get(item["url"])
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/fhir+ndjson")
        out[item["type"]] = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
        assert len(out[item["type"]]) == item["count"]
        assert all(r["resourceType"] == item["type"] for r in out[item["type"]])
    return out


def store_counts(store, types) -> dict[str, int]:
    return {t: store.search(t, [("_summary", "count")]).total for t in types}


def load_back(fhir: FhirClient, manifest: dict, tmp_path) -> SQLiteStore:
    """Download the files, write a manifest naming them, and ``trialtwin load`` it into an empty data dir."""
    folder = tmp_path / "files"
    folder.mkdir()
    local = dict(manifest, output=[])
    for item in manifest["output"]:
        (folder / f"{item['type']}.ndjson").write_bytes(fhir.get(item["url"]).content)
        local["output"].append({**item, "url": f"{item['type']}.ndjson"})
    (folder / "manifest.json").write_text(json.dumps(local))
    target = tmp_path / "target"
    assert main(["load", str(folder / "manifest.json"), "--data-dir", str(target)]) == 0
    return SQLiteStore(str(target / "trialtwin.sqlite"))


def test_system_export_follows_the_bulk_data_flow_and_loads_back_to_the_same_counts(served, tmp_path):
    app, fhir = served
    location = kick_off(fhir, "$export")
    assert "/_jobs/" in location
    poll, progress = finish(fhir, location)
    assert poll.status_code == 200 and poll.headers["Content-Type"].startswith("application/json")
    manifest = poll.json()
    assert set(manifest) >= {"transactionTime", "request", "requiresAccessToken", "output", "error"}
    assert manifest["request"].endswith("/fhir/$export") and manifest["requiresAccessToken"] is False
    assert all(p.endswith("%") or "%:" in p or p in ("queued", "running") for p in progress)
    exported = {o["type"]: o["count"] for o in manifest["output"]}
    with app.app_context():
        source = store_counts(get_store(), exported)
    assert exported == source and exported["Patient"] == PARTICIPANTS
    assert exported["Consent"] == 3 * PARTICIPANTS
    lines(fhir, manifest)
    loaded = load_back(fhir, manifest, tmp_path)
    try:
        assert store_counts(loaded, exported) == exported
        assert loaded.read("Patient", "tt201-p001")["identifier"][0]["value"] == "TT201-001"
    finally:
        loaded.close()


def test_study_export_holds_its_participants_compartments_and_the_study(served, tmp_path):
    app, fhir = served
    manifest = export(fhir, "ResearchStudy/tt-201/$export")
    files = lines(fhir, manifest)
    assert [r["id"] for r in files["ResearchStudy"]] == ["tt-201"]
    assert len(files["Patient"]) == PARTICIPANTS and "Organization" not in files and "Location" not in files
    with app.app_context():
        store = get_store()
        assert len(files["Observation"]) == store.search("Observation", [("_summary", "count")]).total
    loaded = load_back(fhir, manifest, tmp_path)
    try:
        counts = {o["type"]: o["count"] for o in manifest["output"]}
        assert store_counts(loaded, counts) == counts
    finally:
        loaded.close()


def test_group_export_holds_only_its_members(served):
    _, fhir = served
    group = {"resourceType": "Group", "id": "two", "type": "person", "actual": True,
             "member": [{"entity": {"reference": "Patient/tt201-p001"}},
                        {"entity": {"reference": "ResearchSubject/tt201-rs002"}}]}
    assert fhir.put("Group/two", group).status_code in (200, 201)
    files = lines(fhir, export(fhir, "Group/two/$export"))
    assert sorted(p["id"] for p in files["Patient"]) == ["tt201-p001", "tt201-p002"]
    assert [g["id"] for g in files["Group"]] == ["two"]
    subjects = {o["subject"]["reference"] for o in files["Observation"]}
    assert subjects == {"Patient/tt201-p001", "Patient/tt201-p002"}
    # the patient parameter narrows a Group export (POST)
    body = {"resourceType": "Parameters", "parameter": [{"name": "patient",
                                                         "valueReference": {"reference": "Patient/tt201-p002"}}]}
    files = lines(fhir, export(fhir, "Group/two/$export", body))
    assert [p["id"] for p in files["Patient"]] == ["tt201-p002"]


def test_type_since_and_type_filter(served):
    _, fhir = served
    manifest = export(fhir, "Patient/$export?_type=Patient,Observation&_type=Consent")
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Observation", "Consent"}
    hba1c = "Observation?code=" + requests.utils.quote("http://loinc.org|4548-4")
    files = lines(fhir, export(fhir, f"Patient/$export?_type=Observation&_typeFilter={requests.utils.quote(hba1c)}"))
    codes = {c["code"] for o in files["Observation"] for c in o["code"]["coding"]}
    assert "4548-4" in codes and all(any(c["code"] == "4548-4" for c in o["code"]["coding"])
                                     for o in files["Observation"])
    # two filters of one type are OR-ed
    fpg = "Observation?code=" + requests.utils.quote("http://loinc.org|1558-6")
    both = lines(fhir, export(fhir, f"$export?_type=Observation&_typeFilter={requests.utils.quote(hba1c)}"
                                    f"&_typeFilter={requests.utils.quote(fpg)}"))
    assert len(both["Observation"]) > len(files["Observation"])
    # _since: only what changed after the instant (the store keeps milliseconds)
    def touch(pid):
        patient = fhir.get(f"Patient/{pid}").json()
        patient["active"] = not patient.get("active", True)
        assert fhir.put(f"Patient/{pid}", patient).status_code == 200
        return fhir.get(f"Patient/{pid}").json()["meta"]["lastUpdated"]

    first = touch("tt201-p004")
    time.sleep(0.05)
    touch("tt201-p006")
    manifest = export(fhir, "$export?_since=" + requests.utils.quote(first))
    assert {o["type"]: o["count"] for o in manifest["output"]} == {"Patient": 1}
    assert [p["id"] for p in lines(fhir, manifest)["Patient"]] == ["tt201-p006"]


def test_delete_cancels_and_removes_the_files(served):
    app, fhir = served
    location = kick_off(fhir, "$export")
    poll, _ = finish(fhir, location)
    url = poll.json()["output"][0]["url"]
    assert fhir.get(url).status_code == 200
    assert fhir.delete(location).status_code == 202
    assert fhir.get(location).status_code == 404
    assert fhir.get(url).status_code == 404
    job_id = location.rsplit("/", 1)[1]
    from fhir_ops.bulk_export import job_dir

    with app.app_context():
        import os

        assert not os.path.exists(job_dir(app, job_id))


@pytest.mark.parametrize("path, status, error", [
    ("$export?_type=Nope", 400, "unknown-type"),
    ("$export?_typeFilter=Observation%3Fnope%3D1", 400, "invalid-type-filter"),
    ("$export?_typeFilter=Observation", 400, "invalid-type-filter"),
    ("$export?_type=Patient&_typeFilter=Observation%3Fcode%3Dx", 400, "invalid-type-filter"),
    ("$export?_outputFormat=text/csv", 400, "unsupported-output-format"),
    ("$export?_since=yesterday", 400, "wrong-type"),
    ("$export?_deidentify=maybe", 400, "invalid-deidentify"),
    ("$export?_deidentify=year&_deidentifyKey=nokey", 400, "unknown-deidentify-key"),
    ("$export?_deidentify=year&_purpose=primary", 400, "invalid-purpose"),
    ("$export?_deidentifyKey=other", 400, "invalid-deidentify"),
    ("$export?bogus=1", 400, "unknown-parameter"),
    ("Group/none/$export", 404, "unknown-id"),
    ("ResearchStudy/none/$export", 404, "unknown-id"),
    ("Patient/tt201-p001/$export", 400, "operation-not-supported-here"),
    ("Group/$export", 400, "operation-not-supported-here"),
    ("Observation/$export", 400, "operation-not-supported-here"),
])
def test_bad_kick_offs_are_refused_at_once(served, path, status, error):
    _, fhir = served
    resp = fhir.get(path, headers={"Prefer": "respond-async"})
    assert resp.status_code == status, resp.text
    assert error_id(resp) == error


def test_export_without_respond_async_is_refused(served):
    _, fhir = served
    resp = fhir.get("$export")
    assert resp.status_code == 400 and error_id(resp) == "respond-async-required"
    resp = fhir.post("Group/two/$deidentify", {"resourceType": "Parameters"})
    assert resp.status_code == 400 and error_id(resp) == "respond-async-required"


def test_an_unknown_export_file_is_404(served):
    _, fhir = served
    manifest = export(fhir, "$export?_type=Patient")
    url = manifest["output"][0]["url"]
    for bad in ("Nope.ndjson", "..%2Fmanifest.json", "Patient.ndjson.bak"):
        resp = fhir.get(url.rsplit("/", 1)[0] + "/" + bad)
        assert resp.status_code == 404


def _pseudonyms(files) -> dict[str, str]:
    """Pseudonym of each participant, found through their ResearchSubject (study order is kept)."""
    return {s["period"]["start"] + s["assignedArm"]: s["individual"]["reference"] for s in files["ResearchSubject"]}


def test_deidentified_exports_are_keyed_consistent_and_load_back(served, tmp_path):
    _, fhir = served
    first = lines(fhir, export(fhir, "ResearchStudy/tt-201/$export?_deidentify=year"))
    again = export(fhir, "ResearchStudy/tt-201/$export?_deidentify=year")
    other = lines(fhir, export(fhir, "ResearchStudy/tt-201/$export?_deidentify=year&_deidentifyKey=other"))
    second = lines(fhir, again)
    ids = {p["id"] for p in first["Patient"]}
    assert ids == {p["id"] for p in second["Patient"]}  # same key: same pseudonyms in another run
    assert not ids & {p["id"] for p in other["Patient"]}  # another key: other pseudonyms
    assert not any(i.startswith("tt201") for i in ids)
    # consistent across resources: every Observation points at an exported, pseudonymized Patient
    assert {o["subject"]["reference"].split("/")[1] for o in first["Observation"]} <= ids
    assert all(len(p.get("birthDate", "")) in (0, 4) for p in first["Patient"])
    assert all(len(o["effectiveDateTime"]) in (4, 20) for o in first["Observation"])
    text = json.dumps(first)
    import re
    # every id of a participant's record is pseudonymized; the study's twin model (a conformance
    # artifact, Library tt201-twin, named by the ResearchStudy's extension) is no identifier
    leaked = set(re.findall(r"tt201-[a-z0-9-]+", text, flags=re.I)) - {"tt201-twin"}
    assert not leaked, leaked
    report = again["extension"][REPORT]["deidentification"]
    assert report["changes"]["ids-pseudonymized"] > 0 and report["keyName"] == "default"
    assert "k" * 32 not in json.dumps(again)
    loaded = load_back(fhir, again, tmp_path)  # still valid R4: the receiving server stores every line
    try:
        counts = {o["type"]: o["count"] for o in again["output"]}
        assert store_counts(loaded, counts) == counts
    finally:
        loaded.close()


def test_shifted_export_keeps_each_participants_intervals(served):
    _, fhir = served
    from datetime import date

    plain = lines(fhir, export(fhir, "ResearchStudy/tt-201/$export?_type=ResearchSubject,Encounter"
                                     "&_purpose=secondary"))  # the same participants as the shifted export
    shifted = lines(fhir, export(fhir, "ResearchStudy/tt-201/$export?_type=ResearchSubject,Encounter"
                                       "&_deidentify=shift"))
    # participants are matched through their enrolment order within arms: compare the intervals instead
    def intervals(files):
        by_patient: dict[str, list[date]] = {}
        for e in files["Encounter"]:
            by_patient.setdefault(e["subject"]["reference"], []).append(date.fromisoformat(e["period"]["start"][:10]))
        return sorted(tuple((d - min(ds)).days for d in sorted(ds)) for ds in by_patient.values())

    assert intervals(plain) == intervals(shifted)
    starts = sorted(s["period"]["start"] for s in plain["ResearchSubject"])
    moved = sorted(s["period"]["start"] for s in shifted["ResearchSubject"])
    assert starts != moved


def test_secondary_use_withdrawal_leaves_a_participant_out_of_secondary_exports_only(served):
    _, fhir = served
    consent = cm.consent_resource("tt201-p005-consent-secondary-use", "tt201-p005", cm.SECONDARY_USE, "2026-02-01",
                                  withdrawn_on="2026-11-01")
    assert fhir.put(f"Consent/{consent['id']}", consent).status_code in (200, 201)
    try:
        primary = lines(fhir, export(fhir, "ResearchStudy/tt-201/$export?_type=Patient,Observation"))
        secondary = export(fhir, "ResearchStudy/tt-201/$export?_type=Patient,Observation&_purpose=secondary")
        files = lines(fhir, secondary)
        assert "tt201-p005" in {p["id"] for p in primary["Patient"]}
        assert "tt201-p005" not in {p["id"] for p in files["Patient"]}
        assert not any(o["subject"]["reference"] == "Patient/tt201-p005" for o in files["Observation"])
        report = secondary["extension"][REPORT]
        assert any("Patient/tt201-p005" in r and "Consent/tt201-p005-consent-secondary-use/_history/" in r
                   for r in report["consentWithdrawals"])
        deid = export(fhir, "ResearchStudy/tt-201/$deidentify?_type=Patient")
        kept = Counter(p["id"] for p in lines(fhir, deid)["Patient"])
        withdrawn_before = sum(1 for c in lines(fhir, export(fhir, "Patient/$export?_type=Consent"))["Consent"]
                               if cm.consent_kind(c) == cm.SECONDARY_USE and cm.is_withdrawn(c))
        assert sum(kept.values()) == PARTICIPANTS - withdrawn_before
        assert deid["extension"][REPORT]["consentWithdrawnParticipants"] == withdrawn_before
    finally:
        consent = cm.consent_resource(consent["id"], "tt201-p005", cm.SECONDARY_USE, "2026-02-01")
        assert fhir.put(f"Consent/{consent['id']}", consent).status_code == 200


def test_group_deidentify_is_the_keyed_shifted_export_of_its_members(served):
    _, fhir = served
    group = {"resourceType": "Group", "id": "pair", "type": "person", "actual": True,
             "member": [{"entity": {"reference": "Patient/tt201-p001"}},
                        {"entity": {"reference": "Patient/tt201-p002"}}]}
    assert fhir.put("Group/pair", group).status_code in (200, 201)
    body = {"resourceType": "Parameters", "parameter": [{"name": "dateMode", "valueCode": "shift"},
                                                        {"name": "key", "valueString": "other"},
                                                        {"name": "_type", "valueString": "Patient,Encounter"}]}
    manifest = export(fhir, "Group/pair/$deidentify", body)
    assert manifest["request"].endswith("/Group/pair/$deidentify")
    report = manifest["extension"][REPORT]["deidentification"]
    assert report["dateMode"] == "shift" and report["keyName"] == "other" and report["changes"]["dates-shifted"] > 0
    files = lines(fhir, manifest)
    same = lines(fhir, export(fhir, "Group/pair/$export?_type=Patient,Encounter&_deidentify=shift"
                                    "&_deidentifyKey=other"))
    assert files == same
    assert fhir.get("metadata").json()["instantiates"] == [
        "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"]
    resp = fhir.post("Group/pair/$deidentify", {"resourceType": "Parameters", "parameter": [
        {"name": "dateMode", "valueCode": "month"}]}, headers={"Prefer": "respond-async"})
    assert resp.status_code == 400 and error_id(resp) == "invalid-deidentify"
