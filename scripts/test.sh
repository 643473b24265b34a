#!/usr/bin/env bash
# Runs the whole test suite from a set-up checkout: system prerequisites, HAPI, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin

# The integration tier needs a live HAPI FHIR server (CI has no Docker: scripts/hapi.sh builds and
# runs it with Java). Start one unless it is already up or deliberately skipped, and stop only
# what this script started. A fresh in-memory database keeps runs independent.
started_hapi=0
if [[ "${TRIALTWIN_SKIP_HAPI:-0}" != "1" ]] && ! curl -sf --max-time 5 -o /dev/null "$(scripts/hapi.sh url)/metadata"; then
    HAPI_DB="${HAPI_DB:-mem}" scripts/hapi.sh start
    started_hapi=1
fi
stop_hapi() { if [[ $started_hapi == 1 ]]; then scripts/hapi.sh stop; fi; }
trap stop_hapi EXIT

"$BIN/python" -m pytest "$@"
