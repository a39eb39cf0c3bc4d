#!/usr/bin/env bash
# Draw a contact sheet: `python -m bml.predict` with a glyphs checkpoint on a 5-way 5-shot task from the
# embedded `glyphs` test split (classes never seen in training: every fourth one), 6 queries per class,
# written as image folders laid out by class. The sheet goes to OUTPUT (default: contact_sheet.png in the
# current folder), never over the README's picture unless asked.
#
#   bash docs/make_contact_sheet.sh output/<glyphs run>/best.pth [OUTPUT]   # e.g. after `bash train_bml.sh`
#   bash docs/make_contact_sheet.sh CHECKPOINT docs/contact_sheet.png         # regenerate the README's picture
set -euo pipefail
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
CHECKPOINT=$(absolute "${1:?usage: bash docs/make_contact_sheet.sh CHECKPOINT [OUTPUT]}")
OUTPUT=$(absolute "${2:-contact_sheet.png}")
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

python - "$WORK" <<'EOF'
import sys
from pathlib import Path

from PIL import Image

from bml.datasets import build_dataset

SHOTS, QUERIES = 5, 6
work = Path(sys.argv[1])
dataset = build_dataset("glyphs", "test")
for label, name in list(enumerate(dataset.class_names))[::4]:
    for rank, index in enumerate((dataset.labels == label).nonzero()[0][:SHOTS + QUERIES]):
        folder = work / ("support" if rank < SHOTS else "query") / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(dataset.images[index]).save(folder / f"{index:04d}.png")
EOF

python -m bml.predict --ckp_path "$CHECKPOINT" --support "$WORK/support" --query "$WORK/query" \
    --out "$WORK/predictions.csv" --sheet "$OUTPUT" --device cpu --num_workers 0
