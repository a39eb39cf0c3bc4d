"""A contact sheet of a few-shot prediction run: the support set per class, then the queries with
their predicted class and confidence; wrong predictions (when the true class is known) framed in red,
queries rejected as `unknown` (too low a confidence) in grey."""
from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bml.classifier import load_rgb
from bml.utils.io import explain_disk_full

THUMBNAIL_PIXELS = 128
CELL_INCHES = 1.1
LABEL_CHARACTERS = 14
COLOURS = {None: "black", True: "tab:green", False: "red"}
UNKNOWN = "unknown"
"""The prediction of a query whose confidence is below the rejection threshold."""
UNKNOWN_COLOUR = "tab:gray"
MAX_SUPPORT_ROWS = 20
"""Support classes drawn on a sheet (one row each); more are evenly spaced, as the queries are."""


@dataclass
class SheetQuery:
    """One classified query; `truth` is None when its true class is unknown, `prediction` is `UNKNOWN` when
    the query was rejected (it is then neither right nor wrong)."""

    path: Path
    prediction: Hashable
    confidence: float
    truth: Hashable | None = None

    @property
    def rejected(self) -> bool:
        return self.prediction == UNKNOWN

    @property
    def correct(self) -> bool | None:
        return None if self.truth is None or self.rejected else self.truth == self.prediction


def short_labels(labels: Sequence[Hashable], length: int = LABEL_CHARACTERS) -> dict[Hashable, str]:
    """Each label in at most `length` characters, telling the labels apart where their texts differ.

    A longer label keeps its start and its end around a middle ellipsis ('greek_c…cter07'): class names
    often share a prefix and differ in a suffix. The split between start and end moves (towards the
    end first) until the shortened labels are distinct; when none is, the end alone is kept.
    """
    texts = {label: str(label) for label in labels}
    ends = [(length - 1) // 2 + shift for shift in range(length // 2)] + list(range((length - 1) // 2 - 1, 0, -1))

    def cut(text: str, end: int) -> str:
        return text if len(text) <= length else text[:length - 1 - end] + "…" + text[len(text) - end:]

    for end in ends:
        shortened = {label: cut(text, end) for label, text in texts.items()}
        if len(set(shortened.values())) == len(set(texts.values())):
            return shortened
    return {label: cut(text, length - 1) for label, text in texts.items()}


def evenly_spaced(count: int, limit: int) -> list[int]:
    """`limit` indices spread over range(count) (all of them when count <= limit): a capped sheet still
    shows every part of a query folder sorted by class."""
    if count <= limit:
        return list(range(count))
    return np.linspace(0, count - 1, limit).round().astype(int).tolist()


def _show(ax: Axes, path: Path) -> None:
    """The image as a thumbnail, or a note when it cannot be read; no ticks, frame kept for marking."""
    ax.set_xticks([])
    ax.set_yticks([])
    try:
        image = load_rgb(path)
    except Exception as error:   # drawing must not fail on a file the classifier already skipped
        ax.text(0.5, 0.5, f"unreadable\n{type(error).__name__}", ha="center", va="center", fontsize=7,
                transform=ax.transAxes)
        return
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    ax.imshow(np.asarray(image))


def _frame(ax: Axes, colour: str, width: float) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def draw_contact_sheet(path: str | os.PathLike, support: Mapping[Hashable, Sequence[Path]],
                       queries: Sequence[SheetQuery], max_queries: int = 100, columns: int = 10,
                       max_classes: int = MAX_SUPPORT_ROWS) -> int:
    """Write the sheet to `path` (format from its suffix) and return how many queries it shows.

    One row per support class (up to `columns` shots drawn), at most `max_classes` rows, evenly spaced over the
    classes when there are more; below, at most `max_queries` queries, evenly spaced over `queries` when there
    are more. The query heading gives the accuracy over all queries whose true class is known. A full disk is
    an OutputError.
    """
    classes = list(support)
    drawn_classes = [classes[i] for i in evenly_spaced(len(classes), max_classes)]
    shots = sum(len(paths) for paths in support.values())
    counts = f"{len(support)} classes, {shots} images"
    if len(drawn_classes) < len(classes):
        counts += f"; {len(drawn_classes)} of the classes shown, evenly spaced"
    support = {label: support[label] for label in drawn_classes}
    shown = [queries[i] for i in evenly_spaced(len(queries), max_queries)]
    label = short_labels([*support, *(query.prediction for query in queries), *(query.truth for query in queries
                                                                               if query.truth is not None)])
    query_rows = max(1, math.ceil(len(shown) / columns))
    support_height, query_height = CELL_INCHES, 1.3 * CELL_INCHES
    heights = (len(support) * support_height + 0.5, query_rows * query_height + 0.6)
    figure = Figure(figsize=(columns * CELL_INCHES + 1.2, sum(heights)), layout="constrained")
    support_figure, query_figure = figure.subfigures(2, 1, height_ratios=heights)

    support_figure.suptitle(f"Support set: {counts}", fontsize=11, weight="bold")
    support_axes = support_figure.subplots(len(support), columns, squeeze=False)
    for row, (name, paths) in zip(support_axes, support.items()):
        for column, ax in enumerate(row):
            if column < len(paths):
                _show(ax, paths[column])
            else:
                ax.axis("off")
        row[0].axis("on")
        row[0].set_ylabel(f"{label[name]}\n({len(paths)} shot{'s' * (len(paths) != 1)})", fontsize=9,
                          rotation=0, ha="right", va="center", parse_math=False)

    query_figure.suptitle(_query_heading(queries, len(shown)), fontsize=11, weight="bold", parse_math=False)
    for index, ax in enumerate(query_figure.subplots(query_rows, columns, squeeze=False).flat):
        if index >= len(shown):
            ax.axis("off")
            continue
        query = shown[index]
        _show(ax, query.path)
        title = f"{label[query.prediction]} {query.confidence:.2f}"
        if query.correct is False:
            title += f"\ntrue: {label[query.truth]}"
            _frame(ax, COLOURS[False], 3.0)
        colour = UNKNOWN_COLOUR if query.rejected else COLOURS[query.correct]
        ax.set_title(title, fontsize=8, color=colour, parse_math=False)
    with explain_disk_full(path):
        figure.savefig(path, dpi=100)
    return len(shown)


def _query_heading(queries: Sequence[SheetQuery], shown: int) -> str:
    """'Queries: predicted class and confidence', with the count when capped and the accuracy when known."""
    heading = "Queries: predicted class and confidence"
    if shown < len(queries):
        heading += f" ({shown} of {len(queries)} shown, evenly spaced)"
    judged = [query.correct for query in queries if query.correct is not None]
    if judged:
        heading += f"; accuracy {sum(judged)}/{len(judged)} = {100 * sum(judged) / len(judged):.1f}%, wrong in red"
    rejected = sum(query.rejected for query in queries)
    if rejected:
        heading += f"; {rejected} {UNKNOWN} (low confidence) in grey"
    return heading
