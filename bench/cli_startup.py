"""How long `--help` of the entry scripts takes, in one or more checkouts (e.g. before and after a change).

    python bench/cli_startup.py                          # this checkout
    python bench/cli_startup.py /path/to/old/checkout .  # before and after, interleaved under the same load

Each repetition runs `python SCRIPT --help` once per checkout and script, in turn, so that a busy CPU
slows all of them alike. Prints one JSON object: per checkout and script, the median and the minimum
wall time in seconds, and the median ratio to `python -c "import torch"` (the floor of any entry script).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = ("train_bml.py", "eval_bml.py")


def timed(command: list[str], root: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> None:
    roots = [Path(root).resolve() for root in args.roots]
    times: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        times.setdefault("import torch", []).append(timed([sys.executable, "-c", "import torch"], roots[0]))
        for root in roots:
            for script in SCRIPTS:
                times.setdefault(f"{root}/{script}", []).append(timed([sys.executable, script, "--help"], root))
    floor = times["import torch"]
    print(json.dumps({name: {"median_s": round(statistics.median(values), 2), "min_s": round(min(values), 2),
                             "ratio_to_import_torch": round(statistics.median(
                                 [value / base for value, base in zip(values, floor)]), 2)}
                      for name, values in times.items()}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="*", default=["."], help="checkouts to time (default: this one)")
    parser.add_argument("--repeat", type=int, default=5)
    main(parser.parse_args())
