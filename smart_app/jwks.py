"""JSON Web Key sets: the server's own persisted signing keys and a cached fetcher of remote JWKS.

Framework-free; used by the authorization server (signing, publishing) and by the resource server (verifying).
"""
from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Callable

import requests
from joserfc.jwk import ECKey, KeySet, RSAKey



class SigningKeys:
    """The authorization server's private signing keys (one RSA, one EC P-256), persisted as a private JWKS.

    Parameters
    ----------
    key_set : joserfc.jwk.KeySet
        Private keys, each with ``kid`` and ``alg``.
    """

    def __init__(self, key_set: KeySet) -> None:
        self.key_set = key_set

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SigningKeys":
        """Load an existing private JWKS (raises FileNotFoundError: a verifier must never create keys)."""
        return cls(KeySet.import_key_set(json.loads(Path(path).read_text())))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "SigningKeys":
        """Load the private JWKS at ``path``, generating and saving it (mode 0600) on first start."""
        path = Path(path)
        if path.exists():
            return cls(KeySet.import_key_set(json.loads(path.read_text())))
        rsa = RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig"})
        rsa.ensure_kid()
        ec = ECKey.generate_key("P-256", parameters={"alg": "ES256", "use": "sig"})
        ec.ensure_kid()
        key_set = KeySet([rsa, ec])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # Write then rename so a crash never leaves a half-written key file behind.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(key_set.as_dict(private=True), fh)
        os.replace(tmp, path)
        return cls(key_set)

    def key_for(self, alg: str = "RS256"):
        """The private key that signs with ``alg``."""
        for key in self.key_set.keys:
            if key.get("alg") == alg:
                return key
        raise ValueError(f"no signing key for algorithm {alg!r}; have {[k.get('alg') for k in self.key_set.keys]}")

    def public_jwks(self) -> dict:
        """The public JWKS to publish at ``jwks_uri``."""
        return self.key_set.as_dict(private=False)


class JwksCache:
    """Fetch a JWKS over HTTP and keep it for ``ttl`` seconds; refetch early when an unknown ``kid`` appears.

    Parameters
    ----------
    uri : str
        The ``jwks_uri``.
    ttl : float
        Seconds a fetched set is trusted.
    min_refresh_interval : float
        Unknown ``kid`` values trigger at most one refetch per interval, so a flood of forged tokens
        cannot turn into a flood of requests to the issuer.
    http : requests.Session, optional
    clock : callable, optional
    """

    def __init__(self, uri: str, *, ttl: float = 300.0, min_refresh_interval: float = 10.0,
                 http: requests.Session | None = None, timeout: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.uri = uri
        self.ttl = ttl
        self.min_refresh_interval = min_refresh_interval
        self.http = http or requests.Session()
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._keys: KeySet | None = None
        self._fetched_at = float("-inf")
        self.fetch_count = 0

    def _fetch(self) -> KeySet:
        response = self.http.get(self.uri, timeout=self.timeout, headers={"Accept": "application/json"})
        response.raise_for_status()
        keys = KeySet.import_key_set(response.json())
        self._keys, self._fetched_at = keys, self.clock()
        self.fetch_count += 1
        return keys

    def get(self, kid: str | None = None) -> KeySet:
        """The cached key set, refreshed when stale or when ``kid`` is unknown (rate limited)."""
        with self._lock:
            now = self.clock()
            if self._keys is None or now - self._fetched_at > self.ttl:
                return self._fetch()
            if kid is not None and not _has_kid(self._keys, kid) and now - self._fetched_at > self.min_refresh_interval:
                return self._fetch()
            return self._keys


def _has_kid(key_set: KeySet, kid: str) -> bool:
    return any(k.kid == kid for k in key_set.keys)


def select_keys(key_set: KeySet, kid: str | None, alg: str) -> list:
    """Keys of ``key_set`` that may have produced a signature with header ``kid``/``alg``.

    With a ``kid`` only that key; without one, every key of the algorithm's key type whose
    ``alg`` (if stated) matches, so a JWKS of one key works without kids.
    """
    kty = {"RS": "RSA", "PS": "RSA", "ES": "EC"}.get(alg[:2], "")
    keys = []
    for key in key_set.keys:
        if kid is not None and key.kid != kid:
            continue
        if key.key_type != kty:
            continue
        if key.get("alg") not in (None, alg):
            continue
        keys.append(key)
    return keys


def persistent_secret(path: Path) -> str:
    """A random secret kept in ``path`` (created once, owner-only), so sessions survive restarts."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip()
