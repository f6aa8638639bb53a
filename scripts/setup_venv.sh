#!/usr/bin/env bash
# Create .venv (once) and install robust into it. Usage: scripts/setup_venv.sh [extra]   (extra: test, cluster)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, pinned to the builds the project is tested with (pip takes them from a local wheel cache when present)
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
extra=${1:-}
if [ -n "$extra" ]; then
  .venv/bin/pip install -q -e ".[$extra]"
else
  .venv/bin/pip install -q -e .
fi
if [ "$extra" = "test" ]; then
  # the tracking tests need mlflow and tensorboard, the docs tests mkdocs. Resolved together with torchattacks' old pin
  # (requests~=2.25.1), pip backtracks through mlflow releases for many minutes and finds no mkdocs-material at all
  # (it needs requests >= 2.30), so they go in a second step. torchattacks runs fine with the newer requests that this
  # step brings; pip prints a conflict notice about it.
  .venv/bin/pip install -q -e ".[track,docs]" 2>&1 | grep -v "^WARNING: Location" | grep -v "dependency resolver\|requires requests\|conflicts\.$" || true
fi
