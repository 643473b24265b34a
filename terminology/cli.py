"""``trialtwin terminology``: the map-update workflow from the command line (import, diff, preview,
publish, rollback, versions, seed, load, unmapped), against the embedded store in the data directory.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from fhir_ops.errors import FhirError
from terminology import workflow
from terminology.catalog import load_file
from terminology.conceptmap import iter_mappings


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``terminology`` and its sub-commands on the ``trialtwin`` CLI's subparsers."""
    p = subparsers.add_parser("terminology", help="maintain concept maps: import, diff, preview, publish, rollback",
                              description=__doc__)
    p.add_argument("--data-dir", default=os.environ.get("TRIALTWIN_DATA_DIR", "./data"),
                   help="directory of the embedded store (trialtwin.sqlite); default ./data or $TRIALTWIN_DATA_DIR")
    p.add_argument("--user", default=None, help="who is making the change (recorded in the AuditEvent)")
    sub = p.add_subparsers(dest="terminology_command", required=True)
    imp = sub.add_parser("import", help="import a new map version as a draft from CSV or ConceptMap JSON")
    imp.add_argument("file", type=Path, help="the CSV (columns in docs/terminology.md) or ConceptMap .json")
    imp.add_argument("--url", help="canonical url of the map (CSV only; JSON carries its own)")
    imp.add_argument("--version", dest="map_version", help="version of the new map (CSV only)")
    imp.add_argument("--title", help="title of the new map version (CSV only)")
    imp.add_argument("--format", choices=("csv", "json"), help="default: from the file extension")
    d = sub.add_parser("diff", help="what a draft changes against the active version (or another version)")
    d.add_argument("draft_id")
    d.add_argument("--against", help="id of the version to compare with (default: the active version)")
    pv = sub.add_parser("preview", help="which stored resources publishing a draft would re-code")
    pv.add_argument("draft_id")
    pv.add_argument("--examples", type=int, default=3, help="example references per code and type (default 3)")
    pub = sub.add_parser("publish", help="make a draft the active version (the old one is retired)")
    pub.add_argument("draft_id")
    rb = sub.add_parser("rollback", help="return a map to its previous published version")
    rb.add_argument("url")
    vs = sub.add_parser("versions", help="list the stored versions of a map")
    vs.add_argument("url")
    sub.add_parser("seed", help="store the shipped maps as first versions where none exist")
    sub.add_parser("unmapped", help="report stored local codes that the active maps do not map")
    ld = sub.add_parser("load", help="install a licensed code-system release (CodeSystem JSON or LOINC's Loinc.csv) "
                                     "over the shipped subset")
    ld.add_argument("file", type=Path)
    ld.add_argument("--loinc-version", help="LOINC release version, when loading Loinc.csv")
    p.set_defaults(func=run)
    return p


def _open_store(args):
    from fhir_ops.store.sqlite import SQLiteStore

    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    return SQLiteStore(str(Path(args.data_dir) / "trialtwin.sqlite"))


def _summary(cm: dict) -> dict:
    return {"id": cm.get("id"), "url": cm.get("url"), "version": cm.get("version"), "status": cm.get("status"),
            "date": cm.get("date"), "rows": sum(1 for _ in iter_mappings(cm))}


def _execute(args, store) -> dict | list:
    agent = args.user or getpass.getuser()
    cmd = args.terminology_command
    if cmd == "import":
        fmt = args.format or ("json" if args.file.suffix.lower() == ".json" else "csv")
        if fmt == "json":
            return _summary(workflow.import_concept_map(store, load_file(args.file), agent=agent))
        meta = {"title": args.title} if args.title else {}
        text = args.file.read_text(encoding="utf-8")
        return _summary(workflow.import_csv(store, text, url=args.url, version=args.map_version, agent=agent, **meta))
    if cmd == "diff":
        draft = store.read("ConceptMap", args.draft_id)
        other = store.read("ConceptMap", args.against) if args.against else workflow.active_version(store, draft["url"])
        return workflow.diff(other, draft)
    if cmd == "preview":
        return workflow.preview(store, args.draft_id, examples=args.examples)
    if cmd == "publish":
        return _summary(workflow.publish(store, args.draft_id, agent=agent))
    if cmd == "rollback":
        return _summary(workflow.rollback(store, args.url, agent=agent))
    if cmd == "versions":
        return [_summary(v) for v in workflow.versions(store, args.url)]
    if cmd == "load":
        from terminology.release import load_release

        folder = Path(args.data_dir) / "terminology"
        written = load_release(args.file, loinc_version=args.loinc_version, folder=folder)
        resource = load_file(written)
        return {"installed": str(written), "url": resource["url"], "version": resource.get("version"),
                "concepts": len(resource.get("concept", [])),
                "note": "restart the server (or call terminology.catalog.reload_catalog()) to use it"}
    if cmd == "unmapped":
        return workflow.unmapped_report(store)
    if cmd == "seed":
        return [_summary(v) for v in workflow.seed(store)]
    raise ValueError(f"unknown terminology command {cmd!r}")


def run(args, *, store=None, out=None) -> int:
    """Run a parsed ``trialtwin terminology ...`` command; print JSON; return the exit status.

    Errors print their OperationOutcome issues to stderr (one line each, naming the CSV line) and
    return 1; nothing is stored in that case.
    """
    out = out or sys.stdout
    own = store is None
    store = store or _open_store(args)
    try:
        result = _execute(args, store)
    except FhirError as exc:
        for issue in exc.to_outcome()["issue"]:
            print(f"{issue['severity']}: {issue.get('diagnostics')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if own:
            store.close()
    json.dump(result, out, indent=2, ensure_ascii=False)
    out.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m terminology.cli``), the same commands as ``trialtwin terminology``."""
    parser = argparse.ArgumentParser(prog="trialtwin")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
