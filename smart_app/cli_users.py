"""``trialtwin users``: the administrator adds, lists and removes the people who can sign in at /auth.

Passwords are stored only as hashes (werkzeug.security, scrypt); they are read from a terminal prompt
or from standard input, never from the command line (which other users can see).
"""
from __future__ import annotations

import argparse
import getpass
import re
import sys

from fhir_ops.errors import FhirError

from .cli_clients import data_dir_option, open_db

MIN_PASSWORD = 10
_USERNAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_FHIR_USER = re.compile(r"^(Practitioner|PractitionerRole|Patient|RelatedPerson|Person)/[A-Za-z0-9\-.]{1,64}$")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("users", help="add, list and remove users who sign in to the authorization "
                                                 "server (administrator)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add (or reset) a user; the password is prompted for, or read from "
                                         "stdin with --password-stdin")
    data_dir_option(add)
    add.add_argument("username")
    add.add_argument("--fhir-user", required=True, help="the FHIR resource the user is, e.g. Practitioner/dr-lee")
    add.add_argument("--name", help="display name (default: the username)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    lst = actions.add_parser("list", help="list users (never their passwords)")
    data_dir_option(lst)
    rm = actions.add_parser("remove", help="remove a user")
    data_dir_option(rm)
    rm.add_argument("username")
    return parser


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise FhirError("the passwords differ", status=400, error_id="password-mismatch")
    if len(password) < MIN_PASSWORD:
        raise FhirError(f"the password must have at least {MIN_PASSWORD} characters", status=400,
                        error_id="weak-password")
    return password


def run(args: argparse.Namespace) -> int:
    from werkzeug.security import generate_password_hash

    db = open_db(args)
    if args.action == "add":
        if not _USERNAME.match(args.username):
            raise FhirError("username: 1-64 letters, digits, '.', '_', '@' or '-'", status=400, error_id="bad-username")
        if not _FHIR_USER.match(args.fhir_user):
            raise FhirError("--fhir-user must be a relative reference such as Practitioner/dr-lee", status=400,
                            error_id="bad-fhir-user")
        db.add_user(args.username, generate_password_hash(_password(args)), args.fhir_user, args.name or args.username)
        print(f"user {args.username} ({args.fhir_user}) can now sign in")
        return 0
    if args.action == "list":
        for user in db.list_users():
            print(f"{user['username']}\t{user['fhir_user']}\t{user['name']}")
        return 0
    if not db.remove_user(args.username):
        raise FhirError(f"no user {args.username!r}", status=404, error_id="unknown-user")
    print(f"removed {args.username}")
    return 0
