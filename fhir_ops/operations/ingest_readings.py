"""``Observation/$ingest-readings``: a batch of device readings stored once each, harmonized, counted.

Readings come as PHD-gateway Observations (``readings``) or as Open mHealth data points
(``openMHealth`` with ``subject`` and ``device``), mapped to the same Observations first
(``fhir_ops.mapping.open_mhealth``), so every rule below applies to both.

Duplicates (device + code + instant) are dropped in the batch; each reading is written with PUT at an
id derived from that triple, so a batch sent twice, or two batches racing, store each reading once
(a race at worst adds a version of the same resource). Readings are written in transactions of ``CHUNK``; the answer comes after the commit.

With ``gapAfterMinutes`` the answer also names the gaps of each stream (device + code) around the batch,
measured over the stored readings as well, so a late reading that fills a gap makes it disappear.
"""
from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timedelta, timezone

from fhir_ops.errors import FhirError, InvalidRequest
from fhir_ops.mapping import device_reading as dr
from fhir_ops.mapping import open_mhealth as omh
from fhir_ops.operations.registry import OperationContext, Writes, operation
from terminology.workflow import active_harmonizer

CHUNK = 1000
ID_BATCH = 100
#: harmonizer warnings that reject a reading: a unit that cannot be brought to the canonical one
_REJECTING = {"unit-not-convertible", "missing-unit"}


@operation("OperationDefinition-ingest-readings.json", writes=Writes(("Observation",)))
def handle(ctx: OperationContext, params: dict) -> dict:
    if "readings" not in params and "openMHealth" not in params:
        raise InvalidRequest("readings (a Bundle of Observations) or openMHealth (data points) is required",
                             error_id="missing-parameter", expression=["readings"])
    readings: list[tuple[str, object]] = []  # (where, the reading or why it is not one)
    if "readings" in params:
        bundle = params["readings"]
        if bundle.get("resourceType") != "Bundle":
            raise InvalidRequest("readings must be a Bundle of Observations", error_id="wrong-type",
                                 expression=["readings"])
        readings += [(f"readings.entry[{i}].resource", entry.get("resource") if isinstance(entry, dict) else None)
                     for i, entry in enumerate(bundle.get("entry") or [])]
    if "openMHealth" in params:
        readings += _open_mhealth(params)
    late_after = timedelta(minutes=int(params.get("lateAfterMinutes", 60)))
    gap_minutes = params.get("gapAfterMinutes")
    if gap_minutes is not None and gap_minutes < 1:
        raise InvalidRequest(f"gapAfterMinutes must be at least 1; got {gap_minutes}", error_id="gap-out-of-range",
                             expression=["gapAfterMinutes"])
    received_at = datetime.now(timezone.utc)
    harmonizer = active_harmonizer(ctx.store)
    counts = dict.fromkeys(("outOfOrder", "late", "unitConverted", "duplicates", "stored"), 0)
    issues, keyed, seen, last = [], [], set(), {}
    # only with gapAfterMinutes: per stream, the batch's instants and the participants it reads for
    streams: dict[tuple[str, str], tuple[list[datetime], set[str]]] = {}
    for where, resource in readings:
        try:
            if isinstance(resource, FhirError):  # a data point that could not be mapped
                raise resource
            key = dr.reading_key(resource, where)
        except FhirError as exc:
            issues.append(exc.issue())
            continue
        harmonized, warnings = harmonizer.harmonize(resource)
        bad = [w for w in warnings if w["details"]["coding"][0]["code"] in _REJECTING]
        if bad:
            issues.append({**bad[0], "severity": "error",
                           "expression": [f"{where}.{e.partition('.')[2]}" for e in bad[0].get("expression", [])],
                           "diagnostics": f"{where}: {bad[0]['diagnostics']}"})
            continue
        # the harmonizer hands back the very quantity it did not convert (a component that only gained
        # its LOINC coding is not a unit conversion)
        if any(a is not b for a, b in zip(_quantities(harmonized), _quantities(resource))):
            counts["unitConverted"] += 1
        ident = dr.identifier_value(key)
        if ident in seen:
            counts["duplicates"] += 1
            continue
        seen.add(ident)
        stream = key[:2]
        if stream in last and key[2] < last[stream]:
            counts["outOfOrder"] += 1
        last[stream] = max(key[2], last.get(stream, key[2]))
        if gap_minutes is not None:
            instants, subjects = streams.setdefault(stream, ([], set()))
            instants.append(key[2])
            subjects.add(resource["subject"]["reference"])
        if received_at - key[2] > late_after:
            counts["late"] += 1
        keyed.append((dr.with_identifier(harmonized, key), ident))
    for start in range(0, len(keyed), CHUNK):
        chunk = [(dr.reading_id(ident), res, ident) for res, ident in keyed[start:start + CHUNK]]
        # PUT at an id derived from the reading makes a write idempotent by construction; asking first
        # which ids exist (one search per chunk) keeps a repeat from even adding a version
        existing = set()
        for at in range(0, len(chunk), ID_BATCH):  # a search takes at most 100 values per parameter
            ids = [rid for rid, _, _ in chunk[at:at + ID_BATCH]]
            existing.update(r["id"] for r in ctx.store.search("Observation", [
                ("_id", ",".join(ids)), ("_count", str(len(ids))), ("_elements", "id")]).matches)
        fresh = [(rid, res) for rid, res, _ in chunk if rid not in existing]
        counts["duplicates"] += len(chunk) - len(fresh)
        if not fresh:
            continue
        response = ctx.store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {**res, "id": rid}, "request": {"method": "PUT", "url": f"Observation/{rid}"}}
            for rid, res in fresh]})
        created = sum(1 for e in response["entry"] if e["response"]["status"].startswith("201"))
        counts["stored"] += created
        counts["duplicates"] += len(fresh) - created  # written meanwhile by a racing batch: same resource
    out = {"received": len(readings), "rejected": len(issues), **counts}
    if gap_minutes is not None:
        gaps = _gaps(ctx.store, streams, timedelta(minutes=gap_minutes))
        out.update(gaps=len(gaps), gap=gaps)
    if issues:
        out["outcome"] = {"resourceType": "OperationOutcome", "issue": issues}
    return out


def _gaps(store, streams: dict[tuple[str, str], tuple[list[datetime], set[str]]], after: timedelta) -> list[dict]:
    """The intervals longer than ``after`` between consecutive readings of each stream that touch the batch.

    Read after the batch is committed: one search finds the stream's readings within ``after`` of the
    batch; only where none lies before (after) the batch is the nearest earlier (later) reading looked up,
    as that reading is where the gap starts (ends). Only readings of the participants the batch is for
    count: a device handed on to another participant is another stream, and the answer reveals nothing
    of anybody else's readings.
    """
    out = []
    for (device, code), (batch, subjects) in streams.items():
        first, last = min(batch), max(batch)
        base = [("device", device), ("code", code), ("subject", ",".join(sorted(subjects)))]
        near = _instants(store.search_all("Observation", base + [
            ("date", "ge" + _text(first - after)), ("date", "le" + _text(last + after))]))
        times = set(batch) | near
        if not any(t < first for t in near):
            times |= _instants(store.search("Observation", base + [
                ("date", "lt" + _text(first - after)), ("_sort", "-date"), ("_count", "1")]).matches)
        if not any(t > last for t in near):
            times |= _instants(store.search("Observation", base + [
                ("date", "gt" + _text(last + after)), ("_sort", "date"), ("_count", "1")]).matches)
        ordered = sorted(times)
        system, _, value = code.partition("|")
        coding = {"system": system, "code": value} if system else {"code": value}
        # the touch test only matters at the edges of the window, which a store may widen by its precision
        out += [{"device": {"reference": device}, "code": coding, "start": _text(start), "end": _text(end),
                 "minutes": round((end - start).total_seconds() / 60, 3)}
                for start, end in zip(ordered, ordered[1:])
                if end - start > after and end >= first and start <= last]
    return out


def _instants(found: list[dict]) -> set[datetime]:
    return {when for when in map(dr.instant, found) if when is not None}


def _text(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds" if when.microsecond else "seconds").replace("+00:00", "Z")


def _quantities(reading: dict) -> list:
    return [reading.get("valueQuantity"), *(c.get("valueQuantity") for c in reading.get("component") or [])]


def _open_mhealth(params: dict) -> list[tuple[str, object]]:
    """The data points of ``openMHealth`` as (where, Observation), or (where, the error) for a bad one.

    A body that is not a JSON array (or one data point), or missing subject/device, refuses the call
    (400); a single bad data point is rejected alone, as a bad Observation is.
    """
    attachment = params["openMHealth"]
    if attachment.get("contentType", "").split(";")[0].strip() not in ("application/json", ""):
        raise InvalidRequest("openMHealth must be application/json", error_id="wrong-type",
                             expression=["openMHealth.contentType"])
    try:
        points = json.loads(base64.b64decode(attachment.get("data") or "", validate=True))
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"openMHealth.data is not base64-encoded JSON ({exc})", error_id="invalid-json",
                             expression=["openMHealth.data"]) from None
    if isinstance(points, dict):
        points = [points]
    if not isinstance(points, list):
        raise InvalidRequest("openMHealth holds a JSON array of data points (or one data point)",
                             error_id="wrong-type", expression=["openMHealth.data"])
    subject, device = params.get("subject"), params.get("device")
    if not isinstance(subject, dict) or not str(subject.get("reference", "")).startswith("Patient/"):
        raise InvalidRequest("openMHealth needs subject, a reference to the participant's Patient",
                             error_id="reading-without-subject", expression=["subject"])
    if not isinstance(device, dict) or not device.get("reference"):
        raise InvalidRequest("openMHealth needs device, a reference to the Device that measured the data points",
                             error_id="reading-without-device", expression=["device"])
    out: list[tuple[str, object]] = []
    for i, point in enumerate(points):
        where = f"openMHealth[{i}]"
        try:
            out.append((where, omh.to_observation(point, {"reference": subject["reference"]},
                                                  {"reference": device["reference"]}, where)))
        except FhirError as exc:
            out.append((where, exc))
    return out
