"""The training step compared across devices, precisions and processes (checks of `bench/gpu_check.py`).

One step is the trainer's own `bml.training.engine.forward_backward` of a BML from fixed weights on fixed random
images, so two steps can be compared gradient by gradient:

- `step_equality`: the fp32 step on the GPU with TF32 off against the same step on the CPU (loss within 1e-4
  relative, gradients within 1e-3 relative L2 distance: cuDNN and oneDNN sum in different orders); the step
  under fp16 autocast with the gradient scaler (overflowing first steps skipped, as in training), under bf16
  (as `--amp bf16` resolves on this device) and in channels_last against fp32 on the same device;
- `compile`: the loss under `torch.compile`, 3 epochs of 2 steps: its first loss against eager, no graph
  compiled after the first epoch, eager and compiled step times;
- `ddp`: two processes of one episode each against one process running both, the same averaged gradients:
  over NCCL on 2+ GPUs, over Gloo with both processes on the one GPU, or over Gloo on CPUs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bml.training.engine import forward_backward  # noqa: E402
from bml.training.state import TrainComponents  # noqa: E402
from bml.models import BML  # noqa: E402
from bml.recipes import BML_LOSSES  # noqa: E402
from bml.training.wrappers import wrap_for_training  # noqa: E402
from bml.utils.device import configure_tf32, resolve_amp  # noqa: E402
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
TINY = Size(width=0.125, image_size=16, way=5, shot=2, query=3)


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


def fp32_matches_cpu(device: torch.device, size: Size) -> dict:
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


def variant_matches_fp32(device: torch.device, size: Size, amp: str = "off", channels_last: bool = False) -> dict:
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


def step_equality(device: torch.device, size: Size) -> dict:
    """Every comparison of one step; 'ok' when all agree within their tolerances."""
    parts = {"fp32_matches_cpu": fp32_matches_cpu(device, size)} if device.type == "cuda" else {}
    parts.update(fp16_step=variant_matches_fp32(device, size, amp="fp16"),
                 bf16_step=variant_matches_fp32(device, size, amp="bf16"),
                 channels_last=variant_matches_fp32(device, size, channels_last=True))
    return {"ok": all(part["ok"] for part in parts.values()), **parts}


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


def compile_check(device: torch.device, size: Size, backend: str) -> dict:
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
            "loss_relative_error": error, "tolerance": COMPILE_LOSS_RTOL, "graphs_after_each_epoch": graphs,
            "graphs_compiled_after_epoch_1": recompiled, "compiled_step_s": min(compiled_times),
            "eager_step_s": min(eager_times[1:])}


def ddp_devices(device: torch.device) -> tuple[str, list[torch.device]]:
    """(backend, each rank's device): NCCL on two GPUs, else Gloo (both ranks on the one GPU, or CPUs)."""
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        return "nccl", [torch.device("cuda", 0), torch.device("cuda", 1)]
    return "gloo", [device, device]


def _ddp_worker(rank: int, backend: str, devices: list[torch.device], init_file: str, size: Size, out_dir: str) -> None:
    device = devices[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
        configure_tf32("off")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        parts = build_parts(size, device, context=DistributedContext(rank, rank, 2, device))
        images, labels = episode_batch(size, episodes=2)
        _, gradients = step_gradients(parts, (images[rank:rank + 1], labels[rank:rank + 1]), loss_settings(size))
        torch.save(gradients, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ddp_check(device: torch.device, size: Size) -> dict:
    backend, devices = ddp_devices(device)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_ddp_worker, args=(backend, devices, str(Path(folder) / "init"), size, folder), nprocs=2, join=True)
        ranks = [torch.load(Path(folder) / f"rank{rank}.pt") for rank in (0, 1)]
    if device.type == "cuda":
        configure_tf32("off")
    _, single = step_gradients(build_parts(size, device), episode_batch(size, episodes=2), loss_settings(size))
    errors = [relative_distance(gradients, single) for gradients in ranks]
    return {"ok": max(errors) <= DDP_GRAD_RTOL, "backend": backend, "devices": [str(d) for d in devices],
            "gradient_relative_error_per_rank": errors, "tolerance": DDP_GRAD_RTOL}
