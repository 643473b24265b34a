"""The one-process composition: FHIR at the root, installed SMART apps mounted, absent ones logged."""
from __future__ import annotations

import logging

import pytest
import requests
from flask import Flask

from fhir_ops import wsgi
from tests.app_config import open_config
from tests.live_server import serve

pytestmark = pytest.mark.api


def create_app(test_config=None):
    """A small app standing in for a SMART app module: what matters is where it is mounted."""
    app = Flask("mounted")
    app.config.update(test_config or {})

    @app.get("/")
    def index():
        return {"mounted": True, "data_dir": app.config.get("DATA_DIR")}

    return app


def test_absent_smart_apps_are_logged_and_fhir_is_served(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(wsgi, "MOUNTS", (("/app", "smart_app.not_built_yet", "clinician SMART app"),))
    with caplog.at_level(logging.WARNING, logger="fhir_ops.wsgi"):
        app = wsgi.create_wsgi(open_config(DATA_DIR=str(tmp_path)))
    assert "clinician SMART app (smart_app.not_built_yet) is not installed" in caplog.text
    with serve(app) as base:
        assert requests.get(base + "/fhir/metadata").json()["resourceType"] == "CapabilityStatement"
        missing = requests.get(base + "/app/")
        assert missing.status_code == 404
        assert missing.headers["Content-Type"].startswith("application/fhir+json")


def test_installed_apps_are_mounted_under_their_prefix(tmp_path, monkeypatch):
    monkeypatch.setattr(wsgi, "MOUNTS", (("/app", __name__, "test app"),))
    app = wsgi.create_wsgi(open_config(DATA_DIR=str(tmp_path)))
    assert set(app.mounts) == {"/app"}
    with serve(app) as base:
        assert requests.get(base + "/app/").json() == {"mounted": True, "data_dir": str(tmp_path)}
        assert requests.get(base + "/fhir/metadata").status_code == 200
