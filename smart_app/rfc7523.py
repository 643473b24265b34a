"""RFC 7523 JWT client assertions (``private_key_jwt``) as profiled by SMART Backend Services.

Framework-free verification: algorithm allow-list, signature against the client's registered JWKS,
``iss``/``sub``/``aud``/``exp``/``jti`` rules and jti replay protection.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from .jwks import select_keys

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART Backend Services: servers SHALL support RS384 and ES384; nothing else is accepted here.
ASSERTION_ALGORITHMS = ("RS384", "ES384")
#: SMART Backend Services: the assertion's exp SHALL be no more than five minutes in the future.
MAX_ASSERTION_LIFETIME = 300


class AssertionError_(Exception):
    """A client assertion was refused; ``description`` is safe to show to the client."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class JtiStore(Protocol):
    def remember_jti(self, client_id: str, jti: str, expires_at: float) -> bool:
        """Record ``jti``; return False when it was already seen and has not expired."""


@dataclass(frozen=True)
class VerifiedAssertion:
    client_id: str
    jti: str
    expires_at: float
    kid: str | None
    alg: str


def verify_client_assertion(
    assertion: str,
    *,
    token_endpoint: str,
    client_keys: Callable[[str], KeySet | None],
    jti_store: JtiStore,
    now: float | None = None,
    algorithms: tuple[str, ...] = ASSERTION_ALGORITHMS,
    max_lifetime: int = MAX_ASSERTION_LIFETIME,
    leeway: int = 0,
) -> VerifiedAssertion:
    """Verify a ``private_key_jwt`` client assertion and consume its ``jti``.

    Parameters
    ----------
    assertion : str
        The compact JWS from the ``client_assertion`` form field.
    token_endpoint : str
        The token endpoint URL; the assertion's ``aud`` must equal it (or contain it).
    client_keys : callable
        ``client_id -> KeySet`` of the registered client's public keys, ``None`` for an unknown client.
    jti_store : JtiStore
        Replay cache; a ``jti`` is remembered until the assertion expires.
    now : float, optional
        Current time (seconds since the epoch); ``time.time()`` when omitted.

    Returns
    -------
    VerifiedAssertion

    Raises
    ------
    AssertionError_
        With a description naming the rule that failed.
    """
    now = time.time() if now is None else now
    try:
        compact = jws.extract_compact(assertion.encode("ascii"))
    except (JoseError, ValueError, UnicodeError) as exc:
        raise AssertionError_(f"client_assertion is not a compact JWS: {exc}") from None
    header = compact.protected
    alg = header.get("alg")
    if alg not in algorithms:
        raise AssertionError_(f"client_assertion alg {alg!r} is not accepted; use one of {', '.join(algorithms)}")
    # The issuer must be read before the signature can be checked: it names whose keys to use.
    try:
        claims = json.loads(compact.payload)
    except ValueError:
        raise AssertionError_("client_assertion payload is not JSON") from None
    if not isinstance(claims, dict):
        raise AssertionError_("client_assertion payload is not a JSON object")
    iss, sub = claims.get("iss"), claims.get("sub")
    if not iss or iss != sub:
        raise AssertionError_("client_assertion iss and sub must both be the client_id")
    keys = client_keys(iss)
    if keys is None:
        raise AssertionError_(f"client {iss!r} is not registered for private_key_jwt")
    kid = header.get("kid")
    candidates = select_keys(keys, kid, alg)
    if not candidates:
        raise AssertionError_(f"no registered key of client {iss!r} matches kid={kid!r} alg={alg}")
    verified = None
    for key in candidates:
        try:
            verified = jwt.decode(assertion, key, algorithms=[alg])
            break
        except JoseError:
            continue
    if verified is None:
        raise AssertionError_("client_assertion signature does not verify against the client's registered keys")
    claims = verified.claims
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)):
        raise AssertionError_("client_assertion has no numeric exp")
    if exp <= now - leeway:
        raise AssertionError_("client_assertion has expired")
    if exp > now + max_lifetime + leeway:
        raise AssertionError_(f"client_assertion exp is more than {max_lifetime} s in the future")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if token_endpoint not in audiences:
        raise AssertionError_(f"client_assertion aud must be the token endpoint {token_endpoint}")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise AssertionError_("client_assertion has no jti")
    if not jti_store.remember_jti(iss, jti, float(exp)):
        raise AssertionError_("client_assertion jti has already been used")
    return VerifiedAssertion(iss, jti, float(exp), kid, alg)
