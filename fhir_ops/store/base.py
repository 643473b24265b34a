"""The storage contract every TrialTwin store honours (embedded SQLite, remote FHIR).

Operations and the HTTP layer talk to storage only through ``Store``; the contract
tests in ``tests/fhir_ops/store`` (and the HAPI tier) run against every implementation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

#: Set by the audit layer (fhir_ops.audit) for the duration of one request: a store that keeps an audit
#: journal calls it inside each write transaction with what the transaction wrote (``(type, id, version,
#: resource or None)``) and stores the ``(request id, JSON text)`` it returns in the same transaction, so
#: a committed write is never without its audit record.
WRITE_AUDIT: ContextVar[Callable[[list], tuple[str, str]] | None] = ContextVar("trialtwin_write_audit", default=None)


@dataclass(frozen=True)
class WriteResult:
    """Outcome of a create/update: the stored resource (with ``meta``) and whether it is new."""

    resource: dict
    created: bool


@dataclass(frozen=True)
class SearchResult:
    """One page of a search.

    ``matches`` are the page's resources (search mode ``match``), ``included`` those pulled in by
    ``_include`` / ``_revinclude``; ``total`` is the number of matches over all pages (None if not
    computed); ``offset``/``count`` describe the page so the HTTP layer can build paging links;
    ``ignored`` lists search parameters that were not understood (lenient handling).
    """

    total: int | None
    matches: list[dict]
    included: list[dict] = field(default_factory=list)
    offset: int = 0
    count: int = 50
    ignored: list[str] = field(default_factory=list)


class Store(ABC):
    """A FHIR R4 resource store.

    All methods take and return plain JSON-shaped dicts. Failures are raised as
    ``fhir_ops.errors.FhirError`` subclasses: ``NotFound`` (unknown id), ``Gone`` (deleted),
    ``PreconditionFailed`` (``If-Match`` mismatch, or ambiguous ``If-None-Exist``),
    ``InvalidRequest`` (resource fails validation, bad search parameter in strict mode).
    """

    #: short name shown in logs and test ids ("embedded", "hapi")
    name: str = "store"

    @abstractmethod
    def create(self, resource: dict, *, if_none_exist: str | None = None) -> WriteResult:
        """Store a new resource with a server-assigned id.

        ``if_none_exist`` is a search query string (``identifier=sys|val``): if it matches one
        resource, that resource is returned with ``created=False``; more than one → 412.
        """

    @abstractmethod
    def read(self, resource_type: str, resource_id: str) -> dict:
        """Return the current version."""

    @abstractmethod
    def vread(self, resource_type: str, resource_id: str, version_id: str) -> dict:
        """Return one historical version."""

    @abstractmethod
    def update(self, resource_type: str, resource_id: str, resource: dict, *,
               if_match: str | None = None) -> WriteResult:
        """Replace (or create, if the id is new) a resource; ``if_match`` is a version id or ETag."""

    @abstractmethod
    def delete(self, resource_type: str, resource_id: str) -> None:
        """Delete a resource (a new, deleted version appears in history; reads answer 410)."""

    @abstractmethod
    def history(self, resource_type: str | None, resource_id: str | None = None, *,
                count: int | None = None, offset: int = 0) -> list[dict]:
        """Versions newest first: of one resource, of a whole type (``resource_id`` None), or of every
        type (``resource_type`` None too); ``offset`` versions skipped, at most ``count`` returned."""

    @abstractmethod
    def history_total(self, resource_type: str | None, resource_id: str | None = None) -> int:
        """How many versions :meth:`history` pages through (deleted versions included)."""

    @abstractmethod
    def search(self, resource_type: str, params: list[tuple[str, str]], *,
               strict: bool = False) -> SearchResult:
        """Search with FHIR query parameters as (name, value) pairs, in order.

        Understands the type's search parameters plus ``_id``, ``_lastUpdated``, ``_count``,
        ``_offset``, ``_sort``, ``_include``, ``_revinclude``, ``_summary=count``.
        Unknown parameters are ignored and listed in ``ignored``, or raise ``InvalidRequest``
        when ``strict``.
        """

    @abstractmethod
    def transaction(self, bundle: dict) -> dict:
        """Apply a ``transaction`` Bundle atomically (``urn:uuid:`` references rewritten)."""

    @abstractmethod
    def batch(self, bundle: dict) -> dict:
        """Apply a ``batch`` Bundle entry by entry; failures become OperationOutcome entries."""

    def search_all(self, resource_type: str, params: list[tuple[str, str]], *,
                   page_size: int = 500) -> list[dict]:
        """Every match of a search, following pages (``_offset``) to the end."""
        out: list[dict] = []
        offset = 0
        base = [(k, v) for k, v in params if k not in ("_count", "_offset")]
        while True:
            page = self.search(resource_type, base + [("_count", str(page_size)), ("_offset", str(offset))])
            out.extend(page.matches)
            offset += len(page.matches)
            if not page.matches or len(page.matches) < page_size or (page.total is not None and offset >= page.total):
                return out

    def close(self) -> None:  # pragma: no cover - default no-op
        """Release connections."""
