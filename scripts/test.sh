#!/usr/bin/env bash
# The whole test suite from a set-up checkout (make test): system prerequisites for the browser
# tier, a live HAPI FHIR JPA server for the integration tier, then pytest over every tier.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin

# Browser tier: Debian's Chromium driven by Playwright (no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing Debian chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

# Browser tier: the reference SMART JavaScript client (npm fhirclient) at the version the lock file pins.
if [ ! -d tests/smart_app/js/node_modules/fhirclient ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "== installing Debian nodejs and npm for the SMART JavaScript client test"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
  fi
  echo "== npm ci in tests/smart_app/js (fhirclient)"
  (cd tests/smart_app/js && npm ci --silent)
fi

# Integration tier: HAPI FHIR JPA as a plain Java process built by our Maven project (CI has no
# Docker). Start one unless it is already up or deliberately skipped, and stop only what this
# script started. A fresh in-memory database keeps runs independent.
started_hapi=0
if [[ "${TRIALTWIN_SKIP_HAPI:-0}" != "1" ]] && ! curl -sf --max-time 5 -o /dev/null "$(scripts/hapi.sh url)/metadata"; then
  HAPI_DB="${HAPI_DB:-mem}" scripts/hapi.sh start
  started_hapi=1
fi
stop_hapi() { if [[ $started_hapi == 1 ]]; then scripts/hapi.sh stop; fi; }
trap stop_hapi EXIT

mkdir -p test-artifacts
"$BIN/python" -m pytest -n 2 --dist loadgroup "$@"
