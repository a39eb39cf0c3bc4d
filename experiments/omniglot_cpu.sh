#!/usr/bin/env bash
# BML against baseline-global and baseline-local on Omniglot, on a CPU, under one budget:
# the same ResNet-12, width, input size and number of training images seen; then each model's
# best-on-val checkpoint is evaluated on the test split, 5-way and 20-way, 1-shot and 5-shot.
#
#   bash experiments/omniglot_cpu.sh full  [DATA_ROOT]   # Vinyals split of the full Omniglot
#   bash experiments/omniglot_cpu.sh quick [DATA_ROOT]   # omniglot-small (8 alphabets), a few minutes
#   MODELS=bml bash experiments/omniglot_cpu.sh full      # retrain and re-evaluate some models only
#   EVAL_ONLY=1 bash experiments/omniglot_cpu.sh full     # re-evaluate the trained models, no training
#   SEED=1 bash experiments/omniglot_cpu.sh full          # another training seed, in output/omniglot_full_seed1
#
# DATA_ROOT holds omniglot/ and omniglot-small/ (default: ../shared/data). Runs go to
# output/omniglot_<variant>/{bml,global,local}, evaluations to output/omniglot_<variant>/eval/, and
# experiments/omniglot_report.py turns them into the table and curves of docs/RESULTS.md.
set -euo pipefail

VARIANT=${1:-quick}
DATA_ROOT=${2:-../shared/data}
cd "$(dirname "$0")/.."

MODELS=${MODELS:-bml local global}
for MODEL in $MODELS; do
    case $MODEL in bml | local | global) ;; *) echo "unknown model '$MODEL' in MODELS: use bml, local, global" >&2; exit 2 ;; esac
done
case $VARIANT in
    full) DATASET=omniglot; EPOCHS=${EPOCHS:-8}; SEEDS=0-4; EPISODES=1000 ;;
    quick) DATASET=omniglot-small; EPOCHS=${EPOCHS:-20}; SEEDS=0-2; EPISODES=500 ;;
    *) echo "usage: bash $0 {full|quick} [DATA_ROOT]" >&2; exit 2 ;;
esac
SEED=${SEED:-0}
OUT=output/omniglot_$VARIANT$([ "$SEED" = 0 ] || echo "_seed$SEED")
# Settings chosen on val (docs/RESULTS.md, validation sweep): every step shows each model PER_STEP images;
# BML and baseline-local train on 100-way 1-shot 1-query episodes (the best shape on val for each);
# every model clips its gradient norm to CLIP_GRAD (it never binds for baseline-global).
WAYS=100; SHOTS=1; QUERIES=1
PER_STEP=$((WAYS * (SHOTS + QUERIES)))
CLIP_GRAD=10
# One budget for all three: the global baseline sees every training image once an epoch in batches
# of PER_STEP images; the episodic models take as many steps of PER_STEP images.
TRAIN_IMAGES=$(python -m bml.datasets summary --dataset "$DATASET" --data_root "$DATA_ROOT" --json |
               python -c "import json, sys; print(json.load(sys.stdin)['train']['images'])")
STEPS=$((TRAIN_IMAGES / PER_STEP))
COMMON=(--dataset "$DATASET" --data_root "$DATA_ROOT" --epochs "$EPOCHS" --seed "$SEED" --num_workers 1
        --width "${WIDTH:-0.25}" --image_size 28 --eval_freq 1 --n_ways 5 --n_shots 1 --val_episodes 500
        --clip_grad "$CLIP_GRAD")
EPISODIC=(--n_train_ways "$WAYS" --n_train_shots "$SHOTS" --n_train_queries "$QUERIES" --episodes_per_epoch "$STEPS")

timed() {   # timed NAME COMMAND...: run, and record the wall time in $OUT/times.txt
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "$name $((SECONDS - start))" >> "$OUT/times.txt"
}

mkdir -p "$OUT/eval"
touch "$OUT/times.txt"   # appended to: the report takes each name's latest time
echo "== $DATASET: $EPOCHS epochs of $STEPS steps x $PER_STEP images for every model ($MODELS)"
for MODEL in $MODELS; do
    if [ -n "${EVAL_ONLY:-}" ]; then
        [ -f "$OUT/$MODEL/best.pth" ] || { echo "EVAL_ONLY: no $OUT/$MODEL/best.pth, train it first" >&2; exit 2; }
        continue
    fi
    case $MODEL in
        bml) timed bml python train_bml.py "${COMMON[@]}" "${EPISODIC[@]}" --run_folder "$OUT/bml" ;;
        local) timed local python train_baseline.py --mode local "${COMMON[@]}" "${EPISODIC[@]}" --run_folder "$OUT/local" ;;
        global) timed global python train_baseline.py --mode global "${COMMON[@]}" --batch_size "$PER_STEP" \
                    --run_folder "$OUT/global" ;;
    esac
done

for MODEL in $MODELS; do
    for WAY in 5 20; do
        for SHOT in 1 5; do
            timed "eval_${MODEL}_${WAY}w${SHOT}s" python eval_bml.py --ckp_path "$OUT/$MODEL/best.pth" \
                --data_root "$DATA_ROOT" --split test --n_ways "$WAY" --n_shots "$SHOT" --n_queries 15 \
                --episodes "$EPISODES" --seeds "$SEEDS" --device cpu --num_workers 1 --no_progress \
                --head proto cl2n logreg \
                --output_dir "$OUT/eval" --json "$OUT/eval/${MODEL}_${WAY}w${SHOT}s.json"
        done
    done
done
python experiments/omniglot_report.py "$OUT"
