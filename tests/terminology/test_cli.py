"""``trialtwin terminology`` end to end on a real data directory: import, diff, preview, publish, rollback."""
from __future__ import annotations

import json

import pytest

from fhir_ops.store.sqlite import SQLiteStore
from fhir_ops.cli import main

pytestmark = pytest.mark.unit
EDC_LAB = "https://trialtwin.org/fhir/CodeSystem/edc-lab"
LAB_MAP = "https://trialtwin.org/fhir/ConceptMap/edc-lab-to-loinc"


def cli(capsys, data_dir, *argv):
    code = main(["terminology", "--data-dir", str(data_dir), "--user", "alice", *argv])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def test_workflow_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "data"
    code, seeded, _ = cli(capsys, data, "seed")
    assert code == 0 and len(seeded) == 3
    csv_file = tmp_path / "lab-v2.csv"
    csv_file.write_text("source_system,source_code,target_system,target_code,equivalence\n"
                        f"{EDC_LAB},LAB-HBA1C,http://loinc.org,4548-4,equivalent\n"
                        f"{EDC_LAB},LAB-FPG,http://loinc.org,1558-6,equivalent\n"
                        f"{EDC_LAB},LAB-EGFR,http://loinc.org,62238-1,equivalent\n"
                        f"{EDC_LAB},LAB-FPG,http://loinc.org,99999-1,equivalent\n")
    code, _, err = cli(capsys, data, "import", str(csv_file), "--url", LAB_MAP, "--version", "2.0.0")
    assert code == 1 and "line 5" in err and "99999-1" in err
    csv_file.write_text(csv_file.read_text().replace("99999-1", "14771-0"))
    code, draft, _ = cli(capsys, data, "import", str(csv_file), "--url", LAB_MAP, "--version", "2.0.0")
    assert code == 0 and draft["status"] == "draft" and draft["rows"] == 4
    code, diff, _ = cli(capsys, data, "diff", draft["id"])
    assert [c["code"] for c in diff["changed"]] == ["LAB-FPG", "LAB-HBA1C"]
    code, preview, _ = cli(capsys, data, "preview", draft["id"])
    assert code == 0 and preview["total"] == 0 and [c["code"] for c in preview["codes"]] == ["LAB-FPG"]
    code, published, _ = cli(capsys, data, "publish", draft["id"])
    assert published["status"] == "active"
    code, back, _ = cli(capsys, data, "rollback", LAB_MAP)
    assert back["version"] == "1.0.0"
    code, versions, _ = cli(capsys, data, "versions", LAB_MAP)
    assert [(v["version"], v["status"]) for v in versions] == [("1.0.0", "active"), ("2.0.0", "retired")]
    store = SQLiteStore(str(data / "trialtwin.sqlite"))
    try:
        audits = store.search("AuditEvent", [("_count", "50")]).matches
        assert sorted(a["subtype"][0]["code"] for a in audits) == ["import", "publish", "rollback"]
        assert {a["agent"][0]["who"]["display"] for a in audits} == {"alice"}
    finally:
        store.close()


def test_bulk_ndjson_load_is_harmonized_and_reports_unmapped_codes(tmp_path, capsys):
    data = tmp_path / "data"
    lines = [
        {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": EDC_LAB, "code": "LAB-FPG"}]},
         "valueQuantity": {"value": 6.1, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}},
        {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": EDC_LAB, "code": "LAB-LDL"}]}},
        # not an exact repeat of the line above: identical id-less lines are one resource (content id)
        {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": EDC_LAB, "code": "LAB-LDL"}]},
         "effectiveDateTime": "2024-01-02"},
    ]
    path = tmp_path / "obs.ndjson"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["load", str(path), "--data-dir", str(data)]) == 0
    err = capsys.readouterr().err
    assert f"{EDC_LAB}|LAB-LDL: 2 coding(s) in Observation" in err
    code, report, _ = cli(capsys, data, "unmapped")
    assert code == 0 and report == {"unmapped": [{"system": EDC_LAB, "code": "LAB-LDL", "display": None, "count": 2,
                                                  "resourceTypes": ["Observation"]}]}
    store = SQLiteStore(str(data / "trialtwin.sqlite"))
    try:
        (fpg,) = store.search("Observation", [("code", "http://loinc.org|1558-6")]).matches
        assert fpg["valueQuantity"]["value"] == 109.89516  # 6.1 * 18.0156
    finally:
        store.close()
