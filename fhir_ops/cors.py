"""Cross-origin access (CORS) for browser SMART apps served from another origin, per the SMART App Launch guidance.

One configuration (``CORS_ORIGINS``) for every app of the process; each app names the paths a browser app needs.
"""
from __future__ import annotations

import os
import re
from typing import Iterable

from flask import Flask
from flask_cors import CORS

#: ``http(s)://`` + a loopback host + an optional port: any local development origin
LOOPBACK_ORIGINS = re.compile(r"https?://(127(?:\.\d{1,3}){3}|localhost|\[::1\])(:\d{1,5})?\Z", re.IGNORECASE)
#: what a browser SMART app sends: the token, content negotiation, conditional and async requests
ALLOWED_HEADERS = ["Authorization", "Content-Type", "Accept", "If-Match", "If-None-Match", "If-None-Exist",
                   "If-Modified-Since", "Prefer", "X-Requested-With"]
EXPOSED_HEADERS = ["Location", "Content-Location", "ETag", "Last-Modified", "X-Progress", "WWW-Authenticate"]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_ORIGIN = re.compile(r"^https?://[^/\s?#]+$")


def parse_origins(values: Iterable[str] | str | None) -> list[str]:
    """Origins from CLI flags or ``TRIALTWIN_CORS_ORIGINS`` (comma or space separated), checked.

    Raises
    ------
    ValueError
        An entry that is not a bare ``scheme://host[:port]`` origin, or ``*`` (a wildcard would let every
        site read participant data with a stolen token, and cannot be combined with credentials anyway).

    Examples
    --------
    >>> parse_origins("https://app.example, http://127.0.0.1:9000/")
    ['https://app.example', 'http://127.0.0.1:9000']
    >>> parse_origins("none")
    []
    """
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if [str(v).strip().lower() for v in values] == ["none"]:
        return []  # CORS off, said explicitly
    out: list[str] = []
    for value in values:
        for origin in re.split(r"[,\s]+", value or ""):
            origin = origin.strip().rstrip("/")
            if not origin:
                continue
            if not _ORIGIN.match(origin):
                raise ValueError(f"CORS origin {origin!r} is not an origin: give scheme://host[:port] with no path "
                                 "(a wildcard '*' is not accepted)")
            if origin not in out:
                out.append(origin)
    return out


def default_origins(loopback: bool) -> list:
    """The origins allowed when none are configured: loopback origins for a server on a loopback host
    (development), none otherwise (production: deny by default)."""
    return [LOOPBACK_ORIGINS] if loopback else []


def configured_origins(config) -> list:
    """``CORS_ORIGINS`` of an app config (strings and compiled patterns), or ``TRIALTWIN_CORS_ORIGINS``."""
    origins = config.get("CORS_ORIGINS")
    if origins is None:
        origins = parse_origins(os.environ.get("TRIALTWIN_CORS_ORIGINS"))
    if isinstance(origins, str):
        origins = parse_origins(origins)
    return list(origins)


def init_app(app: Flask, paths: Iterable[str]) -> list:
    """Answer cross-origin requests and preflights on ``paths`` (regular expressions of ``request.path``).

    Only the configured origins get ``Access-Control-Allow-Origin`` (echoed, never ``*``), with ``Vary: Origin``;
    credentials (cookies) are never allowed: SMART apps send the access token in ``Authorization``.

    Returns
    -------
    list
        The allowed origins (empty: CORS is off and no header is ever sent).
    """
    origins = configured_origins(app.config)
    app.config["CORS_ORIGINS"] = origins
    if not origins:
        return origins
    # Literal origins become exact patterns: flask-cors would read "[::1]" as a regular expression.
    patterns = [o if isinstance(o, re.Pattern) else re.compile(re.escape(o) + r"\Z", re.IGNORECASE) for o in origins]
    CORS(app, resources={path: {} for path in paths}, origins=patterns, methods=METHODS,
         allow_headers=ALLOWED_HEADERS, expose_headers=EXPOSED_HEADERS, supports_credentials=False,
         vary_header=True, max_age=600, send_wildcard=False, always_send=False)
    return origins
