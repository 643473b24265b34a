"""Shared test configuration of the FHIR app: tests that do not exercise SMART run it in open mode.

The app is secure by default (``AUTH_MODE`` "smart"); saying "open" here, once, keeps that choice visible.
"""
from __future__ import annotations


def open_config(**config) -> dict:
    """A ``create_app`` / ``create_wsgi`` config with authorization switched off, plus ``config``."""
    return {"AUTH_MODE": "open", **config}
