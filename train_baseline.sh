#!/usr/bin/env bash
# Train a single-view baseline (global: base-class classifier; local: episodic prototypes) with the
# recipe of DATASET (one plain process without GPUs).
#
#   bash train_baseline.sh                               # glyphs, global: a few minutes on a laptop CPU
#   bash train_baseline.sh miniImageNet local --data_root /data --spatial
#   bash train_baseline.sh miniImageNet global --dry_run # print the plan (and the launch command) as JSON
#
# Processes as train_bml.sh: at most the recipe's episodes (global: batches) per step, each running its
# share; --allow_more_processes starts one per visible GPU (not the published recipe).
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
source "$(dirname "$0")/scripts/python_env.sh"
exec "$PYTHON" -m bml.launch "$REPO_ROOT/train_baseline.py" --dataset "$DATASET" --mode "$MODE" "$@"
