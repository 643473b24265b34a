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
    parser.add_argument("--store", choices=("embedded", "hapi"), default="embedded",
                        help="where FHIR resources live: the embedded SQLite store in --data-dir (default) "
                             "or an external HAPI FHIR server at --hapi-url")
    parser.add_argument("--hapi-url", default=os.environ.get("TRIALTWIN_HAPI_URL"),
                        help="FHIR base of the HAPI server for --store hapi, e.g. http://127.0.0.1:8090/fhir "
                             "(default $TRIALTWIN_HAPI_URL)")


def open_hapi_store(url: str):
    """A ``RemoteStore`` on the HAPI server at ``url``, after checking that it answers as FHIR R4.

    Raises
    ------
    FhirError
        ``store-unavailable`` when nothing answers ``GET [url]/metadata`` with a CapabilityStatement,
        so ``serve``/``demo`` stop at start-up with the reason instead of failing every request.
    """
    from fhir_ops.errors import FhirError
    from fhir_ops.store.remote import RemoteStore

    store = RemoteStore(url, timeout=30.0)
    try:
        capability = store.metadata()
    except FhirError as exc:
        store.close()
        raise FhirError(f"the HAPI FHIR server at {url} is not usable: {exc.message}. Start it (scripts/hapi.sh "
                        "start, or docker compose -f docker/compose.yml up hapi) or correct --hapi-url.",
                        status=503, code="transient", error_id="store-unavailable") from None
    if capability.get("resourceType") != "CapabilityStatement" or capability.get("fhirVersion") != "4.0.1":
        store.close()
        raise FhirError(f"{url}/metadata did not answer with an R4 (4.0.1) CapabilityStatement "
                        f"(got {capability.get('resourceType')} {capability.get('fhirVersion')}); "
                        "TrialTwin needs a FHIR R4 server", status=503, code="not-supported",
                        error_id="store-not-r4")
    software = capability.get("software") or {}
    log.info("store: %s %s at %s", software.get("name", "FHIR server"), software.get("version", ""), url)
    return store


def build_config(args: argparse.Namespace) -> dict:
    """The app configuration for the parsed options (opens and checks the HAPI store for --store hapi)."""
    from fhir_ops.errors import InvalidRequest

    os.makedirs(args.data_dir, exist_ok=True)
    config = {"DATA_DIR": os.path.abspath(args.data_dir)}
    store = getattr(args, "store", "embedded")
    if store == "hapi":
        if not args.hapi_url:
            raise InvalidRequest("--store hapi needs --hapi-url (or TRIALTWIN_HAPI_URL), the HAPI server's FHIR base")
        config["STORE"] = open_hapi_store(args.hapi_url.rstrip("/"))
    return config


def describe_store(config: dict) -> str:
    """Where the configured store keeps resources, for messages."""
    store = config.get("STORE")
    return f"HAPI FHIR at {store.base_url}" if store is not None else f"the embedded store in {config['DATA_DIR']}"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="run the FHIR server (and the SMART apps when installed)")
    add_server_options(parser)
    return parser


def urls(args: argparse.Namespace, wsgi) -> list[tuple[str, str]]:
    """What to open, as (label, URL) pairs."""
    base = f"http://{args.host}:{args.port}"
    found = [("FHIR server (CapabilityStatement)", f"{base}/fhir/metadata")]
    if getattr(args, "store", "embedded") == "hapi":
        found.append(("store: HAPI FHIR", args.hapi_url))
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
