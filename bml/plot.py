"""Training curves of one or more runs, drawn from their logs.

    python -m bml.plot RUN_DIR [RUN_DIR ...] [-o curves.png] [--labels A B ...]

One panel per loss term, then the gradient norm (runs with --clip_grad), the learning rate, the
images per second and the validation accuracy, all against epochs; several runs are overlaid in
one colour each. The points come from the run folder's `log.txt` (one JSON line per epoch: the
epoch's means and its validation) and, where present, `log_steps.txt` (the means over a few steps
at a time, about ten points an epoch), so that a short run still draws a curve. Training writes
`curves.png` into its run folder with this module. Rendered with Matplotlib's Agg canvas, without
pyplot: no display and no global backend switch.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from bml import cli
from bml.utils import messages

EPOCH_LOG = "log.txt"
STEP_LOG = "log_steps.txt"
CURVES = "curves.png"
NOT_LOSSES = ("train_images_per_s", "train_grad_norm")
VIEW_STYLES = {"global": ("--", "global view"), "local": (":", "local view"), "bml_scaled": ("-.", "scaled vote")}


class PlotError(ValueError):
    """A folder that holds no training log; the message names it."""


@dataclass
class RunLog:
    label: str
    epochs: list[dict]   # log.txt: one entry per epoch
    steps: list[dict]    # log_steps.txt: means over a few steps, 'epoch' fractional; empty for older runs


def read_log(path: Path) -> list[dict]:
    """The JSON lines of a log file, each an object with a numeric `epoch`; PlotError naming the first line that
    is not (a binary or edited file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PlotError(f"{path} is not a text file: pass the folder of a training run (its log.txt)") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        epoch = entry.get("epoch") if isinstance(entry, dict) else None
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
            raise PlotError(f"line {number} of {path} is not a log entry (a JSON object with a numeric 'epoch'): "
                            f"{line[:80]!r}; restore the file or delete that line")
        entries.append(entry)
    return entries


def read_run(folder: str | Path, label: str | None = None) -> RunLog:
    folder = Path(folder)
    if not (folder / EPOCH_LOG).is_file():
        raise PlotError(f"no {EPOCH_LOG} in {folder}: pass the folder of a training run (its -s / --save_folder)")
    steps = read_log(folder / STEP_LOG) if (folder / STEP_LOG).is_file() else []
    return RunLog(label or folder.name, read_log(folder / EPOCH_LOG), steps)


def _series(entries: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(entry["epoch"], entry[key]) for entry in entries
              if isinstance(entry.get(key), (int, float)) and not isinstance(entry[key], bool)]
    return ([x for x, _ in points], [y for _, y in points]) if points else ([], [])


def _loss_terms(runs: Sequence[RunLog]) -> list[str]:
    """train_<term> keys of any run, the total first."""
    keys = {key for run in runs for entry in run.epochs + run.steps for key in entry
            if key.startswith("train_") and key not in NOT_LOSSES}
    return sorted(keys, key=lambda key: (key != "train_total", key))


def _draw_training_series(axis, runs: Sequence[RunLog], key: str, colours: list) -> list[float]:
    """The step points as a line; a run without them (logged before log_steps.txt) draws its epoch means;
    points as sparse as epochs get a marker each."""
    values = []
    for run, colour in zip(runs, colours):
        x, y = _series(run.steps, key)
        if not x:
            x, y = _series(run.epochs, key)
        axis.plot(x, y, "-" if len(x) > 2 * len(run.epochs) else "o-", color=colour, markersize=3.5, linewidth=1.2)
        values += y
    return values


def _log_scale_if_wide(axis, values: list[float]) -> None:
    finite = [value for value in values if math.isfinite(value)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 3:
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))   # 20, 30 rather than 2 x 10^1
        axis.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _draw_validation(axis, runs: Sequence[RunLog], colours: list) -> None:
    """val_acc with its 95% interval per run; a single run also shows each view and the scaled vote."""
    for run, colour in zip(runs, colours):
        x, acc = _series(run.epochs, "val_acc")
        if not x:
            continue
        _, ci95 = _series(run.epochs, "val_ci95")
        axis.plot(x, acc, "o-", color=colour, markersize=3.5, linewidth=1.2,
                  label="prediction" if len(runs) == 1 else None)
        if len(ci95) == len(acc):
            axis.fill_between(x, [a - c for a, c in zip(acc, ci95)], [a + c for a, c in zip(acc, ci95)],
                              color=colour, alpha=0.15, linewidth=0)
        if len(runs) == 1:
            for view, (style, label) in VIEW_STYLES.items():
                view_x, view_acc = _series(run.epochs, f"val_acc_{view}")
                if view_x:
                    axis.plot(view_x, view_acc, style, color=colour, linewidth=1.0, label=label)
    if len(runs) == 1 and axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7, loc="lower right")


def validation_title(folder: Path) -> str:
    """The validation panel's title, with the episode shape from the run's config.json when there is one."""
    config_path = Path(folder) / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (ValueError, OSError):   # a damaged config costs the title its episode shape only
            config = None
        if isinstance(config, dict) and "n_ways" in config and "n_shots" in config:
            return f"val accuracy, {config['n_ways']}-way {config['n_shots']}-shot (%)"
    return "val accuracy (%)"


def check_image_format(path: Path) -> None:
    """The image format of `path`'s suffix must be one Matplotlib writes: checked before the logs are read."""
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise PlotError(f"-o {path}: {path.suffix or 'no suffix'} is not an image format Matplotlib writes; end the "
                        f"name with one of {', '.join('.' + name for name in sorted(formats))}")


def plot_runs(folders: Sequence[str | Path], path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Draw the curves of the runs in `folders` into the image `path` (its format from the suffix)."""
    if labels is not None and len(labels) != len(folders):
        raise PlotError(f"{len(labels)} labels for {len(folders)} runs: give one label per run folder")
    check_image_format(Path(path))
    runs = [read_run(folder, label) for folder, label in zip(folders, labels or [None] * len(folders))]
    if not any(run.epochs or run.steps for run in runs):
        raise PlotError(f"the logs of {', '.join(map(str, folders))} are empty: no epoch has finished yet")
    colours = [f"C{index % 10}" for index in range(len(runs))]
    panels = [(key, f"loss: {key.removeprefix('train_')}") for key in _loss_terms(runs)]
    if any("train_grad_norm" in entry for run in runs for entry in run.epochs):
        panels.append(("train_grad_norm", "gradient norm (before clipping)"))
    panels += [("lr", "learning rate"), ("train_images_per_s", "training images / s"),
               ("val_acc", validation_title(Path(folders[0])))]
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(3.6 * columns, 2.8 * rows + 0.5), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    last_epoch = max(entry["epoch"] for run in runs for entry in run.epochs + run.steps)
    for axis, (key, title) in zip(axes, panels):
        if key == "val_acc":
            _draw_validation(axis, runs, colours)
        else:
            values = _draw_training_series(axis, runs, key, colours)
            if key != "train_images_per_s":
                _log_scale_if_wide(axis, values)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("epoch", fontsize=8)
        axis.set_xlim(0, last_epoch)
        axis.tick_params(which="both", labelsize=7)
        axis.grid(alpha=0.3)
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    if len(runs) > 1:
        handles = [axes[0].plot([], [], color=colour, linewidth=2)[0] for colour in colours]
        figure.legend(handles, [run.label for run in runs], loc="outside upper center", ncols=min(len(runs), 6),
                      fontsize=8, frameon=False)
    else:
        figure.suptitle(runs[0].label, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m bml.plot", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run folders (each with its log.txt)")
    parser.add_argument("-o", "--output", default=None,
                        help=f"image to write (default: {CURVES} in the run folder; with several runs, {CURVES} "
                             "in the current folder)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    return parser


def main(args: argparse.Namespace) -> int:
    output = args.output or (Path(args.runs[0]) / CURVES if len(args.runs) == 1 else Path(CURVES))
    try:
        path = plot_runs(args.runs, output, args.labels)
    except (PlotError, OSError, json.JSONDecodeError) as problem:
        messages.error(str(problem))
        return 1
    messages.info(f"wrote {path}")
    return 0


def command() -> None:
    """`python -m bml.plot` and the `bml-plot` command."""
    cli.run_command(get_args_parser, main)


if __name__ == "__main__":
    command()
