"""Extraction of search-index rows from a resource, driven by the search parameter registry.

Runs on every write; the store inserts the rows into one index table per search type.
"""
from __future__ import annotations

from functools import lru_cache

from fhir_ops.search.registry import search_parameters_for
from fhir_ops.search.values import HIGH_INF, LOW_INF, date_range, normalize_string, split_reference

#: parameters answered from the resource table's own columns, never indexed separately
COLUMN_PARAMS = frozenset({"_id", "_lastUpdated"})
_CONTACT_SYSTEMS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})
_NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")


@lru_cache(maxsize=None)
def _plan(resource_type: str) -> tuple:
    """Per type: (param key, search type, split paths, target set) for every indexed parameter."""
    plan = []
    for p in search_parameters_for(resource_type):
        if p.name in COLUMN_PARAMS:
            continue
        plan.append((f"{resource_type}.{p.name}", p.type, tuple(tuple(x.split(".")) for x in p.paths),
                     frozenset(p.targets)))
    return tuple(plan)


def _values(node, parts: tuple[str, ...], start: int = 0):
    """Yield every value at a dotted path, walking lists transparently."""
    stack = [(node, start)]
    while stack:
        cur, i = stack.pop()
        if isinstance(cur, list):
            stack.extend((c, i) for c in reversed(cur))
            continue
        if i == len(parts):
            yield cur
            continue
        if isinstance(cur, dict):
            nxt = cur.get(parts[i])
            if nxt is not None:
                stack.append((nxt, i + 1))


def _tokens(v):
    if isinstance(v, str):
        yield None, v
    elif isinstance(v, bool):
        yield None, "true" if v else "false"
    elif isinstance(v, dict):
        if "coding" in v:  # CodeableConcept
            for c in v["coding"]:
                if isinstance(c, dict) and c.get("code") is not None:
                    yield c.get("system"), str(c["code"])
        elif "code" in v:  # Coding (or Quantity used as token)
            yield v.get("system"), str(v["code"])
        elif "value" in v:  # Identifier or ContactPoint
            system = v.get("system")
            yield (None if system in _CONTACT_SYSTEMS else system), str(v["value"])


def _strings(v):
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        parts = _NAME_PARTS if ("family" in v or "given" in v) else _ADDRESS_PARTS
        for key in parts:
            x = v.get(key)
            if isinstance(x, str):
                yield x
            elif isinstance(x, list):
                yield from (s for s in x if isinstance(s, str))


def _dates(v):
    if isinstance(v, str):
        rng = date_range(v)
        if rng:
            yield rng
    elif isinstance(v, dict):
        if "start" in v or "end" in v:  # Period
            start = date_range(v["start"]) if "start" in v else None
            end = date_range(v["end"]) if "end" in v else None
            yield (start[0] if start else LOW_INF), (end[1] if end else HIGH_INF)
        elif "event" in v:  # Timing
            for e in v["event"]:
                rng = date_range(e)
                if rng:
                    yield rng


def index_rows(resource: dict) -> dict[str, list[tuple]]:
    """Return the index rows of a resource, keyed by index table, without the row id.

    Tables and row shapes: ``token`` (param, system, code), ``reference`` (param, type, id),
    ``date`` (param, low, high), ``string`` (param, normalized, raw), ``quantity``
    (param, value, system, code), ``number`` (param, value), ``uri`` (param, value).

    Examples
    --------
    >>> rows = index_rows({"resourceType": "Observation", "status": "final",
    ...                    "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024"})
    >>> sorted(rows["reference"])
    [('Observation.patient', 'Patient', 'p1'), ('Observation.subject', 'Patient', 'p1')]
    >>> rows["token"]
    [('Observation.status', None, 'final')]
    """
    out: dict[str, list[tuple]] = {"token": [], "reference": [], "date": [], "string": [],
                                   "quantity": [], "number": [], "uri": []}
    for key, kind, paths, targets in _plan(resource["resourceType"]):
        rows = out[kind]
        seen = None
        for parts in paths:
            # most parameters are absent from a given resource: test the top element before walking
            top = resource.get(parts[0])
            if top is None:
                continue
            if len(parts) == 1:
                found = top if isinstance(top, list) else (top,)
            else:
                found = _values(top, parts, 1)
            for v in found:
                if kind == "token":
                    new = [(key, s, c) for s, c in _tokens(v)]
                elif kind == "reference":
                    ref = v.get("reference") if isinstance(v, dict) else v if isinstance(v, str) else None
                    if not isinstance(ref, str) or ref.startswith("#"):
                        continue
                    rtype, rid = split_reference(ref)
                    if targets and rtype not in targets:
                        continue
                    new = [(key, rtype, rid)]
                elif kind == "date":
                    new = [(key, lo, hi) for lo, hi in _dates(v)]
                elif kind == "string":
                    new = [(key, normalize_string(s), s) for s in _strings(v)]
                elif kind == "quantity":
                    if not isinstance(v, dict) or not isinstance(v.get("value"), (int, float)):
                        continue
                    new = [(key, float(v["value"]), v.get("system"), v.get("code") or v.get("unit"))]
                elif kind == "number":
                    if not isinstance(v, (int, float)) or isinstance(v, bool):
                        continue
                    new = [(key, float(v))]
                else:  # uri
                    if not isinstance(v, str):
                        continue
                    new = [(key, v)]
                if seen is None and len(new) == 1 and len(paths) == 1 and not isinstance(top, list) \
                        and len(parts) == 1:
                    rows.append(new[0])  # a single scalar element cannot repeat itself
                    continue
                if seen is None:
                    seen = set()
                for row in new:
                    if row not in seen:
                        seen.add(row)
                        rows.append(row)
    return out
