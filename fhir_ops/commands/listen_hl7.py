"""``trialtwin listen-hl7``: an MLLP listener storing ORU^R01 results and ADT^A04/A08 updates as FHIR.

Writes into the embedded store of a data directory (beside a running ``trialtwin serve`` on the same
directory, or alone) or into a FHIR server by URL; see docs/connectors.md.
"""
from __future__ import annotations

import argparse
import logging
import os

from fhir_ops.commands.serve import DEFAULT_DATA_DIR, is_loopback

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("listen-hl7", help="receive HL7 v2 messages over MLLP and store them as FHIR")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=2575, help="TCP port (default 2575, HL7's registered port)")
    parser.add_argument("--allow", action="append", default=None, metavar="NETWORK",
                        help="address or CIDR block whose senders may connect; repeatable (default: loopback only)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", default=None, help=f"embedded store directory (default {DEFAULT_DATA_DIR})")
    where.add_argument("--url", help="base URL of a FHIR server to store into instead")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes accepting connections on the same port (SO_REUSEPORT); each parses and "
                             "writes on its own, the store serializes commits (default 1)")
    parser.add_argument("--linger-ms", type=float, default=2.0,
                        help="longest wait for more messages to share a commit while other senders are connected "
                             "(default 2 ms; more: fewer commits, longer ACK latency)")
    parser.add_argument("--token", default=os.environ.get("TRIALTWIN_TOKEN"),
                        help="with --url: a SMART access token (system/Observation.c system/Patient.cru)")
    return parser


def open_store(args):
    if args.url:
        from fhir_ops.store.remote import RemoteStore

        return RemoteStore(args.url, {"Authorization": f"Bearer {args.token}"} if args.token else None)
    from fhir_ops.store.sqlite import SQLiteStore

    data_dir = os.path.abspath(args.data_dir or DEFAULT_DATA_DIR)
    return SQLiteStore(os.path.join(data_dir, "trialtwin.sqlite"))


def _stop_on_sigterm() -> None:
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt  # unwinds through the finally blocks: writer drained, store closed

    signal.signal(signal.SIGTERM, stop)


def run(args) -> int:
    from fhir_ops.connectors.mllp import LOOPBACK

    _stop_on_sigterm()

    if not 0 <= args.linger_ms <= 1000:
        raise SystemExit(f"trialtwin listen-hl7: --linger-ms must be between 0 and 1000; got {args.linger_ms}")
    allow = args.allow or list(LOOPBACK)
    if not is_loopback(args.host) and not args.allow:
        log.warning("listening on %s but only loopback senders may connect until --allow names them", args.host)
    if args.workers > 1:
        if args.port == 0:
            raise SystemExit("trialtwin listen-hl7: --workers needs a fixed --port")
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_serve, args=(args, allow, False), daemon=True) for _ in range(args.workers - 1)]
        for p in procs:
            p.start()
        try:
            return _serve(args, allow, True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.join(timeout=30)
    return _serve(args, allow, True)


def _serve(args, allow, announce: bool) -> int:
    from fhir_ops.connectors.hl7v2 import Hl7Ingest
    from fhir_ops.connectors.mllp import MllpServer

    if not announce:  # a worker process: its own signal handler and log output
        _stop_on_sigterm()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = open_store(args)
    ingest = Hl7Ingest(store, linger=args.linger_ms / 1000.0)
    server = MllpServer((args.host, args.port), ingest.handle, allow=allow, reuse_port=args.workers > 1,
                        handler_many=ingest.handle_many, on_connection=ingest.connection)
    if announce:
        print(f"trialtwin listen-hl7: MLLP on {args.host}:{server.server_address[1]} ({args.workers} worker(s)), "
              f"senders from {', '.join(allow)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        if announce:
            raise
    finally:
        server.server_close()
        ingest.close()
        store.close()
        log.info("HL7 v2 messages: %s", ingest.counts)
        if ingest.writer is not None:
            log.info("group commits: %d commits for %d messages", ingest.writer.commits, ingest.writer.messages)
    return 0
