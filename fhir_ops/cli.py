"""The ``trialtwin`` command line: one argparse program whose subcommands live in their own modules.

A package adds a subcommand by adding ``(name, module)`` to ``COMMANDS``; the module provides
``add_parser(subparsers)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fhir_ops.errors import FhirError

COMMANDS = [
    ("serve", "fhir_ops.commands.serve"),  # run the FHIR server (+ SMART apps when installed)
    ("demo", "fhir_ops.commands.demo"),  # create the TT-201 demo study if absent, then serve
    ("load", "fhir_ops.commands.load"),  # load Bundles, resources and NDJSON files
    ("model", "fhir_ops.commands.model"),  # validate / publish a twin model definition (a Library)
    ("export", "fhir_ops.commands.export"),  # write a study out (NONMEM data set)
    ("train", "inference.cli_train"),  # retrain a learned model (dropout) into the model registry
    ("terminology", "terminology.cli"),  # concept-map versions: import, diff, preview, publish, rollback
    ("clients", "smart_app.cli_clients"),  # administrator: register/list/revoke SMART clients, registration tokens
    ("users", "smart_app.cli_users"),  # administrator: users who sign in at /auth (hashed passwords)
    ("keys", "smart_app.cli_keys"),  # administrator: rotate and retire token-signing keys
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="trialtwin", description="TrialTwin: FHIR-native patient digital twins "
                                     "for clinical trials.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``trialtwin`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except FhirError as exc:
        print(f"trialtwin {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
