"""`bash bench/gpu_check.sh` on the CPU: its checks at tiny sizes and its report, within a budget, and killed
part-way (the report is rewritten atomically after every check)."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_training import ROOT, subprocess_env

CUDA_ONLY = {"train_fp32", "train_bf16", "sync_debug", "cuda_tests"}
STATUSES = {"passed", "failed", "not_run"}


def gpu_check(tmp_path: Path, *flags: str) -> list[str]:
    return ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--folder", str(tmp_path / "run"),
            "--out", str(tmp_path / "report.json"), *flags]


def environment() -> dict[str, str]:
    return {key: value for key, value in subprocess_env().items() if key != "OUT"}


@pytest.mark.slow
def test_the_trainer_and_the_evaluation_pass_on_synthetic_mini_imagenet(tmp_path):
    """The real trainer (`train_bml.sh`, --augment device, transform A) on the synthetic miniImageNet set: the loss
    falls, validation beats chance by 20 points, last.pth resumes; `eval_bml.sh` on its best.pth; the CUDA-only
    checks are not run, saying why, and the summary does not claim that everything passed (81 s on this machine
    when quiet; a budget no load can exhaust)."""
    checks = ["synthetic_data", "train_default", "train_fp32", "train_bf16", "eval", "sync_debug", "cuda_tests"]
    result = subprocess.run(gpu_check(tmp_path, "--budget", "3600", "--only", *checks), cwd=tmp_path,
                            env=environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["finished"] and report["mode"].startswith("cpu") and list(report["checks"]) == checks
    statuses = {name: check["status"] for name, check in report["checks"].items()}
    assert statuses == {name: "not_run" if name in CUDA_ONLY else "passed" for name in checks}
    assert all("needs a CUDA GPU" in report["checks"][name]["reason"] for name in CUDA_ONLY)
    trained = report["checks"]["train_default"]
    assert [epoch["epoch"] for epoch in trained["epochs"]] == [1, 2]                  # the second one resumed
    assert trained["loss_last_epoch"] < trained["loss_first_epoch"] and trained["best_val_acc"] >= 40
    assert report["checks"]["eval"]["accuracy"] >= 40
    assert report["summary"].startswith("3 of 7 checks passed, 0 failed, 4 not run")
    assert report["summary"] in result.stdout


def test_a_budget_too_small_for_everything_runs_nothing_and_says_why(tmp_path):
    result = subprocess.run(gpu_check(tmp_path, "--budget", "1"), cwd=tmp_path, env=environment(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["finished"] and report["budget_s"] == 1 and len(report["checks"]) == 14
    for name, check in report["checks"].items():
        assert check["status"] == "not_run"
        expected = ("needs a CUDA GPU" if name in CUDA_ONLY else "needs " if name in ("train_default", "eval")
                    else "would overrun the budget")
        assert check["reason"].startswith(expected), (name, check["reason"])
    assert report["summary"].startswith("0 of 14 checks passed, 0 failed, 14 not run")


def test_a_run_killed_after_its_first_check_leaves_a_valid_partial_report(tmp_path):
    """SIGKILL (no chance to write anything) once the doctor's result is in: the report on disk is whole JSON, with
    the doctor's result, the check that was running and those not reached as not_run, and finished false; the
    check's own process dies with the orchestrator."""
    report_path = tmp_path / "report.json"
    process = subprocess.Popen(gpu_check(tmp_path, "--only", "doctor", "synthetic_data", "train_default"),
                               cwd=tmp_path, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            report = json.loads(report_path.read_text()) if report_path.is_file() else None
            if report and report["checks"]["doctor"]["status"] != "not_run":
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    report = json.loads(report_path.read_text())
    assert not report["finished"] and set(report["checks"]) == {"doctor", "synthetic_data", "train_default"}
    assert report["checks"]["doctor"]["status"] == "passed" and report["checks"]["doctor"]["report"]["versions"]
    later = [report["checks"][name] for name in ("synthetic_data", "train_default")]
    assert all(check["status"] == "not_run" for check in later)
    assert later[0]["reason"].startswith(("started at", "not reached")) and later[1]["reason"].startswith("not reached")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _check_processes(tmp_path):
        time.sleep(0.5)
    assert not _check_processes(tmp_path)


def _check_processes(tmp_path: Path) -> list[str]:
    """Command lines of the processes still running a check of this run."""
    found = []
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = status.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "--child" in command and str(tmp_path / "run") in command:
            found.append(command)
    return found
