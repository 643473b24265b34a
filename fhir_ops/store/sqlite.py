"""The embedded FHIR store: one SQLite file (WAL) holding current resources, history and search indexes.

Implements ``fhir_ops.store.base.Store``; search parameters come from ``fhir_ops.search``.
"""
from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

from fhir_ops import limits
from fhir_ops.errors import FhirError, Gone, InvalidRequest, NotFound, PreconditionFailed
from fhir_ops.json_codec import dumps as _dumps
from fhir_ops.search.extract import index_rows_many
from fhir_ops.search.query import compile_search, match_sql, pinned_token
from fhir_ops.audit.chain import GENESIS, canonical, link
from fhir_ops.store.base import WRITE_AUDIT, SearchResult, Store, WriteResult
from fhir_ops.store.bundle import DELETED_TAG, METHOD_ORDER, EntryRequest, parse_entries, response_entry, rewrite_references
from fhir_ops.urls import parse_qsl_fast
from fhir_ops.validation import ID_PATTERN, is_resource_type, validate_resource


_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    rid INTEGER PRIMARY KEY, type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
    lu TEXT NOT NULL, lu_ts REAL NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, json TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS resources_type_id ON resources(type, id);
CREATE INDEX IF NOT EXISTS resources_type_lu ON resources(type, lu_ts);
CREATE TABLE IF NOT EXISTS history (
    rid INTEGER NOT NULL, version INTEGER NOT NULL, lu TEXT NOT NULL, lu_ts REAL NOT NULL,
    deleted INTEGER NOT NULL, json TEXT, PRIMARY KEY (rid, version));
CREATE TABLE IF NOT EXISTS idx_token (rid INTEGER NOT NULL, param TEXT NOT NULL, system TEXT, code TEXT);
CREATE INDEX IF NOT EXISTS idx_token_q ON idx_token(param, code, system, rid);
CREATE INDEX IF NOT EXISTS idx_token_s ON idx_token(param, system, rid);
CREATE INDEX IF NOT EXISTS idx_token_r ON idx_token(rid, param);
CREATE TABLE IF NOT EXISTS idx_ref (rid INTEGER NOT NULL, param TEXT NOT NULL, ttype TEXT, tid TEXT);
CREATE INDEX IF NOT EXISTS idx_ref_q ON idx_ref(param, tid, ttype, rid);
CREATE INDEX IF NOT EXISTS idx_ref_r ON idx_ref(rid, param);
CREATE TABLE IF NOT EXISTS idx_date (rid INTEGER NOT NULL, param TEXT NOT NULL, low REAL, high REAL);
CREATE INDEX IF NOT EXISTS idx_date_low ON idx_date(param, low, high, rid);
CREATE TABLE IF NOT EXISTS date_width (param TEXT PRIMARY KEY, w REAL NOT NULL);
CREATE INDEX IF NOT EXISTS idx_date_r ON idx_date(rid, param);
CREATE TABLE IF NOT EXISTS idx_string (rid INTEGER NOT NULL, param TEXT NOT NULL, norm TEXT, raw TEXT);
CREATE INDEX IF NOT EXISTS idx_string_q ON idx_string(param, norm, rid);
CREATE INDEX IF NOT EXISTS idx_string_r ON idx_string(rid, param);
CREATE TABLE IF NOT EXISTS idx_quantity (rid INTEGER NOT NULL, param TEXT NOT NULL, value REAL, system TEXT,
    code TEXT);
CREATE INDEX IF NOT EXISTS idx_quantity_q ON idx_quantity(param, value, rid);
CREATE INDEX IF NOT EXISTS idx_quantity_r ON idx_quantity(rid, param);
CREATE TABLE IF NOT EXISTS idx_number (rid INTEGER NOT NULL, param TEXT NOT NULL, value REAL);
CREATE INDEX IF NOT EXISTS idx_number_q ON idx_number(param, value, rid);
CREATE INDEX IF NOT EXISTS idx_number_r ON idx_number(rid, param);
CREATE TABLE IF NOT EXISTS idx_uri (rid INTEGER NOT NULL, param TEXT NOT NULL, value TEXT);
CREATE INDEX IF NOT EXISTS idx_uri_q ON idx_uri(param, value, rid);
CREATE INDEX IF NOT EXISTS idx_uri_r ON idx_uri(rid, param);
CREATE TABLE IF NOT EXISTS audit_log (seq INTEGER PRIMARY KEY, content TEXT NOT NULL, prev TEXT NOT NULL,
    hash TEXT NOT NULL, drained INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS audit_log_undrained ON audit_log(seq) WHERE drained = 0;
CREATE TABLE IF NOT EXISTS audit_pending (request TEXT NOT NULL, written TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS audit_pending_request ON audit_pending(request);
CREATE TABLE IF NOT EXISTS load_journal (batch TEXT PRIMARY KEY, source TEXT NOT NULL, first_line INTEGER,
    last_line INTEGER, resources INTEGER NOT NULL, committed TEXT NOT NULL);
"""
_INDEX_INSERT = {
    "token": "INSERT INTO idx_token(rid, param, system, code) VALUES (?,?,?,?)",
    "reference": "INSERT INTO idx_ref(rid, param, ttype, tid) VALUES (?,?,?,?)",
    "date": "INSERT INTO idx_date(rid, param, low, high) VALUES (?,?,?,?)",
    "string": "INSERT INTO idx_string(rid, param, norm, raw) VALUES (?,?,?,?)",
    "quantity": "INSERT INTO idx_quantity(rid, param, value, system, code) VALUES (?,?,?,?,?)",
    "number": "INSERT INTO idx_number(rid, param, value) VALUES (?,?,?)",
    "uri": "INSERT INTO idx_uri(rid, param, value) VALUES (?,?,?)",
}
_INDEX_TABLES = ("idx_token", "idx_ref", "idx_date", "idx_string", "idx_quantity", "idx_number", "idx_uri")


def _now() -> tuple[str, float]:
    """The current instant as a FHIR instant with milliseconds, and as epoch seconds of the same value."""
    ms = time.time_ns() // 1_000_000
    dt = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z", ms / 1000


def parse_version(if_match: str) -> str:
    """Extract the version id from an If-Match value: ``3``, ``"3"`` or ``W/"3"``.

    Examples
    --------
    >>> parse_version('W/"3"'), parse_version("3")
    ('3', '3')
    """
    v = if_match.strip()
    if v.startswith("W/"):
        v = v[2:]
    return v.strip('"')


def _stored(resource: dict, rid: str, version: int, lu: str) -> dict:
    """The resource as stored: id and meta first, server-owned meta fields replaced."""
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    meta["versionId"] = str(version)
    meta["lastUpdated"] = lu
    out = {"resourceType": resource["resourceType"], "id": rid, "meta": meta}
    for k, v in resource.items():
        if k not in out:
            out[k] = v
    return out


class _Tx:
    """One write transaction on one connection; every row it writes is buffered for ``executemany``.

    Inserts, version retirements and index rows of a whole Bundle go to SQLite as one ``executemany``
    per statement at ``flush`` (before anything reads inside the transaction, and at commit), so a
    transaction of N resources costs a handful of statement executions instead of ~10 per resource.
    Index rows are extracted for all buffered resources in one pass (``index_rows_many``).
    """

    def __init__(self, store: "SQLiteStore", conn: sqlite3.Connection):
        self.store, self.conn = store, conn
        conn.execute("BEGIN IMMEDIATE")
        self.next_rid = (conn.execute("SELECT COALESCE(MAX(rid), 0) FROM resources").fetchone()[0]) + 1
        self.lu, self.lu_ts = _now()
        self.pending_resources: list[tuple] = []  # rows of new resources
        self.pending_retire: list[tuple] = []  # (rid,) whose current version moves to history
        self.pending_updates: list[tuple] = []  # new current version of a retired rid
        self.pending_indexed: list[tuple[int, dict]] = []  # (rid, stored resource) to index
        self.touched: set[tuple[str, str]] = set()  # keys whose rows are still buffered
        self.written: list[tuple] = []  # (type, id, version, stored resource or None) for the audit record

    def flush(self) -> None:
        conn = self.conn
        if self.pending_retire:
            # Order matters: copy the old version to history and drop its index rows before the row
            # is overwritten and re-indexed.
            conn.executemany("INSERT INTO history(rid, version, lu, lu_ts, deleted, json) "
                             "SELECT rid, version, lu, lu_ts, deleted, json FROM resources WHERE rid = ?",
                             self.pending_retire)
            for table in _INDEX_TABLES:
                conn.executemany(f"DELETE FROM {table} WHERE rid = ?", self.pending_retire)
            self.pending_retire = []
        if self.pending_updates:
            conn.executemany("UPDATE resources SET version = ?, lu = ?, lu_ts = ?, deleted = ?, json = ? "
                             "WHERE rid = ?", self.pending_updates)
            self.pending_updates = []
        if self.pending_resources:
            conn.executemany(
                "INSERT INTO resources(rid, type, id, version, lu, lu_ts, deleted, json) VALUES (?,?,?,?,?,?,0,?)",
                self.pending_resources)
            self.pending_resources = []
        if self.pending_indexed:
            rows, widths = index_rows_many(self.pending_indexed)
            self.pending_indexed = []
            for kind, table_rows in rows.items():
                if table_rows:
                    conn.executemany(_INDEX_INSERT[kind], table_rows)
            if widths:
                # the widest date range per parameter bounds date range scans (see search.query._date_condition)
                conn.executemany("INSERT INTO date_width(param, w) VALUES (?, ?) "
                                 "ON CONFLICT(param) DO UPDATE SET w = max(w, excluded.w)", widths.items())
        self.touched = set()

    def current(self, rtype: str, rid: str):
        if (rtype, rid) in self.touched:
            self.flush()
        return self.conn.execute("SELECT rid, version, deleted, json FROM resources WHERE type = ? AND id = ?",
                                 (rtype, rid)).fetchone()

    def insert(self, resource: dict, rid: str) -> dict:
        stored = _stored(resource, rid, 1, self.lu)
        rowid = self.next_rid
        self.next_rid += 1
        self.pending_resources.append((rowid, stored["resourceType"], rid, 1, self.lu, self.lu_ts, _dumps(stored)))
        self.touched.add((stored["resourceType"], rid))
        self.pending_indexed.append((rowid, stored))
        self.written.append((stored["resourceType"], rid, 1, stored))
        return stored

    def replace(self, row, resource: dict, rid: str) -> dict:
        rowid, version = row[0], row[1]
        stored = _stored(resource, rid, version + 1, self.lu)
        self.pending_retire.append((rowid,))
        self.pending_updates.append((version + 1, self.lu, self.lu_ts, 0, _dumps(stored), rowid))
        self.touched.add((stored["resourceType"], rid))
        self.pending_indexed.append((rowid, stored))
        self.written.append((stored["resourceType"], rid, version + 1, stored))
        return stored

    def delete(self, row, rtype: str, rid: str) -> None:
        rowid, version = row[0], row[1]
        self.pending_retire.append((rowid,))
        self.pending_updates.append((version + 1, self.lu, self.lu_ts, 1, None, rowid))
        self.touched.add((rtype, rid))
        self.written.append((rtype, rid, version + 1, None))

    def resolve_conditions(self, conditions: list[tuple[str, str]]) -> list[list[tuple[str, str]] | None]:
        """Conditional creates' matches, looked up together where the condition allows it.

        ``conditions``: ``(resource type, query)`` pairs. For each, the matching ``(id, stored JSON)``
        pairs (at most two, as ``search_ids`` returns), or None where the query is not one pinned token
        (``identifier=system|value``, see ``search.query.pinned_token``): the caller searches those with
        ``search_ids``. The pinned ones are answered by one indexed query per (parameter, system)
        instead of one search per condition: an HL7 message or a device batch carries one condition per
        result, which as separate searches were a quarter of the writer's time.
        """
        self.flush()
        out: list[list[tuple[str, str]] | None] = [None] * len(conditions)
        wanted: dict[tuple[str, str], dict[str, list[int]]] = {}  # (key, system) -> code -> positions
        for i, (rtype, query) in enumerate(conditions):
            pinned = pinned_token(rtype, parse_qsl_fast(query))
            if pinned is not None:
                key, system, code = pinned
                wanted.setdefault((key, system), {}).setdefault(code, []).append(i)
                out[i] = []
        for (key, system), by_code in wanted.items():
            codes = list(by_code)
            found: dict[str, dict[str, str]] = {}  # code -> id -> JSON (one resource once, as the IN search)
            for at in range(0, len(codes), 500):
                chunk = codes[at:at + 500]
                sql = ("SELECT s.code, r.id, r.json FROM idx_token s JOIN resources r ON r.rid = s.rid "
                       f"WHERE s.param = ? AND s.code IN ({','.join('?' * len(chunk))}) AND s.system = ?")
                for code, rid, text in self.conn.execute(sql, (key, *chunk, system)):
                    found.setdefault(code, {})[rid] = text
            for code, positions in by_code.items():
                hits = list(found.get(code, {}).items())[:2]
                for i in positions:
                    out[i] = hits
        return out

    def search_ids(self, rtype: str, query: str) -> list[str]:
        """Ids of current resources matching a conditional query (inside this transaction)."""
        self.flush()
        params = parse_qsl_fast(query)
        if not params:
            raise InvalidRequest("If-None-Exist needs a search query such as identifier=system|value",
                                 error_id="invalid-condition")
        where, args, _, _ = match_sql(compile_search(rtype, params, strict=True))
        return [x[0] for x in self.conn.execute(f"SELECT r.id FROM resources r WHERE {where} LIMIT 2", args)]


class SQLiteStore(Store):
    """FHIR R4 store in one SQLite file.

    Concurrency: a pool of connections, each used by one thread at a time. The threaded HTTP server
    starts a thread per request, so thread-local connections would be opened and dropped per request;
    a pool reuses them. WAL lets readers run beside the one writer; writers take the write lock up
    front (``BEGIN IMMEDIATE``) and wait on ``busy_timeout`` rather than failing, so concurrent writes
    serialize instead of deadlocking on lock upgrades.

    Durability: ``synchronous=NORMAL`` in WAL mode writes every commit to the WAL file before the
    write is acknowledged, without an fsync per commit. A killed server process (``kill -9``) loses
    no acknowledged write: the commit is in the operating system's file cache and is read back from
    the WAL on the next open (tests/fhir_ops/store/test_durability.py). Only a power loss or kernel
    crash may drop the last commits before the next checkpoint; ``FULL`` would close that gap at the
    cost of an fsync per transaction. The WAL is checkpointed every ~40 MB (``wal_autocheckpoint``).

    Parameters
    ----------
    path : str or os.PathLike
        The SQLite file; its directory is created if missing.

    Examples
    --------
    >>> import tempfile, os
    >>> store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "t.sqlite"))
    >>> created = store.create({"resourceType": "Patient", "gender": "female"})
    >>> store.read("Patient", created.resource["id"])["meta"]["versionId"]
    '1'
    >>> store.close()
    """

    name = "embedded"

    def __init__(self, path) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._pool: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._writer_lock_path = self.path + "-writer.lock"
        conn = self._connect()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        self._pool.put(conn)

    # -- connections -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # Statements are compiled once per connection and reused from the module's statement cache; search
        # builds many distinct SQL texts, so the cache is larger than the default 128 to keep the write
        # path's few statements from being evicted by them.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0,
                               cached_statements=512)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA cache_size=-65536")
        conn.execute("PRAGMA temp_store=MEMORY")
        # Checkpoint the WAL every ~40 MB instead of ~4 MB: pages rewritten by consecutive ingest
        # transactions are copied into the database once, which measured ~15 % faster bundle ingest.
        conn.execute("PRAGMA wal_autocheckpoint=10000")
        # The request's time budget (fhir_ops.limits): SQLite calls back every ~10k VM steps and a
        # request past its deadline has its read statement interrupted, so no query holds the server.
        conn.set_progress_handler(limits.over_budget, 10_000)
        return conn

    @contextmanager
    def _conn(self):
        if self._closed:
            raise sqlite3.ProgrammingError(f"the store {self.path} is closed")
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            yield conn
        except sqlite3.OperationalError as exc:
            if "interrupted" not in str(exc):
                raise
            limits.clear_budget()  # the request is over; let the rollback below run uninterrupted
            raise limits.budget_error() from None
        finally:
            if conn.in_transaction:  # never hand a connection back mid-transaction
                conn.execute("ROLLBACK")
            with self._lock:  # a store closed meanwhile closes the connection here, once nobody uses it
                if not self._closed:
                    self._pool.put(conn)
                    conn = None
            if conn is not None:
                conn.close()

    @contextmanager
    def _write(self, *, audited: bool = True):
        """One write transaction; ``audited``: the request's audit hook (``WRITE_AUDIT``) records what it wrote."""
        with self._writer_turn(), self._conn() as conn:
            # A write, once begun, runs to its end: the time budget stops runaway reads, whereas a
            # write's size is bounded by the body limit, and a long operation's final store must not fail.
            conn.set_progress_handler(None, 0)
            try:
                tx = _Tx(self, conn)
                try:
                    yield tx
                    tx.flush()
                    hook = WRITE_AUDIT.get() if audited and tx.written else None
                    if hook is not None:
                        request_id, written = hook(tx.written)
                        conn.execute("INSERT INTO audit_pending(request, written, at) VALUES (?,?,?)",
                                     (request_id, written, tx.lu_ts))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            finally:
                conn.set_progress_handler(limits.over_budget, 10_000)

    @contextmanager
    def _writer_turn(self):
        """Queue writers (threads and processes) on a blocking file lock before SQLite's write lock.

        SQLite's own wait for a busy write lock polls with sleeps growing to 100 ms, so a writer often
        sleeps on past the moment the lock is free; with parallel load workers that idled a core. A
        blocking ``flock`` wakes the next writer as soon as the current one commits. SQLite's locking
        still guards the file against writers that do not take this lock.
        """
        if fcntl is None:  # no flock on this platform: SQLite's busy wait alone
            yield
            return
        fd = os.open(self._writer_lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextmanager
    def _read(self):
        """A read transaction, so multi-statement reads (count, page, includes) see one snapshot."""
        with self._conn() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close the idle connections now and each one in use when its thread hands it back.

        Closing a SQLite connection while another thread runs a statement on it can crash the process
        (a request thread still finishing its response as a test server shut down did), so only idle
        connections are closed here; afterwards the store refuses new work.
        """
        with self._lock:
            self._closed = True
            idle = []
            while True:
                try:
                    idle.append(self._pool.get_nowait())
                except queue.Empty:
                    break
        for conn in idle:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # -- single interactions ------------------------------------------------------------------------
    @staticmethod
    def _check_type(resource_type: str) -> None:
        if not is_resource_type(resource_type):
            raise NotFound(f"unknown resource type {resource_type!r}", error_id="unknown-resource-type")

    def _create_in(self, tx: _Tx, resource: dict, if_none_exist: str | None) -> WriteResult:
        rtype = resource["resourceType"]
        if if_none_exist:
            ids = tx.search_ids(rtype, if_none_exist.lstrip("?"))
            if len(ids) > 1:
                raise PreconditionFailed(f"If-None-Exist {if_none_exist!r} matches more than one {rtype}",
                                         error_id="multiple-matches")
            if ids:
                return WriteResult(json.loads(tx.current(rtype, ids[0])[3]), False)
        return WriteResult(tx.insert(resource, str(uuid.uuid4())), True)

    def create(self, resource: dict, *, if_none_exist: str | None = None) -> WriteResult:
        validate_resource(resource)
        with self._write() as tx:
            return self._create_in(tx, resource, if_none_exist)

    def read(self, resource_type: str, resource_id: str) -> dict:
        self._check_type(resource_type)
        with self._conn() as conn:
            row = conn.execute("SELECT deleted, json, version FROM resources WHERE type = ? AND id = ?",
                               (resource_type, resource_id)).fetchone()
        if row is None:
            raise NotFound(f"{resource_type}/{resource_id} does not exist", error_id="unknown-id")
        if row[0]:
            raise Gone(f"{resource_type}/{resource_id} was deleted (version {row[2]})", error_id="deleted")
        return json.loads(row[1])

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> dict:
        self._check_type(resource_type)
        with self._read() as conn:
            row = conn.execute("SELECT rid, version, deleted, json FROM resources WHERE type = ? AND id = ?",
                               (resource_type, resource_id)).fetchone()
            if row is None:
                raise NotFound(f"{resource_type}/{resource_id} does not exist", error_id="unknown-id")
            if str(row[1]) == str(version_id):
                found = row[2:]
            else:
                found = conn.execute("SELECT deleted, json FROM history WHERE rid = ? AND version = ?",
                                     (row[0], version_id)).fetchone()
        if found is None:
            raise NotFound(f"{resource_type}/{resource_id} has no version {version_id!r}", error_id="unknown-version")
        if found[0]:
            raise Gone(f"version {version_id} of {resource_type}/{resource_id} is a deletion", error_id="deleted")
        return json.loads(found[1])

    def _update_in(self, tx: _Tx, resource_type: str, resource_id: str, resource: dict,
                   if_match: str | None) -> WriteResult:
        if resource.get("resourceType") != resource_type:
            raise InvalidRequest(f"resource type {resource.get('resourceType')!r} does not match {resource_type!r}",
                                 error_id="type-mismatch", expression=["resourceType"])
        if resource.get("id", resource_id) != resource_id:
            raise InvalidRequest(f"resource id {resource.get('id')!r} does not match the id in the URL "
                                 f"{resource_id!r}", error_id="id-mismatch", expression=[f"{resource_type}.id"])
        if not ID_PATTERN.match(resource_id):
            raise InvalidRequest(f"{resource_id!r} is not a valid FHIR id", error_id="invalid-id")
        row = tx.current(resource_type, resource_id)
        if if_match is not None:
            wanted = parse_version(if_match)
            if row is None or row[2] or str(row[1]) != wanted:
                have = "no current version" if row is None or row[2] else f"version {row[1]}"
                raise PreconditionFailed(f"If-Match {if_match!r} does not match {resource_type}/{resource_id} "
                                         f"({have})", error_id="version-conflict")
        if row is None:
            return WriteResult(tx.insert(resource, resource_id), True)
        return WriteResult(tx.replace(row, resource, resource_id), bool(row[2]))

    def update(self, resource_type: str, resource_id: str, resource: dict, *,
               if_match: str | None = None) -> WriteResult:
        self._check_type(resource_type)
        validate_resource(resource)
        with self._write() as tx:
            return self._update_in(tx, resource_type, resource_id, resource, if_match)

    def _delete_in(self, tx: _Tx, resource_type: str, resource_id: str) -> bool:
        row = tx.current(resource_type, resource_id)
        if row is None or row[2]:
            return False
        tx.delete(row, resource_type, resource_id)
        return True

    def delete(self, resource_type: str, resource_id: str) -> None:
        self._check_type(resource_type)
        with self._write() as tx:
            self._delete_in(tx, resource_type, resource_id)

    def history(self, resource_type: str | None, resource_id: str | None = None, *,
                count: int | None = None, offset: int = 0) -> list[dict]:
        """Versions newest first; a deleted version is a stub ``{resourceType, id, meta}`` tagged ``DELETED_TAG``."""
        limit = -1 if count is None else int(count)
        sql, args = self._history_query(resource_type, resource_id)
        # A total order, so that pages (offset, count) neither repeat nor skip a version.
        order = "version DESC" if resource_id is not None else "lu_ts DESC, version DESC, type, id"
        with self._read() as conn:
            rows = conn.execute(f"SELECT type, id, version, lu, deleted, json FROM ({sql}) "
                                f"ORDER BY {order} LIMIT ? OFFSET ?",
                                (*args, limit, max(0, int(offset)))).fetchall()
        out = []
        for rtype, rid, version, lu, deleted, text in rows:
            if deleted:
                out.append({"resourceType": rtype, "id": rid,
                            "meta": {"versionId": str(version), "lastUpdated": lu, "tag": [dict(DELETED_TAG)]}})
            else:
                out.append(json.loads(text))
        return out

    def history_total(self, resource_type: str | None, resource_id: str | None = None) -> int:
        sql, args = self._history_query(resource_type, resource_id)
        with self._read() as conn:
            return int(conn.execute(f"SELECT count(*) FROM ({sql})", args).fetchone()[0])

    def _history_query(self, resource_type: str | None, resource_id: str | None) -> tuple[str, tuple]:
        """Every version (current and past) of the instance, type or whole store, as one UNION."""
        current = "SELECT r.type, r.id, r.version, r.lu, r.lu_ts, r.deleted, r.json FROM resources r"
        past = ("SELECT r.type, r.id, h.version, h.lu, h.lu_ts, h.deleted, h.json FROM history h "
                "JOIN resources r ON r.rid = h.rid")
        if resource_type is None:
            return f"{current} UNION ALL {past}", ()
        self._check_type(resource_type)
        if resource_id is None:
            return f"{current} WHERE r.type = ? UNION ALL {past} WHERE r.type = ?", (resource_type, resource_type)
        with self._read() as conn:
            row = conn.execute("SELECT rid FROM resources WHERE type = ? AND id = ?",
                               (resource_type, resource_id)).fetchone()
        if row is None:
            raise NotFound(f"{resource_type}/{resource_id} does not exist", error_id="unknown-id")
        return f"{current} WHERE r.rid = ? UNION ALL {past} WHERE h.rid = ?", (row[0], row[0])

    # -- search ---------------------------------------------------------------------------------------
    def search(self, resource_type: str, params: list[tuple[str, str]], *, strict: bool = False) -> SearchResult:
        self._check_type(resource_type)
        c = compile_search(resource_type, list(params), strict=strict)
        where, args, count_sql, count_args = match_sql(c)
        with self._read() as conn:
            total = None
            if c.want_total or c.summary_count:
                total = conn.execute(count_sql, count_args).fetchone()[0]
            if c.summary_count or c.count == 0:
                return SearchResult(total, [], [], c.offset, c.count, c.ignored)
            if c.page_match is not None and c.order_by == "r.rid":
                # cut the page inside the index scan: O(offset + count) instead of O(matches)
                match, match_args = c.page_match
                rows = conn.execute(f"SELECT r.rid, r.id, r.json FROM ({match} ORDER BY s.rid LIMIT ? OFFSET ?) m "
                                    f"JOIN resources r ON r.rid = m.rid ORDER BY r.rid",
                                    [*match_args, c.count, c.offset]).fetchall()
            else:
                rows = conn.execute(f"SELECT r.rid, r.id, r.json FROM resources r WHERE {where} "
                                    f"ORDER BY {c.order_by} LIMIT ? OFFSET ?", [*args, c.count, c.offset]).fetchall()
            matches = [json.loads(r[2]) for r in rows]
            included = self._included(conn, c, rows) if (c.includes or c.revincludes) and rows else []
        return SearchResult(total, matches, included, c.offset, c.count, c.ignored)

    @staticmethod
    def _included(conn: sqlite3.Connection, c, rows) -> list[dict]:
        seen = {(c.resource_type, r[1]) for r in rows}
        rids = [r[0] for r in rows]
        ids = [r[1] for r in rows]
        out = []
        marks = ",".join("?" * len(rids))
        for keys, target in c.includes:
            pm = ",".join("?" * len(keys))
            sql = (f"SELECT DISTINCT t.type, t.id, t.json FROM idx_ref x JOIN resources t "
                   f"ON t.type = x.ttype AND t.id = x.tid WHERE x.rid IN ({marks}) AND x.param IN ({pm}) "
                   f"AND t.deleted = 0")
            args = [*rids, *keys]
            if target:
                sql += " AND x.ttype = ?"
                args.append(target)
            for rtype, rid, text in conn.execute(sql, args):
                if (rtype, rid) not in seen:
                    seen.add((rtype, rid))
                    out.append(json.loads(text))
        idm = ",".join("?" * len(ids))
        for keys, target_type in c.revincludes:
            pm = ",".join("?" * len(keys))
            sql = (f"SELECT DISTINCT t.type, t.id, t.json FROM idx_ref x JOIN resources t ON t.rid = x.rid "
                   f"WHERE x.param IN ({pm}) AND x.ttype = ? AND x.tid IN ({idm}) AND t.deleted = 0")
            for rtype, rid, text in conn.execute(sql, [*keys, target_type, *ids]):
                if (rtype, rid) not in seen:
                    seen.add((rtype, rid))
                    out.append(json.loads(text))
        return out

    # -- audit journal (fhir_ops.audit) ---------------------------------------------------------------
    def append_audit(self, events: list[dict], *, settle: str | None = None) -> list[int]:
        """Append AuditEvent records to the hash-chained journal, in one transaction; their sequence numbers.

        ``settle``: a request id whose pending write records (``audit_pending``) these events replace;
        they are removed in the same transaction.
        """
        with self._write(audited=False) as tx:
            row = tx.conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0], row[1]) if row else (0, GENESIS)
            rows, out = [], []
            for event in events:
                text = canonical(event)
                digest = link(prev, text)
                seq += 1
                rows.append((seq, text, prev, digest))
                out.append(seq)
                prev = digest
            tx.conn.executemany("INSERT INTO audit_log(seq, content, prev, hash) VALUES (?,?,?,?)", rows)
            if settle is not None:
                tx.conn.execute("DELETE FROM audit_pending WHERE request = ?", (settle,))
        return out

    def audit_pending(self, request_id: str) -> list[str]:
        """The JSON texts the write transactions of one request recorded (see ``WRITE_AUDIT``)."""
        with self._conn() as conn:
            return [r[0] for r in conn.execute("SELECT written FROM audit_pending WHERE request = ? ORDER BY rowid",
                                               (request_id,))]

    def audit_orphans(self, before: float) -> dict[str, list[str]]:
        """Pending write records older than ``before`` (epoch s) whose request never wrote its AuditEvent."""
        out: dict[str, list[str]] = {}
        with self._conn() as conn:
            for request_id, written in conn.execute("SELECT request, written FROM audit_pending WHERE at < ? "
                                                    "ORDER BY rowid", (before,)):
                out.setdefault(request_id, []).append(written)
        return out

    def audit_journal(self, after: int = 0, limit: int = 1000) -> list[tuple[int, str, str, str, int]]:
        """Journal rows ``(seq, content, prev, hash, drained)`` with ``seq > after``, in order."""
        with self._read() as conn:
            return conn.execute("SELECT seq, content, prev, hash, drained FROM audit_log WHERE seq > ? ORDER BY seq "
                                "LIMIT ?", (after, limit)).fetchall()

    def audit_resources(self, ids: list[str]) -> dict[str, str | None]:
        """The stored JSON text of AuditEvents by id (None for a deleted one; absent when missing)."""
        out: dict[str, str | None] = {}
        with self._read() as conn:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                rows = conn.execute(f"SELECT id, deleted, json FROM resources WHERE type = 'AuditEvent' AND id IN "
                                    f"({','.join('?' * len(chunk))})", chunk)
                out.update({rid: None if deleted else text for rid, deleted, text in rows})
        return out

    def audit_backlog(self) -> int:
        """How many journal records are not yet searchable as AuditEvent resources."""
        with self._conn() as conn:
            return conn.execute("SELECT count(*) FROM audit_log WHERE drained = 0").fetchone()[0]

    def drain_audit(self, materialize, limit: int = 2000) -> int:
        """Turn journal records into AuditEvent resources (``materialize(seq, content, prev, hash)`` builds
        each), in one transaction per call; returns how many were drained.

        Serialized with every other writer, so two drains never store the same record twice.
        """
        with self._write(audited=False) as tx:
            rows = tx.conn.execute("SELECT seq, content, prev, hash FROM audit_log WHERE drained = 0 ORDER BY seq "
                                   "LIMIT ?", (limit,)).fetchall()
            for seq, text, prev, digest in rows:
                resource = materialize(seq, json.loads(text), prev, digest)
                row = tx.current("AuditEvent", resource["id"])
                if row is None:
                    tx.insert(resource, resource["id"])
                else:  # a resource of that id already there (never by the API: AuditEvent writes are refused)
                    tx.replace(row, resource, resource["id"])
            tx.conn.executemany("UPDATE audit_log SET drained = 1 WHERE seq = ?", [(r[0],) for r in rows])
        return len(rows)

    # -- bundles ---------------------------------------------------------------------------------------
    def _validate_entries(self, entries: list[EntryRequest]) -> None:
        for e in entries:
            if e.resource is None:
                continue
            try:
                validate_resource(e.resource)
            except FhirError as err:
                where = e.where
                err.message = f"{where}: {err.message}"
                err.args = (err.message,)
                inner = [x.split(".", 1)[1] if "." in x else x for x in err.expression]
                err.expression = [where, *(f"{where}.resource.{x}" for x in inner)]
                raise

    def _run_entry(self, tx: _Tx, e: EntryRequest, resource: dict | None) -> dict:
        """Apply one parsed entry inside ``tx``; return its response entry."""
        if e.method == "POST":
            result = self._create_in(tx, resource, e.if_none_exist)
            return response_entry(201 if result.created else 200, result.resource)
        if e.method == "PUT":
            result = self._update_in(tx, e.resource_type, e.resource_id, resource, e.if_match)
            return response_entry(201 if result.created else 200, result.resource)
        if e.method == "DELETE":
            self._delete_in(tx, e.resource_type, e.resource_id)
            return response_entry(204)
        tx.flush()
        if e.query is not None:  # GET Type?query inside a bundle: a searchset
            res = self._search_in(tx.conn, e.resource_type, e.query)
            return {"resource": res, "response": {"status": "200 OK"}}
        if e.resource_id is None:
            raise InvalidRequest(f"{e.where}: GET needs Type/id or Type?query", error_id="invalid-bundle")
        row = tx.conn.execute("SELECT rid, version, deleted, json FROM resources WHERE type = ? AND id = ?",
                              (e.resource_type, e.resource_id)).fetchone()
        if row is None:
            raise NotFound(f"{e.resource_type}/{e.resource_id} does not exist", error_id="unknown-id")
        if e.version_id is not None and str(row[1]) != e.version_id:
            row = tx.conn.execute("SELECT rid, version, deleted, json FROM history WHERE rid = ? AND version = ?",
                                  (row[0], e.version_id)).fetchone()
            if row is None:
                raise NotFound(f"{e.resource_type}/{e.resource_id} has no version {e.version_id}",
                               error_id="unknown-version")
        if row[2]:
            raise Gone(f"{e.resource_type}/{e.resource_id} was deleted", error_id="deleted")
        return response_entry(200, json.loads(row[3]), include_resource=True)

    def _search_in(self, conn, resource_type: str, params) -> dict:
        c = compile_search(resource_type, params)
        where, args, count_sql, count_args = match_sql(c)
        total = conn.execute(count_sql, count_args).fetchone()[0]
        rows = conn.execute(f"SELECT r.json FROM resources r WHERE {where} ORDER BY {c.order_by} LIMIT ? OFFSET ?",
                            [*args, c.count, c.offset]).fetchall()
        return {"resourceType": "Bundle", "type": "searchset", "total": total,
                "entry": [{"resource": json.loads(r[0]), "search": {"mode": "match"}} for r in rows]}

    def transaction(self, bundle: dict, *, journal: dict | None = None) -> dict:
        """Apply a transaction Bundle atomically.

        Every entry is validated before anything is written; ``urn:uuid:`` fullUrls of created (and
        conditionally matched) resources are rewritten in every reference of the bundle; entries run in
        FHIR order (DELETE, POST, PUT, GET); any failure rolls everything back and is raised with the
        entry's index in ``expression`` (``Bundle.entry[3]``).

        ``journal`` (bulk loads): ``{"batch": key, "source": ..., "first_line": ..., "last_line": ...}``
        recorded in the load journal in the same SQLite transaction, so after a crash the journal says
        exactly which batches are stored (see ``loaded_batches``).
        """
        entries = parse_entries(bundle, "transaction")
        self._validate_entries(entries)
        responses: list[dict | None] = [None] * len(entries)
        # Work on copies so reference rewriting never changes the caller's bundle.
        resources = {e.index: dict(e.resource) for e in entries if e.resource is not None}
        order = sorted(entries, key=lambda e: METHOD_ORDER[e.method])
        with self._write() as tx:
            current: EntryRequest | None = None
            try:
                mapping: dict[str, str] = {}
                posts = [e for e in order if e.method == "POST"]
                matched: dict[int, WriteResult] = {}
                conditional = [e for e in posts if e.if_none_exist]
                resolved = dict(zip((e.index for e in conditional), tx.resolve_conditions(
                    [(e.resource_type, e.if_none_exist.lstrip("?")) for e in conditional])))
                for e in posts:  # resolve conditional creates first: their outcome fixes the target id
                    current = e
                    if e.if_none_exist:
                        hits = resolved[e.index]
                        if hits is None:  # not a pinned token: an ordinary search
                            hits = [(x, None) for x in tx.search_ids(e.resource_type, e.if_none_exist.lstrip("?"))]
                        if len(hits) > 1:
                            raise PreconditionFailed(f"ifNoneExist {e.if_none_exist!r} matches more than one "
                                                     f"{e.resource_type}", error_id="multiple-matches")
                        if hits:
                            found_id, text = hits[0]
                            if text is None:
                                text = tx.current(e.resource_type, found_id)[3]
                            matched[e.index] = WriteResult(json.loads(text), False)
                            if e.full_url:
                                mapping[e.full_url] = f"{e.resource_type}/{found_id}"
                            continue
                    new_id = str(uuid.uuid4())
                    resources[e.index]["id"] = new_id
                    if e.full_url:
                        mapping[e.full_url] = f"{e.resource_type}/{new_id}"
                for e in entries:
                    if e.method == "PUT" and e.full_url:
                        mapping[e.full_url] = f"{e.resource_type}/{e.resource_id}"
                if mapping:
                    for res in resources.values():
                        rewrite_references(res, mapping)
                for e in order:
                    current = e
                    if e.index in matched:
                        responses[e.index] = response_entry(200, matched[e.index].resource)
                    elif e.method == "POST":
                        res = resources[e.index]
                        responses[e.index] = response_entry(201, tx.insert(res, res["id"]))
                    else:
                        responses[e.index] = self._run_entry(tx, e, resources.get(e.index))
                if journal is not None:
                    current = None
                    tx.conn.execute("INSERT OR REPLACE INTO load_journal(batch, source, first_line, last_line, "
                                    "resources, committed) VALUES (?,?,?,?,?,?)",
                                    (journal["batch"], journal.get("source", ""), journal.get("first_line"),
                                     journal.get("last_line"), len(entries), tx.lu))
            except FhirError as err:
                if current is not None and not any(x.startswith("Bundle.entry[") for x in err.expression):
                    err.message = f"{current.where}: {err.message}"
                    err.args = (err.message,)
                    err.expression = [current.where, *err.expression]
                raise
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}

    def loaded_batches(self) -> set[str]:
        """Keys of the bulk-load batches committed so far (``transaction(..., journal=...)``)."""
        with self._read() as conn:
            return {row[0] for row in conn.execute("SELECT batch FROM load_journal")}

    def batch(self, bundle: dict) -> dict:
        """Apply a batch Bundle entry by entry, each in its own transaction; failures become outcomes."""
        entries = parse_entries(bundle, "batch")
        responses = []
        for e in entries:
            try:
                if e.resource is not None:
                    validate_resource(e.resource)
                with self._write() as tx:
                    resource = dict(e.resource) if e.resource is not None else None
                    responses.append(self._run_entry(tx, e, resource))
            except FhirError as err:
                responses.append({"response": {
                    "status": response_entry(err.status)["response"]["status"], "outcome": err.to_outcome()}})
        return {"resourceType": "Bundle", "type": "batch-response", "entry": responses}
