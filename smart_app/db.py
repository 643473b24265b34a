"""SQLite persistence of the development authorization server: clients, users, initial access tokens, codes,
tokens (and their revocation), launches, seen jti.

Framework-free; one short-lived connection per call so the threaded WSGI server can share the file.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from authlib.oauth2.rfc6749 import ClientMixin

from .scopes import ScopeSet, parse_scopes

SCHEMA = """
CREATE TABLE IF NOT EXISTS client (
    client_id TEXT PRIMARY KEY, client_secret TEXT, metadata TEXT NOT NULL, issued_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS auth_code (
    code_hash TEXT PRIMARY KEY, client_id TEXT NOT NULL, data TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS token (
    jti TEXT PRIMARY KEY, client_id TEXT NOT NULL, username TEXT, scope TEXT NOT NULL, context TEXT NOT NULL,
    issued_at REAL NOT NULL, expires_at REAL NOT NULL, refresh_hash TEXT UNIQUE, refresh_expires_at REAL,
    revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS launch (
    launch_id TEXT PRIMARY KEY, context TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS seen_jti (
    client_id TEXT NOT NULL, jti TEXT NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (client_id, jti));
CREATE TABLE IF NOT EXISTS app_user (
    username TEXT PRIMARY KEY, password_hash TEXT NOT NULL, fhir_user TEXT NOT NULL, name TEXT NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS initial_access_token (
    token_hash TEXT PRIMARY KEY, label TEXT NOT NULL, scope TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL, revoked INTEGER NOT NULL DEFAULT 0);
"""
#: Columns added after the first release; added to older files on open (SQLite has no IF NOT EXISTS for columns).
MIGRATIONS = (
    ("client", "revoked", "ALTER TABLE client ADD COLUMN revoked INTEGER NOT NULL DEFAULT 0"),
    ("client", "registered_by", "ALTER TABLE client ADD COLUMN registered_by TEXT"),
)


def digest(secret: str) -> str:
    """SHA-256 of a bearer secret: codes and refresh tokens are stored only as digests."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Client(ClientMixin):
    """A registered client with its RFC 7591 metadata."""

    client_id: str
    client_secret: str | None
    metadata: dict
    issued_at: int = 0
    registered_by: str | None = None

    # -- authlib ClientMixin ------------------------------------------------------------------
    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        uris = self.metadata.get("redirect_uris") or []
        return uris[0] if uris else None

    def get_allowed_scope(self, scope: str) -> str:
        # Grant what was asked and registered; system/ scopes never through a user-facing flow.
        requested = parse_scopes(scope).restrict(("patient", "user"))
        return requested.within(self.allowed_scopes).text

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in (self.metadata.get("redirect_uris") or [])

    def check_client_secret(self, client_secret: str) -> bool:
        # as bytes: compare_digest refuses str with non-ASCII characters (a TypeError, i.e. a 500)
        return bool(self.client_secret) and secrets.compare_digest(self.client_secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if endpoint in ("token", "revocation"):
            # RFC 7009 §2.1: a client revokes with the same authentication it uses at the token endpoint.
            return method == self.token_endpoint_auth_method
        # Introspection: any confidential client (resource servers register as one) may call it.
        return method != "none" and method == self.token_endpoint_auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types

    # -- convenience --------------------------------------------------------------------------
    @property
    def token_endpoint_auth_method(self) -> str:
        return self.metadata.get("token_endpoint_auth_method", "client_secret_basic")

    @property
    def grant_types(self) -> list[str]:
        return self.metadata.get("grant_types") or ["authorization_code"]

    @property
    def allowed_scopes(self) -> ScopeSet:
        return parse_scopes(self.metadata.get("scope", ""))

    @property
    def name(self) -> str:
        return self.metadata.get("client_name") or self.client_id

    def public_view(self) -> dict:
        """Registration response body (RFC 7591 §3.2.1)."""
        body = {"client_id": self.client_id, "client_id_issued_at": self.issued_at, **self.metadata}
        if self.client_secret:
            body["client_secret"] = self.client_secret
            body["client_secret_expires_at"] = 0
        return body


@dataclass
class AuthorizationCode:
    """An issued authorization code with its PKCE challenge, user and SMART launch context."""

    client_id: str
    redirect_uri: str
    scope: str
    username: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    context: dict = field(default_factory=dict)
    auth_time: int = 0
    code_hash: str = ""

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time


@dataclass
class TokenRecord:
    """A stored access token (by jti) and its optional refresh token digest."""

    jti: str
    client_id: str
    username: str | None
    scope: str
    context: dict
    issued_at: float
    expires_at: float
    refresh_expires_at: float | None
    revoked: bool

    # authlib refresh-token protocol
    def check_client(self, client) -> bool:
        return client.get_client_id() == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return self.refresh_expires_at is not None and self.refresh_expires_at < time.time()

    def is_revoked(self) -> bool:
        return self.revoked


class AuthDB:
    """All persistent state of the authorization server in one SQLite file."""

    def __init__(self, path: str) -> None:
        self.path = path
        with self._conn() as conn:
            conn.executescript(SCHEMA)
            for table, column, statement in MIGRATIONS:
                if column not in {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(statement)

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    # -- clients ------------------------------------------------------------------------------
    def add_client(self, metadata: dict, *, client_id: str | None = None, client_secret: str | None = None,
                   registered_by: str | None = None) -> Client:
        """Store a client; without ``client_id`` the server generates one (a client never chooses its own).

        Generated ids are 32 hex digits: they never start with ``-`` (which an administrator's
        ``trialtwin clients revoke <id>`` would read as an option) and need no escaping anywhere."""
        client = Client(client_id or secrets.token_hex(16), client_secret, dict(metadata), int(time.time()),
                        registered_by)
        with self._conn() as conn:
            conn.execute("INSERT OR REPLACE INTO client (client_id, client_secret, metadata, issued_at, revoked, "
                         "registered_by) VALUES (?, ?, ?, ?, 0, ?)",
                         (client.client_id, client.client_secret, json.dumps(client.metadata), client.issued_at,
                          registered_by))
        return client

    @staticmethod
    def _client(row: Any) -> Client:
        return Client(row["client_id"], row["client_secret"], json.loads(row["metadata"]), row["issued_at"],
                      row["registered_by"])

    def get_client(self, client_id: str) -> Client | None:
        """An active client (a revoked client is unknown to every flow)."""
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM client WHERE client_id = ? AND revoked = 0", (client_id,)).fetchone()
        return None if row is None else self._client(row)

    def list_clients(self, *, include_revoked: bool = False) -> list[tuple[Client, bool]] | list[Client]:
        """Active clients; with ``include_revoked`` (client, revoked) pairs of every client."""
        with self._conn() as conn:
            rows = conn.execute("SELECT * FROM client ORDER BY issued_at, client_id").fetchall()
        if include_revoked:
            return [(self._client(r), bool(r["revoked"])) for r in rows]
        return [self._client(r) for r in rows if not r["revoked"]]

    def revoke_client(self, client_id: str) -> bool:
        """Revoke a client and every token it holds; False when there is no such active client."""
        with self._conn() as conn:
            found = conn.execute("UPDATE client SET revoked = 1 WHERE client_id = ? AND revoked = 0",
                                 (client_id,)).rowcount == 1
            conn.execute("UPDATE token SET revoked = 1 WHERE client_id = ?", (client_id,))
            conn.execute("DELETE FROM auth_code WHERE client_id = ?", (client_id,))
        return found

    # -- users --------------------------------------------------------------------------------
    def add_user(self, username: str, password_hash: str, fhir_user: str, name: str) -> None:
        """Create or replace a sign-in user; only a password *hash* is ever stored."""
        with self._conn() as conn:
            conn.execute("INSERT OR REPLACE INTO app_user VALUES (?, ?, ?, ?, ?)",
                         (username, password_hash, fhir_user, name, time.time()))

    def get_user(self, username: str) -> dict | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM app_user WHERE username = ?", (username,)).fetchone()
        return dict(row) if row else None

    def list_users(self) -> list[dict]:
        with self._conn() as conn:
            return [dict(r) for r in conn.execute("SELECT username, fhir_user, name, created_at FROM app_user "
                                                  "ORDER BY username")]

    def remove_user(self, username: str) -> bool:
        with self._conn() as conn:
            return conn.execute("DELETE FROM app_user WHERE username = ?", (username,)).rowcount == 1

    # -- initial access tokens (RFC 7591 §3) ------------------------------------------------------
    def add_initial_access_token(self, scope: str, *, label: str = "", lifetime: float | None = None) -> str:
        """Mint an initial access token whose registrations get at most ``scope``; only its digest is kept."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self._conn() as conn:
            conn.execute("INSERT INTO initial_access_token VALUES (?, ?, ?, ?, ?, 0)",
                         (digest(token), label, scope, now, now + lifetime if lifetime else None))
        return token

    def initial_access_token(self, token: str) -> dict | None:
        """The live (unrevoked, unexpired) initial access token record for ``token``."""
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM initial_access_token WHERE token_hash = ? AND revoked = 0 AND "
                               "(expires_at IS NULL OR expires_at > ?)", (digest(token), time.time())).fetchone()
        return dict(row) if row else None

    # -- authorization codes ------------------------------------------------------------------
    def save_code(self, code: str, record: AuthorizationCode, lifetime: float) -> None:
        data = {k: v for k, v in record.__dict__.items() if k != "code_hash"}
        with self._conn() as conn:
            conn.execute("INSERT INTO auth_code VALUES (?, ?, ?, ?)",
                         (digest(code), record.client_id, json.dumps(data), time.time() + lifetime))

    def get_code(self, code: str, client_id: str) -> AuthorizationCode | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM auth_code WHERE code_hash = ? AND client_id = ? AND expires_at > ?",
                               (digest(code), client_id, time.time())).fetchone()
        return AuthorizationCode(**json.loads(row["data"]), code_hash=row["code_hash"]) if row else None

    def consume_code(self, record: AuthorizationCode) -> bool:
        """Delete a code; False if another request consumed it first (codes are single-use, RFC 6749 §4.1.2)."""
        with self._conn() as conn:
            return conn.execute("DELETE FROM auth_code WHERE code_hash = ?", (record.code_hash,)).rowcount == 1

    # -- tokens -------------------------------------------------------------------------------
    def save_token(self, *, jti: str, client_id: str, username: str | None, scope: str, context: dict,
                   issued_at: float, expires_at: float, refresh_token: str | None = None,
                   refresh_expires_at: float | None = None) -> None:
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO token (jti, client_id, username, scope, context, issued_at, expires_at, refresh_hash,"
                " refresh_expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (jti, client_id, username, scope, json.dumps(context), issued_at, expires_at,
                 digest(refresh_token) if refresh_token else None, refresh_expires_at))

    @staticmethod
    def _token(row: Any) -> TokenRecord:
        return TokenRecord(row["jti"], row["client_id"], row["username"], row["scope"], json.loads(row["context"]),
                           row["issued_at"], row["expires_at"], row["refresh_expires_at"], bool(row["revoked"]))

    def token_by_jti(self, jti: str) -> TokenRecord | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM token WHERE jti = ?", (jti,)).fetchone()
        return self._token(row) if row else None

    def token_by_refresh(self, refresh_token: str) -> TokenRecord | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM token WHERE refresh_hash = ?", (digest(refresh_token),)).fetchone()
        return self._token(row) if row else None

    def revoke(self, jti: str) -> bool:
        """Revoke a token; False if it was already revoked (so a refresh token rotates exactly once)."""
        with self._conn() as conn:
            return conn.execute("UPDATE token SET revoked = 1 WHERE jti = ? AND revoked = 0", (jti,)).rowcount == 1

    def is_revoked(self, jti: str) -> bool:
        """Whether the access token ``jti`` was revoked (by /revoke, refresh rotation or client revocation)."""
        with self._conn() as conn:
            return conn.execute("SELECT 1 FROM token WHERE jti = ? AND revoked = 1", (jti,)).fetchone() is not None

    # -- launch contexts ----------------------------------------------------------------------
    def create_launch(self, context: dict, lifetime: float = 600) -> str:
        launch_id = secrets.token_urlsafe(12)
        now = time.time()
        with self._conn() as conn:
            conn.execute("INSERT INTO launch VALUES (?, ?, ?, ?)", (launch_id, json.dumps(context), now, now + lifetime))
        return launch_id

    def get_launch(self, launch_id: str) -> dict | None:
        with self._conn() as conn:
            row = conn.execute("SELECT context FROM launch WHERE launch_id = ? AND expires_at > ?",
                               (launch_id, time.time())).fetchone()
        return json.loads(row["context"]) if row else None

    # -- client-assertion replay cache --------------------------------------------------------
    def remember_jti(self, client_id: str, jti: str, expires_at: float) -> bool:
        """Record an assertion ``jti``; False when it was seen before and is not yet expired."""
        now = time.time()
        with self._conn() as conn:
            conn.execute("DELETE FROM seen_jti WHERE expires_at < ?", (now,))
            try:
                conn.execute("INSERT INTO seen_jti VALUES (?, ?, ?)", (client_id, jti, expires_at))
            except sqlite3.IntegrityError:
                return False
        return True
