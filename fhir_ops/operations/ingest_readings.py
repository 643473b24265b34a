"""``Observation/$ingest-readings``: a batch of device readings stored once each, harmonized, counted.

Duplicates (device + code + instant) are dropped in the batch; each reading is written with PUT at an
id derived from that triple, so a batch sent twice, or two batches racing, store each reading once
(a race at worst adds a version of the same resource). Readings are written in transactions of ``CHUNK``; the answer comes after the commit.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from fhir_ops.errors import FhirError, InvalidRequest
from fhir_ops.mapping import device_reading as dr
from fhir_ops.operations.registry import OperationContext, Writes, operation
from terminology.workflow import active_harmonizer

CHUNK = 1000
ID_BATCH = 100
#: harmonizer warnings that reject a reading: a unit that cannot be brought to the canonical one
_REJECTING = {"unit-not-convertible", "missing-unit"}


@operation("OperationDefinition-ingest-readings.json", writes=Writes(("Observation",)))
def handle(ctx: OperationContext, params: dict) -> dict:
    bundle = params["readings"]
    if bundle.get("resourceType") != "Bundle":
        raise InvalidRequest("readings must be a Bundle of Observations", error_id="wrong-type",
                             expression=["readings"])
    late_after = timedelta(minutes=int(params.get("lateAfterMinutes", 60)))
    received_at = datetime.now(timezone.utc)
    harmonizer = active_harmonizer(ctx.store)
    entries = bundle.get("entry") or []
    counts = dict.fromkeys(("outOfOrder", "late", "unitConverted", "duplicates", "stored"), 0)
    issues, keyed, seen, last = [], [], set(), {}
    for i, entry in enumerate(entries):
        where = f"readings.entry[{i}].resource"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        try:
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
        if harmonized.get("valueQuantity") is not resource.get("valueQuantity") or \
                harmonized.get("component") != resource.get("component"):
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
    out = {"received": len(entries), "rejected": len(issues), **counts}
    if issues:
        out["outcome"] = {"resourceType": "OperationOutcome", "issue": issues}
    return out
