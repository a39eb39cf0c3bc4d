"""`python -m bml.doctor`: the machine's report on simulated GPUs (compute capability 7.0 with a build that lacks
sm_70, 8.0, 9.0, none) and on a data root with complete and incomplete benchmark folders, without reading an
image."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from bml import doctor
from bml.utils.device import LEGACY_CUDA_INDEX
from fixtures import make_cub, make_pickle_split_dataset, make_tiered
from test_training import ROOT, subprocess_env

CUDA_13_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


def run_doctor(capsys, *argv: str) -> tuple[int, dict, str]:
    """(exit status, the --json report, stderr)."""
    status = doctor.main(["--json", *argv])
    captured = capsys.readouterr()
    return status, json.loads(captured.out), captured.err


def test_a_gpu_the_build_has_no_kernels_for_names_the_build_to_install(simulate_gpu, tmp_path, capsys):
    """A V100 (7.0) under a CUDA 13 build (sm_75 and newer): exit 1, and the one problem line says which build has
    its kernels and the command that installs it."""
    simulate_gpu((7, 0), arch_list=CUDA_13_ARCHS, name="Tesla V100-SXM2-32GB", memory_gib=32)
    status, report, err = run_doctor(capsys, "--data_root", str(tmp_path / "nowhere"))
    assert status == 1 and not report["ok"]
    (gpu,) = report["gpus"]
    assert (gpu["name"], gpu["capability"], gpu["memory_gib"], gpu["build_has_kernels"]) == \
        ("Tesla V100-SXM2-32GB", "7.0", 32.0, False)
    assert gpu["bf16"].startswith("emulated") and not gpu["tf32_with_default_settings"]
    (problem,) = report["problems"]
    assert "sm_70" in problem and "CUDA 12.6" in problem and f"make install TORCH_INDEX={LEGACY_CUDA_INDEX}" in problem
    assert err.count("ERROR: ") == 1 and problem in err


@pytest.mark.parametrize("capability, name", [((8, 0), "NVIDIA A100-SXM4-80GB"), ((9, 0), "NVIDIA H200")])
def test_ampere_and_hopper_gpus_are_ready(simulate_gpu, tmp_path, capsys, capability, name):
    simulate_gpu(capability, arch_list=CUDA_13_ARCHS, name=name, memory_gib=80, count=2)
    status, report, err = run_doctor(capsys, "--data_root", str(tmp_path / "nowhere"))
    assert status == 0 and report["ok"] and report["problems"] == [] and err == ""
    assert [gpu["index"] for gpu in report["gpus"]] == [0, 1]
    assert all(gpu["build_has_kernels"] and gpu["bf16"] == "native" and gpu["tf32_with_default_settings"]
               for gpu in report["gpus"])
    training = report["training"]
    assert (training["device"], training["processes"], training["augment"], training["tf32_active"]) == \
        ("cuda", 2, "device", True)
    assert report["versions"]["torch"] and report["nccl"]["available"] in (True, False)


def test_cpu_only_machine(tmp_path, capsys):
    status, report, _ = run_doctor(capsys, "--data_root", str(tmp_path / "nowhere"))
    assert status == 0 and report["gpus"] == [] and report["training"]["device"] == "cpu"
    assert report["training"]["loader_workers_per_process"] >= 1 and report["disk"]["cache"]["free_gib"] > 0
    assert report["data"] == {"root": str(tmp_path / "nowhere"), "exists": False, "benchmarks": [],
                              "note": report["data"]["note"]} and "glyphs" in report["data"]["note"]


def test_data_root_with_complete_and_incomplete_benchmarks(tmp_path, capsys, monkeypatch):
    """miniImageNet and tieredImageNet complete; CUB without its bounding-box crops (val/test stop training) and
    FC100 with a pickle cut short by an interrupted download: exit 1, one problem line each, and no image opened."""
    root = make_pickle_split_dataset(tmp_path, "miniImageNet")
    make_tiered(root)
    make_cub(root)
    make_pickle_split_dataset(root, "FC100")
    cut = root / "FC100" / "test.pickle"
    cut.write_bytes(cut.read_bytes()[:-100])
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("the doctor opened an image"))
    status, report, err = run_doctor(capsys, "--data_root", str(root))
    benchmarks = {entry["name"]: entry for entry in report["data"]["benchmarks"]}
    assert status == 1 and set(benchmarks) == {"miniImageNet", "tieredImageNet", "CUB", "FC100"}
    assert benchmarks["miniImageNet"]["complete"] and benchmarks["tieredImageNet"]["complete"]
    assert benchmarks["tieredImageNet"]["splits"]["train"] == {"classes": 7, "images": 42}   # train + val, as trained
    assert not benchmarks["CUB"]["complete"] and not benchmarks["FC100"]["complete"]
    problems = report["problems"]
    assert len(problems) == 3 and all(problem in err for problem in problems)
    assert sum("CUB_test" in problem and "--allow_uncropped_cub" in problem for problem in problems) == 2   # val, test
    assert any("test.pickle is cut short" in problem and "download it again" in problem for problem in problems)

    assert doctor.main(["--data_root", str(root)]) == 1
    text = capsys.readouterr().out
    assert "miniImageNet: complete" in text and "CUB: INCOMPLETE" in text and "3 problem(s)" in text


def test_command_line_prints_json(tmp_path):
    """`python -m bml.doctor --json` as a user runs it: one JSON object on stdout."""
    result = subprocess.run([sys.executable, "-m", "bml.doctor", "--json", "--data_root", str(tmp_path)], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["data"]["exists"] and report["data"]["benchmarks"] == []
