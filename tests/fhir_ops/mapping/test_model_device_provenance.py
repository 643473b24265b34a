"""The shared pieces for computed resources: one model Device per name and version, and twin Provenance."""
from __future__ import annotations

import pytest

from fhir_ops.conformance import check
from fhir_ops.errors import FhirError
from fhir_ops.mapping.model_device import ensure_model_device
from fhir_ops.mapping.provenance import SERVER_AGENT, build_provenance, requesting_agent
from fhir_ops.store.sqlite import SQLiteStore

pytestmark = pytest.mark.unit


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "store.sqlite")
    yield s
    s.close()


def test_model_device_is_created_once_per_name_and_version(store):
    first = ensure_model_device(store, "dropout", "1.0.0", sha256="ab" * 32, description="risk model")
    again = ensure_model_device(store, "dropout", "1.0.0", sha256="ab" * 32)
    other = ensure_model_device(store, "dropout", "1.1.0")
    assert check(first) == [] and check(other) == []
    assert again["id"] == first["id"] and again["meta"]["versionId"] == first["meta"]["versionId"] == "1"
    assert other["id"] != first["id"]
    assert len(store.search_all("Device", [])) == 2
    assert first["deviceName"] == [{"name": "dropout", "type": "model-name"}]
    assert first["version"] == [{"value": "1.0.0"}]


def test_model_device_refuses_changed_bytes_under_the_same_version(store):
    ensure_model_device(store, "dropout", "1.0.0", sha256="ab" * 32)
    with pytest.raises(FhirError) as err:
        ensure_model_device(store, "dropout", "1.0.0", sha256="cd" * 32)
    assert (err.value.status, err.value.error_id) == (500, "model-device-mismatch")


def test_provenance_conforms_and_names_model_inputs_and_agent(store):
    device = ensure_model_device(store, "dropout", "1.0.0")
    prov = build_provenance(["RiskAssessment/r1/_history/1", "Task/t1/_history/3"],
                            ["Patient/p1/_history/2", "Appointment/a1/_history/1", "Patient/p1/_history/2"],
                            device, requesting_agent({"x-requesting-agent": "Practitioner/c7"}), "$predict-dropout")
    assert check(prov) == []
    assert [t["reference"] for t in prov["target"]] == ["RiskAssessment/r1/_history/1", "Task/t1/_history/3"]
    assert [e["what"]["reference"] for e in prov["entity"]] == ["Patient/p1/_history/2", "Appointment/a1/_history/1"]
    agents = {a["type"]["coding"][0]["code"]: a["who"] for a in prov["agent"]}
    assert agents["assembler"]["reference"] == f"Device/{device['id']}/_history/1"
    assert agents["author"]["reference"] == "Practitioner/c7"
    assert build_provenance(["Task/t/_history/1"], ["Patient/p/_history/1"], device, None, "x")["agent"][1]["who"] \
        == SERVER_AGENT


@pytest.mark.parametrize("targets, inputs", [([], ["Patient/p/_history/1"]), (["Task/t/_history/1"], []),
                                             (["Task/t"], ["Patient/p/_history/1"])])
def test_provenance_needs_versioned_targets_and_inputs(store, targets, inputs):
    device = ensure_model_device(store, "dropout", "1.0.0")
    with pytest.raises(ValueError):
        build_provenance(targets, inputs, device, None, "x")


def test_requesting_agent_defaults():
    assert requesting_agent({}, "Device/site-gateway") == {"reference": "Device/site-gateway"}
    assert requesting_agent(None) == SERVER_AGENT
