"""What an evaluation writes: the published results file and its JSON, named so that the results of one
checkpoint never replace another's, and the `--seeds` syntax."""
from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from bml.scoring import COMBINED
from bml.utils.io import OutputError, atomic_write_together, hash_file

CHECKPOINT_LINE = "# checkpoint: "
SHA256_LINE = "# checkpoint sha256: "
MAX_SEEDS = 10_000
"""More seeds than this in one `--seeds` token is refused before the list is made (0-100000000 would take gigabytes
before a single episode)."""


def parse_seed_range(token: str) -> list[int]:
    """argparse type for one `--seeds` token: a seed ('3') or an inclusive range ('0-9')."""
    first, _, last = token.partition("-")
    try:
        seeds = range(int(first), int(last or first) + 1)
    except ValueError:
        seeds = range(0)
    if not seeds:
        raise argparse.ArgumentTypeError(f"{token!r} is not a seed (e.g. 3) or an increasing range (e.g. 0-9)")
    if len(seeds) > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"{token!r} is {len(seeds):,} seeds: at most {MAX_SEEDS:,} (each seed scores "
                                         "--episodes episodes; the published protocol uses 0-9)")
    return list(seeds)


@dataclass(frozen=True)
class CheckpointIdentity:
    """Which weights were measured: the path as given, the sha256 of the file's bytes and its size, so that
    two results (or two users) can tell whether they evaluated the same file."""

    path: str
    sha256: str
    size: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> CheckpointIdentity:
        """Hash the file once, streamed."""
        return cls(str(path), hash_file(path).hexdigest(), os.path.getsize(path))

    def record(self) -> dict[str, str | int]:
        """The JSON's keys."""
        return {"checkpoint": self.path, "checkpoint_sha256": self.sha256, "checkpoint_bytes": self.size}

    def text_lines(self) -> list[str]:
        """The results file's first lines (comments: the `seed: acc` lines and the last line, `==> Mean ACC on`,
        stay as published)."""
        return [f"{CHECKPOINT_LINE}{self.path}", f"{SHA256_LINE}{self.sha256} ({self.size} bytes)"]


class ResultsPaths(NamedTuple):
    text: Path
    json: Path
    taken: Path | None
    """The default results file when it holds another checkpoint's results (`text` is then the next free name)."""


def recorded_sha256(path: Path) -> str | None:
    """The checkpoint sha256 a results file (text or JSON) records; None when it records none (an earlier
    format, or not a results file)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if path.suffix == ".json":
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return None
        return record.get("checkpoint_sha256") if isinstance(record, dict) else None
    lines = [line for line in text.splitlines() if line.startswith(SHA256_LINE)]
    return lines[0].removeprefix(SHA256_LINE).split()[0] if lines else None


def _numbered(path: Path) -> Iterator[Path]:
    """`path`, then `<stem>-2<suffix>`, `<stem>-3<suffix>`, ... (as training numbers its run folders)."""
    yield path
    for number in itertools.count(2):
        yield path.with_name(f"{path.stem}-{number}{path.suffix}")


def results_paths(label: str, shot: int, checkpoint: CheckpointIdentity, output_dir: str | Path = "eval_results",
                  json_path: str | Path | None = None) -> ResultsPaths:
    """`<output_dir>/<label>_bml_eval_results_<shot>shot.txt` and the JSON path (default: beside it).

    A results file that records another checkpoint (or none) is never replaced: the results go to the
    first of `..._<shot>shot-2.txt`, `-3`, ... that is free or holds this checkpoint's own results. An
    explicit `json_path` that holds another checkpoint's results is refused (OutputError).
    """
    default = Path(output_dir) / f"{label}_bml_eval_results_{shot}shot.txt"
    text_path = next(path for path in _numbered(default)
                     if not path.exists() or recorded_sha256(path) == checkpoint.sha256)
    if json_path is None:
        json_path = text_path.with_suffix(".json")
    elif Path(json_path).exists() and recorded_sha256(Path(json_path)) != checkpoint.sha256:
        raise OutputError(errno.EEXIST, f"--json {json_path} holds the results of another checkpoint (sha256 "
                                        f"{recorded_sha256(Path(json_path)) or 'not recorded'}): pass another --json, "
                                        "or leave it out to write the JSON beside the results file")
    return ResultsPaths(text_path, Path(json_path), default if text_path != default else None)


def write_results(results: dict[str, dict], label: str, paths: ResultsPaths, checkpoint: CheckpointIdentity,
                  metadata: dict | None = None, head_results: dict[str, dict] | None = None) -> ResultsPaths:
    """Write the results file (the published format) and its JSON at `paths` (`results_paths`).

    The text file has the checkpoint's path and sha256 as `#` lines, one `seed: acc` line per seed of the
    combined prediction, then `==> Mean ACC on <label>: acc`; the JSON has `metadata`, the checkpoint's
    identity, every view's results (`results`, the published head) and, under `head_results`, those of the
    other heads ({head: {vote: results}}). The two are written as one unit: two evaluations writing the same
    pair at once leave both files of one of them.
    """
    combined = results[COMBINED]
    seed_lines = [f"{seed}: {summary['acc']:.4f}" for seed, summary in combined["per_seed"].items()]
    lines = [*checkpoint.text_lines(), *seed_lines, f"==> Mean ACC on {label}: {combined['acc']:.4f}"]
    extra = {"head_results": head_results} if head_results else {}
    record = {**checkpoint.record(), **(metadata or {}), "results": results, **extra}
    atomic_write_together({paths.text: "\n".join(lines) + "\n", paths.json: json.dumps(record, indent=2) + "\n"})
    return paths
