"""One command that tells whether this project works on a GPU machine, end to end; one JSON report.

    bash bench/gpu_check.sh [--out gpu_check.json]        # or: python bench/gpu_check.py

On a GPU (about 5-8 minutes on one GPU), at full size (BML ResNet-12, width 1.0, one published
15-way 5-shot 7-query episode of 84 px images):

- `environment`: GPU name, compute capability, torch / CUDA / cuDNN versions, the build's architectures,
  and whether the build has kernels for the GPU (the training scripts stop early when it has not);
- `cuda_tests`: the test suite's CUDA tests (`pytest -m cuda`);
- `fp32_matches_cpu`: one training step (forward, backward of the loss) on the GPU with TF32 off, against
  the same step on the CPU from the same weights and images: the loss within 1e-4 relative and the
  gradients within 1e-3 relative L2 distance (different convolution algorithms sum in different orders);
- `fp16_step`, `bf16_step`: the same step under autocast (fp16 with the gradient scaler, whose overflowing
  first steps are skipped as in training; bf16 where the GPU has it natively, else what `--amp bf16` falls
  back to): finite, gradients within 0.5 relative L2 distance of fp32's (their cosine is reported too);
- `channels_last`: the fp32 step in channels-last memory format, gradients within 1e-3 of fp32's;
- `compile`: the training loss under `torch.compile` (`--compile_backend`, default inductor), 3 epochs
  of 2 steps: the loss of its first step against eager (1e-3 relative), the graphs compiled after each
  epoch (no recompilation after the first epoch) and the eager and compiled step times;
- `ddp`: 2 processes of one episode each (NCCL, with 2+ GPUs) against one process running both: the
  same averaged gradients (1e-4 relative);
- `train_step_bench`, `eval_speed_bench`: `bench/train_step.py` and `bench/eval_speed.py` at full size,
  their JSON figures included; `data_speed_bench`: `bench/data_speed.py` (host work per training image,
  the device augmentation's and the model's images per second, transforms A-E).

Without a GPU (or with `--cpu`) the same checks run on the CPU at tiny size (width 0.125, 32 px,
5-way 2-shot 3-query episodes, Gloo for DDP, the benchmarks at tiny settings), which the test suite
runs, so the command is known to work before a GPU is at hand. The exit code is 0 when every check
passed (a check that cannot run here is reported as skipped, with the reason).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bml.training.engine import forward_backward  # noqa: E402
from bml.training.state import TrainComponents  # noqa: E402
from bml.models import BML  # noqa: E402
from bml.recipes import BML_LOSSES  # noqa: E402
from bml.training.wrappers import wrap_for_training  # noqa: E402
from bml.utils.device import build_runs_on, configure_tf32, gpu_info, resolve_amp  # noqa: E402
from bml.utils.distributed import DistributedContext  # noqa: E402

FP32_LOSS_RTOL = 1e-4
FP32_GRAD_RTOL = 1e-3
AMP_GRAD_RTOL = 0.5          # bf16 keeps 8 mantissa bits: at random init 0.1-0.3 from fp32's gradients
MAX_SCALER_SKIPS = 16        # fp16: overflowing first steps are skipped and the scale halved, as in training
COMPILE_LOSS_RTOL = 1e-3
DDP_GRAD_RTOL = 1e-4


@dataclass(frozen=True)
class Size:
    """The model and episode of every step check."""

    width: float
    image_size: int
    way: int
    shot: int
    query: int
    num_classes: int = 64

    @property
    def images(self) -> int:
        return self.way * (self.shot + self.query)


FULL = Size(width=1.0, image_size=84, way=15, shot=5, query=7)
TINY = Size(width=0.125, image_size=32, way=5, shot=2, query=3)


# ----------------------------------------------------------------------------------------------
# One training step, as the trainer runs it (engine.forward_backward), on any device and precision


def episode_batch(size: Size, episodes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(episodes, images, 3, S, S) random images and base-class labels, the same on every call."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(episodes, size.images, 3, size.image_size, size.image_size, generator=generator)
    labels = torch.randint(0, size.num_classes, (episodes, size.images), generator=generator)
    return images, labels


def loss_settings(size: Size, epoch: int = 1) -> dict:
    return {"way": size.way, "shot": size.shot, "query": size.query,
            "epoch": torch.tensor(float(epoch), dtype=torch.float64), "max_epoch": 100, **BML_LOSSES.model_settings()}


def build_parts(size: Size, device: torch.device, amp: str = "off", channels_last: bool = False,
                compile_backend: str | None = None, context: DistributedContext | None = None) -> TrainComponents:
    """The trainer's components for a BML of `size` from fixed weights (no dropout: steps compare exactly),
    the loss compiled with `compile_backend` if given."""
    torch.manual_seed(0)
    model = BML(size.num_classes, width=size.width, drop_rate=0.0).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    context = context or DistributedContext(0, 0, 1, device)
    loss_module, ddp = wrap_for_training(argparse.Namespace(compile=False), model, context)
    if compile_backend:
        loss_module = torch.compile(loss_module, backend=compile_backend)
    dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    return TrainComponents(model=model, loss_module=loss_module, ddp=ddp,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
                           scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"), device=device,
                           amp_dtype=dtype, channels_last=channels_last)


def step_gradients(parts: TrainComponents, batch, settings: dict) -> tuple[float, torch.Tensor]:
    """(total loss, all gradients unscaled as one float64 CPU vector) of one forward/backward."""
    names, terms = forward_backward(parts, *batch, settings, step=0)
    scale = parts.scaler.get_scale() if parts.scaler.is_enabled() else 1.0
    gradients = torch.cat([p.grad.flatten().double().cpu() for p in parts.model.parameters()]) / scale
    return float(terms[names.index("total")]), gradients


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Checks: each returns a dict with 'ok' (True/False) or 'skipped' (the reason), and its figures


def check_environment(device: torch.device) -> dict:
    gpu = gpu_info(device)
    report = {"ok": True, "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
              "python": platform.python_version(), "gpu": None if gpu is None else gpu.as_dict(),
              "gpus_visible": torch.cuda.device_count(), "arch_list": torch.cuda.get_arch_list()}
    if gpu is not None:
        report["ok"] = report["build_has_kernels"] = build_runs_on(gpu.capability, report["arch_list"])
    return report


def check_cuda_tests(timeout: float) -> dict:
    """The suite's CUDA tests; on a CPU they are collected and skipped (their count is reported)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    result = run_subprocess(command, timeout)
    summary = result["output_tail"].strip().splitlines()[-1] if result["output_tail"].strip() else ""
    report = {"ok": result["returncode"] == 0, "summary": summary, "seconds": result["seconds"]}
    if not report["ok"]:
        report["output_tail"] = result["output_tail"]
    return report


def check_fp32_matches_cpu(device: torch.device, size: Size) -> dict:
    batch, settings = episode_batch(size), loss_settings(size)
    configure_tf32("off")
    try:
        loss, gradients = step_gradients(build_parts(size, device), batch, settings)
    finally:
        configure_tf32("on")
    cpu_loss, cpu_gradients = step_gradients(build_parts(size, torch.device("cpu")), batch, settings)
    loss_error = abs(loss - cpu_loss) / abs(cpu_loss)
    gradient_error = relative_distance(gradients, cpu_gradients)
    return {"ok": loss_error <= FP32_LOSS_RTOL and gradient_error <= FP32_GRAD_RTOL, "loss": loss,
            "cpu_loss": cpu_loss, "loss_relative_error": loss_error, "gradient_relative_error": gradient_error,
            "tolerance": {"loss": FP32_LOSS_RTOL, "gradients": FP32_GRAD_RTOL}, "tf32": "off"}


def check_variant(device: torch.device, size: Size, amp: str = "off", channels_last: bool = False) -> dict:
    """One step in `amp` / channels_last against the fp32 step on the same device."""
    batch, settings = episode_batch(size), loss_settings(size)
    resolved, warnings = resolve_amp(amp, None, device)
    reference_loss, reference = step_gradients(build_parts(size, device), batch, settings)
    parts = build_parts(size, device, resolved, channels_last)
    for skipped in range(MAX_SCALER_SKIPS):
        loss, gradients = step_gradients(parts, batch, settings)
        if torch.isfinite(gradients).all():
            break
        parts.scaler.step(parts.optimizer)    # finds the overflow and skips the update
        parts.scaler.update()                 # halves the scale
        parts.optimizer.zero_grad(set_to_none=True)
    error = relative_distance(gradients, reference)
    tolerance = AMP_GRAD_RTOL if resolved != "off" else FP32_GRAD_RTOL
    finite = bool(torch.isfinite(gradients).all()) and abs(loss) < float("inf")
    cosine = float(torch.nn.functional.cosine_similarity(gradients, reference, dim=0))
    report = {"ok": finite and error <= tolerance, "amp": resolved, "warnings": warnings, "loss": loss,
              "fp32_loss": reference_loss, "gradient_relative_error": error, "gradient_cosine": cosine,
              "tolerance": tolerance}
    if parts.scaler.is_enabled():
        report.update(skipped_overflow_steps=skipped, scale=parts.scaler.get_scale())
    return report


def timed_steps(parts: TrainComponents, batch, size: Size, epochs: int, steps: int) -> tuple[list[float], list[int]]:
    """Seconds of every step and the compiled graphs after each epoch (torch._dynamo's counter)."""
    from torch._dynamo.utils import counters

    times, graphs = [], []
    for epoch in range(1, epochs + 1):
        for _ in range(steps):
            synchronize(parts.device)
            start = time.perf_counter()
            forward_backward(parts, *batch, loss_settings(size, epoch), step=0)
            parts.optimizer.zero_grad(set_to_none=True)
            synchronize(parts.device)
            times.append(time.perf_counter() - start)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    return times, graphs


def check_compile(device: torch.device, size: Size, backend: str) -> dict:
    import torch._dynamo

    batch = episode_batch(size)
    torch._dynamo.reset()
    eager_loss, _ = step_gradients(build_parts(size, device), batch, loss_settings(size))
    eager_times, _ = timed_steps(build_parts(size, device), batch, size, epochs=1, steps=3)
    parts = build_parts(size, device, compile_backend=backend)
    compiled_loss, _ = step_gradients(parts, batch, loss_settings(size))
    parts.optimizer.zero_grad(set_to_none=True)
    compiled_times, graphs = timed_steps(parts, batch, size, epochs=3, steps=2)
    torch._dynamo.reset()
    error = abs(compiled_loss - eager_loss) / abs(eager_loss)
    recompiled = graphs[-1] - graphs[0]
    return {"ok": error <= COMPILE_LOSS_RTOL and recompiled == 0 and graphs[0] > 0, "backend": backend,
            "loss_relative_error": error,
            "tolerance": COMPILE_LOSS_RTOL, "graphs_after_each_epoch": graphs,
            "graphs_compiled_after_epoch_1": recompiled, "compiled_step_s": min(compiled_times),
            "eager_step_s": min(eager_times[1:])}


def _ddp_worker(rank: int, backend: str, init_file: str, size: Size, out_dir: str) -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        parts = build_parts(size, device, context=DistributedContext(rank, rank, 2, device))
        images, labels = episode_batch(size, episodes=2)
        _, gradients = step_gradients(parts, (images[rank:rank + 1], labels[rank:rank + 1]), loss_settings(size))
        torch.save(gradients, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def check_ddp(device: torch.device, size: Size) -> dict:
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": "NCCL DDP needs 2 GPUs; one is visible"}
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_ddp_worker, args=(backend, str(Path(folder) / "init"), size, folder), nprocs=2, join=True)
        ranks = [torch.load(Path(folder) / f"rank{rank}.pt") for rank in (0, 1)]
    _, single = step_gradients(build_parts(size, device), episode_batch(size, episodes=2), loss_settings(size))
    errors = [relative_distance(gradients, single) for gradients in ranks]
    return {"ok": max(errors) <= DDP_GRAD_RTOL, "backend": backend, "gradient_relative_error_per_rank": errors,
            "tolerance": DDP_GRAD_RTOL}


def run_subprocess(command: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        returncode, stdout, output = result.returncode, result.stdout, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        returncode, stdout, output = None, "", f"timed out after {timeout:.0f} s\n{error.stdout or ''}{error.stderr or ''}"
    return {"returncode": returncode, "stdout": stdout, "output_tail": str(output)[-3000:],
            "seconds": time.perf_counter() - start}


def check_bench(script: str, arguments: list[str], timeout: float, json_path: Path | None = None) -> dict:
    """Run a bench script; its JSON figures come from `json_path`, else from its standard output."""
    if not (ROOT / "bench" / script).is_file():
        return {"skipped": f"bench/{script} does not exist"}
    result = run_subprocess([sys.executable, str(ROOT / "bench" / script), *arguments], timeout)
    report = {"ok": result["returncode"] == 0, "command": f"python bench/{script} {' '.join(arguments)}".strip(),
              "seconds": result["seconds"]}
    try:
        report["figures"] = json.loads(json_path.read_text() if json_path else result["stdout"])
    except (OSError, ValueError):
        report["output_tail"] = result["output_tail"]
    return report


def bench_arguments(tiny: bool, folder: Path) -> dict[str, tuple[list[str], Path | None]]:
    train_json, data_json = folder / "train_step.json", folder / "data_speed.json"
    if tiny:
        return {"train_step.py": (["--steps", "1", "--warmup", "0", "--width", "0.125", "--image-size", "32",
                                   "--json", str(train_json)], train_json),
                "eval_speed.py": (["--images", "200", "--classes", "5", "--width", "0.125", "--image_size", "32",
                                   "--seeds", "1",
                                   "--episodes", "50", "--per_episode", "2", "--device", "cpu"], None),
                "data_speed.py": (["--image-size", "32", "--steps", "1", "--repeats", "1", "--model-steps", "1",
                                   "--width", "0.125", "--json", str(data_json)], data_json)}
    return {"train_step.py": (["--steps", "5", "--warmup", "2", "--json", str(train_json)], train_json),
            "eval_speed.py": (["--images", "12000", "--per_episode", "20"], None),
            "data_speed.py": (["--json", str(data_json)], data_json)}


# ----------------------------------------------------------------------------------------------


def run_checks(args: argparse.Namespace) -> dict:
    use_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    tiny = not use_gpu
    size = TINY if tiny else FULL
    report = {"mode": "cpu (tiny sizes)" if tiny else "gpu (full size)", "device": str(device),
              "size": asdict(size), "checks": {}}
    steps = {
        "environment": lambda: check_environment(device),
        "cuda_tests": lambda: check_cuda_tests(args.test_timeout),
        "fp32_matches_cpu": lambda: check_fp32_matches_cpu(device, size),
        "fp16_step": lambda: check_variant(device, size, amp="fp16"),
        "bf16_step": lambda: check_variant(device, size, amp="bf16"),
        "channels_last": lambda: check_variant(device, size, channels_last=True),
        "compile": lambda: check_compile(device, size, args.compile_backend),
        "ddp": lambda: check_ddp(device, size),
    }
    with tempfile.TemporaryDirectory() as folder:
        for script, (arguments, json_path) in bench_arguments(tiny, Path(folder)).items():
            steps[f"{Path(script).stem}_bench"] = (lambda s=script, a=arguments, j=json_path:
                                                   check_bench(s, a, args.bench_timeout, j))
        for name, check in steps.items():
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            try:
                result = check()
            except Exception as error:   # a failing check is reported; the others still run
                result = {"ok": False, "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc()[-3000:]}
            result.setdefault("seconds", time.perf_counter() - start)
            report["checks"][name] = result
            status = "skipped" if "skipped" in result else ("ok" if result["ok"] else "FAILED")
            print(f"{name:20s} {status:8s} {result['seconds']:7.1f} s", flush=True)
    report["ok"] = all(result.get("ok", True) for result in report["checks"].values())
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU checks even when a GPU is visible")
    parser.add_argument("--only", nargs="+", default=None, metavar="CHECK", help="run only these checks")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend of the compile check (eager: tracing and guards only, fast)")
    parser.add_argument("--test_timeout", type=float, default=240, help="seconds for the CUDA tests")
    parser.add_argument("--bench_timeout", type=float, default=180, help="seconds for each bench script")
    return parser


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    report = run_checks(args)
    report["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'} in {report['seconds']:.0f} s; "
          f"report: {args.out}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
