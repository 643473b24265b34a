"""SMART App Launch 2.x scopes: parsing, v1 → v2 mapping and permission checks.

Pure functions and immutable value objects; no Flask, no HTTP (SMART App Launch 2.2, "Scopes and Launch Context").
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

#: Interactions in the canonical SMART v2 order (create, read, update, delete, search).
INTERACTIONS = "cruds"

#: Scopes that name a permission or a launch context rather than FHIR data.
NON_RESOURCE_SCOPES = frozenset({
    "launch", "launch/patient", "launch/encounter", "openid", "fhirUser", "profile",
    "offline_access", "online_access",
})

_V1_ACTIONS = {"read": "rs", "write": "cud", "*": "cruds"}
_RESOURCE_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]+)\.(?P<perm>read|write|\*|c?r?u?d?s?)"
    r"(?:\?(?P<query>[^\s]+))?$"
)
_INTERACTION_NAMES = {
    "c": "c", "create": "c", "r": "r", "read": "r", "vread": "r", "history": "r",
    "u": "u", "update": "u", "patch": "u", "d": "d", "delete": "d", "s": "s", "search": "s",
    # A read-only operation needs read permission on its target type; operations that write
    # ask for "c"/"u" on what they write, explicitly, in their own handler.
    "operation": "r",
}


@dataclass(frozen=True)
class Scope:
    """One SMART resource scope such as ``patient/Observation.rs``.

    Parameters
    ----------
    context : str
        ``patient``, ``user`` or ``system``.
    resource_type : str
        A FHIR resource type or ``*``.
    interactions : str
        Subset of ``"cruds"`` in canonical order.
    query : str, optional
        The v2 granular constraint after ``?`` (e.g. ``category=laboratory``), kept verbatim.
    v1 : str, optional
        The SMART v1 permission (``read``, ``write``, ``*``) the scope was written with. A client that asks
        in v1 syntax is granted the scope in v1 syntax (what it asked, SMART 2.2 "Scopes for requesting
        FHIR resources"); enforcement reads ``interactions`` either way.

    Examples
    --------
    >>> parse_scope("patient/Observation.read").text
    'patient/Observation.read'
    >>> parse_scope("patient/Observation.read").v2_text
    'patient/Observation.rs'
    >>> parse_scope("user/*.cruds").allows("u", "Patient")
    True
    """

    context: str
    resource_type: str
    interactions: str
    query: str | None = None
    v1: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.context not in ("patient", "user", "system"):
            raise ValueError(f"scope context must be patient, user or system, not {self.context!r}")
        if not self.interactions or any(c not in INTERACTIONS for c in self.interactions):
            raise ValueError(f"scope interactions must be a non-empty subset of 'cruds', not {self.interactions!r}")
        canonical = "".join(c for c in INTERACTIONS if c in self.interactions)
        object.__setattr__(self, "interactions", canonical)

    @property
    def text(self) -> str:
        """The scope as it was asked: v1 syntax for a v1 request, v2 otherwise."""
        if self.v1 and _V1_ACTIONS.get(self.v1) == self.interactions and not self.query:
            return f"{self.context}/{self.resource_type}.{self.v1}"
        return self.v2_text

    @property
    def v2_text(self) -> str:
        """The scope in SMART v2 syntax."""
        base = f"{self.context}/{self.resource_type}.{self.interactions}"
        return f"{base}?{self.query}" if self.query else base

    def intersect(self, ceiling: "Scope") -> "Scope | None":
        """The access granted both by this scope and by ``ceiling`` (None when they share nothing).

        >>> parse_scope("system/*.cruds").intersect(parse_scope("system/Observation.rs")).text
        'system/Observation.rs'
        """
        if self.context != ceiling.context:
            return None
        if ceiling.resource_type not in ("*", self.resource_type) and self.resource_type != "*":
            return None
        rtype = self.resource_type if self.resource_type != "*" else ceiling.resource_type
        common = "".join(c for c in INTERACTIONS if c in self.interactions and c in ceiling.interactions)
        if not common:
            return None
        if ceiling.query is not None and self.query not in (None, ceiling.query):
            return None
        keep_v1 = self.v1 if _V1_ACTIONS.get(self.v1 or "") == common else None
        return Scope(self.context, rtype, common, self.query or ceiling.query, keep_v1)

    def allows(self, interaction: str, resource_type: str) -> bool:
        """Whether this scope permits ``interaction`` (c/r/u/d/s or its name) on ``resource_type``."""
        code = interaction_code(interaction)
        return code in self.interactions and self.resource_type in ("*", resource_type)

    def covers(self, other: "Scope") -> bool:
        """Whether every access ``other`` grants is also granted by this scope."""
        return (
            self.context == other.context
            and self.resource_type in ("*", other.resource_type)
            and set(other.interactions) <= set(self.interactions)
            and (self.query is None or self.query == other.query)
        )


def interaction_code(interaction: str) -> str:
    """Map an interaction name (``read``, ``search``, ``operation`` ...) or letter to its SMART letter."""
    try:
        return _INTERACTION_NAMES[interaction]
    except KeyError:
        raise ValueError(f"unknown interaction {interaction!r}; expected one of c, r, u, d, s or a FHIR interaction name") from None


def parse_scope(text: str) -> Scope:
    """Parse one resource scope, accepting SMART v1 (``.read``/``.write``/``.*``) and v2 (``.cruds``) forms.

    Raises
    ------
    ValueError
        If ``text`` is not a resource scope.
    """
    match = _RESOURCE_SCOPE.match(text)
    if not match or not match.group("perm"):
        raise ValueError(f"not a SMART resource scope: {text!r}")
    perm = match.group("perm")
    interactions = _V1_ACTIONS.get(perm, perm)
    return Scope(match.group("context"), match.group("type"), interactions, match.group("query"),
                 perm if perm in _V1_ACTIONS else None)


def is_resource_scope(text: str) -> bool:
    """Whether ``text`` parses as a SMART resource scope."""
    try:
        parse_scope(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ScopeSet:
    """A parsed scope string: resource scopes plus the other recognised scopes.

    Examples
    --------
    >>> s = parse_scopes("launch openid patient/*.read bogus")
    >>> s.text
    'launch openid patient/*.read'
    >>> s.v2_text
    'launch openid patient/*.rs'
    >>> s.unknown
    ('bogus',)
    """

    resources: tuple[Scope, ...] = ()
    names: tuple[str, ...] = ()
    unknown: tuple[str, ...] = field(default=(), compare=False)

    @property
    def text(self) -> str:
        """Space-separated scope string in v2 syntax (non-resource scopes first, in request order)."""
        return " ".join([*self.names, *(s.text for s in self.resources)])

    @property
    def v2_text(self) -> str:
        """The same scopes with every resource scope in SMART v2 syntax."""
        return " ".join([*self.names, *(s.v2_text for s in self.resources)])

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def allows(self, interaction: str, resource_type: str, contexts: Iterable[str] = ("patient", "user", "system")) -> bool:
        """Whether any scope of one of ``contexts`` permits ``interaction`` on ``resource_type``."""
        wanted = set(contexts)
        return any(s.context in wanted and s.allows(interaction, resource_type) for s in self.resources)

    def restrict(self, contexts: Iterable[str]) -> "ScopeSet":
        """A copy keeping only the resource scopes of ``contexts`` (all non-resource names kept)."""
        wanted = set(contexts)
        return ScopeSet(tuple(s for s in self.resources if s.context in wanted), self.names, self.unknown)

    def within(self, allowed: "ScopeSet") -> "ScopeSet":
        """The part of this set that ``allowed`` covers: what a client may be granted of what it asked."""
        resources = tuple(s for s in self.resources if any(a.covers(s) for a in allowed.resources))
        names = tuple(n for n in self.names if n in allowed.names)
        return ScopeSet(resources, names, self.unknown)

    def cut_to(self, ceiling: "ScopeSet") -> "ScopeSet":
        """Each scope narrowed to what ``ceiling`` grants (``system/*.cruds`` under ``system/*.rs`` is ``system/*.rs``).

        Unlike :meth:`within`, a scope wider than the ceiling is narrowed, not dropped: an administrator's
        ceiling bounds what a self-registered client may ever hold.

        >>> parse_scopes("openid system/*.cruds").cut_to(parse_scopes("system/Observation.rs system/Patient.r")).text
        'system/Observation.rs system/Patient.r'
        """
        resources: list[Scope] = []
        for scope in self.resources:
            for limit in ceiling.resources:
                narrowed = scope.intersect(limit)
                if narrowed is not None and narrowed not in resources:
                    resources.append(narrowed)
        names = tuple(n for n in self.names if n in ceiling.names)
        return ScopeSet(tuple(resources), names, self.unknown)


def parse_scopes(text: str | None) -> ScopeSet:
    """Parse a space-separated scope string; unknown tokens are kept apart in ``unknown``."""
    resources: list[Scope] = []
    names: list[str] = []
    unknown: list[str] = []
    for token in (text or "").split():
        if token in NON_RESOURCE_SCOPES:
            if token not in names:
                names.append(token)
            continue
        try:
            scope = parse_scope(token)
        except ValueError:
            unknown.append(token)
            continue
        if scope not in resources:
            resources.append(scope)
    return ScopeSet(tuple(resources), tuple(names), tuple(unknown))


def to_v2(text: str) -> str:
    """Rewrite a scope string in SMART v2 syntax, dropping unknown tokens.

    >>> to_v2("patient/*.write user/Observation.* openid")
    'openid patient/*.cud user/Observation.cruds'
    """
    return parse_scopes(text).v2_text
