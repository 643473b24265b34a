"""``Group/[id]/$export`` with HAPI FHIR as the store: the export reads through the Store interface only, so a
Group's members' data come out of HAPI as they come out of the embedded store (and de-identified alike)."""
from __future__ import annotations

import json
import time
import uuid

import pytest

from fhir_ops import jobs
from fhir_ops.app import create_app
from tests.app_config import open_config
from tests.fhir_ops.conftest import FhirClient
from tests.live_server import serve

pytestmark = pytest.mark.integration


def _put(r):
    return {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}


def _export(fhir: FhirClient, path: str) -> dict:
    resp = fhir.get(path, headers={"Prefer": "respond-async"})
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        poll = fhir.get(resp.headers["Content-Location"])
        if poll.status_code != 202:
            assert poll.status_code == 200, poll.text
            return {o["type"]: [json.loads(x) for x in fhir.get(o["url"]).text.splitlines()]
                    for o in poll.json()["output"]}
        time.sleep(0.2)
    raise AssertionError("export did not finish")


def test_group_export_from_hapi(remote_store, tmp_path):
    tag = uuid.uuid4().hex[:10]
    pids = [f"x{tag}-{i}" for i in range(3)]
    entries = []
    for pid in pids:
        entries.append(_put({"resourceType": "Patient", "id": pid, "birthDate": "1970-02-03",
                             "name": [{"family": f"Fam{tag}"}]}))
        for k in range(2):
            entries.append(_put({"resourceType": "Observation", "id": f"{pid}-o{k}", "status": "final",
                                 "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                                 "subject": {"reference": f"Patient/{pid}"},
                                 "effectiveDateTime": f"2026-0{k + 3}-1{k}T09:00:00Z",
                                 "valueQuantity": {"value": 7.0 + k, "unit": "%", "system": "http://unitsofmeasure.org",
                                                   "code": "%"}}))
    entries.append(_put({"resourceType": "Group", "id": f"g{tag}", "type": "person", "actual": True,
                         "member": [{"entity": {"reference": f"Patient/{p}"}} for p in pids[:2]]}))
    remote_store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    app = create_app(open_config(STORE=remote_store, JOBS_DB=str(tmp_path / "jobs.sqlite"),
                                 DEIDENTIFY_KEYS={"default": "hapi-integration-key-0123"}))
    try:
        with serve(app) as base:
            fhir = FhirClient(base + "/fhir")
            files = _export(fhir, f"Group/g{tag}/$export?_type=Patient,Observation,Group")
            assert sorted(p["id"] for p in files["Patient"]) == pids[:2]
            assert sorted(o["id"] for o in files["Observation"]) == sorted(f"{p}-o{k}" for p in pids[:2] for k in (0, 1))
            assert [g["id"] for g in files["Group"]] == [f"g{tag}"]
            deid = _export(fhir, f"Group/g{tag}/$export?_type=Patient,Observation&_deidentify=year")
            text = json.dumps(deid)
            assert tag not in text and "1970-02-03" not in text and len(deid["Observation"]) == 4
    finally:
        jobs.manager(app).shutdown()
