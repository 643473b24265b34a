#!/usr/bin/env bash
# The whole test suite from a set-up checkout (make test): system prerequisites for the browser
# tier, a live HAPI FHIR JPA server for the integration tier, then pytest over every tier.
#
# HAPI needs minutes to build and start on a busy 2-core machine, so it starts in the background
# while every other tier runs, and the integration tier waits for it (HAPI_WAIT_S, 600 s).
# Environment: TRIALTWIN_SKIP_HAPI=1 (no integration tier), TRIALTWIN_HAPI_URL (test against that
# server instead of starting one), HAPI_PORT / HAPI_DATA_DIR (see scripts/hapi.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
PYTEST=("$BIN/python" -m pytest -n 2 --dist loadgroup)
mkdir -p test-artifacts
# The engine's Numba kernels into the on-disk cache first (make setup did it; ~1 s when cached), so no
# test's request spends its time budget compiling after a change to a kernel's source.
"$BIN/trialtwin" compile-kernels

browser_prerequisites() {
  # Browser tier: Debian's Chromium driven by Playwright (no browser download).
  if ! command -v chromium >/dev/null 2>&1; then
    echo "== installing Debian chromium for the browser tests"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi

  # The withdrawal model's real-data check compares its shipped CSV with R survival's own pbcseq.
  if ! command -v Rscript >/dev/null 2>&1 || ! Rscript -e 'library(survival)' >/dev/null 2>&1; then
    echo "== installing Debian R with survival for the real-data check of the withdrawal model"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq r-base-core r-cran-survival >/dev/null
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
}

if [[ "${TRIALTWIN_SKIP_HAPI:-0}" == "1" || -n "${TRIALTWIN_HAPI_URL:-}" ]]; then
  # Deliberately no HAPI of ours: skipped, or a server the caller named and owns.
  browser_prerequisites
  exec "${PYTEST[@]}" "$@"
fi

# Integration tier: HAPI FHIR JPA as a plain Java process built by our Maven project (CI has no
# Docker), on a fresh in-memory database so runs stay independent. The cleanup trap is in place
# before anything starts, so a failed or interrupted start never leaves a JVM on the port.
hapi_job=""
HAPI_LOG=test-artifacts/hapi-start.log
cleanup() {
  local rc=$?
  if [[ -n $hapi_job ]]; then
    kill -TERM "$hapi_job" 2>/dev/null || true   # a start still building or waiting stops its JVM
    wait "$hapi_job" 2>/dev/null || true
  fi
  scripts/hapi.sh stop >/dev/null || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A server already on the port is not ours to test against: it may be stale (old code, old data).
hapi_port=${HAPI_PORT:-8090}
if (exec 3<>"/dev/tcp/127.0.0.1/$hapi_port") 2>/dev/null; then
  echo "error: port $hapi_port is already in use; scripts/test.sh starts its own fresh HAPI there." >&2
  echo "       Stop that process (scripts/hapi.sh stop if it is ours), pick another HAPI_PORT," >&2
  echo "       or set TRIALTWIN_HAPI_URL=http://127.0.0.1:$hapi_port/fhir to test against it deliberately." >&2
  trap - EXIT
  exit 1
fi

echo "== starting HAPI in the background (log: $HAPI_LOG)"
HAPI_DB="${HAPI_DB:-mem}" HAPI_WAIT_S="${HAPI_WAIT_S:-600}" scripts/hapi.sh start >"$HAPI_LOG" 2>&1 &
hapi_job=$!

# While HAPI builds and starts: the browser tier's system packages (minutes on a fresh machine).
browser_prerequisites

echo "== unit, api and browser tiers"
fast_rc=0
"${PYTEST[@]}" -m "not integration" "$@" || fast_rc=$?

echo "== waiting for HAPI"
if ! wait "$hapi_job"; then
  hapi_job=""
  cat "$HAPI_LOG" >&2
  echo "error: HAPI did not start; the integration tier did not run" >&2
  exit 1
fi
hapi_job=""
cat "$HAPI_LOG"

echo "== integration tier"
integration_rc=0
"${PYTEST[@]}" -m integration "$@" || integration_rc=$?

# Exit 5 is "nothing selected": arguments that pick tests from one tier only leave the other empty.
(( fast_rc == 5 )) && fast_rc=0
(( integration_rc == 5 )) && integration_rc=0
if (( fast_rc != 0 || integration_rc != 0 )); then
  echo "error: tests failed (unit/api/browser exit $fast_rc, integration exit $integration_rc)" >&2
  exit 1
fi
