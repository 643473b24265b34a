"""Benchmark: resource-server token validation by cached JWKS versus RFC 7662 introspection (the baseline).

Runs the real authorization server on loopback, issues a real token, and validates it N times each way.
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
from smart_app.resource_server import TokenValidator  # noqa: E402
from tests.live_server import serve  # noqa: E402
from _machine import cpu_model

N = int(os.environ.get("N", "300"))


def machine() -> dict:
    cpu = cpu_model()
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "authlib": version("authlib"), "joserfc": version("joserfc"), "flask": version("flask")}


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request would dominate
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app({"DATA_DIR": tmp, "FHIR_BASE_URL": "https://fhir.example/fhir"})
        with serve(app) as base:
            # A resource server client for introspection, and a backend token to validate.
            rs = requests.post(base + "/register", json={"redirect_uris": ["https://rs.example/cb"],
                                                         "token_endpoint_auth_method": "client_secret_basic"}).json()
            from joserfc.jwk import ECKey
            from tests.smart_app.helpers import client_assertion
            key = ECKey.generate_key("P-384", parameters={"kid": "k", "alg": "ES384"})
            cl = requests.post(base + "/register", json={
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
            by_jwks.validate(access)
            by_introspection.validate(access)  # warm both paths
            t0 = time.perf_counter()
            for _ in range(N):
                by_introspection.validate(access)
            baseline = (time.perf_counter() - t0) / N
            t0 = time.perf_counter()
            for _ in range(N):
                by_jwks.validate(access)
            local = (time.perf_counter() - t0) / N
    result = {"n": N, "introspection_ms_per_token": baseline * 1e3, "jwks_ms_per_token": local * 1e3,
              "speedup_jwks_over_introspection": baseline / local, "jwks_fetches": by_jwks.jwks_cache.fetch_count,
              "machine": machine()}
    print(f"introspection (baseline): {baseline * 1e3:.3f} ms/token")
    print(f"cached JWKS:              {local * 1e3:.3f} ms/token  ({baseline / local:.1f}x faster)")
    out = Path(__file__).parent / "results" / "smart_token_validation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
