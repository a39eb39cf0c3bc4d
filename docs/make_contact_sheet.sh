#!/usr/bin/env bash
# Regenerate docs/contact_sheet.png: `python -m bml.predict` with a glyphs checkpoint on a 5-way 5-shot task
# from the embedded `glyphs` test split (classes never seen in training: every fourth one), 6 queries per
# class, written as image folders laid out by class.
#
#   bash docs/make_contact_sheet.sh output/<glyphs run>/best.pth      # e.g. after `bash train_bml.sh`
set -euo pipefail
CHECKPOINT=${1:?usage: bash docs/make_contact_sheet.sh CHECKPOINT}
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
    --out "$WORK/predictions.csv" --sheet docs/contact_sheet.png --device cpu --num_workers 0
