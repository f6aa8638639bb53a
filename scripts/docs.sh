#!/usr/bin/env bash
# Build the documentation site strictly and offline into site/ (any warning fails), or serve it: scripts/docs.sh --serve
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import mkdocs, material, mkdocstrings" 2>/dev/null; then
  scripts/setup_venv.sh docs
fi
if [ "${1:-}" = "--serve" ]; then
  shift
  NO_MKDOCS_2_WARNING=1 exec .venv/bin/mkdocs serve "$@"
fi
export NO_MKDOCS_2_WARNING=1
exec .venv/bin/mkdocs build --strict --site-dir "${SITE_DIR:-site}" "$@"
