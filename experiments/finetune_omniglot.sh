#!/usr/bin/env bash
# What fine-tuning from a glyphs-trained BML model buys on omniglot-small, against training from scratch under
# the same budget (docs/RESULTS.md, "Fine-tuning from a trained model"). CPU-sized: a few minutes per run.
#
#   bash experiments/finetune_omniglot.sh [DATA_ROOT]    # DATA_ROOT holds omniglot-small/ (default ../shared/data)
#   SEED=1 bash experiments/finetune_omniglot.sh          # another seed of both omniglot-small runs
#
# 1. a source model on the embedded glyphs set (its recipe, at omniglot-small's 28 px, 4 epochs);
# 2. omniglot-small, the same short budget twice: from scratch, and --init_from the glyphs model (its trunk and
#    views; a new classifier over omniglot-small's 178 training classes); same lr, episodes, steps and seed;
# 3. each best-on-val checkpoint, and the glyphs model itself (cross-domain), evaluated on the test split (47 unseen
#    Japanese characters), 5-way and 20-way 1-shot, prototype head.
set -euo pipefail

DATA_ROOT=${1:-../shared/data}
SEED=${SEED:-0}
cd "$(dirname "$0")/.."
OUT=output/finetune_omniglot
SOURCE=$OUT/glyphs_source
# The budget of both omniglot-small runs: EPOCHS x STEPS steps of 100-way 1-shot 1-query episodes.
EPOCHS=${EPOCHS:-1}
STEPS=${STEPS:-20}
BUDGET=(--dataset omniglot-small --data_root "$DATA_ROOT" --image_size 28 --epochs "$EPOCHS"
        --episodes_per_epoch "$STEPS" --n_train_ways 100 --n_train_shots 1 --n_train_queries 1 --eval_freq 1
        --val_episodes 200 --seed "$SEED" --num_workers 1 --print_freq 10)

if [ ! -f "$SOURCE/best.pth" ]; then
    python train_bml.py --dataset glyphs --image_size 28 --epochs 4 --num_workers 1 --print_freq 50 --run_folder "$SOURCE"
fi
# The two runs side by side (one thread each: a 2-core machine runs both at once).
OMP_NUM_THREADS=1 python train_bml.py "${BUDGET[@]}" --run_folder "$OUT/scratch_s$SEED" > "$OUT/scratch_s$SEED.log" 2>&1 &
OMP_NUM_THREADS=1 python train_bml.py "${BUDGET[@]}" --init_from "$SOURCE/best.pth" --run_folder "$OUT/finetuned_s$SEED" \
    > "$OUT/finetuned_s$SEED.log" 2>&1 &
wait %1 && wait %2 || { echo "a training run failed: see $OUT/*_s$SEED.log" >&2; exit 1; }

for RUN in scratch finetuned; do
    for WAY in 5 20; do
        python eval_bml.py --ckp_path "$OUT/${RUN}_s$SEED/best.pth" --data_root "$DATA_ROOT" --split test \
            --n_ways "$WAY" --n_shots 1 --n_queries 15 --episodes 300 --seeds 0-1 --device cpu --num_workers 1 \
            --no_progress --head proto --output_dir "$OUT/eval" --json "$OUT/eval/${RUN}_s${SEED}_${WAY}w1s.json"
    done
done
# Reference: the glyphs model itself, not fine-tuned, on the same test episodes (cross-domain evaluation).
for WAY in 5 20; do
    python eval_bml.py --ckp_path "$SOURCE/best.pth" --test_dataset omniglot-small --data_root "$DATA_ROOT" \
        --image_size 28 --split test --n_ways "$WAY" --n_shots 1 --n_queries 15 --episodes 300 --seeds 0-1 \
        --device cpu --num_workers 1 --no_progress --head proto --output_dir "$OUT/eval" \
        --json "$OUT/eval/source_${WAY}w1s.json"
done
