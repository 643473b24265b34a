"""README's performance table is exactly what bench/perf_table.py generates from bench/results/."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def _perf_table():
    spec = importlib.util.spec_from_file_location("perf_table", ROOT / "bench" / "perf_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_generated_from_the_committed_results():
    assert _perf_table().main(["--check"]) == 0


def test_every_row_has_its_result_file_and_names_a_baseline():
    perf = _perf_table()
    for what, name, fn in perf.ROWS:
        data = json.loads((perf.RESULTS / f"{name}.json").read_text())
        result, baseline = fn(data)
        assert result and baseline, what


def test_a_changed_result_changes_the_table(tmp_path, monkeypatch):
    perf = _perf_table()
    for name in {n for _, n, _ in perf.ROWS}:
        (tmp_path / f"{name}.json").write_text((perf.RESULTS / f"{name}.json").read_text())
    monkeypatch.setattr(perf, "RESULTS", tmp_path)
    before = perf.table()
    data = json.loads((tmp_path / "cohort_bench.json").read_text())
    data["vectorized"]["participant_years_per_s_wall"] = 2.5e6
    (tmp_path / "cohort_bench.json").write_text(json.dumps(data))
    after = perf.table()
    assert before != after and "2.5 × 10^6 participant-years/s" in after
