"""The revocation list a resource server checks on every request: the co-located authorization server's tokens.

Framework-free. Access tokens are self-contained JWTs, so revoking one (RFC 7009 ``/auth/revoke``, a
refresh rotation, an administrator revoking a client) only takes effect where the resource server asks.
``RevocationList`` asks the authorization server's own SQLite file, read-only, with one indexed lookup
per request on a connection kept per thread (cost measured in ``bench/smart_token_validation.py``).
"""
from __future__ import annotations

import os
import sqlite3
import threading


class RevocationList:
    """Answer "was this ``jti`` revoked?" from the authorization server's database.

    Parameters
    ----------
    path : str or os.PathLike
        The authorization server's SQLite file (``smart-auth.sqlite`` in the data directory).

    Notes
    -----
    A file that does not exist yet means the authorization server has issued nothing: no token can be
    revoked. The file is opened read-only: the resource server can never change the list.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection | None:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if not os.path.exists(self.path):
                return None
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10, check_same_thread=True)
            self._local.conn = conn
        return conn

    def is_revoked(self, jti: str) -> bool:
        """Whether the token with this ``jti`` has been revoked.

        Raises
        ------
        sqlite3.Error
            The database could not be read (the caller answers 503, never "not revoked").
        """
        conn = self._connection()
        if conn is None:
            return False
        try:
            row = conn.execute("SELECT 1 FROM token WHERE jti = ? AND revoked = 1", (jti,)).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return False  # the authorization server has not created its schema yet
            raise
        return row is not None
