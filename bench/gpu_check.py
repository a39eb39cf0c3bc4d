"""One command that tells, within one short GPU lease, whether this project trains and evaluates on the machine.

    bash bench/gpu_check.sh [--budget 480] [--only CHECK ...] [--out PATH]

Checks, the decisive ones first, each in its own process with its own timeout (a CUDA error or a hang in one
cannot fail the next); each ends `passed`, `failed` (with the tail of its output) or `not_run` (with the
reason: CUDA only, a check it needs did not pass, or `--budget` seconds would be overrun by its estimated
cost, which stops it being started):

1. `doctor`: `python -m bml.doctor --json` (versions, GPUs and this build's kernels, NCCL, free space, data);
2. `synthetic_data`, then `train_default`, `train_fp32` (`--tf32 off`), `train_bf16` (`--amp bf16`): the real
   trainer through `bash train_bml.sh miniImageNet` on a learnable synthetic set in the miniImageNet layout
   (`bench/synthetic_mini.py`), transform A with `--augment device`, a few short epochs validated on val: the
   loss falls, validation beats chance (20% in 5-way) by MIN_MARGIN points, and `last.pth` resumes with
   `--is_continue` for one more epoch;
3. `eval`: `bash eval_bml.sh` on that best.pth (the published 10 x 2,000 episodes on a GPU), above chance;
4. `sync_debug`: blocking host-device synchronisations over 3 steady training steps (`bench/sync_check.py`,
   `torch.cuda.set_sync_debug_mode("warn")`), expected 0;
5. `train_step`: `bench/train_step.py`, the published 2-episode step: seconds, images/s, peak memory and the
   fraction of the device's peak (bf16 matrix product) for fp32, TF32, bf16, channels_last and torch.compile;
6. `ddp`: two processes of one episode each against one of two (`bench/step_checks.py`; NCCL on 2+ GPUs,
   else Gloo);
7. `cuda_tests`: `pytest -m cuda`;

then, as the budget allows, `step_equality` (the fp32 step against the CPU's; fp16, bf16, channels_last
against fp32), `compile` (no recompilation between epochs), `data_speed` and `eval_speed` (the benchmarks).

The report, one JSON object, is rewritten atomically after every check: `--out` if given, else
`$OUT/gpu_check.json` when $OUT is set, else `gpu_check.json` in the run's folder (`--folder`, default
`output/gpu_check/<time>/`, which also holds the synthetic data, the runs and each check's log). A report
of a run that was stopped lists the check it stopped in and those not reached as `not_run`, with
`finished: false`. Without a GPU (or with `--cpu`) the same checks run on the CPU at tiny sizes (16 px, width
0.125, an epoch of a few small episodes) and the CUDA-only ones are `not_run`. Exit status: 0 when nothing
failed (the summary line counts what was not run), 1 when a check failed, 143 / 130 when stopped by
SIGTERM / SIGINT.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_BUDGET_S = 480
KILL_GRACE_S = 10
TIMEOUT_SLACK_S = 45
"""A check may run this much past the budget before it is killed (its timeout is at most the budget left plus
this), so that a run started with --budget B ends within about B + 45 s."""
TAIL_CHARACTERS = 3000
CHANCE = 100 / 5                # % correct of a 5-way guess (validation and evaluation are 5-way)
MIN_MARGIN = 20.0
"""Points above chance that validation and evaluation must reach on the synthetic set."""
ACCURACY_NEEDED = CHANCE + MIN_MARGIN
PASSED, FAILED, NOT_RUN = "passed", "failed", "not_run"


@dataclass(frozen=True)
class Scale:
    """Sizes of one mode: the GPU's (the published model and episodes) or the CPU's (tiny)."""

    image_size: int
    width: float
    per_class: int
    epochs: int                       # of the first run; the resumed run trains one more
    episodes_per_epoch: int
    val_episodes: int
    train_flags: tuple[str, ...]      # further train_bml.py flags
    eval_flags: tuple[str, ...]       # further eval_bml.py flags
    bench_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)


GPU = Scale(image_size=84, width=1.0, per_class=60, epochs=2, episodes_per_epoch=10, val_episodes=200,
            train_flags=(), eval_flags=(),
            bench_flags={"train_step.py": ("--steps", "5", "--warmup", "2", "--no-local-loss"),
                         "data_speed.py": (), "eval_speed.py": ("--images", "12000", "--per_episode", "20")})
CPU = Scale(image_size=16, width=0.125, per_class=20, epochs=1, episodes_per_epoch=6, val_episodes=40,
            train_flags=("--device", "cpu", "--width", "0.125", "--image_size", "16", "--n_train_ways", "10",
                         "--n_train_shots", "2", "--n_train_queries", "3", "--num_workers", "0"),
            eval_flags=("--device", "cpu", "--episodes", "50", "--seeds", "0", "--num_workers", "0"),
            bench_flags={"train_step.py": ("--steps", "1", "--warmup", "1", "--width", "0.125", "--image-size", "16",
                                           "--no-local-loss", "--no-compile"),
                         "data_speed.py": ("--image-size", "16", "--steps", "1", "--repeats", "1", "--model-steps", "1",
                                           "--width", "0.125", "--loader-steps", "2", "--loader-workers", "1"),
                         "eval_speed.py": ("--images", "200", "--classes", "5", "--width", "0.125", "--image_size",
                                           "16", "--seeds", "1", "--episodes", "50", "--per_episode", "2",
                                           "--device", "cpu")})


@dataclass(frozen=True)
class Run:
    """What every check process needs, written once to `<folder>/run.json`."""

    mode: str                 # "gpu" or "cpu"
    folder: str
    compile_backend: str

    @property
    def scale(self) -> Scale:
        return GPU if self.mode == "gpu" else CPU

    @property
    def data_root(self) -> Path:
        return Path(self.folder) / "data"

    def path(self, *parts: str) -> Path:
        return Path(self.folder).joinpath(*parts)


# ----------------------------------------------------------------------------------------------
# Running commands from a check process


def command_environment() -> dict[str, str]:
    """This Python first on PATH and as $PYTHON (the shell scripts use it), the repository on PYTHONPATH."""
    python_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PYTHON": sys.executable, "PATH": os.pathsep.join([python_dir, os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_command(command: list[str], log: Path) -> tuple[int, str]:
    """(exit status, stdout) of `command` in the repository; stdout and stderr appended to `log`. The check's own
    timeout (its process group is killed) bounds it."""
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, cwd=ROOT, env=command_environment(), stdout=subprocess.PIPE,
                                stderr=handle, text=True)
        handle.write(result.stdout)
    return result.returncode, result.stdout


def tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-TAIL_CHARACTERS:]
    except OSError:
        return ""


def failed(message: str, log: Path | None = None, **figures) -> dict:
    return {"status": FAILED, "error": message + (f"\n--- output tail ---\n{tail(log)}" if log else ""), **figures}


# ----------------------------------------------------------------------------------------------
# The checks (each runs in its own process: `gpu_check.py --child NAME --folder FOLDER`)


def check_doctor(run: Run, log: Path) -> dict:
    status, stdout = run_command([sys.executable, "-m", "bml.doctor", "--json"], log)
    report = json.loads(stdout) if stdout.strip().startswith("{") else None
    figures = {"report": report}
    if status != 0:
        problems = "\n".join(report["problems"]) if report else "the doctor did not answer"
        return failed(f"python -m bml.doctor found what would stop training:\n{problems}", log, **figures)
    return {"status": PASSED, **figures}


def check_synthetic_data(run: Run, log: Path) -> dict:
    from synthetic_mini import write_synthetic_mini

    scale = run.scale
    written = write_synthetic_mini(run.data_root, image_size=scale.image_size, per_class=scale.per_class)
    return {"status": PASSED, "data_root": str(run.data_root), "image_size": scale.image_size, "splits": written}


PRECISION_FLAGS = {"default": (), "fp32": ("--tf32", "off"), "bf16": ("--amp", "bf16")}


def read_log(folder: Path) -> list[dict]:
    path = folder / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def check_train(run: Run, log: Path, precision: str) -> dict:
    """Train `scale.epochs` epochs, resume from last.pth for one more; judge the log."""
    scale, folder = run.scale, run.path(f"train_{precision}")
    command = ["bash", str(ROOT / "train_bml.sh"), "miniImageNet", "--data_root", str(run.data_root), "-s", str(folder),
               "--augment", "device", "--transform", "A", "--eval_freq", "1", "--val_episodes", str(scale.val_episodes),
               "--episodes_per_epoch", str(scale.episodes_per_epoch), "--print_freq", "1000", *scale.train_flags,
               *PRECISION_FLAGS[precision]]
    started = time.perf_counter()
    status, _ = run_command([*command, "--epochs", str(scale.epochs)], log)
    first_s = time.perf_counter() - started
    if status != 0:
        return failed(f"training exited with {status}", log)
    status, stdout = run_command([*command, "--epochs", str(scale.epochs + 1), "--is_continue"], log)
    epochs = read_log(folder)
    figures = {"folder": str(folder), "flags": list(PRECISION_FLAGS[precision]), "first_run_s": first_s,
               "resumed_run_s": time.perf_counter() - started - first_s,
               "epochs": [{key: epoch.get(key) for key in ("epoch", "train_total", "val_acc", "train_images_per_s")}
                          for epoch in epochs]}
    if status != 0:
        return failed(f"the run resumed with --is_continue exited with {status}", log, **figures)
    losses = [epoch["train_total"] for epoch in epochs]
    accuracy = max((epoch.get("val_acc", 0.0) for epoch in epochs), default=0.0)
    figures.update(loss_first_epoch=losses[0] if losses else None, loss_last_epoch=losses[-1] if losses else None,
                   best_val_acc=accuracy, val_acc_needed=ACCURACY_NEEDED)
    problems = []
    if [epoch["epoch"] for epoch in epochs] != list(range(1, scale.epochs + 2)) or "Resuming" not in stdout:
        problems.append(f"expected epochs 1..{scale.epochs + 1} in log.txt, the last one resumed from last.pth; "
                        f"found {[epoch.get('epoch') for epoch in epochs]}")
    if len(losses) >= 2 and not losses[-1] < losses[0]:
        problems.append(f"the training loss did not fall: {losses}")
    if accuracy < ACCURACY_NEEDED:
        problems.append(f"validation reached {accuracy:.1f}%, not the {ACCURACY_NEEDED:.0f}% needed "
                        f"(chance {CHANCE:.0f}%)")
    return failed("; ".join(problems), log, **figures) if problems else {"status": PASSED, **figures}


def check_eval(run: Run, log: Path) -> dict:
    from bml.scoring import COMBINED

    checkpoint = run.path("train_default", "best.pth")
    results = run.path("eval", "results.json")
    status, _ = run_command(["bash", str(ROOT / "eval_bml.sh"), "miniImageNet", "A", str(checkpoint), "5",
                             "--data_root", str(run.data_root), "--output_dir", str(run.path("eval")),
                             "--json", str(results), "--no_progress", *run.scale.eval_flags], log)
    if status != 0:
        return failed(f"eval_bml.sh exited with {status}", log)
    figures = json.loads(results.read_text())
    accuracy = float(figures["results"][COMBINED]["acc"])
    if accuracy < ACCURACY_NEEDED:
        return failed(f"5-way 5-shot test accuracy {accuracy:.1f}%, not the {ACCURACY_NEEDED:.0f}% needed", log,
                      results=figures)
    return {"status": PASSED, "accuracy": accuracy, "accuracy_needed": ACCURACY_NEEDED, "results": figures}


def check_bench(run: Run, log: Path, script: str, judge: Callable[[dict], str | None] = lambda figures: None) -> dict:
    """A bench script with this mode's flags; its JSON figures, and `judge`'s objection (None: passed)."""
    figures_path = run.path(f"{Path(script).stem}.json")
    status, _ = run_command([sys.executable, str(ROOT / "bench" / script), *run.scale.bench_flags.get(script, ()),
                             "--json", str(figures_path)], log)
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else None
    if status != 0 or figures is None:
        return failed(f"bench/{script} exited with {status}", log, figures=figures)
    objection = judge(figures)
    return failed(objection, log, figures=figures) if objection else {"status": PASSED, "figures": figures}


def check_sync(run: Run, log: Path) -> dict:
    figures_path = run.path("sync_check.json")
    status, _ = run_command([sys.executable, str(ROOT / "bench" / "sync_check.py"), "--json", str(figures_path)], log)
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else None
    if figures is None:
        return failed(f"bench/sync_check.py exited with {status}", log)
    if figures["control_item_synchronisations"] != 1:
        return failed("a control .item() under torch.cuda.set_sync_debug_mode('warn') was not counted once: the "
                      "count cannot be trusted", log, **figures)
    if figures["synchronisations"]:
        return failed(f"{figures['synchronisations']} blocking synchronisations in {figures['steps']} steady steps "
                      f"(expected 0), at: {figures['places']}", **figures)
    return {"status": PASSED, **figures}


def check_cuda_tests(run: Run, log: Path) -> dict:
    status, stdout = run_command([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                  str(ROOT / "tests")], log)
    summary = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    if status != 0 or "passed" not in summary:
        return failed(f"pytest -m cuda: {summary or f'exit status {status}'}", log, summary=summary)
    return {"status": PASSED, "summary": summary}


def step_check(run: Run, log: Path, name: str) -> dict:
    import torch

    import step_checks

    device = torch.device("cuda", 0) if run.mode == "gpu" else torch.device("cpu")
    size = step_checks.FULL if run.mode == "gpu" else step_checks.TINY
    result = {"step_equality": lambda: step_checks.step_equality(device, size),
              "compile": lambda: step_checks.compile_check(device, size, run.compile_backend),
              "ddp": lambda: step_checks.ddp_check(device, size)}[name]()
    ok = result.pop("ok")
    return {"status": PASSED if ok else FAILED, **({} if ok else {"error": json.dumps(result, default=str)}), **result}


def train_step_judge(figures: dict) -> str | None:
    return None if figures.get("train_step") else "bench/train_step.py timed no step"


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Run, Path], dict]
    estimate_s: tuple[float, float]          # (GPU, CPU): decides whether it is started within the budget
    needs: tuple[str, ...] = ()
    cuda_only: str | None = None             # why it cannot run without CUDA

    def estimate(self, mode: str) -> float:
        return self.estimate_s[0 if mode == "gpu" else 1]

    def timeout(self, mode: str) -> float:
        return 3 * self.estimate(mode) + 60


CHECKS = (
    Check("doctor", check_doctor, (20, 10)),
    Check("synthetic_data", check_synthetic_data, (15, 8)),
    Check("train_default", lambda run, log: check_train(run, log, "default"), (50, 50), needs=("synthetic_data",)),
    Check("train_fp32", lambda run, log: check_train(run, log, "fp32"), (60, 50), needs=("synthetic_data",),
          cuda_only="--tf32 off differs from the default only on CUDA GPUs (TF32 is a GPU format)"),
    Check("train_bf16", lambda run, log: check_train(run, log, "bf16"), (50, 50), needs=("synthetic_data",),
          cuda_only="--amp bf16 is a GPU precision (on a CPU it repeats train_default, slower)"),
    Check("eval", check_eval, (35, 15), needs=("train_default",)),
    Check("sync_debug", check_sync, (30, 0), cuda_only="torch.cuda.set_sync_debug_mode counts CUDA synchronisations"),
    Check("train_step", lambda run, log: check_bench(run, log, "train_step.py", train_step_judge), (100, 20)),
    Check("ddp", lambda run, log: step_check(run, log, "ddp"), (40, 25)),
    Check("cuda_tests", check_cuda_tests, (75, 0),
          cuda_only="the suite's CUDA tests (pytest -m cuda) skip without one"),
    Check("step_equality", lambda run, log: step_check(run, log, "step_equality"), (45, 25)),
    Check("compile", lambda run, log: step_check(run, log, "compile"), (120, 40)),
    Check("data_speed", lambda run, log: check_bench(run, log, "data_speed.py"), (90, 40)),
    Check("eval_speed", lambda run, log: check_bench(run, log, "eval_speed.py"), (60, 25)),
)
CHECK_NAMES = tuple(check.name for check in CHECKS)


def child_main(name: str, folder: str) -> int:
    """Run one check in this process and write its result to `<folder>/results/<name>.json`."""
    run = Run(**json.loads(Path(folder, "run.json").read_text()))
    check = next(check for check in CHECKS if check.name == name)
    log = run.path("logs", f"{name}.log")
    try:
        result = check.run(run, log)
    except Exception as error:   # reported as the check's failure; the next check still runs
        result = failed(f"{type(error).__name__}: {error}\n{traceback.format_exc()[-TAIL_CHARACTERS:]}")
    write_json(run.path("results", f"{name}.json"), result)
    return 0


# ----------------------------------------------------------------------------------------------
# The orchestrator


class Stopped(Exception):
    """SIGTERM or SIGINT reached the orchestrator."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def write_json(path: Path, value: dict) -> None:
    """Written atomically: a reader, or a kill at any moment, finds the previous or the new report, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str))
    os.replace(temporary, path)


def die_with_parent() -> None:
    """In the check process before it starts: the kernel kills it if the orchestrator dies (even by SIGKILL)."""
    os.setsid()
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def kill_group(process: subprocess.Popen) -> None:
    """SIGTERM to the check's whole process group (trainers, loader workers, torchrun), SIGKILL if it lingers."""
    for signum, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(run: Run, check: Check, timeout: float) -> dict:
    result_path = run.path("results", f"{check.name}.json")
    result_path.unlink(missing_ok=True)
    log = run.path("logs", f"{check.name}.log")
    command = [sys.executable, str(Path(__file__).resolve()), "--child", check.name, "--folder", run.folder]
    with open(log, "a") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=command_environment(), stdout=handle, stderr=handle,
                                   preexec_fn=die_with_parent)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process)
            return failed(f"timed out after {timeout:.0f} s (its estimate: {check.estimate(run.mode):.0f} s); killed",
                          log)
        except Stopped:
            kill_group(process)
            raise
    if not result_path.is_file():
        return failed(f"the check's process exited with {process.returncode} without a result", log)
    return json.loads(result_path.read_text())


def not_run_reason(check: Check, run: Run, results: dict, elapsed: float, budget: float) -> str | None:
    if check.cuda_only and run.mode == "cpu":
        return f"needs a CUDA GPU: {check.cuda_only}"
    for needed in check.needs:
        status = results.get(needed, {}).get("status")
        if status != PASSED:
            return f"needs {needed}, which {'failed' if status == FAILED else 'was not run'}"
    if elapsed + check.estimate(run.mode) > budget:
        return (f"would overrun the budget: estimated {check.estimate(run.mode):.0f} s, "
                f"{max(budget - elapsed, 0):.0f} s of --budget {budget:.0f} left")
    return None


def first_line(entry: dict) -> str:
    """What the console shows of a check that did not pass: its reason, or its error's first line."""
    if entry["status"] == PASSED:
        return ""
    text = entry.get("reason") or entry.get("error") or ""
    return text.splitlines()[0] if text else ""


def summary_line(report: dict) -> str:
    counts = {status: sum(check["status"] == status for check in report["checks"].values())
              for status in (PASSED, FAILED, NOT_RUN)}
    total = len(report["checks"])
    if counts[PASSED] == total:
        return f"all {total} checks passed in {report['elapsed_s']:.0f} s"
    not_run = [name for name, check in report["checks"].items() if check["status"] == NOT_RUN]
    failed_names = [name for name, check in report["checks"].items() if check["status"] == FAILED]
    return (f"{counts[PASSED]} of {total} checks passed, {counts[FAILED]} failed"
            + (f" ({', '.join(failed_names)})" if failed_names else "")
            + f", {counts[NOT_RUN]} not run" + (f" ({', '.join(not_run)}: see each reason)" if not_run else "")
            + f", in {report['elapsed_s']:.0f} s")


def report_path(args: argparse.Namespace, folder: Path) -> Path:
    if args.out:
        return Path(args.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return folder / "gpu_check.json"


def copy_log(run: Run, name: str) -> None:
    """Each check's log also beside a report under $OUT (what comes back from a lent machine)."""
    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"]) / "gpu_check_logs" / f"{name}.log"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.path("logs", f"{name}.log"), target)


def orchestrate(args: argparse.Namespace) -> int:
    start = time.monotonic()
    import torch

    mode = "gpu" if torch.cuda.is_available() and not args.cpu else "cpu"
    folder = Path(args.folder or ROOT / "output" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S")).absolute()
    run = Run(mode=mode, folder=str(folder), compile_backend=args.compile_backend or
              ("inductor" if mode == "gpu" else "eager"))
    run.path("logs").mkdir(parents=True, exist_ok=True)
    write_json(run.path("run.json"), asdict(run))
    out = report_path(args, folder)
    selected = [check for check in CHECKS if not args.only or check.name in args.only]
    report = {"mode": "gpu (full size)" if mode == "gpu" else "cpu (tiny sizes)", "folder": str(folder),
              "budget_s": args.budget, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if mode == "gpu" else "cpu", "finished": False,
              "elapsed_s": 0.0, "checks": {check.name: {"status": NOT_RUN, "reason": "not reached: the run stopped "
                                                        "before it", "estimate_s": check.estimate(mode)}
                                           for check in selected}}

    def stop(signum, frame):
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"gpu_check: {report['mode']} on {report['device']}, budget {args.budget:.0f} s; report: {out}", flush=True)
    exit_status = 0
    try:
        for check in selected:
            elapsed = time.monotonic() - start
            entry = report["checks"][check.name]
            reason = not_run_reason(check, run, report["checks"], elapsed, args.budget)
            if reason is None:
                entry["reason"] = f"started at {elapsed:.0f} s and did not finish: the run stopped during it"
                report["elapsed_s"] = elapsed
                write_json(out, report)
                timeout = min(check.timeout(mode), args.budget - elapsed + TIMEOUT_SLACK_S)
                result = run_child(run, check, timeout)
                copy_log(run, check.name)
                entry.clear()
                entry.update(result, estimate_s=check.estimate(mode), seconds=time.monotonic() - start - elapsed,
                             log=str(run.path("logs", f"{check.name}.log")))
            else:
                entry.update(reason=reason)
            report["elapsed_s"] = time.monotonic() - start
            write_json(out, report)
            print(f"{check.name:15s} {entry['status']:8s} {entry.get('seconds', 0):6.0f} s  {first_line(entry)}",
                  flush=True)
    except Stopped as stopped:
        for entry in report["checks"].values():
            if entry.get("reason", "").startswith("started at"):
                entry["reason"] = f"stopped by {stopped} during it"
        exit_status = 128 + stopped.signum
    report["finished"] = exit_status == 0
    report["elapsed_s"] = time.monotonic() - start
    report["summary"] = summary_line(report)
    write_json(out, report)
    print(f"{report['summary']}; report: {out}", flush=True)
    if exit_status:
        return exit_status
    return 1 if any(entry["status"] == FAILED for entry in report["checks"].values()) else 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds: a check whose estimated cost would overrun them is not started (not_run)")
    parser.add_argument("--only", nargs="+", choices=CHECK_NAMES, metavar="CHECK",
                        help=f"run only these checks (and nothing they need): {', '.join(CHECK_NAMES)}")
    parser.add_argument("--out", default=None, help="the JSON report (default: $OUT/gpu_check.json, else in --folder)")
    parser.add_argument("--folder", default=None,
                        help="the run's folder: synthetic data, runs, logs (default: output/gpu_check/<time>)")
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU checks even when a GPU is visible")
    parser.add_argument("--compile_backend", default=None,
                        help="torch.compile backend of the compile check (default: inductor on a GPU, eager on a CPU)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.child:
        return child_main(args.child, args.folder)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
