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
def _plan(resource_type: str) -> dict[str, tuple]:
    """Per type, keyed by a path's first element: (param key, search type, path, targets, single) tuples.

    Keyed by the top element because a resource carries few of its type's elements: walking the
    resource's own keys touches only the parameters that can match, instead of every parameter.
    ``single`` marks a parameter with one one-element path, whose values need no de-duplication
    across paths.
    """
    plan: dict[str, list] = {}
    for p in search_parameters_for(resource_type):
        if p.name in COLUMN_PARAMS:
            continue
        paths = tuple(tuple(x.split(".")) for x in p.paths)
        single = len(paths) == 1 and len(paths[0]) == 1
        for parts in paths:
            plan.setdefault(parts[0], []).append((f"{resource_type}.{p.name}", p.type, parts, frozenset(p.targets),
                                                  single))
    return {top: tuple(entries) for top, entries in plan.items()}


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


_KINDS = ("token", "reference", "date", "string", "quantity", "number", "uri")

# References repeat (every result of a participant names the same Patient; subject and patient index
# the same element), so their split is remembered; bounded, and only str references are passed in.
_split_reference = lru_cache(maxsize=8192)(split_reference)


def _rows_of(kind: str, key: str, v, targets) -> list[tuple]:
    """The index rows (without row id) of one value found at a parameter's path."""
    if kind == "token":
        return [(key, s, c) for s, c in _tokens(v)]
    if kind == "reference":
        ref = v.get("reference") if isinstance(v, dict) else v if isinstance(v, str) else None
        if not isinstance(ref, str) or ref.startswith("#"):
            return []
        rtype, rid = split_reference(ref)
        if targets and rtype not in targets:
            return []
        return [(key, rtype, rid)]
    if kind == "date":
        return [(key, lo, hi) for lo, hi in _dates(v)]
    if kind == "string":
        return [(key, normalize_string(s), s) for s in _strings(v)]
    if kind == "quantity":
        if not isinstance(v, dict) or not isinstance(v.get("value"), (int, float)):
            return []
        return [(key, float(v["value"]), v.get("system"), v.get("code") or v.get("unit"))]
    if kind == "number":
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return []
        return [(key, float(v))]
    if not isinstance(v, str):  # uri
        return []
    return [(key, v)]


def _extract(resource: dict, out: dict[str, list], prefix: tuple) -> None:
    """Append every index row of ``resource``, prefixed by ``prefix`` (the row id or nothing), to ``out``.

    The common value shapes (a code string, a CodeableConcept, a reference, a dateTime string) are
    handled inline: this runs for every resource written, and calls dominate its cost.
    """
    plan = _plan(resource["resourceType"])
    seen: dict[str, set] | None = None
    for top_key, top in resource.items():
        entries = plan.get(top_key)
        if entries is None or top is None:
            continue
        top_is_list = isinstance(top, list)
        for key, kind, parts, targets, single in entries:
            if len(parts) == 1:
                found = top if top_is_list else (top,)
            else:
                found = _values(top, parts, 1)
            rows = out[kind]
            for v in found:
                if kind == "token":
                    if isinstance(v, str):
                        new = ((key, None, v),)
                    elif isinstance(v, dict) and "coding" in v:
                        new = [(key, c.get("system"), str(c["code"])) for c in v["coding"]
                               if isinstance(c, dict) and c.get("code") is not None]
                    else:
                        new = [(key, s, c) for s, c in _tokens(v)]
                elif kind == "reference":
                    ref = v.get("reference") if isinstance(v, dict) else v if isinstance(v, str) else None
                    if not isinstance(ref, str) or ref.startswith("#"):
                        continue
                    rtype, rid = _split_reference(ref)
                    if targets and rtype not in targets:
                        continue
                    new = ((key, rtype, rid),)
                elif kind == "date" and isinstance(v, str):
                    rng = date_range(v)
                    if rng is None:
                        continue
                    new = ((key, rng[0], rng[1]),)
                else:
                    new = _rows_of(kind, key, v, targets)
                if not new:
                    continue
                if single and len(new) == 1 and (not top_is_list or len(top) == 1):
                    rows.append(prefix + new[0])  # one value of a one-path parameter cannot repeat itself
                    continue
                if seen is None:
                    seen = {}
                done = seen.get(key)
                if done is None:
                    done = seen[key] = set()
                for row in new:
                    if row not in done:
                        done.add(row)
                        rows.append(prefix + row)


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
    out: dict[str, list[tuple]] = {k: [] for k in _KINDS}
    _extract(resource, out, ())
    return out


def index_rows_many(items) -> tuple[dict[str, list[tuple]], dict[str, float]]:
    """Index rows of many resources in one pass, ready for one ``executemany`` per table.

    Parameters
    ----------
    items : iterable of (int, dict)
        (row id, resource) pairs, e.g. every resource a transaction writes.

    Returns
    -------
    rows : dict
        Index table kind -> rows with the row id first, e.g. ``(rid, param, system, code)``.
    widths : dict
        Per date parameter, the widest ``high - low`` seen (the store keeps the maximum per
        parameter to bound date range scans).

    Examples
    --------
    >>> rows, widths = index_rows_many([(7, {"resourceType": "Observation", "status": "final"})])
    >>> rows["token"], widths
    ([(7, 'Observation.status', None, 'final')], {})
    """
    out: dict[str, list[tuple]] = {k: [] for k in _KINDS}
    for rowid, resource in items:
        _extract(resource, out, (rowid,))
    widths: dict[str, float] = {}
    for _, key, low, high in out["date"]:
        if high - low > widths.get(key, -1.0):
            widths[key] = high - low
    return out, widths
