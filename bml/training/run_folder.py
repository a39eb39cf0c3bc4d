"""A run's folder: which files make it another run's, claiming it for one run, and the commands that
continue the run or use what it made."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from pathlib import Path

from bml.cli import episode_rule, episode_rule_flags
from bml.training.settings import SettingsError
from bml.utils.io import HOLDER_FILE, LOCK_FILE, check_output_folder, folder_lock, link_error, remove_orphan_temporaries
from bml.utils.messages import info

LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "best.pth"
RUN_RECORDS = (LAST_CHECKPOINT, BEST_CHECKPOINT, "epoch_*.pth", "log.txt")
"""Files that make a folder another run's: a fresh run never overwrites or appends to them."""
RUN_FILES = (*RUN_RECORDS, LOCK_FILE, HOLDER_FILE, "config.json", "log_steps.txt", "messages.txt", "curves.png", "tensorboard")
"""Every file a run writes in its folder: none may be a link (it would be written through), and only the
temporary files of these are removed as left by a killed save."""
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def run_records(folder: Path) -> list[str]:
    """The files of another run in `folder` (checkpoints, log), by name."""
    return sorted({path.name for pattern in RUN_RECORDS for path in folder.glob(pattern)})


def claim_run_folder(args: argparse.Namespace, explicit: bool, resources: contextlib.ExitStack) -> Path:
    """The folder this run writes to, checked writable and locked for the run (`resources` releases it).

    A fresh run never takes a folder that holds another run's checkpoints or log: a folder given with
    --run_folder (`explicit`) is refused, one named under -s / --save_folder is replaced by the next free
    `<name>-2`, `<name>-3`, ... Orphan temporary files of a killed save are removed once the lock is held.
    """
    folder = Path(args.save_folder)
    if not args.is_continue and folder.is_dir() and run_records(folder):
        if explicit:
            raise SettingsError(f"{folder} already holds a run ({', '.join(run_records(folder))}): add "
                                "--is_continue to continue it, or delete that folder (or pass another --run_folder) to "
                                "start afresh")
        taken = folder
        folder = next(candidate for candidate in (folder.with_name(f"{folder.name}-{n}") for n in range(2, 10**6))
                      if not (candidate.is_dir() and run_records(candidate)))
        info(f"{taken} already holds a run (continue it with --is_continue); this run goes to {folder}")
    check_output_folder(folder, "--run_folder" if explicit else "--save_folder")
    resources.enter_context(folder_lock(folder))
    links = sorted(path for pattern in RUN_FILES for path in folder.glob(pattern) if path.is_symlink())
    if links:
        raise link_error(links[0])
    for orphan in remove_orphan_temporaries(folder, RUN_FILES):
        info(f"removed {orphan}, left by a save that was killed")
    return folder


FOLDER_FLAGS = ("-s", "--save_folder", "--run_folder", "--local-rank", "--local_rank")
"""Left out of a resume command, which names the run's own folder (and is started by torchrun)."""


def resume_command(args: argparse.Namespace, leave_out: tuple[str, ...] = ()) -> str:
    """The command that continues this run (the current one plus --is_continue and its --run_folder),
    without the flags in `leave_out` (and their values)."""
    argv, drop_value = [], False
    for arg in sys.argv[1:]:
        if drop_value:
            drop_value = False
        elif arg.split("=", 1)[0] in leave_out + FOLDER_FLAGS:
            drop_value = "=" not in arg
        elif arg != "--is_continue":
            argv.append(arg)
    argv += ["--run_folder", args.save_folder]
    return shlex.join([*launcher_command(args.world_size), sys.argv[0], *argv, "--is_continue"])


def launcher_command(world_size: int) -> list[str]:
    """How this run's processes were started: python, torchrun on one machine, or torchrun on several nodes
    (`LOCAL_WORLD_SIZE` processes each; the rendezvous endpoint is the user's, shown as HOST:PORT)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size == 1:
        return ["python"]
    if per_node >= world_size:
        return ["torchrun", "--standalone", f"--nproc_per_node={world_size}"]
    return ["torchrun", f"--nnodes={world_size // per_node}", f"--nproc_per_node={per_node}", "--rdzv_backend=c10d",
            "--rdzv_endpoint=HOST:PORT"]


def next_steps(args: argparse.Namespace, checkpoint: Path) -> str:
    """The commands that use the trained `checkpoint`: the published evaluation protocol on the test split,
    and few-shot prediction on a folder of the user's own images."""
    data_root = ["--data_root", args.data_root] if args.data_root else []
    evaluate_script = REPOSITORY_ROOT / "eval_bml.sh"
    if evaluate_script.is_file():   # a checkout: the original's command
        if evaluate_script.is_relative_to(Path.cwd()):
            evaluate_script = evaluate_script.relative_to(Path.cwd())
        evaluate = ["bash", str(evaluate_script), args.dataset, args.transform, str(checkpoint), str(args.n_shots)]
    else:   # an installed package: the console command, whose defaults are the published protocol
        evaluate = ["bml-eval", "--dataset", args.dataset, "--transform", args.transform, "--ckp_path",
                    str(checkpoint), "--n_shots", str(args.n_shots)]
    rule = episode_rule(args)   # a run validated under a rule (Lake's protocol) is evaluated under it too
    way = args.n_ways if rule.label else 5
    rule_flags = ["--n_ways", str(way), *episode_rule_flags(rule)] if rule.label else []
    evaluate_command = shlex.join([*evaluate, *data_root, *rule_flags])
    predict_command = shlex.join(["python", "-m", "bml.predict", "--ckp_path", str(checkpoint),
                                  "--support", "SUPPORT/", "--query", "IMAGES/", "--sheet", "sheet.png"])
    return (f"Evaluate it with the published protocol (10 seeds x 2,000 {way}-way {args.n_shots}-shot "
            f"episodes of the test split{', ' + rule.description if rule.label else ''}):\n"
            f"  {evaluate_command}\n"
            "Classify your own images (SUPPORT/ holds one sub-folder of examples per class; IMAGES/ an image or "
            f"a folder):\n  {predict_command}")
