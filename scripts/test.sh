#!/usr/bin/env bash
# Runs the whole test suite from a set-up checkout: system prerequisites, HAPI, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
exec "$BIN/python" -m pytest "$@"
