"""Classify your own images with a trained checkpoint, from a folder of labelled examples.

    python -m bml.predict --ckp_path best.pth --support support/ --query photos/ --out predictions.csv \\
        --sheet sheet.png

`support/` holds one sub-folder per class with one or more images each (shots may differ between
classes); `--query` is an image or a folder, searched recursively. Every query gets the class of the
nearest prototype under the model's test-time rule (`bml.classifier`; `--vote` chooses how the views'
logits are combined, as in the evaluation's results; `--head` how each view's are made), its confidence
(softmax of the combined logits, divided by the vote's temperature when the checkpoint is calibrated:
`bml.calibration`; a warning says so when that temperature was fitted on another way or shot than the
support's) and the runner-up class, written to a CSV `path,prediction,confidence,runner_up`.
With `--reject CONFIDENCE` a query whose confidence is below it is labelled `unknown` (in the CSV, the
summary and the sheet); `eval_bml.py --calibrate` reports, on val, the fraction kept and its accuracy at
several thresholds.
When the query folder is laid out by class (sub-folders named like support classes), the accuracy is
reported and wrong predictions are marked on the contact sheet.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import warnings
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path

from bml import cli
from bml.checkpoint import CheckpointError
from bml.classifier import CalibrationWarning, FewShotClassifier, FewShotInputError, Scores
from bml.contact_sheet import MAX_SUPPORT_ROWS, UNKNOWN, SheetQuery, draw_contact_sheet
from bml.datasets import DatasetError, default_num_workers
from bml.datasets.image_files import image_problem
from bml.scoring import COMBINED, HEADS, PROTO, VOTES
from bml.utils import argtypes, messages
from bml.utils.distributed import DeviceError, resolve_device
from bml.utils.io import (OutputError, atomic_write, check_output_file, check_outputs_are_not_inputs,
                          not_regular_file)

CSV_COLUMNS = ("path", "prediction", "confidence", "runner_up")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Few-shot prediction on your own images", add_help=False,
                                     parents=[cli.embedding_parser(), cli.input_parser(), cli.device_parser(),
                                              cli.data_root_parser()])
    parser.set_defaults(embed_batch_size=64)
    parser.add_argument("--support", required=True, help="folder with one sub-folder of images per class")
    parser.add_argument("--query", required=True, help="an image, or a folder searched recursively")
    parser.add_argument("--out", default="predictions.csv", help="CSV of path,prediction,confidence,runner_up")
    parser.add_argument("--sheet", default=None, help="also draw a contact sheet to this image file (e.g. sheet.png)")
    parser.add_argument("--sheet_max", type=argtypes.positive_int, default=100,
                        help="most queries drawn on the sheet (evenly spaced over the queries when more)")

    inputs = parser.add_argument_group("test-time rule")
    inputs.add_argument("--vote", default=COMBINED,
                        help="how the views' logits are combined: "
                             + "; ".join(f"{name}: {vote.description}" for name, vote in VOTES.items())
                             + "; or a view's name (global, local): that view alone. Default: %(default)s")
    inputs.add_argument("--reject", type=argtypes.number(0, 1), default=None, metavar="CONFIDENCE",
                        help=f"label '{UNKNOWN}' every query whose confidence is below CONFIDENCE (calibrated "
                             f"when the checkpoint holds a temperature for the vote; eval_bml.py --calibrate shows, "
                             f"on val, the fraction kept and its accuracy at several thresholds)")
    inputs.add_argument("--head", choices=tuple(HEADS), default=PROTO,
                        help="how each view's logits are made: "
                             + "; ".join(f"{name}: {head.description}" for name, head in HEADS.items())
                             + ". Default: %(default)s")

    return parser


def visible_files(folder: Path) -> list[Path]:
    """Every file under `folder`, recursively, sorted; hidden files and folders (.DS_Store, .git) left out.
    Dangling links are kept, so that the warning on unreadable files names them."""
    return sorted(path for path in folder.rglob("*")
                  if (path.is_file() or (path.is_symlink() and not path.exists()))
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def find_support(folder: Path) -> dict[str, list[Path]]:
    """Class name -> its files, one class per sub-folder of `folder` (files in nested folders included)."""
    if not folder.is_dir():
        raise FewShotInputError(f"--support {folder} is not a folder: it must hold one sub-folder of images per class")
    class_folders = sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
    stray = [path.name for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")]
    if stray:
        warnings.warn(f"ignored {len(stray)} files directly in {folder} (support images go in {folder}/<class>/): "
                      f"{', '.join(sorted(stray))}")
    support = {path.name: visible_files(path) for path in class_folders}
    empty = [str(folder / name) for name, files in support.items() if not files]
    if empty:
        raise FewShotInputError(f"empty class folder(s): {', '.join(empty)}; put at least one image in each "
                                f"class folder, or remove it")
    if len(support) < 2:
        raise FewShotInputError(f"{folder} has {len(support)} class folder(s) {list(support)}: few-shot "
                                f"prediction needs at least two classes, one sub-folder of images each")
    return support


def find_queries(path: Path) -> list[Path]:
    """The query image, or every visible file under the query folder."""
    if problem := not_regular_file(path):
        raise FewShotInputError(f"--query: {problem}: give an image or a folder")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--query {path} does not exist")
    files = visible_files(path)
    if not files:
        raise FewShotInputError(f"no files found under --query {path}")
    return files


def warn_of_support_queries(support: dict[str, list[Path]], queries: Sequence[Path]) -> None:
    """Queries that are support images too are classified by themselves (100% by construction): say so."""
    support_files = {path.resolve() for paths in support.values() for path in paths}
    shared = [path for path in queries if path.resolve() in support_files]
    if shared:
        warnings.warn(f"{len(shared)} of the {len(queries)} query files are support images too (e.g. {shared[0]}): "
                      f"each is nearest its own prototype, so their predictions and accuracy say nothing about new "
                      f"images; give --query a folder of other images than --support")


def earlier_outputs_left_out(queries: list[Path], query_root: Path, outputs: Sequence[str | None]) -> list[Path]:
    """The queries, less a file in the query folder that this run writes and that is not an image (the CSV of an
    earlier run): one that is an image stays a query, so that writing over it is refused."""
    written = {Path(path).resolve() for path in outputs if path}
    return [path for path in queries
            if not (path != query_root and path.resolve() in written and image_problem(path))]


def true_class(path: Path, query_root: Path, classes: set[str]) -> str | None:
    """The top-level sub-folder of `query_root` holding `path` when it is named after a support class."""
    if not query_root.is_dir():
        return None
    parts = path.relative_to(query_root).parts
    return parts[0] if len(parts) > 1 and parts[0] in classes else None


def write_predictions(path: Path, queries: Sequence[SheetQuery], runners_up: Sequence[Hashable]) -> None:
    """The CSV, written atomically (a full disk is an OutputError; the previous file stays)."""
    with atomic_write(path, "w") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for query, runner_up in zip(queries, runners_up):
            writer.writerow((str(query.path), query.prediction, f"{query.confidence:.4f}", runner_up))


def summary_table(classes: Sequence[str], shots: Sequence[int], queries: Sequence[SheetQuery]) -> str:
    """Per class: support shots and predicted count; with known true classes also queries, correct, accuracy."""
    judged = [query for query in queries if query.correct is not None]
    header = ["class", "shots", "predicted"] + (["queries", "correct", "accuracy"] if judged else [])
    rows = []
    for name, shot_count in zip(classes, shots):
        row = [name, shot_count, sum(query.prediction == name for query in queries)]
        if judged:
            truths = [query for query in judged if query.truth == name]
            correct = sum(query.correct for query in truths)
            row += [len(truths), correct, f"{100 * correct / len(truths):.1f}%" if truths else "-"]
        rows.append([str(cell) for cell in row])
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if c == 0 else cell.rjust(width)
                       for c, (cell, width) in enumerate(zip(row, widths))) for row in [header, *rows]]
    if judged:
        correct = sum(query.correct for query in judged)
        lines.append(f"accuracy: {correct}/{len(judged)} = {100 * correct / len(judged):.2f}% "
                     f"(queries in sub-folders named after a support class"
                     f"{f', {UNKNOWN} ones left out' if any(query.rejected for query in queries) else ''})")
    rejected = sum(query.rejected for query in queries)
    if rejected:
        lines.append(f"{UNKNOWN}: {rejected} of {len(queries)} queries (confidence below the --reject threshold)")
    return "\n".join(lines)


def classified_queries(scores: Scores, paths: Sequence[Path], query_root: Path,
                       reject_below: float | None = None) -> list[SheetQuery]:
    """The readable queries with their prediction (`UNKNOWN` when the confidence is below `reject_below`),
    confidence and (when the folder tells) true class."""
    predictions, confidences = scores.ranked(0)
    classes = set(scores.classes)
    return [SheetQuery(paths[index], UNKNOWN if reject_below is not None and confidence < reject_below else prediction,
                       float(confidence), true_class(paths[index], query_root, classes))
            for index, prediction, confidence in zip(scores.kept, predictions, confidences)]


def calibration_note(classifier: FewShotClassifier, checkpoint: str) -> str:
    """Whether the confidences of the fitted task are calibrated (when its way and shot are those the temperature
    was fitted on), and how to calibrate them when they are not."""
    if classifier.temperature is None:
        return (f"confidences uncalibrated: {checkpoint} holds no temperature for vote {classifier.vote}, so they "
                f"are far too close to 1; fit one with eval_bml.py --ckp_path {checkpoint} --calibrate "
                f"--save_calibration PATH")
    fitted = classifier.calibrated_on or {}
    task = (f" {fitted['way']}-way {fitted['shot']}-shot episodes, this task's shape"
            if "way" in fitted and "shot" in fitted else "")
    return (f"confidences calibrated: vote {classifier.vote} at temperature {classifier.temperature:.4g} "
            f"(fitted on val{task})")


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    messages.warn(str(message))


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """Warnings shown as the project's 'WARNING: message' lines, without Python's source location."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _print_warning
        yield


def predict(args: argparse.Namespace) -> None:
    """Classify the queries, write the CSV (and the sheet) and print the summary."""
    args.device = resolve_device(args.device)
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    query_root = Path(args.query)
    support = find_support(Path(args.support))
    if args.reject is not None and UNKNOWN in support:
        raise FewShotInputError(f"a support class is named '{UNKNOWN}', the label --reject gives: rename its folder")
    check_output_file(args.out, "--out")
    if args.sheet:
        check_output_file(args.sheet, "--sheet")
    query_paths = earlier_outputs_left_out(find_queries(query_root), query_root, (args.out, args.sheet))
    check_outputs_are_not_inputs({"--out": args.out, "--sheet": args.sheet},
                                 {"--ckp_path": [args.ckp_path], "--support": [p for ps in support.values() for p in ps],
                                  "--query": query_paths})
    classifier = FewShotClassifier.from_checkpoint(args.ckp_path, device=args.device, batch_size=args.embed_batch_size,
                                                   num_workers=args.num_workers, image_size=args.image_size,
                                                   transform_id=args.transform, progress=not args.no_progress,
                                                   vote=args.vote, head=args.head, data_root=args.data_root)
    messages.info(f"{args.ckp_path}: views {' + '.join(classifier.view_names)} (vote {classifier.vote}, "
                  f"head {classifier.head}), {classifier.image_size} px input, "
                  f"on {args.device}; {len(support)} classes from {args.support}, {len(query_paths)} query files")
    warn_of_support_queries(support, query_paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)   # said below, with the checkpoint's path
        classifier.fit([path for paths in support.values() for path in paths],
                       [name for name, paths in support.items() for _ in paths], skip_unreadable=True)
    mismatch = classifier.calibration_mismatch(args.ckp_path)
    if mismatch:
        messages.warn(mismatch)
    else:
        messages.info(calibration_note(classifier, args.ckp_path))
    scores = classifier.score(query_paths, skip_unreadable=True)
    if not scores.kept:
        raise FewShotInputError(f"none of the {len(query_paths)} query files under {query_root} is a readable image")
    queries = classified_queries(scores, query_paths, query_root, args.reject)
    write_predictions(Path(args.out), queries, scores.ranked(1)[0])
    print(summary_table(classifier.classes_, classifier.shots_, queries))
    messages.info(f"wrote {len(queries)} predictions to {args.out}")
    if args.sheet:
        shown = draw_contact_sheet(args.sheet, support, queries, max_queries=args.sheet_max)
        capped = f" (capped at --sheet_max {args.sheet_max}: {shown} of {len(queries)} queries shown)"
        rows = (f" ({MAX_SUPPORT_ROWS} of the {len(support)} support classes shown)"
                if len(support) > MAX_SUPPORT_ROWS else "")
        messages.info(f"wrote the contact sheet {args.sheet}{capped if shown < len(queries) else ''}{rows}")


def main(args: argparse.Namespace) -> int:
    """Run `predict`; return 0, or 1 after printing the problem (bad input, missing or mismatched checkpoint)."""
    with plain_warnings():
        try:
            predict(args)
        except (CheckpointError, DatasetError, DeviceError, FewShotInputError, FileNotFoundError, OutputError) as problem:
            messages.error(str(problem))
            return 1
    return 0


def command() -> None:
    """`python -m bml.predict` and the `bml-predict` command."""
    cli.run_command(get_args_parser, main, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    command()
