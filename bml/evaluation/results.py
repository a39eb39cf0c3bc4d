"""What an evaluation writes: the published results file and its JSON, and the `--seeds` syntax."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bml.scoring import COMBINED
from bml.utils.io import atomic_write_together


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


def results_paths(label: str, shot: int, output_dir: str | Path = "eval_results",
                  json_path: str | Path | None = None) -> tuple[Path, Path]:
    """`<output_dir>/<label>_bml_eval_results_<shot>shot.txt` and the JSON path (default: beside it)."""
    text_path = Path(output_dir) / f"{label}_bml_eval_results_{shot}shot.txt"
    return text_path, Path(json_path) if json_path else text_path.with_suffix(".json")


def write_results(results: dict[str, dict], label: str, shot: int, output_dir: str | Path = "eval_results",
                  json_path: str | Path | None = None, metadata: dict | None = None,
                  head_results: dict[str, dict] | None = None) -> tuple[Path, Path]:
    """Write `<label>_bml_eval_results_<shot>shot.txt` (the published format) and its JSON beside it.

    The text file has one `seed: acc` line per seed of the combined prediction, then
    `==> Mean ACC on <label>: acc`; the JSON has `metadata`, every view's results (`results`, the
    published head) and, under `head_results`, those of the other heads ({head: {vote: results}}). The two are
    written as one unit: two evaluations writing the same pair at once leave both files of one of them.
    """
    text_path, json_path = results_paths(label, shot, output_dir, json_path)
    combined = results[COMBINED]
    lines = [f"{seed}: {summary['acc']:.4f}" for seed, summary in combined["per_seed"].items()]
    lines.append(f"==> Mean ACC on {label}: {combined['acc']:.4f}")
    extra = {"head_results": head_results} if head_results else {}
    atomic_write_together({text_path: "\n".join(lines) + "\n",
                           json_path: json.dumps({**(metadata or {}), "results": results, **extra}, indent=2) + "\n"})
    return text_path, json_path
