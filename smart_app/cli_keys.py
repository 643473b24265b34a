"""``trialtwin keys``: rotate the authorization server's token-signing keys without breaking issued tokens.

``rotate`` puts new keys in front (they sign after the next start; the old ones stay published and
trusted), ``retire`` removes the old ones once every token they signed has expired.
"""
from __future__ import annotations

import argparse
import os
import time

from fhir_ops.errors import FhirError

from .cli_clients import data_dir_option


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("keys", help="list, rotate and retire the token-signing keys (administrator)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    data_dir_option(actions.add_parser("list", help="list signing keys (kid, alg, age, signing or verify-only)"))
    data_dir_option(actions.add_parser("rotate", help="add new signing keys; old keys stay trusted until retired"))
    retire = actions.add_parser("retire", help="remove keys that no longer sign, once the new keys are old enough")
    data_dir_option(retire)
    retire.add_argument("--min-age", type=int, default=3600,
                        help="seconds the signing keys must have been in use (default 3600, the access-token "
                             "lifetime; use your longest ACCESS_TOKEN_LIFETIME)")
    return parser


def run(args: argparse.Namespace) -> int:
    from .jwks import SigningKeys

    path = os.path.join(os.path.abspath(args.data_dir), "smart-signing-keys.json")
    if args.action == "rotate":
        keys = SigningKeys.rotate(path) if os.path.exists(path) else SigningKeys.load_or_create(path)
        print(f"new signing keys {keys.key_for('RS256').kid} (RS256), {keys.key_for('ES256').kid} (ES256); restart "
              "the server to sign with them. Old keys stay published; 'trialtwin keys retire' after the longest "
              "token lifetime removes them.")
        return 0
    if not os.path.exists(path):
        raise FhirError(f"no signing keys in {args.data_dir} yet (the server creates them on first start)",
                        status=404, error_id="no-keys")
    if args.action == "retire":
        try:
            removed = SigningKeys.retire(path, min_age=args.min_age)
        except ValueError as exc:
            raise FhirError(str(exc), status=409, error_id="keys-too-young") from None
        print(f"retired {', '.join(removed) or 'nothing'}; restart the server so it stops trusting them")
        return 0
    keys = SigningKeys.load(path)
    signing = {id(keys.key_for(alg)) for alg in {k.get("alg") for k in keys.key_set.keys}}
    for key in keys.key_set.keys:
        age = f"{int(time.time() - key.get('iat'))} s" if key.get("iat") else "unknown age"
        print(f"{key.kid}\t{key.get('alg')}\t{age}\t{'signing' if id(key) in signing else 'verify-only'}")
    return 0
