"""Bulk load: parallel workers, resume after SIGKILL without duplicates, id-less lines, $import manifests."""
from __future__ import annotations

import json
import math

import pytest

from fhir_ops.cli import main
from tests.fhir_ops.load_crash import check_store, run_load, write_corpus

pytestmark = pytest.mark.api


def test_load_killed_three_times_then_resumed_stores_each_resource_once(tmp_path):
    corpus = write_corpus(tmp_path / "crash.ndjson", 20_000)
    data = tmp_path / "data"
    batch_size = 250
    runs = [run_load(corpus.path, data, workers=2, batch_size=batch_size, kill_after=10) for _ in range(3)]
    assert all(r["killed"] and r["returncode"] < 0 for r in runs), [r["stderr_tail"] for r in runs]
    final = run_load(corpus.path, data, workers=2, batch_size=batch_size, kill_after=None)
    assert final["returncode"] == 0, final["stderr_tail"]
    # the killed runs stored batches that the last run skipped instead of loading again
    assert final["skipped"] is not None and final["skipped"].split()[1] != "0", final["skipped"]
    result = check_store(data / "trialtwin.sqlite", corpus)
    assert result["integrity_check"] == "ok"
    assert result["duplicate_keys"] == 0 and result["explicit_ids_missing"] == 0
    assert result["idless_stored"] == result["idless_expected"]
    assert result["resources"] == corpus.unique
    assert result["journal_batches"] == math.ceil(corpus.lines / batch_size)


def test_reloading_idless_ndjson_keeps_one_copy_and_says_so(tmp_path, capsys):
    lines = [{"resourceType": "Patient", "gender": "female", "birthDate": f"1970-01-{d:02d}"} for d in range(1, 21)]
    path = tmp_path / "idless.ndjson"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = str(tmp_path / "data")
    assert main(["load", str(path), "--data-dir", data, "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "lines 1-8 stored (8 resources)" in err and "lines 17-20 stored (4 resources)" in err
    assert main(["load", str(path), "--data-dir", data, "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    assert "3 batches (20 lines) already stored by an earlier run, skipped" in captured.err
    # another batch size: other batch keys, so every line is sent again; PUT at the content id keeps one copy
    assert main(["load", str(path), "--data-dir", data, "--batch-size", "5"]) == 0
    from tests.fhir_ops.test_cli import stored

    assert stored(tmp_path / "data", "Patient").total == 20


def test_parallel_workers_stop_at_a_bad_batch_and_name_it(tmp_path, capsys):
    rows = [json.dumps({"resourceType": "Patient", "id": f"p{i}", "gender": "male"}) for i in range(60)]
    rows[44] = json.dumps({"resourceType": "Patient", "id": "p44", "gender": "male", "birthDate": "1970-13-01"})
    path = tmp_path / "p.ndjson"
    path.write_text("\n".join(rows) + "\n")
    assert main(["load", str(path), "--data-dir", str(tmp_path / "data"), "--batch-size", "10",
                 "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "lines 41-50 rejected, nothing of it stored" in err and "birthDate" in err
    from tests.fhir_ops.test_cli import stored

    ids = {r["id"] for r in stored(tmp_path / "data", "Patient").matches}
    assert not ids & {f"p{i}" for i in range(40, 50)}  # the bad batch is atomic
    assert {f"p{i}" for i in range(40)} <= ids


def test_bulk_export_manifest_and_import_parameters(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "Patient.ndjson").write_text(
        "\n".join(json.dumps({"resourceType": "Patient", "id": f"m{i}"}) for i in range(3)) + "\n")
    (tmp_path / "in" / "Observation.ndjson").write_text(json.dumps({
        "resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient/m1"}}) + "\n")
    manifest = {"transactionTime": "2024-01-01T00:00:00Z", "request": "http://x/fhir/$export",
                "requiresAccessToken": False, "error": [],
                "output": [{"type": "Patient", "url": "in/Patient.ndjson"},
                           {"type": "Observation", "url": (tmp_path / "in" / "Observation.ndjson").as_uri()}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    data = str(tmp_path / "data")
    assert main(["load", str(tmp_path / "manifest.json"), "--data-dir", data]) == 0
    assert "4 resources loaded" in capsys.readouterr().out
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "inputFormat", "valueCode": "application/fhir+ndjson"},
        {"name": "input", "part": [{"name": "type", "valueCode": "Observation"},
                                   {"name": "url", "valueUri": "in/Patient.ndjson"}]}]}
    (tmp_path / "import.json").write_text(json.dumps(params))
    assert main(["load", str(tmp_path / "import.json"), "--data-dir", str(tmp_path / "d2")]) == 1
    err = capsys.readouterr().err
    assert "line 1: a Patient in an input the manifest declares as Observation" in err
    remote = {"output": [{"type": "Patient", "url": "https://example.org/Patient.ndjson"}]}
    (tmp_path / "remote.json").write_text(json.dumps(remote))
    assert main(["load", str(tmp_path / "remote.json"), "--data-dir", str(tmp_path / "d3")]) == 1
    assert "is remote" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_load_options_are_refused(tmp_path, capsys, argv, message):
    path = tmp_path / "p.ndjson"
    path.write_text(json.dumps({"resourceType": "Patient"}) + "\n")
    assert main(["load", str(path), "--data-dir", str(tmp_path / "data"), *argv]) == 1
    assert message in capsys.readouterr().err


def test_manifest_naming_a_missing_file_or_no_url_is_an_error(tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps({"output": [{"type": "Patient", "url": "nope.ndjson"}]}))
    assert main(["load", str(tmp_path / "m.json"), "--data-dir", str(tmp_path / "d")]) == 1
    assert "nope.ndjson does not exist" in capsys.readouterr().err
    (tmp_path / "m2.json").write_text(json.dumps({"output": [{"type": "Patient"}]}))
    assert main(["load", str(tmp_path / "m2.json"), "--data-dir", str(tmp_path / "d")]) == 1
    assert "manifest input 0 has no url" in capsys.readouterr().err
