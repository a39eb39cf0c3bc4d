#!/usr/bin/env bash
# The package as `pip install` gives it: build the wheel, install it into a fresh environment (no editable
# install, no checkout on the path) and run a tiny training, an evaluation and a prediction from a folder
# outside the checkout, with the console commands. CI runs this; so can anyone: bash scripts/wheel_check.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bml_wheel_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== wheel: building and installing into $WORK/env"
"$PYTHON" -m venv "$WORK/env"
"$WORK/env/bin/python" -m pip install -q --upgrade pip
"$WORK/env/bin/python" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
"$WORK/env/bin/python" -m pip install -q -c "$ROOT/constraints.txt" "$WORK"/dist/bml-*.whl
cd "$WORK"   # nothing of the checkout is importable from here
export BML_CACHE_DIR="$WORK/cache"
"$WORK/env/bin/python" - <<'PY'
import bml, pathlib
assert "site-packages" in pathlib.Path(bml.__file__).parts, bml.__file__
PY

echo "== wheel: bml-train (tiny glyphs run)"
"$WORK/env/bin/bml-train" --dataset glyphs --epochs 1 --episodes_per_epoch 4 --n_train_ways 5 --n_train_shots 1 \
    --n_train_queries 2 --val_episodes 20 --eval_freq 1 --width 0.25 --num_workers 0 --run_folder run
test -f run/last.pth

echo "== wheel: bml-eval"
"$WORK/env/bin/bml-eval" --dataset glyphs --ckp_path run/last.pth --split val --n_shots 1 --n_queries 2 \
    --episodes 20 --seeds 0 --num_workers 0 --output_dir results --no_progress
ls results/*.json > /dev/null

echo "== wheel: bml-predict"
"$WORK/env/bin/python" - <<'PY'
from pathlib import Path
from PIL import Image
from bml.datasets import read_split
data = read_split("glyphs", "test")
for index, label in enumerate(data.labels[:200]):
    if label < 3:
        folder = Path("support" if index % 2 == 0 else "query") / data.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[index]).save(folder / f"{index}.png")
PY
"$WORK/env/bin/bml-predict" --ckp_path run/last.pth --support support --query query --out predictions.csv
test -s predictions.csv
echo "== wheel: the installed package trains, evaluates and predicts"
