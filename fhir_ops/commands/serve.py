"""``trialtwin serve``: run the FHIR server and the installed SMART apps in one waitress process.

Other subcommands (``demo``) reuse ``add_server_options`` and ``build_config`` so new server options
(``--auth`` ...) reach every command that serves.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os

from fhir_ops.errors import FhirError

log = logging.getLogger(__name__)
DEFAULT_DATA_DIR = os.environ.get("TRIALTWIN_DATA_DIR", "./data")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the server."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help="directory of the embedded SQLite store (default ./data or $TRIALTWIN_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=8, help="waitress worker threads (default 8)")
    parser.add_argument("--auth", choices=("smart", "open"), default="smart",
                        help="smart (default): every FHIR request needs a SMART access token; open: no "
                             "authorization, allowed only on a loopback host")
    parser.add_argument("--public-url", default=None,
                        help="base URL clients use to reach this server (default http://HOST:PORT); tokens are "
                             "issued for <public-url>/fhir by <public-url>/auth")
    parser.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                        help="an origin (scheme://host[:port]) whose browser SMART apps may call /fhir, /auth/token "
                             "and /inference; repeat for several (default $TRIALTWIN_CORS_ORIGINS, comma separated; "
                             "without either: loopback origins when serving on a loopback host, none otherwise; "
                             "'none' turns CORS off)")
    parser.add_argument("--store", choices=("embedded", "hapi"), default="embedded",
                        help="where FHIR resources live: the embedded SQLite store in --data-dir (default) "
                             "or an external HAPI FHIR server at --hapi-url")
    parser.add_argument("--hapi-url", default=os.environ.get("TRIALTWIN_HAPI_URL"),
                        help="FHIR base of the HAPI server for --store hapi, e.g. http://127.0.0.1:8090/fhir "
                             "(default $TRIALTWIN_HAPI_URL)")
    parser.add_argument("--dask-scheduler", default=os.environ.get("TRIALTWIN_DASK_SCHEDULER"), metavar="ADDRESS",
                        help="run cohort and study simulations on an existing Dask cluster, e.g. "
                             "tcp://10.0.0.5:8786 (default $TRIALTWIN_DASK_SCHEDULER; none: in this process)")
    parser.add_argument("--job-tasks", action="store_true", default=_env_flag("TRIALTWIN_JOB_TASKS"),
                        help="store each finished asynchronous job as a FHIR Task (its operation, target, "
                             "outcome and polling URL), so a Subscription on Task can notify of finished jobs "
                             "(default $TRIALTWIN_JOB_TASKS; off: no extra write per job)")
    security = parser.add_argument_group("SMART authorization server (see docs/smart.md, 'Deploying safely')")
    security.add_argument("--registration-token", default=os.environ.get("TRIALTWIN_REGISTRATION_TOKEN"),
                          help="initial access token (RFC 7591 §3) that opens POST /auth/register (default "
                               "$TRIALTWIN_REGISTRATION_TOKEN; none: only clients an administrator registers or "
                               "tokens from 'trialtwin clients token')")
    security.add_argument("--registration-scope", default=os.environ.get("TRIALTWIN_REGISTRATION_SCOPE"),
                          help="the most a client registered with --registration-token may hold (default "
                               "$TRIALTWIN_REGISTRATION_SCOPE, else read-only user-facing scopes)")
    security.add_argument("--dev-launch-simulator", action="store_true",
                          default=_env_flag("TRIALTWIN_DEV_LAUNCH_SIMULATOR"),
                          help="development only, loopback only: the EHR launch simulator and the published "
                               "development users (dr.chen, dr.okafor) (default $TRIALTWIN_DEV_LAUNCH_SIMULATOR)")
    security.add_argument("--jwks-allow", default=os.environ.get("TRIALTWIN_JWKS_ALLOW"),
                          help="development only: comma-separated hosts, host:port or networks whose client "
                               "jwks_uri may be http or a private/loopback address (default $TRIALTWIN_JWKS_ALLOW)")
    security.add_argument("--subscription-allow", default=os.environ.get("TRIALTWIN_SUBSCRIPTION_ALLOW"),
                          help="development only: comma-separated hosts, host:port or networks a Subscription's "
                               "rest-hook endpoint may be http or a private/loopback address on (default "
                               "$TRIALTWIN_SUBSCRIPTION_ALLOW)")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback interface only (127.0.0.0/8, ::1 or localhost).

    Examples
    --------
    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_auth_mode(auth: str, host: str) -> None:
    """Refuse ``--auth open`` unless the server listens on a loopback address only.

    Raises
    ------
    FhirError
        ``--auth open`` with a host that other machines could reach.
    """
    if auth == "open" and not is_loopback(host):
        raise FhirError(f"--auth open serves participant data without any authorization, so it is only allowed "
                        f"on a loopback host (127.0.0.1, ::1, localhost), not on {host!r}; use --auth smart "
                        f"(the default) to listen on {host}", error_id="open-auth-not-loopback")


def check_dev_features(args: argparse.Namespace) -> None:
    """Refuse development features (launch simulator, published passwords) on a server others can reach.

    Raises
    ------
    FhirError
        ``--dev-launch-simulator`` with a non-loopback ``--host`` or ``--public-url``.
    """
    if not getattr(args, "dev_launch_simulator", False):
        return
    from urllib.parse import urlsplit

    public_host = urlsplit(args.public_url).hostname if getattr(args, "public_url", None) else args.host
    if not is_loopback(args.host) or not is_loopback(public_host or ""):
        raise FhirError(f"--dev-launch-simulator signs in with published passwords, so it is only allowed on a "
                        f"loopback host (127.0.0.1, ::1, localhost), not on {args.host!r}"
                        f"{f' / {args.public_url}' if getattr(args, 'public_url', None) else ''}",
                        error_id="dev-features-not-loopback")


def public_base(args: argparse.Namespace) -> str:
    """The URL clients reach the server at (``--public-url`` or http://HOST:PORT)."""
    if args.public_url:
        return args.public_url.rstrip("/")
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{args.port}"


def open_hapi_store(url: str):
    """A ``RemoteStore`` on the HAPI server at ``url``, after checking that it answers as FHIR R4.

    Raises
    ------
    FhirError
        ``store-unavailable`` when nothing answers ``GET [url]/metadata`` with a CapabilityStatement,
        so ``serve``/``demo`` stop at start-up with the reason instead of failing every request.
    """
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


def describe_store(config: dict) -> str:
    """Where the configured store keeps resources, for messages."""
    store = config.get("STORE")
    return f"HAPI FHIR at {store.base_url}" if store is not None else f"the embedded store in {config['DATA_DIR']}"


def cors_origins(args: argparse.Namespace, base: str) -> list:
    """Allowed CORS origins: ``--cors-origin`` flags, else ``$TRIALTWIN_CORS_ORIGINS``, else the default.

    The default is deny in production; a server that listens on, and is reached at, a loopback address is
    a development set-up, where browser apps on other local ports (``http://localhost:3000``) may call it.

    Raises
    ------
    FhirError
        An entry that is not an origin.
    """
    from urllib.parse import urlsplit

    from fhir_ops import cors

    given = getattr(args, "cors_origin", None)
    if given is None:
        given = os.environ.get("TRIALTWIN_CORS_ORIGINS")
    try:
        if given is not None:
            return cors.parse_origins(given)
    except ValueError as exc:
        raise FhirError(str(exc), status=400, code="invalid", error_id="bad-cors-origin") from None
    development = is_loopback(args.host) and is_loopback(urlsplit(base).hostname or "")
    return cors.default_origins(development)


def build_config(args: argparse.Namespace) -> dict:
    """The configuration shared by the FHIR app, the authorization server and the clinician app.

    In smart mode the FHIR app accepts tokens issued by ``<public base>/auth`` for ``<public base>/fhir``
    and checks their signatures with the authorization server's key file (no HTTP round trip).
    """
    auth = getattr(args, "auth", "smart")
    check_auth_mode(auth, args.host)
    check_dev_features(args)
    os.makedirs(args.data_dir, exist_ok=True)
    data_dir = os.path.abspath(args.data_dir)
    base = public_base(args)
    config = {"DATA_DIR": data_dir, "AUTH_MODE": auth, "BASE_URL": f"{base}/fhir", "FHIR_BASE_URL": f"{base}/fhir",
              "ISSUER": f"{base}/auth", "SMART_ISSUER": f"{base}/auth",
              "SMART_KEYS_FILE": os.path.join(data_dir, "smart-signing-keys.json"),
              # The resource server asks the authorization server's own database whether a token was revoked.
              "SMART_REVOCATION_DB": os.path.join(data_dir, "smart-auth.sqlite"),
              "DEV_LAUNCH_SIMULATOR": bool(getattr(args, "dev_launch_simulator", False)),
              "JWKS_FETCH_ALLOW": [e for e in (getattr(args, "jwks_allow", None) or "").split(",") if e.strip()],
              # rest-hook Subscriptions: a background watcher and an outbox in the data directory
              "SUBSCRIPTIONS": True,
              # twins recalibrated in the background as new data arrive (a study may turn it off)
              "CLOSED_LOOP": True,
              # finished asynchronous jobs as Tasks, for Subscriptions (opt-in: one more write per job)
              "JOB_TASKS": bool(getattr(args, "job_tasks", False)),
              "SUBSCRIPTION_ENDPOINT_ALLOW": [e for e in (getattr(args, "subscription_allow", None) or "").split(",")
                                              if e.strip()]}
    if getattr(args, "registration_token", None):
        config["REGISTRATION_ACCESS_TOKEN"] = args.registration_token
    if getattr(args, "registration_scope", None):
        config["REGISTRATION_SCOPE_CEILING"] = args.registration_scope
    config["CORS_ORIGINS"] = cors_origins(args, base)
    if getattr(args, "store", "embedded") == "hapi":
        if not args.hapi_url:
            raise FhirError("--store hapi needs --hapi-url (or TRIALTWIN_HAPI_URL), the HAPI server's FHIR base",
                            status=400, code="required", error_id="missing-hapi-url")
        config["STORE"] = open_hapi_store(args.hapi_url.rstrip("/"))
    if getattr(args, "dask_scheduler", None):
        from fhir_ops import executor

        # one client for the whole process, connected (or refused) before the port is announced
        config["DASK_SCHEDULER"] = args.dask_scheduler
        config["EXECUTOR"] = executor.connect(args.dask_scheduler)
    try:
        from smart_app.app import registration
    except ImportError:
        return config
    config["SEED_CLIENTS"] = [registration(f"{base}/app")]
    return config


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="run the FHIR server (and the SMART apps when installed)")
    add_server_options(parser)
    return parser


def urls(args: argparse.Namespace, wsgi) -> list[tuple[str, str]]:
    """What to open, as (label, URL) pairs."""
    base = public_base(args)
    found = [("FHIR server (CapabilityStatement)", f"{base}/fhir/metadata")]
    if getattr(args, "store", "embedded") == "hapi":
        found.append(("store: HAPI FHIR", args.hapi_url))
    mounts = getattr(wsgi, "mounts", {})
    if "/auth" in mounts:
        found.append(("SMART configuration", f"{base}/fhir/.well-known/smart-configuration"))
        if getattr(args, "dev_launch_simulator", False):
            found.append(("EHR / EDC launch simulator (dev)", f"{base}/auth/launch-simulator"))
    if "/app" in mounts:
        found.append(("SMART clinician app (standalone)", f"{base}/app/"))
    if "/inference" in mounts:
        found.append(("inference service (models, metrics)", f"{base}/inference/models"))
    return found


def serve_forever(args: argparse.Namespace, config: dict, extra_urls: list[tuple[str, str]] = ()) -> int:
    """Compose the WSGI app, print the URLs and serve with waitress until interrupted."""
    from fhir_ops import executor
    from fhir_ops.gc_tuning import tune_for_serving
    from fhir_ops.wsgi import create_wsgi

    try:
        wsgi = create_wsgi(config)
        server = listen(wsgi, args)
        tune_for_serving()
        from inference.kernels import compile_in_background
        compile_in_background()  # loads from the cache in ~1 s; compiles when setup did not
    except BaseException:
        executor.close(config.get("EXECUTOR"))
        raise
    # from here on a Ctrl+C, even during the banner, closes the listener and the Dask client
    try:
        _banner(args, config, wsgi, extra_urls)
        server.run()
    finally:
        server.close()
        executor.close(config.get("EXECUTOR"))
    return 0


def _banner(args: argparse.Namespace, config: dict, wsgi, extra_urls) -> None:
    from fhir_ops import executor

    mode = config.get("AUTH_MODE", "smart")
    print(f"TrialTwin is running (authorization: {mode}"
          f"{'; FHIR requests need a SMART access token' if mode == 'smart' else '; loopback only'}):")
    if config.get("DEV_LAUNCH_SIMULATOR"):
        print("  DEVELOPMENT FEATURES ON (loopback only): EHR launch simulator; published users dr.chen and "
              "dr.okafor, password 'trialtwin'. Never use them on a server others can reach.")
    for label, url in [*urls(args, wsgi), *extra_urls]:
        print(f"  {label:36s} {url}")
    print(f"  {'cohort simulations run':36s} {executor.describe(config.get('EXECUTOR'))}")
    print("Press Ctrl+C to stop.", flush=True)


def _port_in_use(args: argparse.Namespace, exc: OSError) -> FhirError:
    import errno

    if exc.errno == errno.EADDRINUSE:
        return FhirError(f"port {args.port} on {args.host} is already in use (another TrialTwin or another "
                         f"program); stop it or choose another --port", status=409, code="conflict",
                         error_id="port-in-use")
    return FhirError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", status=500,
                     code="exception", error_id="cannot-listen")


def check_port_free(args: argparse.Namespace) -> None:
    """Fail early (before minutes of demo loading) when ``--port`` cannot be bound; ``listen`` still decides."""
    import socket

    host = args.host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress binds
        try:
            probe.bind((host, args.port))
        except OSError as exc:
            raise _port_in_use(args, exc) from None


def listen(wsgi, args: argparse.Namespace):
    """Bind the waitress server to ``--host``/``--port`` before anything says the server is running.

    Raises
    ------
    FhirError
        ``port-in-use`` (or ``cannot-listen``) with the address, so the CLI prints one line and exits 1.
    """
    import waitress.server

    try:
        return waitress.server.create_server(wsgi, host=args.host, port=args.port, threads=args.threads)
    except OSError as exc:
        raise _port_in_use(args, exc) from None


def run(args: argparse.Namespace) -> int:
    return serve_forever(args, build_config(args))
