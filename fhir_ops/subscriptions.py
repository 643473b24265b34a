"""R4 Subscriptions (rest-hook): who is notified of what, and a durable outbox that delivers it.

A watcher thread finds new matches by running each active Subscription's criteria as a store search
restricted to ``_lastUpdated`` at or after its cursor, so writes from any path and any process (REST,
transactions, loads, ``listen-hl7``) are seen, and criteria mean exactly what a search means. Matches go
to an outbox (SQLite beside the store) that delivery threads drain off the request path: retries with
backoff, then the Subscription is set to ``error``. Endpoints must be https on a public address, or
named by ``SUBSCRIPTION_ENDPOINT_ALLOW`` (loopback for tests and development).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from urllib.parse import parse_qsl

from fhir_ops import watch
from fhir_ops.errors import FhirError, InvalidRequest

log = logging.getLogger(__name__)

#: default seconds between delivery attempts; after the last one the Subscription is in error
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
POLL_SECONDS = 0.25
DELIVERY_TIMEOUT = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (subscription TEXT PRIMARY KEY, lu TEXT NOT NULL, seen TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS delivery (
    n INTEGER PRIMARY KEY, subscription TEXT NOT NULL, focus TEXT NOT NULL, version TEXT NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, created REAL NOT NULL,
    delivered REAL, last_error TEXT, UNIQUE(subscription, focus, version));
CREATE INDEX IF NOT EXISTS delivery_due ON delivery(status, next_at);
"""


#: search parameters that shape the answer rather than select resources: meaningless in criteria
_RESULT_PARAMS = frozenset({"_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_elements",
                            "_total", "_contained", "_containedType"})


# -- checking a Subscription as it is written ------------------------------------------------------
def criteria_of(subscription: dict) -> tuple[str, list[tuple[str, str]]]:
    """``Subscription.criteria`` as (resource type, search parameters)."""
    criteria = subscription.get("criteria")
    if not isinstance(criteria, str) or not criteria.strip():
        raise InvalidRequest("Subscription.criteria is required: a search such as "
                             "'RiskAssessment?probability=gt0.8'", error_id="invalid-criteria",
                             expression=["Subscription.criteria"])
    rtype, _, query = criteria.strip().partition("?")
    return rtype, parse_qsl(query, keep_blank_values=True)


def check_subscription(resource: dict, allow) -> None:
    """Refuse (400/422) a Subscription this server would not honour, before it is stored.

    ``allow`` is the ``smart_app.outbound.AllowList`` of non-public endpoints (development).
    """
    if not isinstance(resource, dict) or resource.get("resourceType") != "Subscription":
        return
    from fhir_ops.search.query import compile_search
    from smart_app.outbound import OutboundRefused, check_url

    rtype, params = criteria_of(resource)
    paging = sorted({name for name, _ in params} & _RESULT_PARAMS)
    if paging:
        raise InvalidRequest(f"Subscription.criteria: {', '.join(paging)} shape a result page, not which resources "
                             "match", error_id="invalid-criteria", expression=["Subscription.criteria"])
    try:
        compile_search(rtype, params, strict=True)
    except FhirError as exc:
        raise InvalidRequest(f"Subscription.criteria: {exc.message}", error_id="invalid-criteria",
                             expression=["Subscription.criteria"]) from None
    except Exception:  # an unknown resource type is not a search at all
        raise InvalidRequest(f"Subscription.criteria: {rtype!r} is not a searchable resource type",
                             error_id="invalid-criteria", expression=["Subscription.criteria"]) from None
    channel = resource.get("channel") if isinstance(resource.get("channel"), dict) else {}
    if channel.get("type") != "rest-hook":
        raise FhirError(f"Subscription.channel.type {channel.get('type')!r} is not supported here (rest-hook)",
                        status=422, code="not-supported", error_id="unsupported-channel",
                        expression=["Subscription.channel.type"])
    endpoint = channel.get("endpoint")
    try:
        check_url(str(endpoint or ""), allow)
    except OutboundRefused as exc:
        raise FhirError(f"Subscription.channel.endpoint refused: {exc} (an endpoint must be https on a public "
                        "address)", status=422, code="security", error_id="endpoint-refused",
                        expression=["Subscription.channel.endpoint"]) from None
    for i, header in enumerate(channel.get("header") or []):
        if not isinstance(header, str) or ":" not in header or "\n" in header or "\r" in header:
            raise InvalidRequest("Subscription.channel.header must be 'Name: value' lines",
                                 error_id="invalid-header", expression=[f"Subscription.channel.header[{i}]"])


# -- the service -------------------------------------------------------------------------------------
class SubscriptionService:
    """Watcher + delivery threads over one store; ``start()`` / ``stop()``.

    Parameters
    ----------
    store : Store
    outbox_path : str
        SQLite file of cursors and deliveries (the delivery log).
    allow : smart_app.outbound.AllowList
        Non-public endpoints allowed (development).
    retry_delays : sequence of float
        Seconds before each retry; a delivery failing ``len(retry_delays) + 1`` times puts its
        Subscription in ``error``.
    """

    def __init__(self, store, outbox_path: str, allow=None, *, retry_delays=RETRY_DELAYS,
                 poll_seconds: float = POLL_SECONDS, timeout: float = DELIVERY_TIMEOUT, workers: int = 4) -> None:
        from smart_app.outbound import AllowList

        self.store = store
        self.allow = allow if allow is not None else AllowList()
        self.retry_delays = tuple(retry_delays)
        self.poll_seconds = poll_seconds
        self.timeout = timeout
        self.workers = workers
        self.path = outbox_path
        os.makedirs(os.path.dirname(os.path.abspath(outbox_path)), exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _db(self):
        return watch.state_db(self.path)  # closed after each use (see watch.state_db)

    def start(self) -> "SubscriptionService":
        self._threads = [threading.Thread(target=self._watch, name="subscription-watch", daemon=True)]
        self._threads += [threading.Thread(target=self._deliver_loop, name=f"subscription-deliver-{i}", daemon=True)
                          for i in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    # -- watching ----------------------------------------------------------------------------------
    def _active(self) -> list[dict]:
        found = self.store.search("Subscription", [("status", "requested,active"), ("_count", "1000")])
        return [s for s in found.matches if s.get("status") in ("requested", "active")]

    def poll_once(self) -> int:
        """Queue deliveries for new matches of every active Subscription; the number queued."""
        queued = 0
        for sub in self._active():
            try:
                queued += self._poll_subscription(sub)
            except FhirError as exc:  # criteria that no longer compile (e.g. a search parameter removed)
                self._set_error(sub["id"], f"criteria cannot be evaluated: {exc.message}")
        if queued:
            with self._wake:
                self._wake.notify_all()
        return queued

    def _poll_subscription(self, sub: dict) -> int:
        sid = sub["id"]
        with self._db() as db:
            row = db.execute("SELECT lu, seen FROM cursor WHERE subscription = ?", (sid,)).fetchone()
        if row is None or sub.get("status") == "requested":
            # notify of what happens from the Subscription's (re)activation on, not of the past: one
            # set back to requested after an error does not replay what matched meanwhile
            lu, seen = sub["meta"]["lastUpdated"], []
            with self._db() as db:
                db.execute("INSERT OR REPLACE INTO cursor VALUES (?, ?, '[]')", (sid, lu))
            if sub.get("status") == "requested":
                self._update_subscription(sid, status="active")
        else:
            lu, seen = row[0], json.loads(row[1])
        rtype, params = criteria_of(sub)
        new, newest, at_newest = watch.changes(self.store, rtype, params, lu, set(seen))
        if not new:
            return 0
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            for r in new:
                db.execute("INSERT OR IGNORE INTO delivery(subscription, focus, version, status, next_at, created) "
                           "VALUES (?, ?, ?, 'pending', ?, ?)",
                           (sid, f"{r['resourceType']}/{r['id']}", r["meta"]["versionId"], now, now))
            db.execute("UPDATE cursor SET lu = ?, seen = ? WHERE subscription = ?",
                       (newest, json.dumps(sorted(at_newest)), sid))
            db.execute("COMMIT")
        return len(new)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the watcher must outlive a bad poll
                log.exception("subscription watcher")
            self._stop.wait(self.poll_seconds)

    # -- delivering --------------------------------------------------------------------------------
    def _claim(self):
        with self._lock, self._db() as db:
            busy = sorted(self._in_flight)
            marks = ",".join("?" * len(busy))
            row = db.execute("SELECT n, subscription, focus, version, attempts FROM delivery WHERE status = 'pending' "
                             f"AND next_at <= ? {'AND subscription NOT IN (' + marks + ')' if busy else ''} "
                             "ORDER BY next_at, n LIMIT 1", (time.time(), *busy)).fetchone()
            if row:
                self._in_flight.add(row[1])
            return row

    def _deliver_loop(self) -> None:
        while not self._stop.is_set():
            row = self._claim()
            if row is None:
                with self._wake:
                    self._wake.wait(0.1)
                continue
            try:
                self._deliver(*row)
            except Exception:  # noqa: BLE001
                log.exception("subscription delivery")
            finally:
                with self._lock:
                    self._in_flight.discard(row[1])

    def _deliver(self, n: int, sid: str, focus: str, version: str, attempts: int) -> None:
        from smart_app.outbound import post

        try:
            sub = self.store.read("Subscription", sid)
        except FhirError:
            sub = None
        if sub is None or sub.get("status") not in ("requested", "active"):
            self._record(n, "abandoned", attempts, None, "the Subscription is no longer active")
            return
        channel = sub.get("channel") or {}
        headers = {"X-Subscription": f"Subscription/{sid}"}
        for h in channel.get("header") or []:
            name, _, value = h.partition(":")
            headers[name.strip()] = value.strip()
        body = b""
        if channel.get("payload"):
            rtype, rid = focus.split("/", 1)
            resource = self.store.vread(rtype, rid, version)
            body = json.dumps(resource).encode()
            headers["Content-Type"] = channel["payload"]
        error = None
        try:
            status = post(channel.get("endpoint", ""), body, headers, allow=self.allow, timeout=self.timeout)
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, timed out: all retried
            error = f"{type(exc).__name__}: {exc}"[:300]
        attempts += 1
        if error is None:
            self._record(n, "delivered", attempts, None, None)
            return
        if attempts <= len(self.retry_delays):
            self._record(n, "pending", attempts, time.time() + self.retry_delays[attempts - 1], error)
            return
        self._record(n, "failed", attempts, None, error)
        self._set_error(sid, f"delivery of {focus}/_history/{version} failed {attempts} times; last: {error}")

    def _record(self, n: int, status: str, attempts: int, next_at: float | None, error: str | None) -> None:
        with self._db() as db:
            db.execute("UPDATE delivery SET status = ?, attempts = ?, next_at = COALESCE(?, next_at), "
                       "last_error = ?, delivered = CASE WHEN ? = 'delivered' THEN ? ELSE delivered END WHERE n = ?",
                       (status, attempts, next_at, error, status, time.time(), n))
        log.info("subscription delivery %s: %s (attempt %s)%s", n, status, attempts, f": {error}" if error else "")

    def _set_error(self, sid: str, message: str) -> None:
        self._update_subscription(sid, status="error", error=message)
        with self._db() as db:
            db.execute("UPDATE delivery SET status = 'abandoned' WHERE subscription = ? AND status = 'pending'", (sid,))

    def _update_subscription(self, sid: str, **fields) -> None:
        try:
            sub = self.store.read("Subscription", sid)
        except FhirError:
            return
        sub = {**sub, **fields}
        if fields.get("status") == "active":
            sub.pop("error", None)
        self.store.update("Subscription", sid, sub)

    def deliveries(self, sid: str | None = None) -> list[dict]:
        """The delivery log, oldest first (for tests, the CLI and operators)."""
        with self._db() as db:
            rows = db.execute("SELECT n, subscription, focus, version, status, attempts, created, delivered, "
                              "last_error FROM delivery " + ("WHERE subscription = ? " if sid else "") + "ORDER BY n",
                              (sid,) if sid else ()).fetchall()
        keys = ("n", "subscription", "focus", "version", "status", "attempts", "created", "delivered", "lastError")
        return [dict(zip(keys, r)) for r in rows]


def endpoint_allow(app):
    """The AllowList of non-public endpoints (``SUBSCRIPTION_ENDPOINT_ALLOW``: hosts and networks)."""
    from smart_app.outbound import AllowList

    return AllowList.parse(app.config.get("SUBSCRIPTION_ENDPOINT_ALLOW") or ())


def init_app(app) -> None:
    """Start the watcher and delivery threads when ``SUBSCRIPTIONS`` is on (``trialtwin serve`` turns it on).

    Config: ``SUBSCRIPTION_ENDPOINT_ALLOW``, ``SUBSCRIPTION_RETRY_DELAYS`` (seconds), ``SUBSCRIPTION_POLL``,
    ``SUBSCRIPTION_DELIVERY_TIMEOUT`` (seconds one POST to an endpoint may take; 5).
    The service is ``app.extensions["trialtwin.subscriptions"]``; ``stop()`` it before closing the store.
    """
    if not app.config.get("SUBSCRIPTIONS"):
        return
    service = SubscriptionService(
        app.extensions["trialtwin.store"], os.path.join(app.config["DATA_DIR"], "trialtwin-subscriptions.sqlite"),
        endpoint_allow(app), retry_delays=app.config.get("SUBSCRIPTION_RETRY_DELAYS") or RETRY_DELAYS,
        poll_seconds=float(app.config.get("SUBSCRIPTION_POLL") or POLL_SECONDS),
        timeout=float(app.config.get("SUBSCRIPTION_DELIVERY_TIMEOUT") or DELIVERY_TIMEOUT))
    app.extensions["trialtwin.subscriptions"] = service.start()


__all__ = ["SubscriptionService", "check_subscription", "criteria_of", "init_app"]
