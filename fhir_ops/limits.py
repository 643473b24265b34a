"""Bounds on what one request may make the server do: JSON nesting, search value counts, time.

A leaf module (no Flask app, no store) so every parser and the store can share the same limits.
"""
from __future__ import annotations

import json
import time
from contextvars import ContextVar

from fhir_ops.errors import FhirError, InvalidRequest

#: Deepest JSON nesting accepted in a request body. FHIR R4 resources of the kinds TrialTwin stores stay
#: under ~15 levels (a Questionnaire's nested items a little more); far below Python's recursion limit,
#: so no later recursive walk (validation, harmonization) can run out of stack.
MAX_JSON_DEPTH = 64
#: Most comma-separated (OR) values in one search parameter, and most parameters in one search: each
#: value becomes an SQL term, and SQLite refuses expression trees past 1,000 terms.
MAX_OR_VALUES = 100
MAX_SEARCH_PARAMS = 100
#: Largest _offset: paging deeper than this is what a bulk export is for; it also keeps the value
#: inside SQLite's 64-bit integers.
MAX_OFFSET = 1_000_000
#: Default wall-clock budget of one request, seconds (``REQUEST_TIME_BUDGET``): a store read still running
#: past it is interrupted. Generous, so an operation's legitimate computing on a loaded machine is never
#: cut short; writes are never interrupted (fhir_ops.store.sqlite).
DEFAULT_REQUEST_BUDGET = 30.0

_deadline: ContextVar[float | None] = ContextVar("trialtwin_request_deadline", default=None)


class BudgetExceeded(FhirError):
    """A request ran past its time budget; its database work was interrupted and rolled back."""

    status, code, error_id = 503, "too-costly", "request-budget-exceeded"


def json_depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), computed without recursion.

    Runs over every request body, so it checks exact types (``json.loads`` makes plain dicts and
    lists) and pushes children without generators: ~3x faster than ``isinstance`` with a generator
    on transaction Bundles (bench/write_profile.py).

    Examples
    --------
    >>> json_depth({"a": [1, {"b": 2}]}), json_depth(3)
    (3, 0)
    """
    deepest = 0
    stack = [(value, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        kind = type(node)
        if kind is dict:
            children = node.values()
        elif kind is list:
            children = node
        else:
            if depth > deepest:
                deepest = depth
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                push((child, depth))
    return deepest


def _no_constant(name: str):
    # Python's json reads NaN and Infinity, JSON (and FHIR) has no such numbers
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: bytes | str, *, what: str = "request body", malformed_id: str = "malformed-json",
          allow_nan: bool = False):
    """Parse JSON from a client, refusing malformed or too deeply nested input with a 400.

    ``allow_nan`` lets Python's NaN/Infinity literals through for a caller that names the bad value itself.

    Raises
    ------
    InvalidRequest
        ``malformed-json`` for text that is not JSON, ``json-too-deep`` past :data:`MAX_JSON_DEPTH`.
    """
    try:
        value = json.loads(raw, parse_constant=None if allow_nan else _no_constant)
    except RecursionError:
        # the C decoder gives up on its own past the interpreter's recursion limit
        raise InvalidRequest(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", error_id="json-too-deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}", error_id=malformed_id) from None
    if isinstance(value, (dict, list)) and json_depth(value) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", error_id="json-too-deep")
    return value


# --- the per-request time budget ---------------------------------------------------------------------

def start_budget(seconds: float | None) -> None:
    """Give the current request (thread/context) ``seconds`` of database time; None or <= 0: no limit."""
    _deadline.set(time.monotonic() + seconds if seconds and seconds > 0 else None)


def clear_budget() -> None:
    """End the current request's budget (a pooled thread must not carry it into the next request)."""
    _deadline.set(None)


def over_budget() -> bool:
    """Whether the current request has used up its budget (cheap: called from SQLite's progress handler)."""
    deadline = _deadline.get()
    return deadline is not None and time.monotonic() > deadline


def budget_error() -> BudgetExceeded:
    """The error a request gets when its budget ran out."""
    return BudgetExceeded("the request exceeded the server's time budget and was stopped; narrow the search "
                          "(fewer values, a smaller _count, a selective parameter) and try again",
                          headers={"Retry-After": "1"})
