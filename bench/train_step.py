"""Time one published BML training step: forward + backward + SGD on a 15-way 5-shot 7-query
episode (180 images, 84 px, width 1.0, 64 base classes).

Reports images/s per backbone and execution variant: fp32 on the CPU (plus channels_last and
bf16 autocast with --cpu-variants), and on CUDA, where present, fp32, bf16 autocast, and bf16
with channels_last. It also times the local loss alone, vectorised against a looped version
with per-item host syncs like the original implementation, on the same features.

    python bench/train_step.py --steps 2 --warmup 1 --backbone resnet18 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from bml.losses import local_prototype_loss
from bml.losses.reference import looped_local_loss
from bml.models import BML
from bml.recipes import BML_LOSSES

WAY, SHOT, QUERY = 15, 5, 7


@dataclass(frozen=True)
class Variant:
    name: str
    amp: bool
    channels_last: bool


CPU_VARIANTS = (Variant("fp32", False, False), Variant("channels_last", False, True),
                Variant("bf16", True, False), Variant("bf16+channels_last", True, True))
CUDA_VARIANTS = (Variant("fp32", False, False), Variant("bf16", True, False),
                 Variant("bf16+channels_last", True, True))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_steps(backbone: str, variant: Variant, device: torch.device, args: argparse.Namespace) -> list[float]:
    """Seconds of each timed step (after ``args.warmup`` untimed ones), DropBlock fully ramped."""
    torch.manual_seed(0)
    model = BML(args.num_classes, width=args.width, backbone=backbone).to(device).train()
    model.dropblock_step = 40000
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(WAY * (SHOT + QUERY), 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    base_labels = torch.randint(0, args.num_classes, (images.shape[0],), device=device)
    times = []
    for step in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.amp):
            losses = model.losses(images, base_labels, way=WAY, shot=SHOT, query=QUERY, epoch=50, max_epoch=100,
                                      **BML_LOSSES.model_settings())
        losses["total"].backward()
        optimizer.step()
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


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


def run(args: argparse.Namespace) -> dict:
    devices = [(torch.device("cpu"), CPU_VARIANTS if args.cpu_variants else CPU_VARIANTS[:1])]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append((torch.device("cuda"), CUDA_VARIANTS))
    backbones = ["resnet12"] + [b for b in args.backbone if b != "resnet12"]
    # The loss comparison runs first, in a fresh process: after the large training steps the
    # allocator makes every small op slower, which would blur the ratio.
    loss_rows = [compare_local_losses(args, device) for device, _ in devices]
    for row in loss_rows:
        print(f"local loss on {row['device']}: vectorised {row['vectorised_s'] * 1e3:.2f} ms, looped "
              f"{row['looped_s'] * 1e3:.0f} ms, speedup {row['speedup']:.0f}x "
              f"(|difference| {row['max_abs_difference']:.1e})", flush=True)
    rows = []
    for device, variants in devices:
        for backbone in backbones:
            for variant in variants:
                times = time_train_steps(backbone, variant, device, args)
                step_s = statistics.median(times)
                row = {"device": device.type, "backbone": backbone, **asdict(variant), "step_s": step_s,
                       "images_per_s": WAY * (SHOT + QUERY) / step_s, "step_times_s": times}
                rows.append(row)
                print(f"{device.type:4s} {backbone:8s} {variant.name:18s} {step_s:8.3f} s/step "
                      f"{row['images_per_s']:8.1f} images/s", flush=True)
    return {
        "episode": {"way": WAY, "shot": SHOT, "query": QUERY, "images": WAY * (SHOT + QUERY)},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "train_step": rows,
        "local_loss": loss_rows,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", default=[], choices=["resnet12", "resnet18"],
                        help="add a backbone row (ResNet-12 is always timed); repeatable")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier (1.0 = published)")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--num-classes", type=int, default=64)
    parser.add_argument("--cpu-variants", action="store_true", help="also time channels_last and bf16 on the CPU")
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
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
