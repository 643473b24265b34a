"""The ``trialtwin`` command line: one argparse program whose subcommands live in their own modules.

A package adds a subcommand by adding ``(name, module)`` to ``COMMANDS`` (and a line to ``SUMMARIES``
for ``trialtwin --help``); the module provides ``add_parser(subparsers)`` and ``run(args) -> int``.
Only the module of the command being run is imported, so ``trialtwin --help`` loads no numerics.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    ("serve", "fhir_ops.commands.serve"),  # run the FHIR server (+ SMART apps when installed)
    ("demo", "fhir_ops.commands.demo"),  # create the TT-201 demo study if absent, then serve
    ("load", "fhir_ops.commands.load"),  # load Bundles, resources and NDJSON files
    ("listen-hl7", "fhir_ops.commands.listen_hl7"),  # HL7 v2 over MLLP: ORU^R01 / ADT^A04/A08 -> FHIR
    ("model", "fhir_ops.commands.model"),  # validate / publish a twin model definition (a Library)
    ("export", "fhir_ops.commands.export"),  # write a study out (NONMEM data set)
    ("train", "inference.cli_train"),  # retrain a learned model (dropout) into the model registry
    ("compile-kernels", "inference.cli_kernels"),  # fill Numba's cache so no request pays compilation
    ("terminology", "terminology.cli"),  # concept-map versions: import, diff, preview, publish, rollback
    ("clients", "smart_app.cli_clients"),  # administrator: register/list/revoke SMART clients, registration tokens
    ("users", "smart_app.cli_users"),  # administrator: users who sign in at /auth (hashed passwords)
    ("keys", "smart_app.cli_keys"),  # administrator: rotate and retire token-signing keys
]

#: One line per command for the top-level help, which must not import the command modules.
SUMMARIES = {
    "serve": "run the FHIR server (and the SMART apps when installed)",
    "demo": "create the demo study TT-201 if absent, then serve it",
    "load": "load Bundles, resources, NDJSON files, NONMEM data sets (--format nonmem) and OMOP CDM tables (--format omop)",
    "listen-hl7": "receive HL7 v2 results (ORU^R01) and patient updates (ADT^A04/A08) over MLLP",
    "model": "validate a twin model definition, or publish it as a Library (optionally a study's model)",
    "export": "write a study out as a NONMEM-format data set",
    "train": "retrain a learned model (simulated data -> ONNX + metadata)",
    "compile-kernels": "compile the engine's Numba kernels into the on-disk cache (make setup does)",
    "terminology": "maintain concept maps: import, diff, preview, publish, rollback",
    "clients": "register, list and revoke SMART clients; mint registration tokens (administrator)",
    "users": "add, list and remove users who sign in to the authorization server (administrator)",
    "keys": "list, rotate and retire the token-signing keys (administrator)",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser.

    Parameters
    ----------
    command : str, optional
        Build only this subcommand's full parser (importing its module); the others are listed by
        name and summary. None builds every subcommand in full.
    """
    parser = argparse.ArgumentParser(prog="trialtwin", description="TrialTwin: FHIR-native patient digital twins "
                                     "for clinical trials.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS:
        if command is not None and name != command:
            subparsers.add_parser(name, help=SUMMARIES.get(name, ""), add_help=False)
            continue
        module = importlib.import_module(module_name)
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def _command_in(argv: list[str]) -> str:
    """The subcommand named in ``argv`` ("" when none is, e.g. ``trialtwin --help``)."""
    names = {name for name, _ in COMMANDS}
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in names else ""
    return ""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``trialtwin`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
    import logging

    from fhir_ops.errors import FhirError

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
