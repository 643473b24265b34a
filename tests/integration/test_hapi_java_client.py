"""HAPI FHIR's Java generic client against TrialTwin's embedded server: what outside Java clients send.

``org.trialtwin.hapi.ClientConformance`` (hapi/, built with the pinned HAPI version by scripts/hapi.sh)
does a conditional create twice, pages instance, type and system history five versions at a time, and
runs a typed chained search, all with HAPI's own client code; this test serves a fresh embedded store
on loopback, runs it, and judges the answers.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from urllib.parse import unquote
from pathlib import Path

import pytest

from fhir_ops.app import create_app
from tests.app_config import open_config
from tests.live_server import serve

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JAR = ROOT / "hapi" / "target" / "trialtwin-hapi.jar"
LAUNCHER = "org.springframework.boot.loader.launch.PropertiesLauncher"


@pytest.fixture(scope="module")
def java_client_report(tmp_path_factory):
    if shutil.which("java") is None or not JAR.is_file():
        pytest.fail(f"HAPI's Java client needs java and {JAR.relative_to(ROOT)}: run `scripts/hapi.sh build` "
                    "(scripts/test.sh builds it for the integration tier)", pytrace=False)
    app = create_app(open_config(DATA_DIR=str(tmp_path_factory.mktemp("java-client"))))
    tag = uuid.uuid4().hex[:12]
    try:
        with serve(app) as base:
            run = subprocess.run(["java", "-Xmx512m", "-XX:TieredStopAtLevel=1", "-cp", str(JAR),
                                  "-Dloader.main=org.trialtwin.hapi.ClientConformance", LAUNCHER,
                                  f"{base}/fhir", tag],
                                 capture_output=True, text=True, timeout=600)
    finally:
        app.extensions["trialtwin.store"].close()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    line = next(l for l in reversed(run.stdout.splitlines()) if l.startswith("{"))
    return {"base": base + "/fhir", **json.loads(line)}


def test_conditional_create_with_the_absolute_if_none_exist_it_sends(java_client_report):
    r = java_client_report
    sent = [s for s in r["requests"] if "If-None-Exist:" in s]
    # absolute, with the client's own _format and the identifier percent-encoded
    assert len(sent) == 2 and all(f"If-None-Exist: {r['base']}/Patient?" in s and "identifier=urn%3Atrialtwin" in s
                                  for s in sent), sent
    assert r["conditional_first_created"] and not r["conditional_second_created"] and r["conditional_same_id"]
    assert r["conditional_matches"] == 1


@pytest.mark.parametrize("level", ["instance_history", "type_history", "system_history"])
def test_history_paged_by_the_client_has_every_version_and_the_full_total(java_client_report, level):
    # Read after the conditional Patient's create and 7 updates, before anything else is written: at
    # every level the history holds exactly those 8 versions, so 5 + 3 over two pages.
    pages = java_client_report[level]
    assert pages["totals"] == [8, 8], pages
    assert pages["sizes"] == [5, 3] and pages["distinct"] == 8, pages


def test_typed_chained_search_as_the_client_spells_it(java_client_report):
    r = java_client_report
    searches = [unquote(s) for s in r["requests"] if s.startswith("GET") and "/Observation?" in s]
    assert any("subject:Patient.gender=female" in s for s in searches), searches
    assert (r["chained_total"], r["chained_entries"]) == (2, 2)
