"""Open mHealth (IEEE 1752.1) data points to FHIR device-reading Observations.

Blood pressure, heart rate, body weight and step count, as consumer devices and their apps export
them. The Observations come out in the shape a PHD gateway sends (MDC or LOINC code, UCUM unit,
Observation.device, an effective instant or period), so ``$ingest-readings`` applies the same
duplicate, ordering, lateness and unit rules to both.
"""
from __future__ import annotations

from fhir_ops.errors import InvalidRequest
from terminology.catalog import LOINC, MDC, UCUM

OMH_SCHEMA_SYSTEM = "https://w3id.org/openmhealth/schemas"

#: the OMH unit value sets (closed lists in the schemas) as UCUM codes
UNITS = {"beats/min": "/min", "mmHg": "mm[Hg]", "kPa": "kPa", "kg": "kg", "g": "g", "lb": "[lb_av]",
         "oz": "[oz_av]", "steps": "{steps}"}
#: schema name -> (code system, code, value property) for the one-value schemas
SINGLE = {"heart-rate": (MDC, "147842", "heart_rate"),
          "body-weight": (MDC, "188736", "body_weight"),
          "step-count": (LOINC, "55423-8", "step_count")}
#: blood pressure: the MDC compound and its parts
BLOOD_PRESSURE = (MDC, "150020", (("systolic_blood_pressure", "150021"), ("diastolic_blood_pressure", "150022")))
NAMESPACES = ("omh", "ieee")


def _bad(where: str, message: str, field: str = "", error_id: str = "invalid-open-mhealth") -> InvalidRequest:
    return InvalidRequest(f"{where}{'.' + field if field else ''}: {message}", error_id=error_id,
                          expression=[f"{where}{'.' + field if field else ''}"])


def _quantity(value, where: str, field: str, default_unit: str | None = None) -> dict:
    """An OMH unit-value (``{"value": 72, "unit": "beats/min"}``, or a bare number where the schema has one)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and default_unit:
        number, unit = value, default_unit
    elif isinstance(value, dict):
        number, unit = value.get("value"), value.get("unit")
    else:
        raise _bad(where, "a value with its unit is required", field)
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        raise _bad(where, f"value {number!r} is not a number", f"{field}.value")
    if unit not in UNITS:
        raise _bad(where, f"unit {unit!r} is not one of the schema's ({', '.join(UNITS)})", f"{field}.unit",
                   error_id="unit-not-convertible")
    return {"value": number, "unit": unit, "system": UCUM, "code": UNITS[unit]}


def _effective(body: dict, where: str) -> dict:
    frame = body.get("effective_time_frame")
    if not isinstance(frame, dict):
        raise _bad(where, "effective_time_frame is required", "body.effective_time_frame",
                   error_id="reading-without-instant")
    if isinstance(frame.get("date_time"), str):
        return {"effectiveDateTime": frame["date_time"]}
    interval = frame.get("time_interval")
    if isinstance(interval, dict) and isinstance(interval.get("start_date_time"), str):
        period = {"start": interval["start_date_time"]}
        if isinstance(interval.get("end_date_time"), str):
            period["end"] = interval["end_date_time"]
        return {"effectivePeriod": period}
    raise _bad(where, "effective_time_frame needs date_time or time_interval.start_date_time",
               "body.effective_time_frame", error_id="reading-without-instant")


def schema_name(point: dict, where: str) -> str:
    """The data point's schema name (``heart-rate``), from ``header.schema_id``."""
    header = point.get("header") if isinstance(point, dict) else None
    schema = (header or {}).get("schema_id") if isinstance(header, dict) else None
    if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
        raise _bad(where, "header.schema_id.name is required (an Open mHealth data point)", "header.schema_id")
    if schema.get("namespace") not in NAMESPACES:
        raise _bad(where, f"schema namespace {schema.get('namespace')!r} is not taken here (omh, ieee)",
                   "header.schema_id.namespace")
    return schema["name"]


def to_observation(point: dict, subject: dict, device: dict, where: str) -> dict:
    """One data point as one device-reading Observation; ``InvalidRequest`` naming what is wrong.

    Examples
    --------
    >>> obs = to_observation({"header": {"schema_id": {"namespace": "omh", "name": "heart-rate", "version": "1.0"}},
    ...     "body": {"heart_rate": {"value": 61, "unit": "beats/min"},
    ...              "effective_time_frame": {"date_time": "2026-11-01T07:00:00Z"}}},
    ...     {"reference": "Patient/p1"}, {"reference": "Device/hr-1"}, "openMHealth[0]")
    >>> obs["code"]["coding"][0]["code"], obs["valueQuantity"]["code"]
    ('147842', '/min')
    """
    name = schema_name(point, where)
    body = point.get("body")
    if not isinstance(body, dict):
        raise _bad(where, "body is required", "body")
    header = point["header"]
    obs = {"resourceType": "Observation", "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                     "code": "activity" if name == "step-count" else "vital-signs"}]}],
           "subject": subject, "device": device, **_effective(body, where)}
    version = header["schema_id"].get("version")
    obs["meta"] = {"tag": [{"system": OMH_SCHEMA_SYSTEM, "code": f"{header['schema_id']['namespace']}:{name}"
                            + (f":{version}" if version else "")}]}
    if isinstance(header.get("id") or header.get("uuid"), str):
        obs["identifier"] = [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{header.get('id') or header['uuid']}"}
                             if _is_uuid(header.get("id") or header["uuid"]) else
                             {"system": f"{OMH_SCHEMA_SYSTEM}/data-point-id", "value": header.get("id") or header["uuid"]}]
    if name in SINGLE:
        system, code, field = SINGLE[name]
        obs["code"] = {"coding": [{"system": system, "code": code}]}
        obs["valueQuantity"] = _quantity(body.get(field), where, f"body.{field}",
                                         default_unit="steps" if name == "step-count" else None)
        return obs
    if name == "blood-pressure":
        system, code, parts = BLOOD_PRESSURE
        obs["code"] = {"coding": [{"system": system, "code": code}]}
        obs["component"] = [{"code": {"coding": [{"system": MDC, "code": part_code}]},
                             "valueQuantity": _quantity(body.get(field), where, f"body.{field}")}
                            for field, part_code in parts]
        return obs
    raise _bad(where, f"schema {name!r} is not taken here ({', '.join([*SINGLE, 'blood-pressure'])})",
               "header.schema_id.name", error_id="unsupported-schema")


def _is_uuid(text: str) -> bool:
    import uuid

    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return len(text) == 36


__all__ = ["BLOOD_PRESSURE", "SINGLE", "UNITS", "schema_name", "to_observation"]
