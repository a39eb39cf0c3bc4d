"""`python -m bml.datasets summary --dataset NAME [--data_root ROOT] [--json]`: classes, images and
image shape per split, or the actionable error and exit status 1.

tieredImageNet 'train' is train + val, as trained on. For file layouts (CUB, image folders) the image
shape comes from every file's header (no decoding) and is null when the sizes differ."""
from __future__ import annotations

import argparse
import json
import sys

from bml.utils.messages import error

from .errors import DatasetError
from .factory import EMBEDDED_DATASET, canonical_name, dataset_names, describe_datasets, resolve_data_root, summarize


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bml.datasets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="classes, images and image shape per split",
                                  epilog="data sets:\n" + describe_datasets(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    summary.add_argument("--dataset", default=EMBEDDED_DATASET,
                         help=f"{', '.join(dataset_names())}, or an image folder name (default: %(default)s)")
    summary.add_argument("--data_root", default=None, help="default: $BML_DATA_ROOT, else data/")
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def format_summary(name: str, summary: dict[str, dict]) -> str:
    lines = [f"{'split':<6} {'classes':>8} {'images':>9}  image shape"]
    for split, info in summary.items():
        shape = "x".join(map(str, info["image_shape"])) if info["image_shape"] else "mixed sizes"
        lines.append(f"{split:<6} {info['classes']:>8} {info['images']:>9}  {shape}")
    return "\n".join([name, *lines])


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        summary = summarize(args.dataset, args.data_root)
    except (DatasetError, OSError) as problem:
        error(str(problem))
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        name = canonical_name(args.dataset)
        where = "" if name == EMBEDDED_DATASET else f" (data root {resolve_data_root(args.data_root)})"
        print(format_summary(name + where, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
