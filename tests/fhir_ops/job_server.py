"""A real FHIR server process for the durable-job tests: ``python -m tests.fhir_ops.job_server DATA_DIR``.

Serves ``fhir_ops.app.create_app`` (open mode, finished jobs stored as Tasks) on a free loopback port,
printed as the first line of stdout, with one test operation ``$test-wait`` that runs until the file ``DATA_DIR/release``
appears or the job is cancelled (then it writes ``DATA_DIR/stopped``).
"""
from __future__ import annotations

import os
import sys
import time

from werkzeug.serving import make_server

from fhir_ops.app import create_app
from fhir_ops.operations import registry

WAIT = {
    "resourceType": "OperationDefinition", "id": "test-wait", "name": "TestWait", "status": "draft",
    "url": "https://trialtwin.org/fhir/OperationDefinition/test-wait", "kind": "operation",
    "code": "test-wait", "affectsState": False, "system": True, "type": False, "instance": False,
    "parameter": [
        {"name": "block", "use": "in", "min": 1, "max": "1", "type": "boolean"},
        {"name": "pid", "use": "out", "min": 1, "max": "1", "type": "integer"},
    ],
}


def main(data_dir: str) -> None:
    @registry.operation(WAIT, async_allowed=True)
    def wait(ctx, params):
        deadline = time.time() + 120
        while params["block"] and time.time() < deadline:
            if ctx.cancelled():
                open(os.path.join(data_dir, "stopped"), "w").close()
                return {"pid": os.getpid()}
            if os.path.exists(os.path.join(data_dir, "release")):
                break
            ctx.progress(0.5, "waiting")
            time.sleep(0.05)
        return {"pid": os.getpid()}

    app = create_app({"AUTH_MODE": "open", "DATA_DIR": data_dir, "JOB_TASKS": True})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1])
