"""Compilation of FHIR search query parameters into SQL over the embedded store's index tables.

The output is plain SQL fragments plus arguments; ``fhir_ops.store.sqlite`` runs them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from fhir_ops.errors import InvalidRequest
from fhir_ops.limits import MAX_OFFSET, MAX_OR_VALUES, MAX_SEARCH_PARAMS
from fhir_ops.search.extract import COLUMN_PARAMS
from fhir_ops.search.registry import search_parameter, search_parameters_for
from fhir_ops.search.values import normalize_string, parse_date_param, split_reference

DEFAULT_COUNT = 50
MAX_COUNT = 1000
#: parameters that change the presentation only and need no handling here
_PRESENTATION = frozenset({"_format", "_pretty"})
_TABLE = {"token": "idx_token", "reference": "idx_ref", "date": "idx_date", "string": "idx_string",
          "quantity": "idx_quantity", "number": "idx_number", "uri": "idx_uri"}
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_PREFIX_RE = re.compile(r"^(eq|ne|gt|lt|ge|le|sa|eb|ap)(?=[\d\-+.])")
_STRING_TOP = "\U0010ffff"
_MODIFIERS = {"token": {"not", "missing"}, "reference": {"missing"}, "date": {"missing"},
              "string": {"exact", "contains", "missing"}, "quantity": {"missing"},
              "number": {"missing"}, "uri": {"below", "missing"}}


@dataclass
class CompiledSearch:
    """A search turned into SQL.

    ``sets`` are index conditions ``(table, param key, SQL over the row, args, search type)`` that every
    match satisfies (ANDed), ``excludes`` ``(table, key, SQL, args)`` ones it must not (``:not``,
    ``:missing=true``), ``where`` conditions on the ``resources`` row itself (alias ``r``: ``_id``,
    ``_lastUpdated``).
    """

    resource_type: str
    sets: list[tuple] = field(default_factory=list)
    excludes: list[tuple] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    args: list = field(default_factory=list)
    order_by: str = "r.rid"
    count: int = DEFAULT_COUNT
    offset: int = 0
    summary_count: bool = False
    want_total: bool = True
    includes: list[tuple[list[str], str | None]] = field(default_factory=list)
    revincludes: list[tuple[list[str], str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    #: set by match_sql when the page can be cut from the index scan itself (rid order, no row conditions)
    page_match: tuple[str, list] | None = None


_RANK = {"reference-unique": 0, "reference": 0, "token-unique": 1, "token": 1, "string": 1, "uri": 1, "quantity": 2, "number": 2, "date": 3}


def match_sql(c: CompiledSearch) -> tuple[str, list, str, list]:
    """Return (WHERE clause over ``resources r``, its args, a count query, its args).

    The most selective-looking index condition (references first, dates last) drives the scan; the
    others are checked per candidate with ``EXISTS`` on the (rid, param) indexes, so no large
    intermediate set is ever materialized. Index rows exist only for the current, non-deleted
    version and carry the type in their parameter key, so pure index searches need no type filter.
    """
    if not c.sets:
        where = ["r.type = ?", "r.deleted = 0"]
        args: list = [c.resource_type]
        for table, key, cond, xs in c.excludes:
            where.append(f"NOT EXISTS (SELECT 1 FROM {table} x WHERE x.rid = r.rid AND x.param = ? AND ({cond}))")
            args += [key, *xs]
        where += c.where
        args += c.args
        clause = " AND ".join(where)
        return clause, args, f"SELECT count(*) FROM resources r WHERE {clause}", args
    ordered = sorted(c.sets, key=lambda s_: _RANK.get(s_[4], 3))
    table, key, cond, xs, kind = ordered[0]
    # a fully pinned token (system|code) or typed reference matches at most one (deduplicated) index row
    # per resource, so the driving scan needs no DISTINCT and streams in rid order from the covering index
    distinct = "" if kind in ("token-unique", "reference-unique") else "DISTINCT "
    match = f"SELECT {distinct}s.rid FROM {table} s WHERE s.param = ? AND ({cond})"
    match_args = [key, *xs]
    for table, key, cond, xs, _ in ordered[1:]:
        # INDEXED BY: per candidate, look up its own rows; never range-scan the value index again
        match += (f" AND EXISTS (SELECT 1 FROM {table} x INDEXED BY {table}_r WHERE x.rid = s.rid AND x.param = ?"
                  f" AND ({cond}))")
        match_args += [key, *xs]
    for table, key, cond, xs in c.excludes:
        match += (f" AND NOT EXISTS (SELECT 1 FROM {table} x INDEXED BY {table}_r WHERE x.rid = s.rid"
                  f" AND x.param = ? AND ({cond}))")
        match_args += [key, *xs]
    where = [f"r.rid IN ({match})", *c.where]
    args = [*match_args, *c.args]
    clause = " AND ".join(where)
    c.page_match = (match, match_args) if not c.where else None
    if not c.where:
        return clause, args, f"SELECT count(*) FROM ({match})", match_args
    return clause, args, f"SELECT count(*) FROM resources r WHERE {clause}", args


def _split_values(raw: str) -> list[str]:
    """Split on commas that are not escaped with a backslash (FHIR search value escaping).

    At most :data:`fhir_ops.limits.MAX_OR_VALUES` values: each becomes an SQL term.
    """
    if raw.count(",") >= MAX_OR_VALUES:
        parts = [p for p in raw.split(",") if p]
        if len(parts) > MAX_OR_VALUES:
            raise InvalidRequest(f"a search parameter takes at most {MAX_OR_VALUES} comma-separated values, got "
                                 f"{len(parts)}", error_id="too-many-values")
    if "\\" not in raw:  # nothing escaped (nearly every value): the same split, without the per-character loop
        return [p for p in raw.split(",") if p != ""]
    parts, cur, i = [], [], 0
    while i < len(raw):
        c = raw[i]
        if c == "\\" and i + 1 < len(raw) and raw[i + 1] in ",$|\\":
            cur.append(raw[i + 1])
            i += 2
            continue
        if c == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return [p for p in parts if p != ""]


def _split_pipe(value: str) -> list[str]:
    return re.split(r"(?<!\\)\|", value)


def _prefix(value: str) -> tuple[str, str]:
    m = _PREFIX_RE.match(value)
    return (m.group(1), value[2:]) if m else ("eq", value)


def _number(text: str, name: str) -> tuple[float, float, float]:
    """Return (value, low, high) where [low, high) is the value's implied precision range."""
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise InvalidRequest(f"search parameter {name!r}: {text!r} is not a number",
                             error_id="invalid-search-value") from None
    if not d.is_finite():
        raise InvalidRequest(f"search parameter {name!r}: {text!r} is not a finite number",
                             error_id="invalid-search-value")
    half = Decimal(5).scaleb(d.as_tuple().exponent - 1)
    return float(d), float(d - half), float(d + half)


def _number_condition(prefix: str, text: str, name: str, col: str = "value") -> tuple[str, list]:
    v, lo, hi = _number(text, name)
    if prefix == "eq":
        return f"{col} >= ? AND {col} < ?", [lo, hi]
    if prefix == "ne":
        return f"NOT ({col} >= ? AND {col} < ?)", [lo, hi]
    if prefix in ("gt", "sa"):
        return f"{col} > ?", [v]
    if prefix in ("lt", "eb"):
        return f"{col} < ?", [v]
    if prefix == "ge":
        return f"{col} >= ?", [v]
    if prefix == "le":
        return f"{col} <= ?", [v]
    # ap: within 10 % of the value, as the FHIR search page recommends
    delta = abs(v) * 0.1
    return f"{col} >= ? AND {col} <= ?", [v - delta, v + delta]


_WIDTH = "(SELECT COALESCE(MAX(w), 0) FROM date_width WHERE param = ?)"


def _date_condition(prefix: str, text: str, name: str, key: str) -> tuple[str, list]:
    """FHIR date comparison between the parameter range [pl, ph) and an indexed range [low, high).

    Each exact condition is paired with redundant bounds on ``low`` alone (using W, the widest range
    ever indexed for the parameter, so that ``high > x`` implies ``low > x - W``); those let SQLite
    answer ``ge A & lt B`` with one range scan of the (param, low) index instead of half the table.
    """
    pl, ph = parse_date_param(text, name)
    if prefix == "eq":
        return "low >= ? AND low < ? AND high <= ?", [pl, ph, ph]
    if prefix == "ne":
        return "NOT (low >= ? AND high <= ?)", [pl, ph]
    if prefix == "gt":
        return f"low > ? - {_WIDTH} AND high > ?", [ph, key, ph]
    if prefix == "lt":
        return "low < ?", [pl]
    if prefix == "ge":
        return f"low >= min(?, ? - {_WIDTH}) AND (low >= ? OR high > ?)", [pl, ph, key, pl, ph]
    if prefix == "le":
        return "low < ? AND (low < ? OR high <= ?)", [ph, pl, ph]
    if prefix == "sa":
        return "low >= ?", [ph]
    if prefix == "eb":
        return "low < ? AND high <= ?", [pl, pl]
    # ap: overlap with the parameter range widened by 10 % of its distance from now, at least a day
    import time

    widen = max(86400.0, abs(time.time() - pl) * 0.1)
    return f"low < ? AND low > ? - {_WIDTH} AND high > ?", [ph + widen, pl - widen, key, pl - widen]


def _lastupdated_condition(prefix: str, text: str) -> tuple[str, list]:
    pl, ph = parse_date_param(text, "_lastUpdated")
    col = "r.lu_ts"
    table = {"eq": (f"{col} >= ? AND {col} < ?", [pl, ph]), "ne": (f"NOT ({col} >= ? AND {col} < ?)", [pl, ph]),
             "gt": (f"{col} >= ?", [ph]), "sa": (f"{col} >= ?", [ph]), "lt": (f"{col} < ?", [pl]),
             "eb": (f"{col} < ?", [pl]), "ge": (f"{col} >= ?", [pl]), "le": (f"{col} < ?", [ph]),
             "ap": (f"{col} >= ? AND {col} < ?", [pl - 86400.0, ph + 86400.0])}
    return table[prefix]


def _value_condition(pdef, key: str, modifier: str | None, value: str, resource_type: str) -> tuple[str, list]:
    """SQL condition on one index table row (no table prefix) for one search value."""
    kind, name = pdef.type, pdef.name
    if kind == "token":
        parts = _split_pipe(value)
        if len(parts) == 1:
            return "code = ?", [parts[0]]
        system, code = parts[0], "|".join(parts[1:])
        if system == "" and code:
            return "code = ? AND system IS NULL", [code]
        if code == "":
            return "system = ?", [system]
        return "code = ? AND system = ?", [code, system]
    if kind == "reference":
        if modifier:  # a type modifier: subject:Patient=123
            return "tid = ? AND ttype = ?", [value, modifier]
        if "/" in value:
            rtype, rid = split_reference(value)
            if rtype is None:
                return "tid = ? AND ttype IS NULL", [value]
            return "tid = ? AND ttype = ?", [rid, rtype]
        return "tid = ?", [value]
    if kind == "date":
        prefix, rest = _prefix(value)
        return _date_condition(prefix, rest, name, key)
    if kind == "string":
        norm = normalize_string(value)
        if modifier == "exact":
            return "raw = ?", [value]
        if modifier == "contains":
            escaped = norm.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return "norm LIKE ? ESCAPE '\\'", [f"%{escaped}%"]
        return "norm >= ? AND norm < ?", [norm, norm + _STRING_TOP]
    if kind == "number":
        prefix, rest = _prefix(value)
        return _number_condition(prefix, rest, name)
    if kind == "quantity":
        parts = _split_pipe(value)
        prefix, rest = _prefix(parts[0])
        sql, args = _number_condition(prefix, rest, name)
        if len(parts) >= 3:
            system, code = parts[1], "|".join(parts[2:])
            if system:
                sql, args = sql + " AND system = ?", args + [system]
            if code:
                sql, args = sql + " AND code = ?", args + [code]
        elif len(parts) == 2 and parts[1]:
            sql, args = sql + " AND code = ?", args + [parts[1]]
        return sql, args
    # uri
    if modifier == "below":
        escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return "value LIKE ? ESCAPE '\\'", [escaped + "%"]
    return "value = ?", [value]


def _chain(c: CompiledSearch, resource_type: str, raw_name: str, raw_value: str, strict: bool) -> None:
    """One level of chained search: ``subject:Patient.gender=female`` or ``subject.gender=female``.

    The reference parameter's targets (the type modifier, or else every target type that has the
    chained parameter) are searched with the chained parameter; the outer resource matches when
    its reference points at one of the hits. Chains of more than one level, and modifiers on the
    chained parameter other than the ones plain searches support, are ignored (or refused when
    strict) like any other unsupported parameter.
    """
    head, _, chained = raw_name.partition(".")
    ref_name, _, type_modifier = head.partition(":")
    chained_name, _, chained_modifier = chained.partition(":")
    pdef = search_parameter(resource_type, ref_name)
    if pdef is None or pdef.type != "reference":
        _ignore_or_fail(c, raw_name, f"chains through {ref_name!r}, which is not a reference search parameter",
                        strict)
        return
    if "." in chained:
        _ignore_or_fail(c, raw_name, "chains more than one level, which is not supported", strict)
        return
    if type_modifier:
        if pdef.targets and type_modifier not in pdef.targets:
            _ignore_or_fail(c, raw_name, f"names type {type_modifier!r}, which {ref_name!r} cannot refer to", strict)
            return
        candidates = (type_modifier,)
    else:
        candidates = pdef.targets
    targets = [(t, search_parameter(t, chained_name)) for t in candidates]
    targets = [(t, d) for t, d in targets if d is not None and d.name not in ("_id", "_lastUpdated")]
    if not targets:
        _ignore_or_fail(c, raw_name, f"chains to {chained_name!r}, which is not a search parameter of "
                                     f"{' or '.join(candidates) or 'its targets'}", strict)
        return
    if chained_modifier and (chained_modifier not in _MODIFIERS[targets[0][1].type]
                             or chained_modifier in ("missing", "not")):
        _ignore_or_fail(c, raw_name, f"uses modifier :{chained_modifier} on a chained parameter, which is not "
                                     "supported", strict)
        return
    values = _split_values(raw_value)
    if not values:
        return
    conds, args = [], []
    for target, inner in targets:
        inner_key = f"{target}.{inner.name}"
        inner_conds = [_value_condition(inner, inner_key, chained_modifier or None, v, target) for v in values]
        # Unqualified columns in the value conditions resolve to the innermost table (y), as in a plain search.
        conds.append(f"(ttype = ? AND tid IN (SELECT t.id FROM resources t WHERE t.rid IN ("
                     f"SELECT y.rid FROM {_TABLE[inner.type]} y WHERE y.param = ? AND ("
                     + " OR ".join(f"({sql})" for sql, _ in inner_conds) + "))))")
        args += [target, inner_key, *(a for _, xs in inner_conds for a in xs)]
    c.sets.append(("idx_ref", f"{resource_type}.{ref_name}", " OR ".join(conds), args, "reference"))


def _ignore_or_fail(c: CompiledSearch, raw_name: str, why: str, strict: bool) -> None:
    if strict:
        raise InvalidRequest(f"search parameter {raw_name!r} {why} for {c.resource_type}",
                             error_id="unknown-search-parameter", expression=[raw_name])
    c.ignored.append(raw_name)


def _int_param(name: str, value: str, low: int) -> int:
    try:
        n = int(value)
    except ValueError:
        n = low - 1
    if n < low:
        raise InvalidRequest(f"{name} must be an integer >= {low}, got {value!r}", error_id="invalid-search-value",
                             expression=[name])
    return n


def _sort_expression(resource_type: str, spec: str, strict: bool, c: CompiledSearch) -> list[str]:
    terms = []
    if spec.count(",") >= 10:
        raise InvalidRequest("_sort takes at most 10 keys", error_id="too-many-values", expression=["_sort"])
    for item in spec.split(","):
        item = item.strip()
        desc = item.startswith("-")
        name = item[1:] if desc else item
        direction = "DESC" if desc else "ASC"
        if name == "_id":
            terms.append(f"r.id {direction}")
            continue
        if name == "_lastUpdated":
            terms.append(f"r.lu_ts {direction}")
            continue
        pdef = search_parameter(resource_type, name)
        if pdef is None or pdef.type == "reference" or pdef.type == "uri":
            _ignore_or_fail(c, f"_sort={item}", "cannot be sorted on", strict)
            continue
        key = f"{resource_type}.{name}".replace("'", "''")
        table = _TABLE[pdef.type]
        column = {"date": "low" if not desc else "high", "string": "norm", "token": "code",
                  "number": "value", "quantity": "value"}[pdef.type]
        agg = "MAX" if desc else "MIN"
        # INDEXED BY the (rid, param) index: left to itself SQLite may answer MAX(high) from the covering
        # (param, low, high) index, scanning every row of the parameter once per resource sorted (O(n^2))
        terms.append(f"(SELECT {agg}({column}) FROM {table} s INDEXED BY {table}_r WHERE s.rid = r.rid "
                     f"AND s.param = '{key}') {direction}")
    return terms


def _include_spec(resource_type: str | None, value: str, rev: bool, strict: bool,
                  c: CompiledSearch, raw: str) -> None:
    if value == "*":
        if rev:
            keys = [f"{t}.{p.name}" for t in _all_registered_types() for p in search_parameters_for(t)
                    if p.type == "reference" and (not p.targets or c.resource_type in p.targets)]
            c.revincludes.append((keys, c.resource_type))
        else:
            keys = [f"{c.resource_type}.{p.name}" for p in search_parameters_for(c.resource_type)
                    if p.type == "reference"]
            c.includes.append((keys, None))
        return
    parts = value.split(":")
    if len(parts) not in (2, 3):
        _ignore_or_fail(c, raw, "is not of the form Type:param[:target]", strict)
        return
    src, name = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    pdef = search_parameter(src, name)
    if pdef is None or pdef.type != "reference":
        _ignore_or_fail(c, raw, f"names no reference search parameter {src}:{name}", strict)
        return
    if rev:
        c.revincludes.append(([f"{src}.{name}"], c.resource_type))
    elif src != c.resource_type:
        _ignore_or_fail(c, raw, f"names type {src}, not the searched type", strict)
    else:
        c.includes.append(([f"{src}.{name}"], target))


def _all_registered_types() -> list[str]:
    from fhir_ops.search.registry import supported_search_types

    return supported_search_types()


def pinned_token(resource_type: str, params) -> tuple[str, str, str] | None:
    """``(index key, system, code)`` when ``params`` are one token search ``name=system|code`` and nothing else.

    Such a search matches exactly the resources with an ``idx_token`` row ``(key, system, code)`` —
    the condition ``compile_search`` builds for it — so a writer resolving many conditional creates
    (``identifier=system|value``) can look them up in one query. Anything else (modifiers, several
    values, escapes, an empty system or code, another parameter) returns None: compile it as usual.

    Examples
    --------
    >>> pinned_token("Observation", [("identifier", "urn:lab|42")])
    ('Observation.identifier', 'urn:lab', '42')
    >>> pinned_token("Observation", [("identifier", "urn:lab|42,urn:lab|43")]) is None
    True
    """
    if len(params) != 1:
        return None
    name, value = params[0]
    if value.count("|") != 1 or "," in value or "\\" in value:
        return None
    pdef = search_parameter(resource_type, name)  # a name with a modifier (``:``) or a chain is no parameter
    if pdef is None or pdef.type != "token" or name in COLUMN_PARAMS:
        return None
    system, code = value.split("|")
    if not system or not code:
        return None
    return f"{resource_type}.{name}", system, code


def compile_search(resource_type: str, params: list[tuple[str, str]], *, strict: bool = False) -> CompiledSearch:
    """Compile FHIR search parameters for ``resource_type`` into a :class:`CompiledSearch`.

    Repeated parameters are ANDed, comma-separated values ORed. Unknown parameters and
    unsupported modifiers are listed in ``ignored`` (or raise ``InvalidRequest`` when ``strict``);
    malformed values always raise ``InvalidRequest``.

    Examples
    --------
    >>> c = compile_search("Observation", [("code", "http://loinc.org|4548-4"), ("foo", "1")])
    >>> c.ignored, c.count
    (['foo'], 50)
    """
    c = CompiledSearch(resource_type)
    if len(params) > MAX_SEARCH_PARAMS:
        raise InvalidRequest(f"a search takes at most {MAX_SEARCH_PARAMS} parameters, got {len(params)}",
                             error_id="too-many-parameters")
    sort_terms: list[str] = []
    date_scans: dict[str, tuple[list[str], list]] = {}
    for raw_name, raw_value in params:
        if raw_name in _PRESENTATION:
            continue
        name, _, modifier = raw_name.partition(":")
        modifier = modifier or None
        if name == "_count":
            c.count = min(_int_param("_count", raw_value, 0), MAX_COUNT)
            continue
        if name == "_offset":
            c.offset = _int_param("_offset", raw_value, 0)
            if c.offset > MAX_OFFSET:
                raise InvalidRequest(f"_offset must be at most {MAX_OFFSET}, got {raw_value[:40]!r}; page with the "
                                     "links of the previous page or narrow the search", error_id="invalid-search-value",
                                     expression=["_offset"])
            continue
        if name == "_summary":
            if raw_value == "count":
                c.summary_count = True
            elif raw_value != "false":
                _ignore_or_fail(c, f"_summary={raw_value}", "is not supported (only count and false)", strict)
            continue
        if name == "_total":
            c.want_total = raw_value != "none"
            continue
        if name == "_sort":
            sort_terms.extend(_sort_expression(resource_type, raw_value, strict, c))
            continue
        if name in ("_include", "_revinclude"):
            if modifier not in (None, "iterate", "recurse"):
                _ignore_or_fail(c, raw_name, "has an unknown modifier", strict)
                continue
            _include_spec(resource_type, raw_value, name == "_revinclude", strict, c, f"{raw_name}={raw_value}")
            continue
        if "." in raw_name:
            _chain(c, resource_type, raw_name, raw_value, strict)
            continue
        pdef = search_parameter(resource_type, name)
        if pdef is None:
            _ignore_or_fail(c, raw_name, "is not a known search parameter", strict)
            continue
        if modifier and modifier not in _MODIFIERS[pdef.type] and not (
                pdef.type == "reference" and modifier[:1].isupper()):
            _ignore_or_fail(c, raw_name, f"uses modifier :{modifier}, which is not supported", strict)
            continue
        key = f"{resource_type}.{name}"
        if modifier == "missing":
            if raw_value not in ("true", "false"):
                raise InvalidRequest(f"{raw_name} must be true or false", error_id="invalid-search-value")
            if name in COLUMN_PARAMS:
                if raw_value == "true":
                    c.where.append("0")
                continue
            if raw_value == "true":
                c.excludes.append((_TABLE[pdef.type], key, "1", []))
            else:
                c.sets.append((_TABLE[pdef.type], key, "1", [], "missing"))
            continue
        values = _split_values(raw_value)
        if not values:
            continue
        if name == "_id":
            c.where.append(f"r.id IN ({','.join('?' * len(values))})")
            c.args.extend(values)
            continue
        if name == "_lastUpdated":
            conds = [_lastupdated_condition(*_prefix(v)) for v in values]
            c.where.append("(" + " OR ".join(f"({s})" for s, _ in conds) + ")")
            for _, a in conds:
                c.args.extend(a)
            continue
        table = _TABLE[pdef.type]
        negate = modifier == "not"
        conds = [_value_condition(pdef, key, None if negate else modifier, v, resource_type) for v in values]
        if pdef.type == "date" and len(conds) == 1 and not negate:
            # date=ge2024-03-01&date=lt2024-04-01: one scan of the range, as HAPI does for one value
            scan_sql, scan_args = date_scans.setdefault(key, ([], []))
            scan_sql.append(conds[0][0])
            scan_args.extend(conds[0][1])
            continue
        cond = " OR ".join(f"({sql})" for sql, _ in conds)
        args = [a for _, xs in conds for a in xs]
        if negate:
            c.excludes.append((table, key, cond, args))
        else:
            kind = pdef.type
            if len(values) == 1 and modifier is None and (
                    (kind == "token" and "|" in values[0] and not values[0].endswith("|"))
                    or (kind == "reference" and "/" in values[0] and split_reference(values[0])[0])):
                kind += "-unique"
            c.sets.append((table, key, cond, args, kind))
    for key, (sqls, args) in date_scans.items():
        c.sets.append(("idx_date", key, " AND ".join(f"({x})" for x in sqls), args, "date"))
    if sort_terms:
        c.order_by = ", ".join([*sort_terms, "r.rid"])
    return c
