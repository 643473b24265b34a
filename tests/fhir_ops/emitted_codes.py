"""The codes TrialTwin's code can emit in its own code systems, collected from the source by an AST walk.

Used by tests/fhir_ops/test_code_systems.py so that a new error id (or operation, modality ...) without a
concept in its published CodeSystem fails CI; there is no hand-kept second list to drift.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fhir_ops", "inference", "terminology", "smart_app")


@dataclass
class ErrorIds:
    """Error ids found, where each was found, and the expressions the walk could not reduce to literals."""

    sites: dict[str, list[str]] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)

    def add(self, value: str, where: str) -> None:
        self.sites.setdefault(value, []).append(where)


def _modules(sources: dict[str, str] | None = None) -> list[tuple[str, ast.Module]]:
    if sources is not None:
        return [(name, ast.parse(text)) for name, text in sources.items()]
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if ".venv" in path.parts:
                continue
            out.append((str(path.relative_to(ROOT)), ast.parse(path.read_text(encoding="utf-8"))))
    return out


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _enclosing_function(node: ast.AST, parents: dict) -> ast.FunctionDef | None:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node
    return None


def _params(fn: ast.FunctionDef) -> list[ast.arg]:
    return [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]


def _defaults(fn: ast.FunctionDef) -> dict[str, ast.expr]:
    positional = [*fn.args.posonlyargs, *fn.args.args]
    out = {a.arg: d for a, d in zip(positional[len(positional) - len(fn.args.defaults):], fn.args.defaults)}
    out.update({a.arg: d for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None})
    return out


class _Module:
    def __init__(self, name: str, tree: ast.Module) -> None:
        self.name, self.tree, self._parents = name, tree, None
        self.globals: dict[str, list[ast.expr]] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.globals.setdefault(target.id, []).append(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                self.globals.setdefault(node.target.id, []).append(node.value)

    @property
    def parents(self) -> dict[ast.AST, ast.AST]:
        if self._parents is None:  # built only for the modules that give error ids
            self._parents = _parents(self.tree)
        return self._parents


def _literals(expr: ast.expr, mod: _Module, scope: ast.FunctionDef | None, depth: int = 0):
    """The string literals ``expr`` can evaluate to, or None when it cannot be reduced.

    Understood: literals, ``a if c else b``, ``a or b``, a literal dict's ``.get(k, default)`` / ``[k]`` (every
    value), names assigned from those in the function or module, and tuple unpacking of such values.
    A parameter of the enclosing function yields the empty set: its call sites are collected separately.
    """
    if depth > 8:
        return None
    if isinstance(expr, ast.Constant):
        return {expr.value} if isinstance(expr.value, str) else (set() if expr.value is None else None)
    if isinstance(expr, ast.IfExp):
        a, b = _literals(expr.body, mod, scope, depth + 1), _literals(expr.orelse, mod, scope, depth + 1)
        return None if a is None or b is None else a | b
    if isinstance(expr, ast.BoolOp):
        parts = [_literals(v, mod, scope, depth + 1) for v in expr.values]
        return None if any(p is None for p in parts) else set().union(*parts)
    if isinstance(expr, ast.Attribute) and expr.attr == "error_id":
        return set()  # re-raising or reporting an error already raised elsewhere: its id is collected there
    table = _table(expr, mod, scope, depth)
    if table is not None:
        return table
    if isinstance(expr, ast.Name):
        if scope is not None and expr.id in {a.arg for a in _params(scope)}:
            return set()
        values = _assigned(expr.id, mod, scope)
        if not values:
            return None
        out = set()
        for value, index in values:
            found = _literals(value, mod, scope, depth + 1) if index is None else \
                _tuple_items(value, index, mod, scope, depth + 1)
            if found is None:
                return None
            out |= found
        return out
    return None


def _dict_of(expr: ast.expr, mod: _Module) -> ast.Dict | None:
    if isinstance(expr, ast.Dict):
        return expr
    if isinstance(expr, ast.Name) and len(mod.globals.get(expr.id, [])) == 1 and \
            isinstance(mod.globals[expr.id][0], ast.Dict):
        return mod.globals[expr.id][0]
    return None


def _table(expr: ast.expr, mod: _Module, scope, depth: int, index: int | None = None):
    """Values of ``{...}.get(k[, default])`` or ``{...}[k]`` (item ``index`` of tuple values), else None."""
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "get":
        table, extra = _dict_of(expr.func.value, mod), expr.args[1:2]
    elif isinstance(expr, ast.Subscript):
        table, extra = _dict_of(expr.value, mod), []
    else:
        return None
    if table is None:
        return None
    out = set()
    for value in [*table.values, *extra]:
        found = _literals(value, mod, scope, depth + 1) if index is None else \
            _tuple_items(value, index, mod, scope, depth + 1)
        if found is None:
            return None
        out |= found
    return out


def _tuple_items(expr: ast.expr, index: int, mod: _Module, scope, depth: int):
    if isinstance(expr, ast.Tuple) and index < len(expr.elts):
        return _literals(expr.elts[index], mod, scope, depth)
    return _table(expr, mod, scope, depth, index)


def _assigned(name: str, mod: _Module, scope) -> list[tuple[ast.expr, int | None]]:
    """(value, tuple index or None) of each assignment to ``name`` in ``scope`` (else the module)."""
    body = scope if scope is not None else mod.tree
    out = []
    for node in ast.walk(body):
        if isinstance(node, ast.Assign) and (scope is not None or node in mod.tree.body):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == name:
                    out.append((node.value, None))
                elif isinstance(target, ast.Tuple):
                    for i, elt in enumerate(target.elts):
                        if isinstance(elt, ast.Name) and elt.id == name:
                            out.append((node.value, i))
    return out


def error_ids(sources: dict[str, str] | None = None) -> ErrorIds:
    """Every error id the packages can put into an OperationOutcome (``issue.details.coding``).

    Sources: ``error_id=`` arguments of any call (``FhirError`` and subclasses, ``outcome``), ``error_id`` class
    attributes of FhirError subclasses, and helpers that pass one of their parameters on as ``error_id``
    (their defaults and the literal each call site passes, by position or keyword). ``sources`` (module name ->
    text) replaces the packages, to test the walk itself.
    """
    found = ErrorIds()
    modules = [_Module(name, tree) for name, tree in _modules(sources)]
    forwarders: dict[str, list[tuple[_Module, ast.FunctionDef, str]]] = {}
    calls: dict[str, list[tuple[_Module, ast.Call]]] = {}  # by the called name
    for mod in modules:
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign):
                        for target in stmt.targets:
                            names = [target] if isinstance(target, ast.Name) else getattr(target, "elts", [])
                            for i, t in enumerate(names):
                                if isinstance(t, ast.Name) and t.id == "error_id":
                                    value = stmt.value.elts[i] if isinstance(target, ast.Tuple) else stmt.value
                                    _collect(value, mod, None, f"{mod.name}:{stmt.lineno}", found)
            if not isinstance(node, ast.Call):
                continue
            called = node.func.id if isinstance(node.func, ast.Name) else \
                node.func.attr if isinstance(node.func, ast.Attribute) else None
            if called:
                calls.setdefault(called, []).append((mod, node))
            for kw in node.keywords:
                if kw.arg != "error_id":
                    continue
                scope = _enclosing_function(node, mod.parents)
                _collect(kw.value, mod, scope, f"{mod.name}:{node.lineno}", found)
                # a helper's own parameter passed on as the error id: its callers choose the id
                if isinstance(kw.value, ast.Name) and scope is not None and \
                        kw.value.id in {a.arg for a in _params(scope)} and scope.name != "__init__":
                    forwarders.setdefault(scope.name, []).append((mod, scope, kw.value.id))
    for fname, defs in forwarders.items():
        for mod, fn, param in defs:
            default = _defaults(fn).get(param)
            if default is not None:
                _collect(default, mod, None, f"{mod.name}:{fn.lineno}", found)
            position = [a.arg for a in [*fn.args.posonlyargs, *fn.args.args]].index(param) \
                if param in [a.arg for a in [*fn.args.posonlyargs, *fn.args.args]] else None
            # private helpers are called in their own module only; public ones anywhere
            for caller, call in calls.get(fname, []):
                if fname.startswith("_") and caller is not mod:
                    continue
                arg = next((k.value for k in call.keywords if k.arg == param), None)
                if arg is None and position is not None and position < len(call.args):
                    arg = call.args[position]
                if arg is not None:
                    scope = _enclosing_function(call, caller.parents)
                    _collect(arg, caller, scope, f"{caller.name}:{call.lineno}", found)
    return found


def _collect(expr: ast.expr, mod: _Module, scope, where: str, found: ErrorIds) -> None:
    values = _literals(expr, mod, scope)
    if values is None:
        found.unresolved.append(f"{where}: {ast.unparse(expr)}")
        return
    for value in values:
        found.add(value, where)
