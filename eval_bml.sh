#!/usr/bin/env bash
# Evaluate a checkpoint with the published protocol: seeds 0-9 x 2,000 5-way SHOT-shot 15-query episodes.
#   bash eval_bml.sh DATASET TRANSFORM WEIGHTS SHOT [more eval_bml.py flags]
#   bash eval_bml.sh miniImageNet A pretrained_weights/miniImageNet.pth 5
# Data root: $BML_DATA_ROOT, else data/. Writes eval_results/<DATASET>_bml_eval_results_<SHOT>shot.txt (+ .json).
set -euo pipefail

if [ "$#" -lt 4 ]; then
    echo "usage: bash $0 DATASET TRANSFORM WEIGHTS SHOT [eval_bml.py flags]" >&2
    echo "  e.g. bash $0 miniImageNet A pretrained_weights/miniImageNet.pth 5" >&2
    exit 2
fi
DATASET=$1
TRANSFORM=$2
WEIGHTS=$3
SHOT=$4
shift 4

source "$(dirname "$0")/scripts/python_env.sh"
exec "$PYTHON" "$REPO_ROOT/eval_bml.py" \
    --dataset "$DATASET" --transform "$TRANSFORM" --ckp_path "$WEIGHTS" --n_shots "$SHOT" \
    --n_ways 5 --n_queries 15 --episodes 2000 --seeds 0-9 "$@"
