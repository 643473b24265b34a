"""trialtwin model validate|publish, load --format nonmem and export --format nonmem on a temp data dir."""
from __future__ import annotations

import csv
import io
import json
from importlib import resources

import pytest

from fhir_ops.cli import main
from inference import model_definition as md
from tests.fhir_ops.test_cli import stored

pytestmark = pytest.mark.api

DATA = resources.files("inference").joinpath("data")


def rows(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def test_model_validate_reports_every_problem_with_its_path(tmp_path, capsys):
    assert main(["model", "validate", "theophylline"]) == 0
    assert "valid model definition https://trialtwin.org/fhir/Library/theophylline-1cmt-oral|1.1.0" in capsys.readouterr().out
    raw = md.shipped_definition("theophylline")
    raw["pk"]["compartments"] = 4
    raw["outputs"][0]["observation"]["unit"] = "kg"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    assert main(["model", "validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "$.pk.compartments: 4-compartment models are not supported" in err
    assert "$.outputs[0].observation.unit: observations in 'kg' do not convert" in err


def test_model_publish_refuses_a_bad_definition_and_changed_content(tmp_path, capsys):
    raw = md.shipped_definition("theophylline")
    raw["pk"]["parameters"]["KA"] = "NOPE"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    assert main(["model", "publish", str(path), "--data-dir", str(tmp_path / "d")]) == 1
    assert "$.pk.parameters.KA: unknown parameter 'NOPE'" in capsys.readouterr().err
    assert stored(tmp_path / "d", "Library").total == 0
    assert main(["model", "publish", "theophylline", "--data-dir", str(tmp_path / "d")]) == 0
    changed = md.shipped_definition("theophylline")
    changed["description"] = "edited without a new version"
    path.write_text(json.dumps(changed))
    assert main(["model", "publish", str(path), "--data-dir", str(tmp_path / "d")]) == 1
    assert "immutable" in capsys.readouterr().err


def test_load_nonmem_with_a_bad_row_loads_nothing(tmp_path, capsys):
    text = DATA.joinpath("theoph_nonmem.csv").read_text("utf-8").replace("12,0,.,320.65,1,1,1", "12,0,.,0,1,1,1")
    assert "12,0,.,0,1,1,1" in text
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    code = main(["load", "--format", "nonmem", str(bad), "--mapping", str(DATA.joinpath("theoph_nonmem.map.json")),
                 "--data-dir", str(tmp_path / "d")])
    assert code == 1
    err = capsys.readouterr().err
    line = next(i for i, row in enumerate(text.splitlines(), start=1) if row.startswith("12,0,.,0,1"))
    assert f"line {line}: EVID=1 (dose) but AMT is 0" in err
    for kind in ("Patient", "ResearchStudy", "Observation", "MedicationAdministration"):
        assert stored(tmp_path / "d", kind).total == 0


@pytest.mark.parametrize("find, replace, message", [
    ("1,0,.,319.99,1,1,1", ",0,.,319.99,1,1,1", "missing ID"),                      # no ID on a dose row
    ("1,0.25,2.84,0,0,0,2", "1,0.25,2.84,100,0,0,2", "EVID=0 (observation) but AMT=100"),
    ("1,0,.,319.99,1,1,1", "1,0,.,.,1,1,1", "EVID=1 (dose) but AMT is missing"),
])
def test_load_nonmem_contradictions_are_named_by_line_and_load_nothing(tmp_path, capsys, find, replace, message):
    text = DATA.joinpath("theoph_nonmem.csv").read_text("utf-8")
    assert text.count(find) == 1, find
    bad = tmp_path / "bad.csv"
    bad.write_text(text.replace(find, replace))
    assert main(["load", "--format", "nonmem", str(bad), "--mapping", str(DATA.joinpath("theoph_nonmem.map.json")),
                 "--data-dir", str(tmp_path / "d")]) == 1
    line = next(i for i, row in enumerate(text.splitlines(), start=1) if row.startswith(find))
    assert f"line {line}: {message}" in capsys.readouterr().err
    for kind in ("Patient", "ResearchStudy", "Observation", "MedicationAdministration"):
        assert stored(tmp_path / "d", kind).total == 0


def test_load_nonmem_with_units_the_studys_model_contradicts_loads_nothing(tmp_path, capsys):
    """The mapping's study names the theophylline definition: concentrations mapped in kg, or doses in mL,
    contradict its mg/L and mg; the load is refused naming the mapping entry, nothing stored."""
    mapping = json.loads(DATA.joinpath("theoph_nonmem.map.json").read_text("utf-8"))
    mapping["observations"][0]["unit"] = "kg"
    mapping["doses"][0]["unit"] = "mL"
    path = tmp_path / "bad.map.json"
    path.write_text(json.dumps(mapping))
    assert main(["load", "--format", "nonmem", str(DATA.joinpath("theoph_nonmem.csv")), "--mapping", str(path),
                 "--data-dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "mapping: observations[0].unit 'kg' does not convert to 'mg/L', the unit of output 'concentration'" in err
    assert "mapping: doses[0].unit 'mL' does not convert to 'mg'" in err
    for kind in ("Patient", "ResearchStudy", "Observation"):
        assert stored(tmp_path / "d", kind).total == 0


def test_load_then_export_round_trips_theoph(tmp_path, capsys):
    mapping = str(DATA.joinpath("theoph_nonmem.map.json"))
    source = DATA.joinpath("theoph_nonmem.csv").read_text("utf-8")
    assert main(["load", "--format", "nonmem", str(DATA.joinpath("theoph_nonmem.csv")), "--mapping", mapping,
                 "--data-dir", str(tmp_path / "d")]) == 0
    assert stored(tmp_path / "d", "Patient").total == 12
    assert stored(tmp_path / "d", "Observation", ("code", "http://loinc.org|4049-3")).total == 132
    study = stored(tmp_path / "d", "ResearchStudy").matches[0]
    assert study["extension"][0]["valueCanonical"].endswith("theophylline-1cmt-oral|1.1.0")
    out = tmp_path / "out.csv"
    assert main(["export", "--format", "nonmem", "--mapping", mapping, "--data-dir", str(tmp_path / "d"),
                 "-o", str(out)]) == 0
    before, after = rows(source), rows(out.read_text())
    assert len(after) == len(before) == 144
    for a, b in zip(before, after):
        assert a["ID"] == b["ID"] and a["EVID"] == b["EVID"] and a["CMT"] == b["CMT"]
        for col in ("TIME", "AMT", "WT") + (("DV",) if a["EVID"] == "0" else ()):
            assert float(a[col]) == pytest.approx(float(b[col]), abs=1e-9), (a, b)
