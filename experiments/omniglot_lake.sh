#!/usr/bin/env bash
# Omniglot as Lake et al. meant it (omniglot-lake): learn from the background alphabets only, then 20-way 1-shot
# within one unseen alphabet, support and query by different people. BML against baseline-global and
# baseline-local, trained under one budget on a CPU; settings chosen on the val alphabets only (sweep).
#
#   bash experiments/omniglot_lake.sh sweep [DATA_ROOT]   # the val-only sweep of BML's settings, 25-45 min a run
#   RUNS="E G" bash experiments/omniglot_lake.sh sweep    # some sweep runs only
#   bash experiments/omniglot_lake.sh final [DATA_ROOT]   # the comparison: train, evaluate on test, report
#   MODELS="local global" bash experiments/omniglot_lake.sh final   # some models only
#   EVAL_ONLY=1 bash experiments/omniglot_lake.sh final             # re-evaluate the trained models
#
# DATA_ROOT holds omniglot/ (default ../shared/data). The sweep goes to output/omniglot_lake_sweep/<name>,
# the comparison to output/omniglot_lake/{bml,global,local} and output/omniglot_lake/eval/;
# experiments/omniglot_lake_report.py writes the tables and curves of docs/RESULTS.md from them. A run whose
# output says it finished is skipped (delete its .out to run it again).
set -euo pipefail

MODE=${1:-}
DATA_ROOT=${2:-../shared/data}
cd "$(dirname "$0")/.."

# One budget for every model: 320,000 training images seen. BML and baseline-local: EPOCHS x STEPS steps of
# PER_STEP images (16 x 100 x 200); baseline-global: shuffled batches of PER_STEP images, 80 a pass over the 16,580
# upright training images, for 20 epochs.
EPOCHS=16; STEPS=100; PER_STEP=200; GLOBAL_EPOCHS=20; GLOBAL_STEPS=80
# Validation: within-alphabet 20-way 1-shot episodes, support and query by different drawers, on the val alphabets.
VALIDATION=(--n_ways 20 --n_shots 1 --n_queries 5 --within_group --distinct_drawers --val_episodes 1000 --eval_freq 2)
COMMON=(--dataset omniglot-lake --data_root "$DATA_ROOT" --seed "${SEED:-0}" --num_workers 1 --width 0.25
        --image_size 28 --clip_grad 10 --print_freq 1000 "${VALIDATION[@]}")
EPISODIC=(--epochs "$EPOCHS" --episodes_per_epoch "$STEPS" --n_train_ways 100 --n_train_shots 1 --n_train_queries 1)
# The sweep's choice on val (docs/RESULTS.md, "Omniglot as Lake et al. meant it"): run E, the omniglot recipe's data
# and episodes on 42 px inputs; neither rotations as more classes (B) nor affine distortions (C) did better on val.
LARGER_INPUT=(--image_size 42 --channels_last)
CHOSEN=("${LARGER_INPUT[@]}")

source experiments/run_once.sh

case $MODE in
sweep)
    OUT=output/omniglot_lake_sweep
    mkdir -p "$OUT" && touch "$OUT/times.txt"
    RUNS=${RUNS:-A B C E F G}
    sweep_run() { case " $RUNS " in *" $1 "*) run_once "$OUT" "$@" ;; esac; }
    # A: the omniglot recipe's data and episodes (100-way 1-shot 1-query from any alphabets, characters upright).
    sweep_run A python train_bml.py "${COMMON[@]}" "${EPISODIC[@]}"
    # B: A with each character's rotations as three more classes.
    sweep_run B python train_bml.py "${COMMON[@]}" "${EPISODIC[@]}" --rotation_classes
    # C: A with Koch et al.'s affine distortions (transform K).
    sweep_run C python train_bml.py "${COMMON[@]}" "${EPISODIC[@]}" --transform K
    # E: A on 42 px inputs instead of 28 (in the channels-last memory format, 1.6x faster on this CPU).
    sweep_run E python train_bml.py "${COMMON[@]}" "${EPISODIC[@]}" "${LARGER_INPUT[@]}"
    # F: E with each step's 200 images as five 20-way 1-shot 1-query episodes, each within one alphabet (the test's
    # episode shape, while the global view still sees 100 classes a step).
    sweep_run F python train_bml.py "${COMMON[@]}" "${EPISODIC[@]}" "${LARGER_INPUT[@]}" --n_train_ways 20 \
        --train_within_group --episodes_per_step 5
    # G: E on 48 px inputs, whose last feature maps are 3 x 3 (42 px: 2 x 2).
    sweep_run G python train_bml.py "${COMMON[@]}" "${EPISODIC[@]}" "${LARGER_INPUT[@]}" --image_size 48
    python experiments/omniglot_lake_report.py --sweep "$OUT"
    ;;
final)
    OUT=output/omniglot_lake
    mkdir -p "$OUT/eval" && touch "$OUT/times.txt"
    MODELS=${MODELS:-bml local global}
    for MODEL in $MODELS; do
        if [ -n "${EVAL_ONLY:-}" ]; then
            [ -f "$OUT/$MODEL/best.pth" ] || { echo "EVAL_ONLY: no $OUT/$MODEL/best.pth, train it first" >&2; exit 2; }
            continue
        fi
        case $MODEL in
            bml) run_once "$OUT" bml python train_bml.py "${COMMON[@]}" "${EPISODIC[@]}" "${CHOSEN[@]}" ;;
            local) run_once "$OUT" local python train_baseline.py --mode local "${COMMON[@]}" "${EPISODIC[@]}" \
                       "${CHOSEN[@]}" ;;
            global) run_once "$OUT" global python train_baseline.py --mode global "${COMMON[@]}" "${CHOSEN[@]}" \
                        --epochs "$GLOBAL_EPOCHS" --episodes_per_epoch "$GLOBAL_STEPS" --batch_size "$PER_STEP" ;;
            *) echo "unknown model '$MODEL' in MODELS: use bml, local, global" >&2; exit 2 ;;
        esac
    done
    # Test: 10 seeds x 1,000 episodes of 20-way 1-shot 1-query (Lake's runs: 20 queries, one a class), within one
    # alphabet and across alphabets, support and query by different drawers in both.
    for MODEL in $MODELS; do
        for GROUPING in within across; do
            start=$SECONDS
            python eval_bml.py --ckp_path "$OUT/$MODEL/best.pth" --data_root "$DATA_ROOT" --split test \
                --n_ways 20 --n_shots 1 --n_queries 1 --episodes 1000 --seeds 0-9 --distinct_drawers \
                $([ $GROUPING = within ] && echo --within_group) --device cpu \
                --num_workers 1 --no_progress --output_dir "$OUT/eval" --json "$OUT/eval/${MODEL}_${GROUPING}.json"
            echo "eval_${MODEL}_${GROUPING} $((SECONDS - start))" >> "$OUT/times.txt"
        done
    done
    python experiments/omniglot_lake_report.py "$OUT"
    ;;
*)
    echo "usage: bash $0 {sweep|final} [DATA_ROOT]" >&2
    exit 2
    ;;
esac
