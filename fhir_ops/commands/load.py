"""``trialtwin load``: load transaction/batch Bundles, single resources and NDJSON files.

Into the embedded store of a data directory, or into any FHIR server by URL; NDJSON goes in
transactions of ``--batch-size`` lines so a bad line rejects its batch only, and says which.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

from fhir_ops.commands.serve import DEFAULT_DATA_DIR
from fhir_ops.errors import FhirError, InvalidRequest


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("load", help="load Bundles, resources and NDJSON files")
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="*.json (a transaction/batch/collection Bundle or one resource) or *.ndjson")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", default=None,
                       help=f"embedded store directory (default {DEFAULT_DATA_DIR})")
    where.add_argument("--url", help="base URL of a running FHIR server (e.g. http://127.0.0.1:8080/fhir)")
    parser.add_argument("--format", choices=("fhir", "nonmem"), default="fhir",
                        help="fhir (default): Bundles, resources, NDJSON; nonmem: NONMEM-format CSV data sets "
                             "(needs --mapping)")
    parser.add_argument("--mapping", metavar="MAP.json",
                        help="with --format nonmem: what compartments and columns mean (codes, units, study)")
    parser.add_argument("--batch-size", type=int, default=1000, help="NDJSON lines per transaction (default 1000)")
    parser.add_argument("--token", default=os.environ.get("TRIALTWIN_TOKEN"),
                        help="with --url: a SMART access token sent as 'Authorization: Bearer' (default "
                             "$TRIALTWIN_TOKEN), e.g. a backend-services token with system/*.cruds")
    return parser


@dataclass
class FileReport:
    """What happened to one file."""

    path: str
    loaded: int = 0
    failed: int = 0
    error: str | None = None


class LoadError(Exception):
    """A file (or part of it) could not be loaded; the message says where and why."""


def _entry(resource: dict) -> dict:
    # resources with an id keep it (PUT), so loading a file twice does not duplicate it
    if resource.get("id"):
        request = {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
    else:
        request = {"method": "POST", "url": resource["resourceType"]}
    return {"resource": resource, "request": request}


def _check_resource(value, where: str) -> dict:
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        raise LoadError(f"{where}: not a FHIR resource (a JSON object with resourceType)")
    return value


def bundles_of_json(path: str) -> Iterator[tuple[str, dict]]:
    """A ``.json`` file as (description, Bundle to submit) pairs."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise LoadError(f"line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
    resource = _check_resource(data, "the file")
    if resource["resourceType"] == "Bundle" and resource.get("type") in ("transaction", "batch"):
        yield f"{resource['type']} Bundle", resource
    elif resource["resourceType"] == "Bundle" and resource.get("type") in ("collection", "searchset"):
        entries = [_entry(_check_resource(e.get("resource"), f"entry[{i}]"))
                   for i, e in enumerate(resource.get("entry") or [])]
        yield f"{resource['type']} Bundle loaded as a transaction", {
            "resourceType": "Bundle", "type": "transaction", "entry": entries}
    elif resource["resourceType"] == "Bundle":
        raise LoadError(f"a Bundle of type {resource.get('type')!r} cannot be loaded "
                        "(use transaction, batch or collection)")
    else:
        yield f"{resource['resourceType']}", {"resourceType": "Bundle", "type": "transaction",
                                              "entry": [_entry(resource)]}


def bundles_of_ndjson(path: str, batch_size: int, advance: Callable[[int], None]) -> Iterator[tuple[str, dict]]:
    """An NDJSON file as transactions of ``batch_size`` lines; ``advance`` gets bytes read."""
    batch: list[dict] = []
    first_line = 1
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            advance(len(raw))
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise LoadError(f"line {number}: invalid JSON: {exc}") from None
            batch.append(_entry(_check_resource(value, f"line {number}")))
            if len(batch) >= batch_size:
                yield f"lines {first_line}-{number}", {"resourceType": "Bundle", "type": "transaction", "entry": batch}
                batch, first_line = [], number + 1
    if batch:
        yield f"lines {first_line}-{number}", {"resourceType": "Bundle", "type": "transaction", "entry": batch}


def _failed_entries(response: dict) -> list[str]:
    failures = []
    for i, entry in enumerate(response.get("entry") or []):
        status = ((entry or {}).get("response") or {}).get("status", "")
        if status and not status.startswith("2"):
            outcome = (entry["response"].get("outcome") or {}).get("issue") or [{}]
            failures.append(f"entry[{i}]: {status} {outcome[0].get('diagnostics', '')}".rstrip())
    return failures


class StoreTarget:
    """Submit Bundles to the embedded store of a data directory."""

    def __init__(self, data_dir: str) -> None:
        from fhir_ops.app import create_app, get_store

        os.makedirs(data_dir, exist_ok=True)
        # In-process store access, never served over HTTP: no tokens to check.
        self.app = create_app({"DATA_DIR": os.path.abspath(data_dir), "AUTH_MODE": "open"})
        with self.app.app_context():
            self.store = get_store()
        self.where = os.path.abspath(data_dir)
        from terminology.harmonize import UnmappedReport

        self.unmapped = UnmappedReport()

    def submit(self, bundle: dict) -> dict:
        # the same harmonization as the REST layer: standard codings, canonical units, unmapped codes counted
        from terminology.harmonize import attach_outcomes, harmonize_bundle
        from terminology.workflow import active_harmonizer

        bundle, warnings = harmonize_bundle(bundle, harmonizer=active_harmonizer(self.store), report=self.unmapped)
        if bundle["type"] == "batch":
            return attach_outcomes(self.store.batch(bundle), warnings)
        return attach_outcomes(self.store.transaction(bundle), warnings)

    def close(self) -> None:
        self.store.close()


class HttpTarget:
    """Submit Bundles to a FHIR server's base URL."""

    def __init__(self, url: str, token: str | None = None) -> None:
        import requests

        self.url = url.rstrip("/")
        self.where = self.url
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def submit(self, bundle: dict) -> dict:
        import requests

        try:
            response = self.session.post(self.url, data=json.dumps(bundle),
                                         headers={"Content-Type": "application/fhir+json",
                                                  "Accept": "application/fhir+json"}, timeout=600)
        except requests.RequestException as exc:
            raise LoadError(f"cannot reach {self.url}: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            issues = body.get("issue") or [{}]
            detail = "; ".join(i.get("diagnostics", "") for i in issues if i.get("diagnostics")) or response.reason
            raise LoadError(f"HTTP {response.status_code}: {detail}")
        return body

    def close(self) -> None:
        self.session.close()


def load_file(target, path: str, batch_size: int = 1000) -> FileReport:
    """Load one file into ``target``; errors are caught and described in the report."""
    from tqdm import tqdm

    report = FileReport(path)
    ndjson = path.endswith(".ndjson")
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        report.error = f"cannot read: {exc.strerror}"
        return report
    with tqdm(total=size if ndjson else None, unit="B", unit_scale=True, desc=os.path.basename(path),
              disable=not ndjson, leave=False, file=sys.stderr) as bar:
        pieces = bundles_of_ndjson(path, batch_size, bar.update) if ndjson else bundles_of_json(path)
        part = "the file"
        try:
            for part, bundle in pieces:
                response = target.submit(bundle)
                failures = _failed_entries(response)
                report.failed += len(failures)
                report.loaded += len(bundle.get("entry") or []) - len(failures)
                if failures:
                    shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
                    report.error = f"{part}: {len(failures)} entries failed: {shown}"
        except LoadError as exc:
            message = str(exc)
            report.error = message if message.startswith("line") or part == "the file" else f"{part}: {message}"
        except FhirError as exc:
            report.error = f"{part} rejected, nothing of it stored: {exc.message}"
        except OSError as exc:
            report.error = f"cannot read: {exc}"
    return report


def load_nonmem(target, path: str, mapping: dict) -> FileReport:
    """Load a NONMEM data set: the whole file is checked first (nothing stored when a row is bad),
    then the ResearchStudy, then one transaction per subject."""
    from fhir_ops.mapping import nonmem

    report = FileReport(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        report.error = f"cannot read: {exc}"
        return report
    try:
        subjects = nonmem.parse(text, mapping)
    except nonmem.NonmemError as exc:
        report.error = "nothing loaded:\n  " + "\n  ".join(exc.problems)
        return report
    bundles = [("ResearchStudy", {"resourceType": "Bundle", "type": "transaction", "entry": [{
        "resource": nonmem.study_resource(mapping, [s.arm for s in subjects if s.arm]),
        "request": {"method": "PUT", "url": f"ResearchStudy/{mapping['study']['id']}"}}]})]
    bundles += [(f"ID {s.id} (line {s.first_line})", nonmem.subject_bundle(s, mapping)) for s in subjects]
    for part, bundle in bundles:
        try:
            response = target.submit(bundle)
        except (LoadError, FhirError) as exc:
            report.error = f"{part}: rejected ({getattr(exc, 'message', exc)}); subjects before it are loaded"
            return report
        failures = _failed_entries(response)
        if failures:
            report.error = f"{part}: {'; '.join(failures[:3])}"
            return report
        report.loaded += len(bundle["entry"])
    return report


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InvalidRequest("--batch-size must be at least 1")
    mapping = None
    if getattr(args, "format", "fhir") == "nonmem":
        if not args.mapping:
            raise InvalidRequest("--format nonmem needs --mapping MAP.json (codes, units and study of the data set)")
        try:
            with open(args.mapping, encoding="utf-8") as fh:
                mapping = json.load(fh)
        except OSError as exc:
            raise InvalidRequest(f"cannot read {args.mapping}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{args.mapping}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    elif args.mapping:
        raise InvalidRequest("--mapping applies to --format nonmem")
    target = HttpTarget(args.url, getattr(args, "token", None)) if args.url else StoreTarget(args.data_dir or DEFAULT_DATA_DIR)
    failed = False
    try:
        for path in args.files:
            report = (load_nonmem(target, path, mapping) if mapping is not None
                      else load_file(target, path, args.batch_size))
            if report.error:
                failed = True
                print(f"{path}: ERROR: {report.error} ({report.loaded} resources loaded before/besides this)",
                      file=sys.stderr)
            else:
                print(f"{path}: {report.loaded} resources loaded into {target.where}")
        unmapped = getattr(target, "unmapped", None)
        if unmapped is not None and unmapped.counts:
            rows = unmapped.to_dict()["unmapped"]
            print(f"warning: {len(rows)} local code(s) have no standard mapping (stored as received):", file=sys.stderr)
            for row in rows[:20]:
                print(f"  {row['system']}|{row['code']}: {row['count']} coding(s) in {', '.join(row['resourceTypes'])}",
                      file=sys.stderr)
    finally:
        target.close()
    return 1 if failed else 0
