"""Time the published BML training step: `--episodes` (2, as published) 15-way 5-shot 7-query episodes of 84 px
images, each its own forward and backward pass, then one SGD step (width 1.0, 64 base classes).

Rows per backbone and execution variant, on CUDA when present (CPU-only rows are then skipped), else on the
CPU: on CUDA fp32 (TF32 off), tf32 (PyTorch's default: cuDNN convolutions in TF32), bf16 autocast, bf16 with
channels_last, and that under `torch.compile` (`--compile-backend`; --no-compile leaves it out); on the CPU
fp32 (plus channels_last and bf16 with --cpu-variants). Each row: seconds per step (median), images per
second, peak memory (CUDA), and the fraction of the device's physical limit that the step reaches: its FLOPs
(counted on one eager step with torch's FlopCounterMode: 26.7 GFLOP per 84 px training image, forward and
backward, at width 1.0) per second over the peak FLOP/s of a large matrix product measured on the same
device (bf16 on CUDA, fp32 on a CPU). The local loss is also timed alone, vectorised against a looped
version with per-item host syncs like the original implementation, on the same features.

    python bench/train_step.py --steps 5 --warmup 2 --json out.json
    python bench/train_step.py --episodes 1 --steps 2 --warmup 1 --backbone resnet18 --cpu-variants   # docs' CPU runs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bml.losses import local_prototype_loss  # noqa: E402
from bml.losses.reference import looped_local_loss  # noqa: E402
from bml.models import BML  # noqa: E402
from bml.recipes import BML_LOSSES  # noqa: E402
from bml.utils.device import configure_tf32  # noqa: E402

WAY, SHOT, QUERY = 15, 5, 7


@dataclass(frozen=True)
class Variant:
    name: str
    amp: bool
    channels_last: bool
    tf32: bool = False
    compile: bool = False


CPU_VARIANTS = (Variant("fp32", False, False), Variant("channels_last", False, True),
                Variant("bf16", True, False), Variant("bf16+channels_last", True, True))
CUDA_VARIANTS = (Variant("fp32", False, False), Variant("tf32", False, False, tf32=True),
                 Variant("bf16", True, False, tf32=True), Variant("bf16+channels_last", True, True, tf32=True),
                 Variant("bf16+channels_last+compile", True, True, tf32=True, compile=True))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One published training step of a BML on random images: `episodes` forward/backward passes, one SGD step."""

    def __init__(self, backbone: str, variant: Variant, device: torch.device, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.variant, self.device, self.episodes = variant, device, args.episodes
        if device.type == "cuda":
            configure_tf32("on" if variant.tf32 else "off")
        memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
        self.model = BML(args.num_classes, width=args.width, backbone=backbone).to(device).train()
        self.model = self.model.to(memory_format=memory_format)
        self.model.dropblock_step = 40000
        self.losses = self.model.losses
        if variant.compile:
            self.losses = torch.compile(self.model.losses, backend=args.compile_backend)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        images = torch.randn(self.episodes, WAY * (SHOT + QUERY), 3, args.image_size, args.image_size, device=device)
        self.images = [episode.contiguous(memory_format=memory_format) for episode in images]
        self.labels = torch.randint(0, args.num_classes, (self.episodes, images.shape[1]), device=device)

    @property
    def images_per_step(self) -> int:
        return self.episodes * self.images[0].shape[0]

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for images, labels in zip(self.images, self.labels):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.variant.amp):
                losses = self.losses(images, labels, way=WAY, shot=SHOT, query=QUERY, epoch=50, max_epoch=100,
                                     **BML_LOSSES.model_settings())
            (losses["total"] / self.episodes).backward()
        self.optimizer.step()


def time_train_steps(backbone: str, variant: Variant, device: torch.device, args: argparse.Namespace) -> list[float]:
    """Seconds of each timed step (after ``args.warmup`` untimed ones), DropBlock fully ramped."""
    return time_step(Step(backbone, variant, device, args), args)


def time_step(step: Step, args: argparse.Namespace) -> list[float]:
    times = []
    for index in range(args.warmup + args.steps):
        synchronize(step.device)
        start = time.perf_counter()
        step()
        synchronize(step.device)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def flops_per_image(backbone: str, device: torch.device, args: argparse.Namespace) -> float:
    """Floating-point operations of one training image, forward and backward, counted on one eager fp32 step."""
    step = Step(backbone, Variant("fp32", False, False), device, args)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / step.images_per_step


def peak_flops(device: torch.device) -> float:
    """FLOP/s of a large matrix product on `device` (the best of the timed repeats), its physical limit: bf16 on
    CUDA (tensor cores), fp32 on a CPU (where bf16 products are no faster)."""
    size, repeats, dtype = (8192, 20, torch.bfloat16) if device.type == "cuda" else (1024, 3, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for index in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        if index >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def time_loss(loss_fn, features: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(median seconds of forward + backward, loss value) of ``loss_fn`` on ``features``."""
    times, value = [], 0.0
    for _ in range(repeats):
        features.grad = None
        synchronize(features.device)
        start = time.perf_counter()
        loss = loss_fn(features, WAY, SHOT, 50, 100, 5.5, 0.1)
        loss.backward()
        synchronize(features.device)
        times.append(time.perf_counter() - start)
        value = loss.item()
    return statistics.median(times), value


def compare_local_losses(args: argparse.Namespace, device: torch.device) -> dict:
    """Vectorised vs looped local loss on one episode's local-view maps (180 x 640w x 5 x 5)."""
    torch.manual_seed(0)
    channels = max(1, round(640 * args.width))
    features = (0.05 * torch.randn(WAY * (SHOT + QUERY), channels, 5, 5, device=device)).requires_grad_()
    vectorised, vectorised_value = time_loss(local_prototype_loss, features, repeats=5)
    looped, looped_value = time_loss(lambda *arguments: looped_local_loss(*arguments)[0], features, repeats=1)
    return {"device": device.type, "vectorised_s": vectorised, "looped_s": looped, "speedup": looped / vectorised,
            "max_abs_difference": abs(vectorised_value - looped_value)}


def variants_for(device: torch.device, args: argparse.Namespace) -> tuple[Variant, ...]:
    if device.type == "cpu":
        return CPU_VARIANTS if args.cpu_variants else CPU_VARIANTS[:1]
    return tuple(variant for variant in CUDA_VARIANTS if args.compile or not variant.compile)


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_only else "cpu")
    backbones = ["resnet12"] + [b for b in args.backbone if b != "resnet12"]
    # The loss comparison runs first, in a fresh process: after the large training steps the
    # allocator makes every small op slower, which would blur the ratio.
    loss_rows = [compare_local_losses(args, device)] if args.local_loss else []
    for row in loss_rows:
        print(f"local loss on {device.type}: vectorised {row['vectorised_s'] * 1e3:.2f} ms, looped "
              f"{row['looped_s'] * 1e3:.0f} ms, speedup {row['speedup']:.0f}x "
              f"(|difference| {row['max_abs_difference']:.1e})", flush=True)
    peak = peak_flops(device)
    print(f"{device.type}: matrix product peak {peak / 1e12:.2f} TFLOP/s", flush=True)
    rows = []
    for backbone in backbones:
        flops = flops_per_image(backbone, device, args)
        for variant in variants_for(device, args):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step = Step(backbone, variant, device, args)
            times = time_step(step, args)
            step_s = statistics.median(times)
            images_per_s = step.images_per_step / step_s
            row = {"device": device.type, "backbone": backbone, **asdict(variant), "step_s": step_s,
                   "images_per_s": images_per_s, "step_times_s": times, "gflop_per_image": flops / 1e9,
                   "fraction_of_peak": images_per_s * flops / peak,
                   "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                       else None)}
            rows.append(row)
            del step
            memory = f" {row['peak_memory_gib']:6.1f} GiB" if row["peak_memory_gib"] is not None else ""
            print(f"{device.type:4s} {backbone:8s} {variant.name:27s} {step_s:8.3f} s/step "
                  f"{images_per_s:8.1f} images/s "
                  f"{100 * row['fraction_of_peak']:5.1f}% of peak{memory}", flush=True)
    if device.type == "cuda":
        configure_tf32("on")
    return {
        "episode": {"way": WAY, "shot": SHOT, "query": QUERY, "images": WAY * (SHOT + QUERY),
                    "episodes_per_step": args.episodes},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "peak_flops": peak,
        "train_step": rows,
        "local_loss": loss_rows,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", default=[], choices=["resnet12", "resnet18"],
                        help="add a backbone row (ResNet-12 is always timed); repeatable")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per step (2 = the published step)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (compilation included)")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier (1.0 = published)")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--num-classes", type=int, default=64)
    parser.add_argument("--cpu-variants", action="store_true", help="also time channels_last and bf16 on the CPU")
    parser.add_argument("--cpu-only", action="store_true", help="time on the CPU even when CUDA is present")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the torch.compile row")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile row")
    parser.add_argument("--no-local-loss", dest="local_loss", action="store_false",
                        help="leave out the vectorised-vs-looped local loss timing (the looped one takes seconds)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
