"""``trialtwin model``: validate a twin model definition file, or publish it as a Library (optionally
making it the model of a ResearchStudy).

``validate`` needs no server; ``publish`` writes to the embedded store of a data directory or to a
FHIR server by URL. A definition with an error is refused with one line per problem, each naming
its path in the definition (``$.pk.compartments: ...``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from fhir_ops.commands.serve import DEFAULT_DATA_DIR
from fhir_ops.errors import Conflict, FhirError, InvalidRequest, NotFound


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("model", help="validate or publish a twin model definition")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    validate = sub.add_parser("validate", help="check a definition file (JSON Schema and semantic rules)")
    validate.add_argument("file", metavar="FILE", help="definition JSON file, or the name of a shipped example "
                                                       "(theophylline, tt201, tumour-growth)")
    publish = sub.add_parser("publish", help="store a definition as a versioned Library")
    publish.add_argument("file", metavar="FILE", help="definition JSON file or shipped example name")
    publish.add_argument("--study", metavar="ID", help="make it the twin model of ResearchStudy/ID")
    where = publish.add_mutually_exclusive_group()
    where.add_argument("--data-dir", default=None, help=f"embedded store directory (default {DEFAULT_DATA_DIR})")
    where.add_argument("--url", help="base URL of a running FHIR server")
    publish.add_argument("--token", default=os.environ.get("TRIALTWIN_TOKEN"),
                         help="with --url: a SMART access token (default $TRIALTWIN_TOKEN)")
    return parser


def read_definition(path: str) -> dict:
    """A definition document from a file, or a shipped example by name."""
    from inference import model_definition as md

    if not os.path.exists(path) and path in md.shipped_names():
        return md.shipped_definition(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None


def _print_issues(path: str, exc: FhirError) -> None:
    issues = exc.to_outcome()["issue"]
    print(f"{path}: invalid model definition ({len(issues)} problem{'s' if len(issues) > 1 else ''}):", file=sys.stderr)
    for issue in issues:
        where = (issue.get("expression") or ["$"])[0]
        text = issue.get("diagnostics", "")
        print(f"  {text if text.startswith(where) else where + ': ' + text}", file=sys.stderr)


class _Reader:
    """Read and write single resources on the chosen target (embedded store or FHIR URL)."""

    def __init__(self, args):
        from fhir_ops.commands.load import HttpTarget, StoreTarget

        self.target = HttpTarget(args.url, args.token) if args.url else StoreTarget(args.data_dir or DEFAULT_DATA_DIR)

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        if hasattr(self.target, "store"):
            try:
                return self.target.store.read(resource_type, resource_id)
            except NotFound:
                return None
        response = self.target.session.get(f"{self.target.url}/{resource_type}/{resource_id}",
                                           headers={"Accept": "application/fhir+json"}, timeout=60)
        if response.status_code in (404, 410):
            return None
        if response.status_code >= 400:
            raise InvalidRequest(f"reading {resource_type}/{resource_id}: HTTP {response.status_code}")
        return response.json()


def run(args: argparse.Namespace) -> int:
    from fhir_ops.commands.load import LoadError
    from fhir_ops.mapping import model_definition as fm

    raw = read_definition(args.file)
    try:
        model = fm.compile_definition(raw)
    except FhirError as exc:
        _print_issues(args.file, exc)
        return 1
    if args.action == "validate":
        print(f"{args.file}: valid model definition {model.canonical} ({len(model.parameter_names)} parameters, "
              f"outputs {', '.join(model.output_names)})")
        return 0
    library = fm.definition_library(model)
    target = _Reader(args)
    try:
        existing = target.read("Library", library["id"])
        if existing is not None and existing.get("content") != library["content"]:
            raise Conflict(f"Library/{library['id']} already holds {model.canonical} with different content; a "
                           "published version is immutable: raise the definition's version")
        entries = [{"resource": library, "request": {"method": "PUT", "url": f"Library/{library['id']}"}}]
        if args.study:
            study = target.read("ResearchStudy", args.study)
            if study is None:
                raise NotFound(f"ResearchStudy/{args.study} does not exist")
            study = fm.with_study_model(study, model.canonical)
            study.pop("meta", None)
            entries.append({"resource": study, "request": {"method": "PUT", "url": f"ResearchStudy/{args.study}"}})
        try:
            target.target.submit({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        except LoadError as exc:
            print(f"{args.file}: not published: {exc}", file=sys.stderr)
            return 1
    finally:
        target.target.close()
    print(f"published {model.canonical} as Library/{library['id']} in {target.target.where}"
          + (f"; ResearchStudy/{args.study} now uses it" if args.study else ""))
    return 0
