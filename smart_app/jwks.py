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

    @staticmethod
    def _new_keys() -> list:
        now = int(time.time())
        rsa = RSAKey.generate_key(2048, parameters={"alg": "RS256", "use": "sig", "iat": now})
        rsa.ensure_kid()
        ec = ECKey.generate_key("P-256", parameters={"alg": "ES256", "use": "sig", "iat": now})
        ec.ensure_kid()
        return [rsa, ec]

    @staticmethod
    def _save(path: Path, key_set: KeySet) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # Write then rename so a crash never leaves a half-written key file behind.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(key_set.as_dict(private=True), fh)
        os.replace(tmp, path)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "SigningKeys":
        """Load the private JWKS at ``path``, generating and saving it (mode 0600) on first start."""
        path = Path(path)
        if path.exists():
            return cls(KeySet.import_key_set(json.loads(path.read_text())))
        key_set = KeySet(cls._new_keys())
        cls._save(path, key_set)
        return cls(key_set)

    @classmethod
    def rotate(cls, path: str | os.PathLike) -> "SigningKeys":
        """Put a new RSA and EC key in front of the file's keys: they sign from the next start on, while the
        old keys stay published (and trusted) until :meth:`retire` removes them."""
        path = Path(path)
        old = cls.load(path).key_set.keys
        keys = cls(KeySet([*cls._new_keys(), *old]))
        cls._save(path, keys.key_set)
        return keys

    @classmethod
    def retire(cls, path: str | os.PathLike, *, min_age: float, now: float | None = None) -> list[str]:
        """Remove every key that no longer signs, once the signing keys are ``min_age`` seconds old.

        ``min_age`` should be at least the longest access-token lifetime: a token signed by an old key
        must have expired before that key stops being trusted. Returns the removed ``kid`` values.

        Raises
        ------
        ValueError
            The signing keys are younger than ``min_age``.
        """
        path = Path(path)
        keys = cls.load(path)
        active = {id(keys.key_for(alg)) for alg in {k.get("alg") for k in keys.key_set.keys}}
        now = time.time() if now is None else now
        youngest = max(int(k.get("iat") or 0) for k in keys.key_set.keys if id(k) in active)
        if now - youngest < min_age:
            raise ValueError(f"the signing keys are {int(now - youngest)} s old; wait until they are {int(min_age)} s "
                             "old (the longest token lifetime) so that no token signed by an old key is still valid")
        removed = [k.kid for k in keys.key_set.keys if id(k) not in active]
        cls._save(path, KeySet([k for k in keys.key_set.keys if id(k) in active]))
        return removed

    def key_for(self, alg: str = "RS256"):
        """The private key that signs with ``alg`` (the first of that algorithm: the newest after a rotation)."""
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
    fetch : callable, optional
        ``uri -> dict`` that fetches the JSON (e.g. :func:`smart_app.outbound.fetch_json` with its SSRF
        rules); default: a plain GET through ``http``. A failed fetch is remembered for
        ``min_refresh_interval`` so a flood of assertions cannot turn into a flood of outbound requests.
    """

    def __init__(self, uri: str, *, ttl: float = 300.0, min_refresh_interval: float = 10.0,
                 http: requests.Session | None = None, timeout: float = 5.0,
                 clock: Callable[[], float] = time.time, fetch: Callable[[str], dict] | None = None) -> None:
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
        self.fetch = fetch
        self._failure: tuple[float, Exception] | None = None

    def _get_json(self) -> dict:
        if self.fetch is not None:
            return self.fetch(self.uri)
        response = self.http.get(self.uri, timeout=self.timeout, headers={"Accept": "application/json"})
        response.raise_for_status()
        return response.json()

    def _fetch(self) -> KeySet:
        now = self.clock()
        if self._failure is not None and now - self._failure[0] < self.min_refresh_interval:
            raise self._failure[1]
        self.fetch_count += 1
        try:
            keys = KeySet.import_key_set(self._get_json())
        except Exception as exc:
            self._failure = (now, exc)
            raise
        self._failure = None
        self._keys, self._fetched_at = keys, self.clock()
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
