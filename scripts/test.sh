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

# Integration tier: HAPI FHIR JPA as a plain Java process built by our Maven project.
stop_hapi() { bash scripts/hapi.sh stop || true; }
if [ "${TRIALTWIN_SKIP_HAPI:-0}" != 1 ]; then
  bash scripts/hapi.sh build
  trap stop_hapi EXIT
  bash scripts/hapi.sh start
fi

mkdir -p test-artifacts
"$BIN/python" -m pytest -n 2 --dist loadgroup "$@"
