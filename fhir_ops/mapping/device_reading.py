"""Device readings (IEEE 11073 PHD gateway Observations): the identity of a reading and its checks.

A reading is one device's value of one code at one instant; that triple, with the instant in UTC to
the millisecond, is its identifier, so a reading sent again is recognised wherever it comes from.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from fhir_ops.errors import InvalidRequest

READING_SYSTEM = "https://trialtwin.org/fhir/sid/device-reading"


def instant(resource: dict) -> datetime | None:
    """The reading's effective instant (``effectiveDateTime``/``effectiveInstant``/``effectivePeriod.start``)."""
    text = resource.get("effectiveInstant") or resource.get("effectiveDateTime") or \
        (resource.get("effectivePeriod") or {}).get("start")
    if not isinstance(text, str) or "T" not in text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.astimezone(timezone.utc) if when.tzinfo else None


def reading_key(resource: dict, where: str) -> tuple[str, str, datetime]:
    """(device reference, first coding as system|code, instant); ``InvalidRequest`` naming what is missing."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Observation":
        raise InvalidRequest(f"{where}: a reading is an Observation", error_id="not-a-reading", expression=[where])
    device = (resource.get("device") or {}).get("reference")
    if not isinstance(device, str) or not device:
        raise InvalidRequest(f"{where}: Observation.device is required (the reading's device)",
                             error_id="reading-without-device", expression=[f"{where}.device"])
    subject = (resource.get("subject") or {}).get("reference")
    if not isinstance(subject, str) or not subject.startswith("Patient/"):
        raise InvalidRequest(f"{where}: Observation.subject must reference the Patient",
                             error_id="reading-without-subject", expression=[f"{where}.subject"])
    codings = (resource.get("code") or {}).get("coding") or []
    if not codings or not codings[0].get("code"):
        raise InvalidRequest(f"{where}: Observation.code.coding is required", error_id="reading-without-code",
                             expression=[f"{where}.code"])
    when = instant(resource)
    if when is None:
        raise InvalidRequest(f"{where}: an effective instant with time zone is required (effectiveDateTime)",
                             error_id="reading-without-instant", expression=[f"{where}.effective[x]"])
    if "valueQuantity" not in resource and "component" not in resource:
        raise InvalidRequest(f"{where}: a reading has valueQuantity or component", error_id="reading-without-value",
                             expression=[f"{where}.value[x]"])
    return device, f"{codings[0].get('system', '')}|{codings[0]['code']}", when


def identifier_value(key: tuple[str, str, datetime]) -> str:
    device, code, when = key
    return f"{device}|{code}|{when.strftime('%Y-%m-%dT%H:%M:%S.')}{when.microsecond // 1000:03d}Z"


def reading_id(identifier: str) -> str:
    """The resource id of a reading: a digest of its identifier (FHIR ids are at most 64 characters)."""
    return "reading-" + hashlib.sha256(identifier.encode()).hexdigest()[:40]


def with_identifier(resource: dict, key: tuple[str, str, datetime]) -> dict:
    """A copy carrying the reading identifier (replacing one of the same system)."""
    idents = [i for i in resource.get("identifier") or [] if i.get("system") != READING_SYSTEM]
    return {**resource, "identifier": [*idents, {"system": READING_SYSTEM, "value": identifier_value(key)}]}


__all__ = ["READING_SYSTEM", "identifier_value", "reading_id", "instant", "reading_key", "with_identifier"]
