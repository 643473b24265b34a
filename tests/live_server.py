"""Run a WSGI app on a real loopback socket for the duration of a test (no test client)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from werkzeug.serving import make_server


@contextmanager
def serve(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` on a free port in a background thread; yield its base URL (no trailing slash)."""
    server = make_server(host, 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)
