#!/usr/bin/env bash
# The validation sweep behind docs/RESULTS.md: short runs (4 epochs) on the full Omniglot, each
# validated on the val split (20-way 1-shot, 1,000 episodes, seed 0); never on test.
#
#   bash experiments/omniglot_sweep.sh [DATA_ROOT]     # about 6 min a run on 2 CPU cores
#
# Runs go to output/omniglot_sweep/<name>; the table of val accuracies is written by
#   python experiments/omniglot_report.py --sweep output/omniglot_sweep
set -euo pipefail

DATA_ROOT=${1:-../shared/data}
cd "$(dirname "$0")/.."
OUT=output/omniglot_sweep
STEPS=411   # 82,240 training images / 200 images a step: one pass of the data an epoch
COMMON=(--dataset omniglot --data_root "$DATA_ROOT" --epochs 4 --seed 0 --num_workers 1 --width 0.25
        --image_size 28 --eval_freq 2 --n_ways 20 --n_shots 1 --val_episodes 1000 --print_freq 1000)

run() {   # run NAME COMMAND...: train into $OUT/NAME, record the wall time in $OUT/times.txt
    local name=$1 start=$SECONDS
    shift
    "$@" -s "$OUT/$name" > "$OUT/$name.out" 2>&1
    echo "$name $((SECONDS - start))" >> "$OUT/times.txt"
}

mkdir -p "$OUT"
: > "$OUT/times.txt"
# Episode shape (all 200 images a step): more classes per step for the global view, fewer shots.
run bml_20w5s5q python train_bml.py "${COMMON[@]}" --n_train_ways 20 --n_train_shots 5 --n_train_queries 5 --episodes_per_epoch $STEPS
run bml_50w2s2q python train_bml.py "${COMMON[@]}" --n_train_ways 50 --n_train_shots 2 --n_train_queries 2 --episodes_per_epoch $STEPS
run bml_100w1s1q python train_bml.py "${COMMON[@]}" --n_train_ways 100 --n_train_shots 1 --n_train_queries 1 --episodes_per_epoch $STEPS
# A 20-way 2-shot 3-query episode plus 100 shuffled images for the global and mutual terms only.
run bml_20w2s3q_gb100 python train_bml.py "${COMMON[@]}" --n_train_ways 20 --n_train_shots 2 --n_train_queries 3 --episodes_per_epoch $STEPS --global_batch 100
# Without the mutual term, and the two baselines under the same budget.
run bml_50w2s2q_wt2_1_0 python train_bml.py "${COMMON[@]}" --n_train_ways 50 --n_train_shots 2 --n_train_queries 2 --episodes_per_epoch $STEPS --weights 2_1_0
# Is it the episodic batch or the other terms? The global term alone on the same episodes; a global weight of 1.
run bml_50w2s2q_wt2_0_0 python train_bml.py "${COMMON[@]}" --n_train_ways 50 --n_train_shots 2 --n_train_queries 2 --episodes_per_epoch $STEPS --weights 2_0_0
run bml_50w2s2q_wt1_1_0.5 python train_bml.py "${COMMON[@]}" --n_train_ways 50 --n_train_shots 2 --n_train_queries 2 --episodes_per_epoch $STEPS --weights 1_1_0.5
run local_50w2s2q python train_baseline.py --mode local "${COMMON[@]}" --n_train_ways 50 --n_train_shots 2 --n_train_queries 2 --episodes_per_epoch $STEPS
run global python train_baseline.py --mode global "${COMMON[@]}" --batch_size 200
python experiments/omniglot_report.py --sweep "$OUT"
