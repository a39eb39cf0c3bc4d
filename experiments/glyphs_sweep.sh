#!/usr/bin/env bash
# The validation sweep behind the `glyphs` recipe (`make demo`, docs/RESULTS.md "The demo"): short CPU runs
# on the embedded set, each validated on the val split (5-way 1-shot, 300 episodes, seed 0); never on test.
#
#   bash experiments/glyphs_sweep.sh [NAME ...]     # all runs, or only the named ones
#
# Every run uses one thread and no loader processes, so that runs can share the CPU side by side and
# their CPU seconds (user + system, in $OUT/times.txt with the wall time) measure their cost. A run whose
# output says it finished is skipped; delete $OUT/<name>.out to run one again.
set -euo pipefail

OUT=${OUT:-/tmp/sweep/glyphs}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
COMMON=(--dataset glyphs --seed 0 --num_workers 0 --print_freq 1000 --eval_freq 2)

run() {   # run NAME FLAGS...: train into $OUT/NAME unless NAMES were given and NAME is not one of them
    local name=$1
    shift
    if [[ ${#SELECTED[@]} -gt 0 && ! " ${SELECTED[*]} " =~ " $name " ]]; then
        return
    fi
    if grep -q "^Done:" "$OUT/$name.out" 2>/dev/null; then
        echo "$name: finished before, skipped"
        return
    fi
    echo "$name: training ($(date +%H:%M))"
    /usr/bin/time -f "$name %U %S %e" -a -o "$OUT/times.txt" \
        python train_bml.py "${COMMON[@]}" "$@" --run_folder "$OUT/$name" > "$OUT/$name.out" 2>&1
    grep "^Validation accuracy" "$OUT/$name.out"
}

SELECTED=("$@")
mkdir -p "$OUT"
# First round: the recipe before this sweep (10-way 5-shot 5-query, width 0.25, no clipping, 4 epochs of 50
# steps) with the Omniglot lessons: a clipped gradient norm, more classes per step, twice the steps.
run old_4x50_10w5s5q --epochs 4 --episodes_per_epoch 50 --n_train_ways 10 --n_train_shots 5 --n_train_queries 5 --clip_grad 0
run clip10_8x50_10w5s5q --epochs 8 --episodes_per_epoch 50 --n_train_ways 10 --n_train_shots 5 --n_train_queries 5 --clip_grad 10
run clip10_8x50_20w2s3q --epochs 8 --episodes_per_epoch 50 --n_train_ways 20 --n_train_shots 2 --n_train_queries 3 --clip_grad 10
run clip10_8x52_32w1s2q --epochs 8 --episodes_per_epoch 52 --n_train_ways 32 --n_train_shots 1 --n_train_queries 2 --clip_grad 10
run clip10_8x40_64w1s1q --epochs 8 --episodes_per_epoch 40 --n_train_ways 64 --n_train_shots 1 --n_train_queries 1 --clip_grad 10
# Without clipping at the first round's best shape: is the clip what made the difference?
run noclip_8x50_20w2s3q --epochs 8 --episodes_per_epoch 50 --n_train_ways 20 --n_train_shots 2 --n_train_queries 3 --clip_grad 0
# The chosen recipe (32-way 1-shot 2-query, 8 epochs of 52 steps, clip 10: the recipe's defaults) with another seed.
run recipe_seed1 --seed 1

# The table of docs/RESULTS.md: settings, training images, val accuracy after every second epoch, the last
# epoch's loss terms and the CPU seconds of each run.
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
cpu = {fields[0]: float(fields[1]) + float(fields[2]) for fields in
       (line.split() for line in (out / "times.txt").read_text().splitlines()) if len(fields) == 4}
print("| run | episode | steps | images | clip | val after epoch 2 / 4 / 6 / 8 | last losses (global / local / "
      "mutual) | CPU s |")
print("|---|---|---|---|---|---|---|---|")
for name in cpu:
    config = json.loads((out / name / "config.json").read_text())
    log = [json.loads(line) for line in (out / name / "log.txt").read_text().splitlines()]
    shape = f"{config['n_train_ways']}w{config['n_train_shots']}s{config['n_train_queries']}q"
    images = log[-1]["step"] * config["n_train_ways"] * (config["n_train_shots"] + config["n_train_queries"])
    val = " / ".join(f"{entry['val_acc']:.2f}" for entry in log if "val_acc" in entry)
    losses = " / ".join(f"{log[-1][f'train_{term}']:.2f}" for term in ("global", "local", "mutual"))
    stopped = f" (stopped in epoch {log[-1]['epoch'] + 1})" if log[-1]["epoch"] < config["epochs"] else ""
    print(f"| {name}{stopped} | {shape} | {config['epochs']} x {config['episodes_per_epoch']} | {images:,} | "
          f"{config['clip_grad']:g} | {val} | {losses} | {cpu[name]:.0f} |")
PY
