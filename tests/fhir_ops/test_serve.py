"""What ``trialtwin serve`` shows the outside: the root and favicon, the advertised security, a busy port,
the CapabilityStatement built at start-up and a ``--help`` that loads no numerics."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from fhir_ops.app import create_app
from tests.app_config import open_config
from tests.live_server import serve

pytestmark = pytest.mark.api

ROOT = Path(__file__).resolve().parents[2]
FHIR_JSON = "application/fhir+json"
HEAVY = ("numpy", "scipy", "flask", "onnxruntime", "sklearn", "fhir.resources", "matplotlib", "waitress")


def smart_config(tmp_path, **extra) -> dict:
    from smart_app.jwks import SigningKeys

    tmp_path.mkdir(parents=True, exist_ok=True)
    SigningKeys.load_or_create(tmp_path / "keys.json")  # the authorization server's real key file
    return {"DATA_DIR": str(tmp_path), "SMART_ISSUER": "https://auth.example/auth",
            "BASE_URL": "https://ehr.example/fhir", "SMART_KEYS_FILE": str(tmp_path / "keys.json"), **extra}


def test_root_and_favicon_in_smart_mode_are_a_landing_page_and_a_404_not_a_401(tmp_path):
    app = create_app(smart_config(tmp_path))
    with serve(app) as base:
        root = requests.get(base + "/", timeout=30)
        assert root.status_code == 200 and root.headers["Content-Type"].startswith("text/html")
        assert 'href="fhir/metadata"' in root.text and 'href="app/"' in root.text
        icon = requests.get(base + "/favicon.ico", timeout=30)
        assert icon.status_code == 404 and icon.headers["Content-Type"].startswith(FHIR_JSON)
        assert icon.json()["issue"][0]["details"]["coding"][0]["code"] == "unknown-route"
        # Everything under the FHIR base is still behind the token, and so is any other route of the app.
        assert requests.get(base + "/fhir/Patient", timeout=30).status_code == 401
        assert requests.get(base + "/fhir/no-such-type", timeout=30).status_code == 401
        assert requests.get(base + "/static/anything.css", timeout=30).status_code == 401
        assert requests.post(base + "/", timeout=30).status_code in (401, 405)


def test_open_mode_does_not_advertise_smart_security(tmp_path):
    # ``trialtwin serve --auth open`` still configures the issuer (the clinician app uses it), but the FHIR
    # server ignores tokens, so its CapabilityStatement must not send clients to authorize.
    opened = create_app(smart_config(tmp_path / "open", AUTH_MODE="open"))
    smart = create_app(smart_config(tmp_path / "smart"))
    with serve(opened) as open_base, serve(smart) as smart_base:
        open_cap = requests.get(open_base + "/fhir/metadata", timeout=30).json()
        smart_cap = requests.get(smart_base + "/fhir/metadata", timeout=30).json()
    assert "security" not in open_cap["rest"][0]
    assert smart_cap["rest"][0]["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"


def test_capability_statement_is_built_when_the_app_is_created(tmp_path):
    from fhir_ops.rest import capability_statement

    app = create_app(open_config(DATA_DIR=str(tmp_path)))
    built = app.extensions["trialtwin.capability"]  # present before any request
    assert capability_statement(app) is built and "implementation" not in built
    with serve(app) as base:
        first = requests.get(base + "/fhir/metadata", timeout=30).json()
    assert first["implementation"]["url"] == base + "/fhir"  # the request's base, not a cached one
    assert first["rest"] == built["rest"] and "implementation" not in built


def _busy_port():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def _cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "fhir_ops.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_busy_port_is_one_clear_error_and_exit_1(tmp_path, command):
    with _busy_port() as sock:
        port = sock.getsockname()[1]
        run = _cli(command, "--auth", "open", "--port", str(port), "--data-dir", str(tmp_path))
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"trialtwin {command}: port {port} on 127.0.0.1 is already in use" in run.stderr
    assert "Traceback" not in run.stderr and "running" not in run.stdout
    if command == "demo":
        assert "Loaded" not in run.stdout  # refused before minutes of loading, not after


def test_help_imports_no_numerics_or_web_framework():
    probe = ("import sys\nfrom fhir_ops.cli import main\n"
             "for argv in (['--help'], ['serve', '--help']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             f"print('LOADED', __import__('json').dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             f"{sorted({h.split('.')[0] for h in HEAVY})!r})))\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "run the FHIR server" in run.stdout and "--auth {smart,open}" in run.stdout
    loaded = json.loads(run.stdout.rsplit("LOADED", 1)[1])
    assert loaded == [], f"trialtwin --help imported {loaded}"


def test_every_command_has_a_summary_and_runs_its_own_parser():
    from fhir_ops.cli import COMMANDS, SUMMARIES, build_parser

    assert {name for name, _ in COMMANDS} == set(SUMMARIES)
    args = build_parser("load").parse_args(["load", "a.json"])
    assert args.files == ["a.json"] and callable(args._run)
