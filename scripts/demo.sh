#!/usr/bin/env bash
# Two-minute demo: install robust into .venv and train fc200_200_10 on the embedded digits data (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
.venv/bin/robust train model=fc200_200_10 dataset=digits "$@"
latest=$(ls -td outputs/train/*/* | head -n 1)
echo
echo "outputs: $latest  (train_log.csv, model.pt, run.json, run.log)"
echo "next:    .venv/bin/robust attack attack=pgd 'eps=[0,0.05,0.1,0.2,0.3]'"
