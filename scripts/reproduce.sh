#!/usr/bin/env bash
# Reproduce one of the sources' tables end to end: run the preset's sweep, collect it, print the table and its path.
#
#   scripts/reproduce.sh <preset> [scale] [extra hydra overrides ...]
#     preset: szegedy_table   Bell's Table 1 (robust persistence, L-BFGS, 0.7-persistence per network)
#             oberman_table   Oberman et al.'s J0/J1/J2/J2-Lip table (robust attack, DeepFool distances)
#             ibp_comparison  Demyanov et al.'s comparison of invariance objectives (robust attack, FGSM + noise)
#             cohen_table     Cohen et al.'s certified accuracy per sigma and L2 radius (robust certify, gaussian_aug)
#     scale:  cpu (default) | full | smoke   (see robust_cli/conf/experiment/<preset>.yaml)
#   e.g. MNIST_ROOT=~/data/mnist scripts/reproduce.sh szegedy_table cpu hydra/launcher=joblib
#
# Environment:
#   MNIST_ROOT    folder holding the four MNIST IDX files (*-ubyte or *-ubyte.gz), default ./data
#   CIFAR_ROOT    folder with CIFAR-10 (cifar-10-batches-py) for oberman_table and cohen_table full, default ./data
#   OUTPUTS_ROOT  where run directories and the checkpoint registry go, default ./outputs (checkpoints are reused:
#                 a second run of the same preset only attacks and measures)
#   ROBUST        the robust executable, default: `robust` on PATH, else this checkout's .venv/bin/robust
set -euo pipefail

usage="usage: scripts/reproduce.sh <szegedy_table|oberman_table|ibp_comparison|cohen_table> [cpu|full|smoke] [overrides ...]"
preset=${1:-}
scale=${2:-cpu}
[ $# -ge 2 ] && shift 2 || shift $#
case "$preset" in
  szegedy_table) command=persistence; root=${MNIST_ROOT:-./data} ;;
  oberman_table) command=attack; if [ "$scale" = full ]; then root=${CIFAR_ROOT:-./data}; else root=${MNIST_ROOT:-./data}; fi ;;
  ibp_comparison) command=attack; root=${MNIST_ROOT:-./data} ;;
  cohen_table) command=certify; if [ "$scale" = full ]; then root=${CIFAR_ROOT:-./data}; else root=${MNIST_ROOT:-./data}; fi ;;
  *) echo "error: unknown preset '${preset}'; $usage" >&2; exit 2 ;;
esac
case "$scale" in
  cpu|full|smoke) ;;
  *) echo "error: scale must be cpu, full or smoke, got '${scale}'; $usage" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")/.." && pwd)
robust=${ROBUST:-$(command -v robust || echo "$here/.venv/bin/robust")}
outputs=${OUTPUTS_ROOT:-outputs}
sweep="$outputs/reproduce/${preset}-${scale}-$(date +%Y%m%d-%H%M%S)"

echo "reproduce $preset (scale=$scale): robust $command --multirun experiment=$preset -> $sweep"
SECONDS=0
# the collect callback is switched off here: collect runs below, once, with the paper table
"$robust" "$command" --multirun "experiment=$preset" "scale=$scale" "data.root=$root" "outputs_root=$outputs" \
  "hydra.sweep.dir=$sweep" '~hydra/callbacks' "$@"
sweep_seconds=$SECONDS
"$robust" collect "$sweep" --table "$preset"
table=$(ls "$sweep/collected/table_${preset}".* 2>/dev/null | head -n 1)
echo
echo "sweep: ${sweep_seconds} s; total: ${SECONDS} s"
echo "table: ${table:-none (see $sweep/collected/failed_runs.csv)}"
echo "all collected files: $sweep/collected/"
