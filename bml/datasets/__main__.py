"""`python -m bml.datasets summary --dataset NAME [--data_root ROOT] [--json]`: classes, images and
image shape per split, the label ids as the files store them, and each split's fingerprint (compare it
with another copy's: README, Data), or the actionable error and exit status 1.

tieredImageNet 'train' is train + val, as trained on; the summary says whether the two files' label ids
overlap (how the original code's concatenation then differs: `--tiered_labels`). For file layouts (CUB,
image folders) the image shape comes from every file's header (no decoding) and is null when the sizes
differ."""
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
    summary = commands.add_parser("summary",
                                  help="classes, images, image shape, stored label ids and fingerprint per split",
                                  epilog="data sets:\n" + describe_datasets(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    summary.add_argument("--dataset", default=EMBEDDED_DATASET,
                         help=f"{', '.join(dataset_names())}, or an image folder name (default: %(default)s)")
    summary.add_argument("--data_root", default=None, help="default: $BML_DATA_ROOT, else data/")
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _shape(shape: list[int] | None) -> str:
    return "x".join(map(str, shape)) if shape else "mixed sizes"


def _stored_labels_lines(summary: dict[str, dict]) -> list[str]:
    """The label ids as stored, per split, and what an overlap of a joined split's files means."""
    lines = []
    for split, info in summary.items():
        if "stored_labels" in info:
            files = ", ".join(f"{name} {r['first']}..{r['last']} ({r['ids']} ids)"
                              for name, r in info["stored_labels"].items())
            shared = info.get("shared_label_ids")
            lines.append(f"{split:<6} {files}" + (f": {shared} ids in both" if shared is not None else ""))
    if not lines:
        return []
    lines = ["", "label ids as stored in the files (this toolkit numbers each split's classes 0..C-1):", *lines]
    for split, info in summary.items():
        shared, files = info.get("shared_label_ids"), list(info.get("stored_labels", ()))
        if shared:
            outputs = sum(r["ids"] for r in info["stored_labels"].values())
            lines.append(f"{split} joins {' and '.join(files)}, whose ids overlap: the original code concatenated "
                         f"the stored labels, a {outputs}-way classifier in which {shared} classes of one file "
                         f"share their output with a class of the other (--tiered_labels raw reproduces it); this "
                         f"toolkit's default numbers them apart, {info['classes']} distinct classes "
                         f"(--tiered_labels offset)")
        elif shared == 0:
            lines.append(f"{split} joins {' and '.join(files)}, whose ids do not overlap: the original code's "
                         "concatenation and this toolkit's numbering give the same classes")
    return lines


def format_summary(name: str, summary: dict[str, dict]) -> str:
    lines = [f"{'split':<6} {'classes':>8} {'images':>9}  image shape"]
    for split, info in summary.items():
        lines.append(f"{split:<6} {info['classes']:>8} {info['images']:>9}  {_shape(info['image_shape'])}")
    lines += _stored_labels_lines(summary)
    sampled = max(info["fingerprint"]["sampled"] for info in summary.values())
    lines += ["", f"fingerprint (equal on two copies: the same labels and the same {sampled} sampled images)",
              f"{'split':<6} {'images':>9}  {'image shape':<12} {'labels':<16}  pixels"]
    for split, info in summary.items():
        fingerprint = info["fingerprint"]
        lines.append(f"{split:<6} {fingerprint['images']:>9}  {_shape(fingerprint['image_shape']):<12} "
                     f"{fingerprint['labels']:<16}  {fingerprint['pixels']}")
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
