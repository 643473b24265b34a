"""A versioned TrialTwin model (learned or mechanistic) as a FHIR Device, created once per name and version.

RiskAssessments, forecasts and Provenance point at this Device so a result names the exact model it came from.
"""
from __future__ import annotations

from fhir_ops.errors import FhirError
from fhir_ops.store.base import Store
from terminology.catalog import TRIALTWIN_CS

__all__ = ["ensure_model_device", "model_device_identifier", "MODEL_IDENTIFIER_SYSTEM",
           "MODEL_DEVICE_PROFILE", "SHA256_IDENTIFIER_SYSTEM", "find_model_device", "with_lifecycle_status",
           "LIFECYCLE_PROPERTY"]

MODEL_DEVICE_PROFILE = "https://trialtwin.org/fhir/StructureDefinition/twin-model-device"
#: identifier system of model Devices; the value is ``<name>@<version>``
MODEL_IDENTIFIER_SYSTEM = "https://trialtwin.org/fhir/sid/model"
#: identifier system carrying the sha256 of the model file, when there is one
SHA256_IDENTIFIER_SYSTEM = "https://trialtwin.org/fhir/sid/model-sha256"


def model_device_identifier(name: str, version: str) -> dict:
    """The business identifier that makes a model Device unique: ``{system, value: "name@version"}``.

    Examples
    --------
    >>> model_device_identifier("dropout", "1.0.0")["value"]
    'dropout@1.0.0'
    """
    return {"system": MODEL_IDENTIFIER_SYSTEM, "value": f"{name}@{version}"}


def ensure_model_device(store: Store, name: str, version: str, sha256: str | None = None,
                        description: str = "TrialTwin model") -> dict:
    """Return the stored Device for model ``name`` at ``version``, creating it on first use.

    The Device conforms to the ``twin-model-device`` profile. It is created with a conditional
    create (``If-None-Exist: identifier=<system>|<name>@<version>``), so concurrent callers and
    re-runs share one Device per model version and never create a second one.

    Parameters
    ----------
    store : Store
        Where the Device lives.
    name, version : str
        The model's registry name and version (``"dropout"``, ``"1.0.0"``).
    sha256 : str, optional
        Hex digest of the model file; stored as a second identifier so a reader can check the bytes.
    description : str
        Human-readable note (``Device.note``): what the model predicts or simulates.

    Returns
    -------
    dict
        The stored Device (with ``id`` and ``meta.versionId``).

    Raises
    ------
    FhirError
        500 ``model-device-mismatch`` when a Device with this name and version exists but records a
        different sha256: the registry and the store disagree about what the model is.

    Examples
    --------
    >>> from fhir_ops.store.sqlite import SQLiteStore   # doctest: +SKIP
    >>> device = ensure_model_device(SQLiteStore(":memory:"), "dropout", "1.0.0")   # doctest: +SKIP
    >>> device["version"][0]["value"]   # doctest: +SKIP
    '1.0.0'
    """
    if not name or not version:
        raise ValueError("a model Device needs a name and a version")
    ident = model_device_identifier(name, version)
    identifiers = [ident]
    if sha256:
        identifiers.append({"system": SHA256_IDENTIFIER_SYSTEM, "value": sha256})
    device = {
        "resourceType": "Device",
        "meta": {"profile": [MODEL_DEVICE_PROFILE]},
        "identifier": identifiers,
        "status": "active",
        "deviceName": [{"name": name, "type": "model-name"}],
        "type": {"coding": [{"system": TRIALTWIN_CS, "code": "twin-model", "display": "Digital twin model"}],
                 "text": "TrialTwin model"},
        "version": [{"value": version}],
        "note": [{"text": description}],
    }
    result = store.create(device, if_none_exist=f"identifier={ident['system']}|{ident['value']}")
    stored = result.resource
    if sha256 and not result.created:
        recorded = [i.get("value") for i in stored.get("identifier", []) if i.get("system") == SHA256_IDENTIFIER_SYSTEM]
        if recorded and sha256 not in recorded:
            raise FhirError(f"Device/{stored['id']} records model {name}@{version} with sha256 {recorded[0]}, but the "
                            f"registry's file has {sha256}: the model changed without a new version",
                            status=500, code="exception", error_id="model-device-mismatch")
    return stored


#: Device.property (by type text) holding a learned model version's lifecycle status: shadow, active,
#: rejected, retired (the learning loop, ``$train-model`` / ``$promote-model``)
LIFECYCLE_PROPERTY = "lifecycle status"


def find_model_device(store: Store, name: str, version: str) -> dict | None:
    """The stored Device of model ``name`` at ``version``, or None."""
    ident = model_device_identifier(name, version)
    found = store.search_all("Device", [("identifier", f"{ident['system']}|{ident['value']}")])
    return found[0] if found else None


def with_lifecycle_status(device: dict, status: str) -> dict:
    """A copy of ``device`` (for an update) whose lifecycle-status property says ``status``.

    Examples
    --------
    >>> stored = {"resourceType": "Device", "id": "d", "meta": {"versionId": "2", "profile": [MODEL_DEVICE_PROFILE]}}
    >>> d = with_lifecycle_status(stored, "retired")
    >>> d["property"][0]["valueCode"], d["meta"] == {"profile": [MODEL_DEVICE_PROFILE]}
    ([{'text': 'retired'}], True)
    """
    out = {k: v for k, v in device.items() if k != "meta"}  # the store sets versionId and lastUpdated
    profile = (device.get("meta") or {}).get("profile")
    if profile:
        out["meta"] = {"profile": profile}
    kept = [p for p in device.get("property", []) if (p.get("type") or {}).get("text") != LIFECYCLE_PROPERTY]
    out["property"] = [{"type": {"text": LIFECYCLE_PROPERTY}, "valueCode": [{"text": status}]}] + kept
    return out
