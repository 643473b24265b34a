"""``trialtwin serve``: run the FHIR server and the installed SMART apps in one waitress process.

Other subcommands (``demo``) reuse ``add_server_options`` and ``build_config`` so new server options
(``--auth`` ...) reach every command that serves.
"""
from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)
DEFAULT_DATA_DIR = os.environ.get("TRIALTWIN_DATA_DIR", "./data")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the server."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="directory of the embedded SQLite store (default ./data or $TRIALTWIN_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=8, help="waitress worker threads (default 8)")


def build_config(args: argparse.Namespace) -> dict:
    """The app configuration for the parsed options."""
    os.makedirs(args.data_dir, exist_ok=True)
    return {"DATA_DIR": os.path.abspath(args.data_dir)}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="run the FHIR server (and the SMART apps when installed)")
    add_server_options(parser)
    return parser


def urls(args: argparse.Namespace, wsgi) -> list[tuple[str, str]]:
    """What to open, as (label, URL) pairs."""
    base = f"http://{args.host}:{args.port}"
    found = [("FHIR server (CapabilityStatement)", f"{base}/fhir/metadata")]
    mounts = getattr(wsgi, "mounts", {})
    if "/app" in mounts:
        found.append(("SMART clinician app", f"{base}/app/"))
    if "/auth" in mounts:
        found.append(("SMART configuration", f"{base}/fhir/.well-known/smart-configuration"))
    if "/inference" in mounts:
        found.append(("inference service (models, metrics)", f"{base}/inference/models"))
    return found


def serve_forever(args: argparse.Namespace, config: dict, extra_urls: list[tuple[str, str]] = ()) -> int:
    """Compose the WSGI app, print the URLs and serve with waitress until interrupted."""
    import waitress

    from fhir_ops.wsgi import create_wsgi

    wsgi = create_wsgi(config)
    print("TrialTwin is running:")
    for label, url in [*urls(args, wsgi), *extra_urls]:
        print(f"  {label:36s} {url}")
    print("Press Ctrl+C to stop.", flush=True)
    waitress.serve(wsgi, host=args.host, port=args.port, threads=args.threads)
    return 0


def run(args: argparse.Namespace) -> int:
    return serve_forever(args, build_config(args))
