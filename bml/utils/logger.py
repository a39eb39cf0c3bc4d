"""Training records: smoothed metrics, the JSON-lines log, config.json and TensorBoard scalars."""

from __future__ import annotations

import argparse
import json
from collections import deque
from pathlib import Path

from bml.utils.io import append_file, atomic_write, explain_disk_full

STEP_LOG = "log_steps.txt"
TENSORBOARD = "tensorboard"


class SmoothedValue:
    """A metric seen once per step: its recent median (what a progress bar should show) and its mean."""

    def __init__(self, window: int = 20) -> None:
        self.recent: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, weight: int = 1) -> None:
        self.recent.append(value)
        self.total += value * weight
        self.count += weight

    @property
    def median(self) -> float:
        return sorted(self.recent)[len(self.recent) // 2] if self.recent else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")


class RunLogger:
    """Writes a run's records into its save folder; a no-op on every process but the main one.

    - `config.json`: the resolved settings of the run;
    - `log.txt`: one JSON object per epoch with all its statistics (DeiT style);
    - `log_steps.txt`: the same training keys averaged over a few steps at a time (about ten points
      an epoch, 'epoch' fractional), so that a short run draws a curve (`bml.plot`); kept apart from
      `log.txt`, whose readers expect one line per epoch;
    - `tensorboard/`: scalars (loss terms, learning rate, images/s, validation accuracy), the points of
      `log_steps.txt` under `steps/` (x axis: the global step), and the run's settings as text (`settings`).

    `fresh`: a run that starts from no checkpoint; the step log and TensorBoard events of an earlier run killed
    before its first checkpoint are removed, so that the two runs' records are never mixed. Files are never
    written through links.
    """

    def __init__(self, save_folder: Path, enabled: bool, fresh: bool = False) -> None:
        self.save_folder = Path(save_folder)
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.save_folder.mkdir(parents=True, exist_ok=True)
            if fresh:
                (self.save_folder / STEP_LOG).unlink(missing_ok=True)
                for events in (self.save_folder / TENSORBOARD).glob("events.out.tfevents.*"):
                    events.unlink()
            self.writer = SummaryWriter(log_dir=str(self.save_folder / TENSORBOARD))

    def write_config(self, args: argparse.Namespace) -> None:
        if self.enabled:
            text = json.dumps(vars(args), indent=2, sort_keys=True, default=str)
            with atomic_write(self.save_folder / "config.json", "w") as handle:
                handle.write(text + "\n")
            rows = [f"| {key} | {json.dumps(value, default=str)} |" for key, value in sorted(vars(args).items())]
            self.writer.add_text("settings", "\n".join(["| setting | value |", "|---|---|", *rows]))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def epoch(self, stats: dict) -> None:
        if self.enabled:
            line = json.dumps(stats, sort_keys=True) + "\n"
            path = self.save_folder / "log.txt"
            with explain_disk_full(path, len(line)), append_file(path) as log_file:
                log_file.write(line)
            self.writer.flush()

    def steps(self, stats: dict) -> None:
        if self.enabled:
            path = self.save_folder / STEP_LOG
            with explain_disk_full(path), append_file(path) as log_file:
                log_file.write(json.dumps(stats, sort_keys=True) + "\n")
            for name, value in stats.items():
                if name != "step":
                    self.writer.add_scalar(f"steps/{name}", value, stats["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
