"""Benchmark: resource-server token validation by cached JWKS versus RFC 7662 introspection (the baseline),
and the per-request cost of the revocation-list check (JWKS + one indexed read of the auth server's SQLite).

Runs the real authorization server on loopback, issues a real token, and validates it N times each way.
The revocation list is filled with ``ROWS`` other token records (a tenth of them revoked) so the lookup
runs on a database of realistic size.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smart_app.authz import create_app  # noqa: E402
from smart_app.db import AuthDB  # noqa: E402
from smart_app.resource_server import TokenValidator  # noqa: E402
from smart_app.revocation import RevocationList  # noqa: E402
from tests.live_server import serve  # noqa: E402
from _machine import cpu_model

N = int(os.environ.get("N", "300"))
ROWS = int(os.environ.get("ROWS", "50000"))


def machine() -> dict:
    cpu = cpu_model()
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "authlib": version("authlib"), "joserfc": version("joserfc"), "flask": version("flask")}


def _fill_token_table(db: AuthDB, rows: int) -> None:
    """Other clients' token records, one in ten revoked: the list the lookup searches."""
    import sqlite3
    now = time.time()
    with sqlite3.connect(db.path) as conn:
        conn.executemany(
            "INSERT INTO token (jti, client_id, username, scope, context, issued_at, expires_at, revoked) "
            "VALUES (?, 'other', NULL, 'system/*.rs', '{}', ?, ?, ?)",
            ((f"bench-{i}", now, now + 3600, int(i % 10 == 0)) for i in range(rows)))


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request would dominate
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app({"DATA_DIR": tmp, "FHIR_BASE_URL": "https://fhir.example/fhir",
                          "REGISTRATION_ACCESS_TOKEN": "bench", "REGISTRATION_SCOPE_CEILING": "system/*.rs"})
        iat = {"Authorization": "Bearer bench"}
        _fill_token_table(AuthDB(os.path.join(tmp, "smart-auth.sqlite")), ROWS)
        with serve(app) as base:
            # A resource server client for introspection, and a backend token to validate.
            rs = requests.post(base + "/register", headers=iat, json={
                "redirect_uris": ["https://rs.example/cb"], "token_endpoint_auth_method": "client_secret_basic"}).json()
            from joserfc.jwk import ECKey
            from tests.smart_app.helpers import client_assertion
            key = ECKey.generate_key("P-384", parameters={"kid": "k", "alg": "ES384"})
            cl = requests.post(base + "/register", headers=iat, json={
                "grant_types": ["client_credentials"], "token_endpoint_auth_method": "private_key_jwt",
                "jwks": {"keys": [key.as_dict(private=False)]}, "scope": "system/*.rs"}).json()
            token = requests.post(base + "/token", data={
                "grant_type": "client_credentials", "scope": "system/*.rs",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": client_assertion(key, cl["client_id"], base + "/token", alg="ES384")}).json()
            access = token["access_token"]
            by_jwks = TokenValidator(issuer=base, audience="https://fhir.example/fhir", jwks_uri=base + "/.well-known/jwks.json")
            by_introspection = TokenValidator(issuer=base, audience="https://fhir.example/fhir",
                                              introspection_endpoint=base + "/introspect",
                                              introspection_auth=(rs["client_id"], rs["client_secret"]))
            revocation = RevocationList(os.path.join(tmp, "smart-auth.sqlite"))
            by_jwks_checked = TokenValidator(issuer=base, audience="https://fhir.example/fhir",
                                             jwks_uri=base + "/.well-known/jwks.json", revocation=revocation)
            by_jwks.validate(access)
            by_jwks_checked.validate(access)
            by_introspection.validate(access)  # warm every path
            t0 = time.perf_counter()
            for _ in range(N):
                by_introspection.validate(access)
            baseline = (time.perf_counter() - t0) / N
            t0 = time.perf_counter()
            for _ in range(N):
                by_jwks.validate(access)
            local = (time.perf_counter() - t0) / N
            t0 = time.perf_counter()
            for _ in range(N):
                by_jwks_checked.validate(access)
            checked = (time.perf_counter() - t0) / N
            t0 = time.perf_counter()
            for _ in range(N * 10):
                revocation.is_revoked("not-revoked-jti")
            lookup = (time.perf_counter() - t0) / (N * 10)
    result = {"n": N, "introspection_ms_per_token": baseline * 1e3, "jwks_ms_per_token": local * 1e3,
              "speedup_jwks_over_introspection": baseline / local, "jwks_fetches": by_jwks.jwks_cache.fetch_count,
              "revocation_rows": ROWS, "jwks_plus_revocation_ms_per_token": checked * 1e3,
              "revocation_lookup_us": lookup * 1e6, "revocation_overhead_ratio": checked / local,
              "speedup_jwks_plus_revocation_over_introspection": baseline / checked,
              "machine": machine()}
    print(f"introspection (baseline): {baseline * 1e3:.3f} ms/token")
    print(f"cached JWKS:              {local * 1e3:.3f} ms/token  ({baseline / local:.1f}x faster)")
    print(f"JWKS + revocation list:   {checked * 1e3:.3f} ms/token  ({checked / local:.2f}x JWKS alone, "
          f"{baseline / checked:.1f}x faster than introspection; lookup {lookup * 1e6:.1f} us on {ROWS} rows)")
    out = Path(__file__).parent / "results" / "smart_token_validation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
