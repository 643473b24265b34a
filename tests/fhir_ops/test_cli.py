"""The trialtwin CLI: load (Bundles, resources, NDJSON, errors) into a temp data dir or over HTTP; demo."""
from __future__ import annotations

import json

import pytest

from fhir_ops.app import create_app, get_store
from fhir_ops.cli import build_parser, main
from tests.app_config import open_config
from tests.live_server import serve

pytestmark = pytest.mark.api


def stored(data_dir, resource_type, *params):
    app = create_app(open_config(DATA_DIR=str(data_dir)))
    with app.app_context():
        store = get_store()
        try:
            return store.search(resource_type, [*params, ("_count", "1000")])
        finally:
            store.close()


def patient(i, birth="1970-01-01"):
    return {"resourceType": "Patient", "id": f"p{i}", "birthDate": birth, "gender": "female"}


def write_ndjson(path, resources, bad_line=None):
    lines = [json.dumps(r) for r in resources]
    if bad_line is not None:
        lines[bad_line - 1] = '{"resourceType": "Patient", "id": '
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_subcommands_are_registered():
    parser = build_parser()
    args = parser.parse_args(["serve", "--port", "9000", "--data-dir", "/tmp/x"])
    assert (args.command, args.port, args.host, args.data_dir) == ("serve", 9000, "127.0.0.1", "/tmp/x")
    args = parser.parse_args(["demo", "--participants", "20", "--seed", "3"])
    assert (args.participants, args.seed) == (20, 3)
    assert parser.parse_args(["load", "a.json", "b.ndjson", "--url", "http://h/fhir"]).files == ["a.json", "b.ndjson"]


def test_load_transaction_bundle_with_urn_references(tmp_path, capsys):
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:7f0c6d8e-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "gender": "male"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final",
                      "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                      "subject": {"reference": "urn:uuid:7f0c6d8e-0000-4000-8000-000000000001"},
                      "valueQuantity": {"value": 7.1, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}},
         "request": {"method": "POST", "url": "Observation"}}]}
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    assert main(["load", str(path), "--data-dir", str(tmp_path / "data")]) == 0
    assert "2 resources loaded" in capsys.readouterr().out
    obs = stored(tmp_path / "data", "Observation").matches
    pid = stored(tmp_path / "data", "Patient").matches[0]["id"]
    assert obs[0]["subject"]["reference"] == f"Patient/{pid}"


def test_load_plain_resource_twice_keeps_one(tmp_path):
    path = tmp_path / "patient.json"
    path.write_text(json.dumps(patient(1)))
    for _ in range(2):
        assert main(["load", str(path), "--data-dir", str(tmp_path / "data")]) == 0
    assert stored(tmp_path / "data", "Patient").total == 1


def test_load_ndjson_in_batched_transactions(tmp_path, capsys):
    path = write_ndjson(tmp_path / "patients.ndjson", [patient(i) for i in range(25)])
    assert main(["load", str(path), "--data-dir", str(tmp_path / "data"), "--batch-size", "10"]) == 0
    assert "25 resources loaded" in capsys.readouterr().out
    assert stored(tmp_path / "data", "Patient").total == 25


def test_ndjson_bad_json_line_is_named_and_earlier_batches_stay(tmp_path, capsys):
    path = write_ndjson(tmp_path / "p.ndjson", [patient(i) for i in range(25)], bad_line=15)
    assert main(["load", str(path), "--data-dir", str(tmp_path / "data"), "--batch-size", "10"]) == 1
    err = capsys.readouterr().err
    assert "line 15: invalid JSON" in err and "p.ndjson" in err
    assert stored(tmp_path / "data", "Patient").total == 10


def test_ndjson_invalid_resource_rejects_its_batch_only(tmp_path, capsys):
    resources = [patient(i) for i in range(25)]
    resources[11] = patient(11, birth="1970-13-01")
    path = write_ndjson(tmp_path / "p.ndjson", resources)
    assert main(["load", str(path), "--data-dir", str(tmp_path / "data"), "--batch-size", "10"]) == 1
    err = capsys.readouterr().err
    assert "lines 11-20 rejected" in err and "birthDate" in err
    assert stored(tmp_path / "data", "Patient").total == 10  # lines 1-10; 11-20 atomic; stopped


def test_batch_bundle_reports_failed_entries(tmp_path, capsys):
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient(1), "request": {"method": "PUT", "url": "Patient/p1"}},
        {"resource": patient(2, birth="not a date"), "request": {"method": "PUT", "url": "Patient/p2"}}]}
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(bundle))
    assert main(["load", str(path), "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert "1 entries failed" in err and "entry[1]" in err
    assert stored(tmp_path / "data", "Patient").total == 1


@pytest.mark.parametrize("content, message", [
    ("{oops", "invalid JSON"),
    ('{"resourceType": "Bundle", "type": "document"}', "cannot be loaded"),
    ('["not", "a", "resource"]', "not a FHIR resource"),
])
def test_bad_json_files_get_clear_messages(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["load", str(path), str(tmp_path / "missing.json"), "--data-dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert f"{path}: ERROR:" in err and message in err
    assert "missing.json: ERROR: cannot read" in err


def test_load_over_http_into_a_running_server(tmp_path, capsys):
    app = create_app(open_config(DATA_DIR=str(tmp_path / "server")))
    path = write_ndjson(tmp_path / "p.ndjson", [patient(i) for i in range(5)])
    with serve(app) as base:
        assert main(["load", str(path), "--url", base + "/fhir", "--batch-size", "2"]) == 0
        import requests

        assert requests.get(base + "/fhir/Patient", params={"_summary": "count"}).json()["total"] == 5
        bad = write_ndjson(tmp_path / "bad.ndjson", [patient(9, birth="1970-13-01")])
        assert main(["load", str(bad), "--url", base + "/fhir"]) == 1
        assert "HTTP 400" in capsys.readouterr().err
    with app.app_context():
        get_store().close()


def test_demo_creates_the_study_once(tmp_path, capsys):
    from fhir_ops.demo import build_demo_resources, simulate_demo_records

    data = tmp_path / "demo"
    args = ["demo", "--no-serve", "--participants", "12", "--seed", "5", "--data-dir", str(data)]
    assert main(args) == 0
    expected = build_demo_resources(simulate_demo_records(seed=5, n=12))
    assert f"Loaded {len(expected)} resources" in capsys.readouterr().out
    assert stored(data, "ResearchSubject").total == 12
    assert stored(data, "MedicationAdministration").total == sum(
        r["resourceType"] == "MedicationAdministration" for r in expected)
    assert main(args) == 0
    assert "already present" in capsys.readouterr().out
    assert stored(data, "ResearchSubject").total == 12


def test_store_hapi_needs_a_url(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRIALTWIN_HAPI_URL", raising=False)
    assert main(["serve", "--store", "hapi", "--data-dir", str(tmp_path)]) == 1
    assert "--store hapi needs --hapi-url" in capsys.readouterr().err


def test_store_hapi_unreachable_stops_at_start_with_the_reason(tmp_path, capsys):
    with serve(create_app({"DATA_DIR": str(tmp_path / "probe"), "AUTH_MODE": "open"})) as base:
        port = base.rsplit(":", 1)[1]  # a port that was just free; nothing listens there once closed
    assert main(["demo", "--no-serve", "--store", "hapi", "--hapi-url", f"http://127.0.0.1:{port}/fhir",
                 "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"the HAPI FHIR server at http://127.0.0.1:{port}/fhir is not usable" in err
    assert "scripts/hapi.sh start" in err and "Traceback" not in err


def test_store_hapi_refuses_a_url_without_a_capability_statement(tmp_path, capsys):
    # our own server answers /fhir/metadata; below an instance path there is no CapabilityStatement
    with serve(create_app({"DATA_DIR": str(tmp_path / "other"), "AUTH_MODE": "open"})) as base:
        assert main(["serve", "--store", "hapi", "--hapi-url", base + "/fhir/Patient/x",
                     "--data-dir", str(tmp_path)]) == 1
    assert "the HAPI FHIR server at " in capsys.readouterr().err
