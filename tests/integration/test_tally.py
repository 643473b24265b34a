"""The CI evidence line: under ``pytest -n 2`` the controller names HAPI and counts every integration test.

Runs a small selection of this tier in a child pytest with xdist, as ``make test`` does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_summary_line_names_hapi_and_counts_the_tests_that_ran(hapi, tmp_path, workers):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(TRIALTWIN_HAPI_URL=hapi.base_url, TRIALTWIN_ARTIFACTS=str(tmp_path))
    # three integration tests and one embedded (unit) contract test, which must not be counted
    selection = ["tests/integration/test_profiles_hapi.py::test_uploaded_profile_accepts_a_conforming_observation",
                 "tests/integration/test_profiles_hapi.py::test_example_without_a_profile_is_reported",
                 "tests/integration/test_profiles_hapi.py::test_a_malformed_profile_is_a_load_failure",
                 "tests/fhir_ops/store/test_contract.py::test_create_assigns_id_and_version[embedded]"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, *selection],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert f"HAPI FHIR {hapi.version} at {hapi.base_url}: 3 integration tests ran" in run.stdout, run.stdout[-2000:]
    artifact = json.loads((tmp_path / "hapi-integration.json").read_text())
    assert (artifact["integration_tests_ran"], artifact["integration_tests_selected"]) == (3, 3)
    assert artifact["hapi"]["version"] == hapi.version
