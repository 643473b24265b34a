"""A compiled validator for FHIR R4 JSON: element rules and required code bindings from definitions.json.

Each type's snapshot is compiled once into a table from JSON property name to a small tuple (element
name, cardinality, primitive checker or child table, required codes); validating a resource is one
walk over its JSON with dictionary look-ups, no model objects.
"""
from __future__ import annotations

import math
import re
from datetime import date
from functools import lru_cache
from typing import Callable

from fhir_ops.r4 import definitions

MAX_ISSUES = 50
_INT32 = (-(2 ** 31), 2 ** 31 - 1)

# field kinds
_PRIMITIVE, _COMPLEX, _RESOURCE, _PRIMITIVE_EXTENSION = 0, 1, 2, 3


class Issue(tuple):
    """(expression, message, issue code, binding) of one problem; ``binding`` is the value set url
    for a code outside its required value set, else None."""

    __slots__ = ()

    def __new__(cls, expression: str, message: str, code: str = "structure", binding: str | None = None):
        return tuple.__new__(cls, (expression, message, code, binding))

    expression = property(lambda self: self[0])
    message = property(lambda self: self[1])
    code = property(lambda self: self[2])
    binding = property(lambda self: self[3])


class _Node:
    """The compiled rules of one JSON object context: a type, or a backbone element of a type."""

    __slots__ = ("fields", "required", "choice_keys", "choices", "is_resource", "is_extension")

    def __init__(self) -> None:
        self.fields: dict[str, tuple] = {}
        self.required: tuple = ()
        self.choice_keys: frozenset = frozenset()
        self.choices: dict[str, str] = {}  # json key -> choice element name (value[x])
        self.is_resource = False
        self.is_extension = False


# -- primitives ---------------------------------------------------------------------------------------
def _valid_calendar_date(value: str) -> bool:
    # the regexes allow 2024-02-31; the calendar does not
    if len(value) < 10 or value[8:10] <= "28":
        return True
    try:
        date(int(value[:4]), int(value[5:7]), int(value[8:10]))
    except ValueError:
        return False
    return True


def _primitive_checker(name: str, regex: str | None) -> Callable[[object], str | None]:
    """A function returning None for a valid JSON value of primitive ``name``, else the problem."""
    if name == "boolean":
        return lambda v: None if v is True or v is False else "must be a JSON boolean (true or false)"
    if name in ("integer", "positiveInt", "unsignedInt"):
        low = {"integer": _INT32[0], "positiveInt": 1, "unsignedInt": 0}[name]

        def check_int(v):
            if type(v) is not int:
                if type(v) is float and v.is_integer():
                    v = int(v)  # 2.0 parses as a float but is an integer in JSON
                else:
                    return f"must be a JSON integer ({name})"
            if not low <= v <= _INT32[1]:
                return f"{v} is out of range for {name}"
            return None
        return check_int
    if name == "decimal":
        def check_decimal(v):
            if type(v) is int:
                return None
            if type(v) is float and math.isfinite(v):
                return None
            return "must be a JSON number (decimal)"
        return check_decimal
    if name == "xhtml":
        return lambda v: None if type(v) is str and v.lstrip().startswith("<div") else \
            "must be XHTML in a <div> element"
    fullmatch = re.compile(regex).fullmatch if regex else None
    dated = name in ("date", "dateTime", "instant")

    def check_string(v):
        if type(v) is not str:
            return f"must be a JSON string ({name})"
        if not v:
            return "must not be empty (leave the element out instead)"
        if fullmatch is not None and fullmatch(v) is None:
            return f"{v[:80]!r} is not a valid {name}"
        if dated and not _valid_calendar_date(v):
            return f"{v!r} is not a valid {name}: no such calendar date"
        return None
    return check_string


# datatypes.html: a code has "no whitespace other than single spaces in the contents"; the published
# regex ([^\s]+(\s[^\s]+)*) lets a tab or newline through, the prose (and HAPI) do not.
_CODE_REGEX = r"[^\s]+( [^\s]+)*"


@lru_cache(maxsize=1)
def _primitives() -> dict:
    regexes = {name: p["regex"] for name, p in definitions()["primitives"].items()}
    regexes["code"] = _CODE_REGEX
    prims = {name: _primitive_checker(name, regex) for name, regex in regexes.items()}
    prims["System.String"] = _primitive_checker("string", None)
    return prims


_NODES: dict | None = None  # set once by compiled(); read on the hot path without the cache wrapper


# -- compilation --------------------------------------------------------------------------------------
def _upper_first(s: str) -> str:
    return s[:1].upper() + s[1:]


@lru_cache(maxsize=1)
def compiled() -> dict[str, _Node]:
    """Every R4 type compiled into a :class:`_Node` (done once; about 0.1 s).

    A field is the tuple (element name, repeats, kind, checker or child node, required codes or None,
    value set url, set of strings the checker accepted) for one JSON property name.
    """
    defs = definitions()
    types = defs["types"]
    prims = _primitives()
    value_sets = {url: frozenset(codes) for url, codes in defs["valueSets"].items()}
    nodes: dict[str, _Node] = {name: _Node() for name, t in types.items() if t["kind"] != "primitive-type"}
    known_valid = {checker: set() for checker in prims.values()}  # per primitive type: strings it accepted
    element_node = nodes["Element"]
    by_path: dict[str, _Node] = {}
    pending_refs: list = []
    for name, t in types.items():
        if t["kind"] == "primitive-type":
            continue
        root = nodes[name]
        root.is_resource = t["kind"] == "resource"
        root.is_extension = name == "Extension"
        by_path[name] = root
        # snapshot order puts a parent before its children, so backbone nodes exist when needed
        required: dict[_Node, list] = {}
        for path, mn, mx, etypes, binding, ref in t["elements"]:
            parent_path, _, elem = path.rpartition(".")
            parent = by_path.get(parent_path)
            if parent is None or mx == "0":
                continue  # children of an element we do not descend into; prohibited (max 0) elements
            many = mx != "1" and mx != "0"
            codes = value_sets.get(binding) if binding else None
            keys: list[str] = []
            if ref:
                child = _Node()
                pending_refs.append((child, ref))
                parent.fields[elem] = (elem, many, _COMPLEX, child, None, None, None)
                keys.append(elem)
            elif etypes and etypes[0] in ("BackboneElement", "Element") and len(etypes) == 1:
                child = _Node()
                by_path[path] = child
                parent.fields[elem] = (elem, many, _COMPLEX, child, None, None, None)
                keys.append(elem)
            else:
                is_choice = elem.endswith("[x]")
                stem = elem[:-3] if is_choice else elem
                for ty in etypes:
                    key = stem + _upper_first(ty) if is_choice else stem
                    if ty in prims:
                        # Resource.id is declared a string in the snapshot but is an id on the wire
                        checker = prims["id"] if elem == "id" and root.is_resource and parent is root else prims[ty]
                        parent.fields[key] = (elem, many, _PRIMITIVE, checker, codes, binding,
                                                  known_valid[checker])
                        parent.fields["_" + key] = (elem, many, _PRIMITIVE_EXTENSION, element_node,
                                                        None, None, None)
                        keys += [key, "_" + key]
                    elif ty in ("Resource", "DomainResource") or (ty in types and types[ty]["kind"] == "resource"):
                        parent.fields[key] = (elem, many, _RESOURCE, None, None, None, None)
                        keys.append(key)
                    elif ty in nodes:
                        parent.fields[key] = (elem, many, _COMPLEX, nodes[ty], None, None, None)
                        keys.append(key)
                    if is_choice:
                        parent.choices[key] = elem
                        if ty in prims:
                            parent.choices["_" + key] = elem
            if mn > 0:
                required.setdefault(parent, []).append((elem, tuple(keys)))
        for node, req in required.items():
            node.required = tuple(req)
    for child, ref in pending_refs:
        target = by_path[ref]
        child.fields, child.required, child.choices = target.fields, target.required, target.choices
    for node in [*nodes.values(), *by_path.values(), *(child for child, _ in pending_refs)]:
        node.choice_keys = frozenset(node.choices)
    global _NODES
    _NODES = nodes
    return nodes


# -- the walk -----------------------------------------------------------------------------------------
# Two passes over the same compiled tables: _ok answers valid/invalid without building any expression
# (the hot path: most writes are valid), and only a rejected resource is walked again by _walk, which
# names every problem. tests/fhir_ops/r4/test_validator.py checks that both passes agree.
def validate(resource: object, issues: list | None = None, path: str | None = None) -> list[Issue]:
    """Validate a parsed JSON resource against the R4 definitions.

    Parameters
    ----------
    resource : object
        The parsed JSON (a dict with ``resourceType``).
    issues : list, optional
        Where to append problems (a new list by default).
    path : str, optional
        Expression prefix for problems (default: the resource type).

    Returns
    -------
    list of Issue
        Empty when the resource is valid; at most :data:`MAX_ISSUES` are kept.

    Examples
    --------
    >>> validate({"resourceType": "Patient", "gender": "female"})
    []
    >>> [(i.expression, i.code) for i in validate({"resourceType": "Patient", "gender": "banana"})]
    [('Patient.gender', 'code-invalid')]
    """
    out: list = [] if issues is None else issues
    nodes = _NODES or compiled()
    if type(resource) is dict:
        node = nodes.get(resource.get("resourceType"))  # type: ignore[arg-type]
        if node is not None and node.is_resource and _ok(node, resource, nodes):
            return out
    _report(resource, out, path, nodes)
    del out[MAX_ISSUES:]
    return out


def is_valid(resource: object) -> bool:
    """True when :func:`validate` finds nothing (the fast pass only)."""
    nodes = _NODES or compiled()
    node = nodes.get(resource.get("resourceType")) if type(resource) is dict else None  # type: ignore[union-attr]
    return node is not None and node.is_resource and _ok(node, resource, nodes)


def _report(resource: object, out: list, path: str | None, nodes: dict) -> None:
    if type(resource) is not dict:
        out.append(Issue(path or "Resource", "a resource must be a JSON object"))
        return
    rtype = resource.get("resourceType")
    node = nodes.get(rtype) if type(rtype) is str else None
    if node is None or not node.is_resource:
        out.append(Issue(f"{path}.resourceType" if path else "resourceType",
                         f"unknown resource type {rtype!r}: expected an R4 resource type such as 'Patient'"))
        return
    _walk(node, resource, path or rtype, out, nodes)


_KNOWN_MAX = 1 << 16


def _remember(known: set, value: str) -> None:
    # Strings recur (systems, codes, units, references): a string a checker accepted once is accepted
    # again without its regex. Bounded: the set starts over when full.
    if len(known) >= _KNOWN_MAX:
        known.clear()
    known.add(value)


def _choices_ok(node: _Node, obj: dict) -> bool:
    present = node.choice_keys.intersection(obj)
    if node.is_extension and (bool(present) == ("extension" in obj)):
        return False  # ext-1: a value[x] or nested extensions, exactly one of the two
    if len(present) > 1:
        keys = {k.lstrip("_") for k in present}
        return len({node.choices[k] for k in keys}) == len(keys)
    return True


def _ok(node: _Node, obj: dict, nodes: dict) -> bool:
    # deliberately unrolled (single value vs array, string fast path): this is the per-write cost
    fields = node.fields
    for key, value in obj.items():
        field = fields.get(key)
        if field is None:
            if key == "resourceType" and node.is_resource:
                continue
            return False
        kind = field[2]
        if not field[1]:
            if kind == _PRIMITIVE:
                known = field[6]
                if type(value) is str and value in known:
                    pass
                elif value is None or field[3](value) is not None:
                    return False
                elif type(value) is str:
                    _remember(known, value)
                if field[4] is not None and value not in field[4]:
                    return False
            elif kind == _RESOURCE:
                if type(value) is not dict:
                    return False
                sub = nodes.get(value.get("resourceType"))
                if sub is None or not sub.is_resource or not _ok(sub, value, nodes):
                    return False
            elif type(value) is not dict or not value or not _ok(field[3], value, nodes):
                return False
            continue
        if type(value) is not list or not value:
            return False
        if kind == _PRIMITIVE:
            check, codes, known = field[3], field[4], field[6]
            for v in value:
                if v is None:
                    if ("_" + key) in obj:
                        continue
                    return False
                if type(v) is str and v in known:
                    pass
                elif check(v) is not None:
                    return False
                elif type(v) is str:
                    _remember(known, v)
                if codes is not None and v not in codes:
                    return False
        elif kind == _RESOURCE:
            for v in value:
                if type(v) is not dict or (key == "contained" and "contained" in v):
                    return False
                sub = nodes.get(v.get("resourceType"))
                if sub is None or not sub.is_resource or not _ok(sub, v, nodes):
                    return False
        else:
            child = field[3]
            for v in value:
                if type(v) is not dict:
                    if v is None and kind == _PRIMITIVE_EXTENSION:
                        continue
                    return False
                if not v or not _ok(child, v, nodes):
                    return False
    if node.choice_keys and not _choices_ok(node, obj):
        return False
    for _, keys in node.required:
        for k in keys:
            if k in obj:
                break
        else:
            return False
    return True


def _walk(node: _Node, obj: dict, path: str, out: list, nodes: dict) -> None:
    fields = node.fields
    for key, value in obj.items():
        field = fields.get(key)
        if field is None:
            if key != "resourceType" or not node.is_resource:
                out.append(Issue(f"{path}.{key}", "unknown element"))
            continue
        if field[1]:
            if type(value) is not list:
                out.append(Issue(f"{path}.{key}", "must be a JSON array (the element repeats)"))
                continue
            if not value:
                out.append(Issue(f"{path}.{key}", "must not be an empty array (leave the element out instead)"))
                continue
            for i, item in enumerate(value):
                _item(field, key, item, f"{path}.{key}[{i}]", obj, out, nodes)
        elif type(value) is list:
            out.append(Issue(f"{path}.{key}", "must not be an array (at most one value)"))
        else:
            _item(field, key, value, f"{path}.{key}", obj, out, nodes)
    if node.choice_keys:
        present = node.choice_keys.intersection(obj)
        seen: dict[str, str] = {}
        for key in sorted(present, key=lambda k: k.lstrip("_")):
            elem = node.choices[key]
            other = seen.setdefault(elem, key)
            if other.lstrip("_") != key.lstrip("_"):
                out.append(Issue(f"{path}.{key}", f"only one type of {elem} may be given ({other} is too)"))
        if node.is_extension and "extension" in obj and present:
            out.append(Issue(path, "an extension has either a value[x] or nested extensions, not both (ext-1)",
                             "invariant"))
        elif node.is_extension and not present and "extension" not in obj:
            out.append(Issue(path, "an extension needs a value[x] or nested extensions (ext-1)", "invariant"))
    for elem, keys in node.required:
        for k in keys:
            if k in obj:
                break
        else:
            out.append(Issue(f"{path}.{elem.replace('[x]', '')}", f"{elem} is required (min 1) and missing",
                             "required"))


def _item(field: tuple, key: str, value: object, where: str, holder: dict, out: list, nodes: dict) -> None:
    kind = field[2]
    if kind == _PRIMITIVE:
        if value is None:
            if field[1] and ("_" + key) in holder:
                return  # a null in a primitive array: its extension sits at the same index of _key
            out.append(Issue(where, "must not be null"))
            return
        problem = field[3](value)
        if problem is not None:
            out.append(Issue(where, problem, "value"))
        elif field[4] is not None and value not in field[4]:
            out.append(Issue(where, f"{value!r} is not in the required value set {field[5]}",
                             "code-invalid", field[5]))
        return
    if type(value) is not dict:
        if value is None and kind == _PRIMITIVE_EXTENSION and field[1]:
            return
        out.append(Issue(where, "must be a JSON object"))
        return
    if kind == _RESOURCE:
        if key == "contained" and "contained" in value:
            out.append(Issue(f"{where}.contained", "a contained resource cannot contain resources (dom-2)",
                             "invariant"))
        _report(value, out, where, nodes)
        return
    if not value:
        out.append(Issue(where, "must not be an empty object (leave the element out instead)"))
        return
    _walk(field[3], value, where, out, nodes)


def validate_datatype(type_name: str, value: object, path: str | None = None) -> list[Issue] | None:
    """Validate ``value`` as an instance of R4 complex datatype ``type_name`` (``Quantity``, ``Period``...).

    Returns the problems (empty when valid), or None when ``type_name`` is not an R4 complex datatype.

    Examples
    --------
    >>> validate_datatype("Quantity", {"value": 5, "unit": "mg"})
    []
    >>> [i.expression for i in validate_datatype("Quantity", {"value": "five"}, "dose")]
    ['dose.value']
    """
    nodes = _NODES or compiled()
    node = nodes.get(type_name)
    if node is None or node.is_resource:
        return None
    out: list = []
    where = path or type_name
    if type(value) is not dict or not value:
        out.append(Issue(where, "must be a non-empty JSON object"))
    elif not _ok(node, value, nodes):
        _walk(node, value, where, out, nodes)
    return out
