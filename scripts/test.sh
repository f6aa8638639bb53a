#!/usr/bin/env bash
# Create/use .venv, install robust with its test extra, run the fast test suite (pass --slow for the long one).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh test
if [ "${1:-}" = "--slow" ]; then
  shift
  exec .venv/bin/python -m pytest -m slow "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
