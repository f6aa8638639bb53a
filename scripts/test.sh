#!/usr/bin/env bash
# Create/use .venv, install robust with its test extra, run the fast test suite (pass --slow for the long one).
# Tests run in one worker process per core (pytest-xdist; ROBUST_TEST_WORKERS overrides, 0 = in this process):
# most of them are CLI subprocesses, and on 2 cores two workers cut the wall time from about 10 to 7.5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh test
if [ "${1:-}" = "--slow" ]; then
  shift
  exec .venv/bin/python -m pytest -m slow -n "${ROBUST_TEST_WORKERS:-auto}" "$@"
fi
exec .venv/bin/python -m pytest -q -n "${ROBUST_TEST_WORKERS:-auto}" "$@"
