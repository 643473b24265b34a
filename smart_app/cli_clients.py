"""``trialtwin clients``: the administrator registers, lists and revokes SMART clients, and mints initial
access tokens (RFC 7591 §3) that let others register under a scope ceiling.

Works on the authorization server's database in ``--data-dir`` (the server need not be running; a
running server sees the change on its next request).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

from fhir_ops.errors import FhirError


def data_dir_option(parser: argparse.ArgumentParser) -> None:
    from fhir_ops.commands.serve import DEFAULT_DATA_DIR

    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="the server's data directory (default ./data or $TRIALTWIN_DATA_DIR)")


def open_db(args: argparse.Namespace):
    """The authorization server's database in ``args.data_dir`` (created if absent)."""
    from smart_app.db import AuthDB

    os.makedirs(args.data_dir, exist_ok=True)
    return AuthDB(os.path.join(os.path.abspath(args.data_dir), "smart-auth.sqlite"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("clients", help="register, list and revoke SMART clients; mint registration "
                                                   "tokens (administrator)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    reg = actions.add_parser("register", help="register a client with the scopes you grant it; prints its "
                                              "credentials once")
    data_dir_option(reg)
    reg.add_argument("--name", required=True, help="client_name shown on the consent page")
    reg.add_argument("--scope", required=True, help="the most the client may ever be granted, e.g. "
                                                    "'launch openid fhirUser patient/*.rs' or 'system/Observation.cruds'")
    reg.add_argument("--redirect-uri", action="append", default=[], help="redirect URI (repeatable); https, or "
                                                                          "http on a loopback host")
    reg.add_argument("--launch-uri", help="the app's launch URL (EHR launch)")
    reg.add_argument("--backend", action="store_true",
                     help="a SMART Backend Services client (client_credentials + private_key_jwt, system/ scopes)")
    reg.add_argument("--auth-method", choices=("none", "client_secret_basic", "client_secret_post", "private_key_jwt"),
                     help="token endpoint authentication (default: none for an app, private_key_jwt for --backend)")
    reg.add_argument("--jwks", type=Path, help="file with the client's public JWK Set (private_key_jwt)")
    reg.add_argument("--jwks-uri", help="URL of the client's public JWK Set (private_key_jwt; https)")
    reg.add_argument("--refresh", action="store_true", help="also allow the refresh_token grant")

    lst = actions.add_parser("list", help="list registered clients")
    data_dir_option(lst)
    lst.add_argument("--all", action="store_true", help="include revoked clients")
    lst.add_argument("--json", action="store_true", help="print JSON")

    rev = actions.add_parser("revoke", help="revoke a client and every token it holds")
    data_dir_option(rev)
    rev.add_argument("client_id", help="the client's id (put `--` before an id that starts with '-')")

    tok = actions.add_parser("token", help="mint an initial access token for POST /auth/register; registrations "
                                           "with it get at most --scope")
    data_dir_option(tok)
    tok.add_argument("--scope", required=True, help="the scope ceiling of clients registered with this token")
    tok.add_argument("--label", default="", help="a name for the token (shown as the clients' registered_by)")
    tok.add_argument("--expires-in", type=int, default=7 * 24 * 3600,
                     help="seconds until the token expires (default one week; 0: never)")
    return parser


def _register(args: argparse.Namespace, db) -> int:
    from smart_app.outbound import AllowList
    from smart_app.rfc7591 import RegistrationError, validate_client_metadata

    method = args.auth_method or ("private_key_jwt" if args.backend else "none")
    metadata: dict = {"client_name": args.name, "scope": args.scope, "token_endpoint_auth_method": method}
    if args.backend:
        metadata["grant_types"] = ["client_credentials"]
    else:
        metadata["grant_types"] = ["authorization_code", *(["refresh_token"] if args.refresh else [])]
        metadata["redirect_uris"] = args.redirect_uri
    if args.launch_uri:
        metadata["launch_uri"] = args.launch_uri
    if args.jwks:
        metadata["jwks"] = json.loads(args.jwks.read_text())
    if args.jwks_uri:
        metadata["jwks_uri"] = args.jwks_uri
    allow = AllowList.parse(os.environ.get("TRIALTWIN_JWKS_ALLOW", ""))
    try:
        metadata = validate_client_metadata(metadata, jwks_http_allowed=allow.allows_host)
    except RegistrationError as exc:
        raise FhirError(f"{exc.error}: {exc.description}", status=400, error_id="invalid-client") from None
    secret = secrets.token_urlsafe(32) if method in ("client_secret_basic", "client_secret_post") else None
    client = db.add_client(metadata, client_secret=secret, registered_by="administrator")
    print(json.dumps(client.public_view(), indent=2))
    if secret:
        print("Keep the client_secret now: it is not shown again.", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace, db) -> int:
    rows = db.list_clients(include_revoked=True)
    rows = [(c, r) for c, r in rows if args.all or not r]
    if args.json:
        print(json.dumps([{"client_id": c.client_id, "client_name": c.metadata.get("client_name"),
                           "grant_types": c.grant_types, "scope": c.metadata.get("scope", ""),
                           "registered_by": c.registered_by, "revoked": r} for c, r in rows], indent=2))
        return 0
    for client, revoked in rows:
        fields = [client.client_id, repr(client.name), ",".join(client.grant_types), client.metadata.get("scope", ""),
                  client.registered_by or "self-registered", *(["REVOKED"] if revoked else [])]
        print("\t".join(fields))
    return 0


def run(args: argparse.Namespace) -> int:
    db = open_db(args)
    if args.action == "register":
        return _register(args, db)
    if args.action == "list":
        return _list(args, db)
    if args.action == "revoke":
        if not db.revoke_client(args.client_id):
            raise FhirError(f"no active client {args.client_id!r}", status=404, error_id="unknown-client")
        print(f"revoked {args.client_id} and its tokens; /fhir refuses them from the next request on")
        return 0
    if args.action == "token":
        from smart_app.scopes import parse_scopes

        scopes = parse_scopes(args.scope)
        if scopes.unknown:
            raise FhirError(f"unknown scopes: {' '.join(scopes.unknown)}", status=400, error_id="invalid-scope")
        token = db.add_initial_access_token(scopes.v2_text, label=args.label, lifetime=args.expires_in or None)
        print(token)
        print(f"initial access token for POST /auth/register (Authorization: Bearer ...); clients registered with "
              f"it get at most: {scopes.v2_text}. It is shown only now.", file=sys.stderr)
        return 0
    raise FhirError(f"unknown action {args.action}")  # pragma: no cover (argparse refuses first)
