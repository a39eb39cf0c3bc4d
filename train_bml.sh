#!/usr/bin/env bash
# Train BML with the published recipe of DATASET on every visible GPU (one process without GPUs).
#
#   bash train_bml.sh                                   # embedded `glyphs` set: a few minutes on a laptop CPU
#   bash train_bml.sh miniImageNet --data_root /data    # published recipe; any train_bml.py flag may follow
#
# With several GPUs this runs `torchrun --standalone --nproc_per_node=<GPUs>`, one episode per GPU and
# step. The published models averaged 2 episodes per step (2 GPUs), so on a single device the published
# data sets get --episodes_per_step 2 (a flag given on the command line still wins).
set -euo pipefail

DATASET=glyphs
if [[ $# -gt 0 && $1 != -* ]]; then
    DATASET=$1
    shift
fi
HERE=$(dirname "$0")
NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count())")

RECIPE=()
if [[ $NUM_GPUS -le 1 && $DATASET != glyphs && $DATASET != omniglot ]]; then
    RECIPE=(--episodes_per_step 2)
fi

if [[ $NUM_GPUS -gt 1 ]]; then
    torchrun --standalone --nproc_per_node="$NUM_GPUS" "$HERE/train_bml.py" --dataset "$DATASET" ${RECIPE[@]+"${RECIPE[@]}"} "$@"
else
    python "$HERE/train_bml.py" --dataset "$DATASET" ${RECIPE[@]+"${RECIPE[@]}"} "$@"
fi
