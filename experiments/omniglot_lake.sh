#!/usr/bin/env bash
# Omniglot as Lake et al. meant it (omniglot-lake): learn from the background alphabets only, then 20-way 1-shot
# within one unseen alphabet, support and query by different people. BML against baseline-global and
# baseline-local, trained under one budget on a CPU; settings chosen on the val alphabets only (sweep).
#
#   bash experiments/omniglot_lake.sh sweep [DATA_ROOT]   # the val-only sweep of BML's settings, ~25 min a run
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

# One budget for every model: EPOCHS x STEPS steps of PER_STEP images (16 x 100 x 200 = 320,000 images seen).
EPOCHS=16; STEPS=100; PER_STEP=200
# Validation: within-alphabet 20-way 1-shot episodes, support and query by different drawers, on the val alphabets.
VALIDATION=(--n_ways 20 --n_shots 1 --n_queries 5 --within_group --distinct_drawers --val_episodes 1000 --eval_freq 2)
COMMON=(--dataset omniglot-lake --data_root "$DATA_ROOT" --epochs "$EPOCHS" --episodes_per_epoch "$STEPS"
        --seed "${SEED:-0}" --num_workers 1 --width 0.25 --image_size 28 --clip_grad 10 --print_freq 1000
        "${VALIDATION[@]}")
# The sweep's choice (docs/RESULTS.md, "Omniglot, Lake et al.'s protocol"): rotations as more training classes,
# 50-way 1-shot 3-query training episodes within one alphabet.
CHOSEN=(--rotation_classes --train_within_group --n_train_ways 50 --n_train_shots 1 --n_train_queries 3)

run() {   # run OUT NAME COMMAND...: train into OUT/NAME unless it finished before; wall time to OUT/times.txt
    local out=$1 name=$2 start=$SECONDS
    shift 2
    if grep -q "^Done:" "$out/$name.out" 2>/dev/null; then
        echo "$name: finished before, skipped"
        return
    fi
    echo "$name: training ($(date +%H:%M))"
    "$@" --run_folder "$out/$name" > "$out/$name.out" 2>&1
    echo "$name $((SECONDS - start))" >> "$out/times.txt"
}

case $MODE in
sweep)
    OUT=output/omniglot_lake_sweep
    mkdir -p "$OUT" && touch "$OUT/times.txt"
    # A: the omniglot recipe as it is (100-way 1-shot 1-query episodes from any alphabets, characters upright).
    run "$OUT" A python train_bml.py "${COMMON[@]}" --n_train_ways 100 --n_train_shots 1 --n_train_queries 1
    # B: A with each character's rotations as three more classes.
    run "$OUT" B python train_bml.py "${COMMON[@]}" --n_train_ways 100 --n_train_shots 1 --n_train_queries 1 \
        --rotation_classes
    # C: B with every training episode within one alphabet, 50-way 1-shot 3-query (every alphabet has 50 classes).
    run "$OUT" C python train_bml.py "${COMMON[@]}" "${CHOSEN[@]}"
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
            bml) run "$OUT" bml python train_bml.py "${COMMON[@]}" "${CHOSEN[@]}" ;;
            local) run "$OUT" local python train_baseline.py --mode local "${COMMON[@]}" "${CHOSEN[@]}" ;;
            # The same images a step, in shuffled batches over all the (rotated) training classes.
            global) run "$OUT" global python train_baseline.py --mode global "${COMMON[@]}" --rotation_classes \
                        --batch_size "$PER_STEP" ;;
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
                $([ $GROUPING = within ] && echo --within_group) --head proto cl2n logreg --device cpu \
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
