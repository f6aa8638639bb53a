#!/usr/bin/env bash
# The GPU checks, in one script (at most about 8 minutes on one GPU, no downloads):
#   1. pytest -m gpu: device placement, the fp32 re-check of bf16 attacks, compile, batch_size=auto on a real
#      out-of-memory error, a seeded GPU training run twice;
#   2. scripts/bench_gpu.py: one table of training / PGD-10 / autoattack / persistence throughput and peak memory.
# Usage: scripts/gpu_check.sh [MNIST_DIR]   (MNIST_DIR: the four IDX files, for real images in the MNIST rows)
# Without a CUDA device it says so in one line and exits 0: everything else is tested by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MNIST=${1:-}
if [ ! -x .venv/bin/python ]; then
  scripts/setup_venv.sh test
fi
PY=.venv/bin/python
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device on this machine ($("$PY" -c 'import torch; print("torch", torch.__version__)')): GPU tests and benchmark skipped"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
"$PY" scripts/bench_gpu.py --device cuda ${MNIST:+--mnist-root "$MNIST"} --json "${OUT:-.}/bench_gpu.json"
