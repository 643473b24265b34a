"""``trialtwin export --format nonmem``: write a study's doses, observations and covariates out as a
NONMEM-format data set, read through the same mapping file ``trialtwin load --format nonmem`` takes.
"""
from __future__ import annotations

import argparse
import os
import sys

from fhir_ops.commands.serve import DEFAULT_DATA_DIR
from fhir_ops.errors import InvalidRequest


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="write a study out as a NONMEM-format data set")
    parser.add_argument("--format", choices=("nonmem",), default="nonmem", help="output format (nonmem)")
    parser.add_argument("--mapping", metavar="MAP.json", required=True,
                        help="study id, compartments, codes and units (as for load --format nonmem)")
    parser.add_argument("--study", metavar="ID", help="ResearchStudy id (default: the mapping's study.id)")
    parser.add_argument("-o", "--output", metavar="FILE", help="CSV file to write (default: standard output)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", default=None, help=f"embedded store directory (default {DEFAULT_DATA_DIR})")
    where.add_argument("--url", help="base URL of a running FHIR server")
    parser.add_argument("--token", default=os.environ.get("TRIALTWIN_TOKEN"),
                        help="with --url: a SMART access token (default $TRIALTWIN_TOKEN)")
    return parser


def run(args: argparse.Namespace) -> int:
    from fhir_ops.mapping import nonmem

    from fhir_ops.commands.load import read_mapping

    mapping = read_mapping(args.mapping)
    if args.study and isinstance(mapping.get("study"), dict):
        mapping["study"]["id"] = args.study
    if args.url:
        from fhir_ops.store.remote import RemoteStore

        store = RemoteStore(args.url, {"Authorization": f"Bearer {args.token}"} if args.token else None)
    else:
        from fhir_ops.app import create_app, get_store

        data_dir = os.path.abspath(args.data_dir or DEFAULT_DATA_DIR)
        if not os.path.isdir(data_dir):
            raise InvalidRequest(f"no data directory {data_dir}")
        # in-process read of the embedded store, never served: no tokens to check
        app = create_app({"DATA_DIR": data_dir, "AUTH_MODE": "open"})
        with app.app_context():
            store = get_store()
    try:
        text = nonmem.export(store, mapping)
    except nonmem.NonmemError as exc:
        print(f"trialtwin export: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {text.count(chr(10)) - 1} rows to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
