"""The same data on the embedded store and on HAPI give the same twin: calibration and forecasts agree.

The stores differ in how they answer (ids of new resources, meta.source, search paging), never in what
the operations compute from what they read.
"""
from __future__ import annotations

import uuid

import pytest

from fhir_ops.app import create_app
from fhir_ops.store.remote import RemoteStore
from fhir_ops.store.sqlite import SQLiteStore
from tests.fhir_ops.conftest import FhirClient
from tests.fhir_ops.store.test_operations_contract import _load_demo
from tests.live_server import serve

pytestmark = pytest.mark.integration


def _twin_outputs(store, data_dir, tag: str) -> tuple[list, list]:
    app = create_app({"STORE": store, "DATA_DIR": str(data_dir), "AUTH_MODE": "open"})
    with serve(app) as base:
        client = FhirClient(base + "/fhir")
        pid = _load_demo(client, tag)
        calibrated = client.post(f"Patient/{pid}/$calibrate", {"resourceType": "Parameters", "parameter": []})
        assert calibrated.status_code == 200, calibrated.text
        simulated = client.post(f"Patient/{pid}/$simulate", {"resourceType": "Parameters", "parameter": [
            {"name": "seed", "valueInteger": 5}, {"name": "horizonDays", "valueInteger": 14}]})
        assert simulated.status_code == 200, simulated.text
        client.http.close()
    posterior = [p["part"] for p in calibrated.json()["parameter"] if p["name"] == "parameter"]
    forecast = [p["part"] for p in simulated.json()["parameter"] if p["name"] == "forecast"]
    return posterior, forecast


def test_calibration_and_forecast_are_identical_on_both_stores(hapi, tmp_path):
    tag = f"eq{uuid.uuid4().hex[:8]}"  # the same ids on both stores; new to HAPI
    embedded = SQLiteStore(tmp_path / "embedded.sqlite")
    remote = RemoteStore(hapi.base_url)
    try:
        on_embedded = _twin_outputs(embedded, tmp_path / "e", tag)
        on_hapi = _twin_outputs(remote, tmp_path / "h", tag)
    finally:
        embedded.close()
        remote.close()
    assert on_embedded[0] and on_embedded[1]
    # bit-for-bit: the engine sees the same observations in the same order from either store
    assert on_hapi == on_embedded
