#!/usr/bin/env bash
# Train a single-view baseline (global: base-class classifier; local: episodic prototypes) with the
# recipe of DATASET on every visible GPU (one process without GPUs).
#
#   bash train_baseline.sh                               # glyphs, global: a few minutes on a laptop CPU
#   bash train_baseline.sh miniImageNet local --data_root /data --spatial
set -euo pipefail

DATASET=glyphs
MODE=global
if [[ $# -gt 0 && $1 != -* ]]; then
    DATASET=$1
    shift
fi
if [[ $# -gt 0 && $1 != -* ]]; then
    MODE=$1
    shift
fi
HERE=$(dirname "$0")
NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count())")

if [[ $NUM_GPUS -gt 1 ]]; then
    torchrun --standalone --nproc_per_node="$NUM_GPUS" "$HERE/train_baseline.py" --dataset "$DATASET" --mode "$MODE" "$@"
else
    python "$HERE/train_baseline.py" --dataset "$DATASET" --mode "$MODE" "$@"
fi
