"""Count the blocking host-device synchronisations of steady training steps on CUDA.

The trainer's own loop (`bml.training.engine.train_one_epoch`) runs the published step (BML ResNet-12, 2 episodes of
15-way 5-shot 7-query, 84 px) on random uint8 images augmented on the device (`--augment device`: pinned
batches copied asynchronously, `DeviceAugment`), first `--warmup` steps, then `--steps` steps under
`torch.cuda.set_sync_debug_mode("warn")`. Every synchronising call (`.item()`, `.tolist()`, a copy to or
from pageable memory, ...) warns once per call: the count is expected to be 0, and each warning's place in
the code is listed. A control `.item()` must be counted once, or the count is not trusted. Needs a CUDA GPU.

    python bench/sync_check.py [--width 1.0] [--image-size 84] [--json sync.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bml.datasets import DeviceAugment, draw_parameters  # noqa: E402
from bml.datasets.device_augment import DeviceAugmentLoader  # noqa: E402
from bml.training.engine import train_one_epoch  # noqa: E402
from bml.training.state import TrainComponents, TrainingState  # noqa: E402
from bml.models import BML  # noqa: E402
from bml.recipes import BML_LOSSES  # noqa: E402
from bml.training.wrappers import wrap_for_training  # noqa: E402
from bml.utils.device import configure_tf32  # noqa: E402
from bml.utils.distributed import DistributedContext  # noqa: E402
from bml.utils.logger import RunLogger  # noqa: E402

WAY, SHOT, QUERY, EPISODES, CLASSES = 15, 5, 7, 2, 64


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_batches(steps: int, image_size: int, pin: bool) -> list[tuple[torch.Tensor, ...]]:
    """What the loader workers send for transform A: pinned uint8 images, labels and the drawn parameters."""
    generator = torch.Generator().manual_seed(0)
    shape = (EPISODES, WAY * (SHOT + QUERY))
    batches = []
    for _ in range(steps):
        images = torch.randint(0, 256, (*shape, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, CLASSES, shape, generator=generator)
        parameters = draw_parameters(shape[0] * shape[1], "A", (image_size, image_size), image_size)
        batch = (images, labels, parameters.reshape(*shape, -1))
        batches.append(tuple(part.pin_memory() for part in batch) if pin else batch)
    return batches


def run(args: argparse.Namespace, device: torch.device) -> dict:
    """The count on `device` (a CPU runs the same steps but has no synchronisations to count)."""
    on_cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    configure_tf32("on")
    torch.manual_seed(0)
    model = BML(CLASSES, width=args.width).to(device)
    loss_module, ddp = wrap_for_training(argparse.Namespace(compile=False), model,
                                         DistributedContext(0, 0, 1, device))
    parts = TrainComponents(model=model, loss_module=loss_module, ddp=ddp,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
                            scaler=torch.amp.GradScaler(device.type, enabled=False), device=device, amp_dtype=None,
                            channels_last=False)
    settings = {"way": WAY, "shot": SHOT, "query": QUERY, "epoch": torch.tensor(1.0, dtype=torch.float64),
                "max_epoch": 100, **BML_LOSSES.model_settings()}
    augment = DeviceAugment("A", args.image_size)
    batches = host_batches(args.warmup + args.steps, args.image_size, pin=on_cuda)
    state = TrainingState()
    with tempfile.TemporaryDirectory() as folder:
        logger = RunLogger(Path(folder), enabled=False)

        def epoch(steps: list) -> None:
            train_one_epoch(parts, DeviceAugmentLoader(steps, augment, device), state, epoch=1, epochs=1,
                            steps_per_epoch=len(batches), loss_settings=settings, stop_requested=lambda: False,
                            logger=logger, print_freq=10**9, is_main=True)

        epoch(batches[:args.warmup])
        synchronize(device)
        synchronising = counted_synchronisations(lambda: epoch(batches[args.warmup:]), on_cuda)
        control = counted_synchronisations(lambda: torch.ones(1, device=device).item(), on_cuda)
    places = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in synchronising)
    return {"steps": args.steps, "warmup": args.warmup, "synchronisations": len(synchronising),
            "per_step": len(synchronising) / args.steps, "places": dict(places.most_common()),
            "first_messages": sorted({str(w.message).splitlines()[0] for w in synchronising})[:5],
            "control_item_synchronisations": len(control)}


def counted_synchronisations(work, on_cuda: bool) -> list[warnings.WarningMessage]:
    """The sync-debug warnings that `work()` raises; the control (one `.item()`) shows that they are caught."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if on_cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
    return [w for w in caught if "synchroniz" in str(w.message)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--warmup", type=int, default=2, help="steps before counting (cuDNN autotuning, allocator)")
    parser.add_argument("--steps", type=int, default=3, help="steady steps counted")
    parser.add_argument("--json", metavar="PATH", help="also write the result to PATH")
    return parser


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("sync_check needs a CUDA GPU (torch.cuda.set_sync_debug_mode)", file=sys.stderr)
        return 2
    result = run(args, torch.device("cuda", 0))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["control_item_synchronisations"] != 1:
        print("the control .item() raised no sync-debug warning: the count cannot be trusted", file=sys.stderr)
        return 1
    return 0 if result["synchronisations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
