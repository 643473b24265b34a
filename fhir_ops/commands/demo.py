"""``trialtwin demo``: create the TT-201 demo study in the configured store (once), then serve it.

The study is simulated by the twin engine (``fhir_ops.demo``); a second run finds it and only serves.
"""
from __future__ import annotations

import argparse
import time

from urllib.parse import urlsplit

from fhir_ops.commands.serve import (add_server_options, build_config, check_port_free, describe_store, is_loopback,
                                     public_base, serve_forever)

#: the demo ``trialtwin demo`` creates unless told otherwise (tests that must run "on the demo data" use these)
DEFAULT_PARTICIPANTS = 200
DEFAULT_SEED = 7

#: a participant on study at the data cut of the default demo (200 participants, seed 7), named in the
#: console and the README; tests/fhir_ops/test_demo.py checks both against the generated study
EXAMPLE_PARTICIPANT = "tt201-p062"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="create the demo study TT-201 if absent, then serve it")
    add_server_options(parser)
    parser.add_argument("--participants", type=int, default=DEFAULT_PARTICIPANTS,
                        help=f"participants to simulate (default {DEFAULT_PARTICIPANTS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"simulation seed (default {DEFAULT_SEED})")
    parser.add_argument("--no-serve", action="store_true", help="only create the study, do not start the server")
    parser.add_argument("--no-dev-features", action="store_true",
                        help="do not turn on the launch simulator and development users, which the demo otherwise "
                             "does when it serves on a loopback host")
    return parser


def wants_dev_features(args: argparse.Namespace) -> bool:
    """The demo turns development features on by itself, but only on loopback (and never when told not to)."""
    if args.no_dev_features:
        return False
    public_host = urlsplit(args.public_url).hostname if args.public_url else args.host
    return is_loopback(args.host) and is_loopback(public_host or "")


def create_demo(config: dict, participants: int, seed: int) -> int:
    """Load the demo study into the store of ``config`` unless present; return resources loaded."""
    from tqdm import tqdm

    from fhir_ops.app import create_app, get_store
    from fhir_ops.demo import demo_study_exists, ensure_demo_study

    # In-process store access, never served over HTTP: no tokens to check.
    # No background watchers either: the study being loaded is not "new data" for the closed loop.
    app = create_app({**config, "AUTH_MODE": "open", "SUBSCRIPTIONS": False, "CLOSED_LOOP": False})
    with app.app_context():
        store = get_store()
        try:
            if demo_study_exists(store):
                print(f"Demo study TT-201 already present in {describe_store(config)}; not regenerated.")
                return 0
            print(f"Simulating TT-201 ({participants} participants, seed {seed}) ...", flush=True)
            started = time.perf_counter()
            with tqdm(total=None, unit=" resources", desc="loading TT-201") as bar:
                def advance(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                loaded = ensure_demo_study(store, participants=participants, seed=seed, progress=advance)
            elapsed = time.perf_counter() - started
            print(f"Loaded {loaded} resources into {describe_store(config)} in {elapsed:.1f} s "
                  f"({loaded / elapsed:.0f} resources/s).")
            return loaded
        finally:
            if config.get("STORE") is None:  # a store handed in (HAPI) goes on to serve
                store.close()


def run(args: argparse.Namespace) -> int:
    if args.participants < 1:
        raise SystemExit("trialtwin demo: --participants must be at least 1")
    if not args.no_serve:
        check_port_free(args)  # before loading, not after minutes of it
    if not args.dev_launch_simulator and wants_dev_features(args):
        args.dev_launch_simulator = True
        print("trialtwin demo: serving on loopback, so development features are on: the EHR launch simulator and "
              "the published users dr.chen / dr.okafor (password 'trialtwin'); --no-dev-features turns them off.")
    config = build_config(args)
    create_demo(config, args.participants, args.seed)
    if args.no_serve:
        if config.get("STORE") is not None:
            config["STORE"].close()
        return 0
    base = public_base(args)
    if config.get("AUTH_MODE") == "smart" and config.get("DEV_LAUNCH_SIMULATOR"):
        print("Open the launch simulator, sign in as dr.chen / trialtwin, choose 'TrialTwin clinician app' and a "
              f"participant (e.g. {EXAMPLE_PARTICIPANT}) or the study tt-201, and press Launch.")
    elif config.get("AUTH_MODE") == "smart":
        print("Development features are off: add a user (trialtwin users add) and register clients "
              "(trialtwin clients register); see docs/smart.md, 'Deploying safely'.")
    extra = [("Demo study (FHIR)", f"{base}/fhir/ResearchStudy/tt-201")]
    if config.get("AUTH_MODE") == "open":
        extra += [("Participants", f"{base}/fhir/ResearchSubject?study=ResearchStudy/tt-201"),
                  ("One participant's HbA1c",
                   f"{base}/fhir/Observation?subject=Patient/{EXAMPLE_PARTICIPANT}&code=http://loinc.org|4548-4")]
    return serve_forever(args, config, extra_urls=extra)
