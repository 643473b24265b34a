"""Storage behind one interface: the embedded SQLite store and a remote FHIR server."""
from fhir_ops.store.base import SearchResult, Store, WriteResult

__all__ = ["Store", "SearchResult", "WriteResult"]
