"""Start a training script on the visible GPUs with as many processes as its recipe allows.

    python -m bml.launch train_bml.py --dataset miniImageNet [train_bml.py flags]
    python -m bml.launch train_baseline.py --dataset CUB --mode local [flags] --dry_run

The recipe (`bml.recipes`) states the episodes averaged per optimiser step over all processes (2 for
the published recipes: one per GPU on 2 GPUs). This starts at most that many processes, the largest
number of visible GPUs that divides it (`torchrun --standalone`; one plain process without GPUs), and
each process runs its share. `--allow_more_processes` starts one process per visible GPU instead
(the script warns that this is not the published recipe). With `--dry_run` it prints the script's
plan for that many processes, plus the `launch` command line, as one JSON object, and starts nothing.
`train_bml.sh` and `train_baseline.sh` call this.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path
from types import ModuleType

import torch

from bml.datasets import canonical_name
from bml.training import SettingsError, apply_recipe, run_plan
from bml.utils import messages
from bml.utils.distributed import DeviceError

EXIT_FAILURE = 1


def load_script(path: str | Path) -> ModuleType:
    """An entry script (train_bml.py, train_baseline.py) as a module; its `__main__` block does not run."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def process_count(args: argparse.Namespace, episodes: int, num_gpus: int) -> int:
    """Processes to start: 1 without GPUs (or on one named device); else the largest divisor of
    `episodes` (per step) that the GPUs allow, or every GPU with --allow_more_processes."""
    one_device = args.device is not None and (args.device == "cpu" or ":" in args.device)
    if one_device or num_gpus <= 1:
        return 1
    if args.allow_more_processes:
        return num_gpus
    return max(count for count in range(1, min(num_gpus, episodes) + 1) if episodes % count == 0)


def launch_command(script: str, argv: list[str], processes: int) -> list[str]:
    """The command line that runs `script` with `argv` on `processes` processes."""
    if processes == 1:
        return [sys.executable, script, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            script, *argv]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m bml.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="the training script: train_bml.py or train_baseline.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, metavar="...",
                        help="the script's flags (SCRIPT --help lists them), --dry_run included")
    return parser


def main(argv: list[str]) -> int:
    """Start SCRIPT with its flags (`argv`: SCRIPT, then the flags) on the processes its recipe allows, or print
    its plan with --dry_run; returns the exit code (replaced by the script's own when it starts)."""
    parser = get_args_parser()
    launched = parser.parse_args(argv)
    script, script_argv = launched.script, launched.script_args
    if not Path(script).is_file():
        parser.error(f"no training script {script}: give the path of train_bml.py or train_baseline.py")
    module = load_script(script)
    args = module.get_args_parser().parse_args(script_argv)
    filled = apply_recipe(argparse.Namespace(**{**vars(args), "dataset": canonical_name(args.dataset)}))
    processes = process_count(args, filled.episodes_per_step, torch.cuda.device_count())
    command = launch_command(script, [arg for arg in script_argv if arg != "--dry_run"], processes)
    if not args.dry_run:
        sys.stdout.flush()
        os.execv(command[0], command)
    try:
        plan = run_plan(args, world_size=processes)
    except (SettingsError, DeviceError) as error:
        messages.error(str(error))
        return EXIT_FAILURE
    print(json.dumps({**plan, "launch": shlex.join(command)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
