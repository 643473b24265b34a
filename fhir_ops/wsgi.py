"""The one WSGI process: the FHIR server at the root, the SMART apps under /auth and /app, inference at /inference.

``create_wsgi(config)`` composes whichever apps are installed; absent ones are logged, not faked.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging

from werkzeug.middleware.dispatcher import DispatcherMiddleware

log = logging.getLogger(__name__)

#: path prefix → (module with ``create_app(test_config)``, what it is)
MOUNTS = (
    ("/auth", "smart_app.authz", "SMART authorization server"),
    ("/app", "smart_app.app", "clinician SMART app"),
    ("/inference", "fhir_ops.inference_api", "ONNX Runtime inference service"),
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package itself is missing
        return False


def create_wsgi(config: dict | None = None):
    """Build the WSGI app of ``trialtwin serve``.

    Parameters
    ----------
    config : dict, optional
        Passed to every app factory as its ``test_config`` (``DATA_DIR``, ``BASE_URL`` ...); None
        lets each factory read its ``TRIALTWIN_*`` environment.

    Returns
    -------
    werkzeug.middleware.dispatcher.DispatcherMiddleware
        The FHIR app (routes under ``/fhir``) at the root; its ``mounts`` dict holds the SMART apps
        that are installed.
    """
    from fhir_ops.app import create_app

    fhir = create_app(None if config is None else dict(config))
    mounts = {}
    for prefix, module, what in MOUNTS:
        if not _installed(module):
            log.warning("%s (%s) is not installed in this build; nothing is served under %s", what, module, prefix)
            continue
        factory = importlib.import_module(module).create_app
        mounts[prefix] = factory(None if config is None else dict(config))
        log.info("%s mounted at %s", what, prefix)
    return DispatcherMiddleware(fhir, mounts)
