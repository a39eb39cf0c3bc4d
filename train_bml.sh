#!/usr/bin/env bash
# Train BML with the published recipe of DATASET (one plain process without GPUs).
#
#   bash train_bml.sh                                   # embedded `glyphs` set: a few minutes on a laptop CPU
#   bash train_bml.sh miniImageNet --data_root /data    # published recipe; any train_bml.py flag may follow
#   bash train_bml.sh miniImageNet --dry_run            # print the plan (and the launch command) as JSON
#
# The recipe states the episodes averaged per step over all processes (2 for the published data sets,
# one per GPU on 2 GPUs): at most that many processes are started (torchrun), each running its share;
# one GPU or a CPU runs them all. --allow_more_processes starts one process per visible GPU instead
# (not the published recipe). The logic lives in `python -m bml.launch`.
set -euo pipefail

DATASET=glyphs
if [[ $# -gt 0 && $1 != -* ]]; then
    DATASET=$1
    shift
fi
source "$(dirname "$0")/scripts/python_env.sh"
exec "$PYTHON" -m bml.launch "$REPO_ROOT/train_bml.py" --dataset "$DATASET" "$@"
