"""Which limits a training step, the input pipeline or the model? For transforms A-E at 84 px:

- host CPU microseconds per training image in one loader worker (one thread, no model), before
  (`--augment host`: the whole transform in PIL) and after (`--augment device`: the stored uint8
  image and its drawn parameters; for E, CUB-like JPEG files of mixed sizes, the crop box cut out of
  the decoded store); process CPU time, so other load on a shared machine matters less;
- `DeviceAugment`'s images per second (crop and resize, colour jitter, flips, normalisation) on the
  CPU and, when present, on CUDA (the uint8 images copied from pinned memory included);
- the images per second a BML training step consumes on the same device (`bench/train_step.py`'s
  step: 15-way 5-shot 7-query, width 1.0; fp32 on the CPU, bf16 + channels_last on CUDA);
- for evaluation, host CPU microseconds per test image (the deterministic resize and crop) sent as
  normalised floats (`eval_host_us_per_image_float`) and as uint8 crops normalised on the device
  (`eval_host_us_per_image_uint8`, what `embed_dataset` sends);
- for E, a training loader with several workers (`loader`): the images per second that 1, 2, ... workers
  deliver (wall clock, published 2-episode steps, each worker a process as in training) and the bytes a step
  sends to the device, with boxes longer than twice the output resized on the host (`MAX_SENT_SIDE`) and, for
  comparison, with every box sent as drawn (`sent_bytes_per_step_unbounded`); also the host work per image
  and DeviceAugment's CPU images per second both ways, and the host transform's.

Stored images are random uint8 arrays of the data sets' stored sizes (84 px; 32 px for the CIFAR-based
C and D, which are resized to 84 in training). E's images are JPEG files of CUB's sizes (300-500 px a
side, smooth content) written to a temporary folder: before, a worker decodes each file at every step
(`host_us_per_image_decoding` says how much of its time that is); after, it reads the store
the files were decoded into once (`bml.datasets.decoded`, built before timing).

    python bench/data_speed.py --json data_speed.json
    python bench/data_speed.py --only-loader --loader-workers 1 2 --json loader.json   # the loader case alone
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from PIL import Image

from bml.datasets import ArrayDataset, DeviceAugment, FileDataset, StepBatches, build_transform
from bml.datasets import device_augment
from bml.datasets.device_augment import EvalCrops
from bml.datasets.sampler import available_cpus
from train_step import QUERY, SHOT, WAY, Variant, synchronize, time_train_steps

TRANSFORMS = ("A", "B", "C", "D", "E")
STORED_SIZE = {"A": 84, "B": 84, "C": 32, "D": 32}
IMAGES_PER_STEP = WAY * (SHOT + QUERY)
EPISODES_PER_STEP = 2   # the published step
MODEL_VARIANT = {"cpu": Variant("fp32", False, False), "cuda": Variant("bf16+channels_last", True, True)}


def cub_like_files(folder: Path, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` JPEG files of 300-500 px a side with smooth content (upsampled noise), as CUB's photographs."""
    paths = []
    for i, (height, width) in enumerate(rng.integers(300, 500, (count, 2))):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
        path = folder / f"{i}.jpg"
        coarse.resize((int(width), int(height)), Image.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return np.array(paths)


def bench_dataset(transform_id: str, image_size: int, folder: Path, train: bool = True) -> ArrayDataset | FileDataset:
    """IMAGES_PER_STEP random images of the transform's data set (E: JPEG files in `folder`), with its training
    (`train`) or test transform."""
    rng = np.random.default_rng(0)
    labels = np.arange(IMAGES_PER_STEP) % WAY
    settings = dict(class_names=[str(c) for c in range(WAY)],
                    transform=build_transform(transform_id, image_size, train), name=f"transform {transform_id}", split="bench", transform_id=transform_id, image_size=image_size,
                    train=train)
    if transform_id == "E":
        paths = sorted(folder.glob("*.jpg")) or cub_like_files(folder, IMAGES_PER_STEP, rng)
        return FileDataset(np.array([str(path) for path in paths]), labels, **settings)
    size = STORED_SIZE[transform_id]
    return ArrayDataset(rng.integers(0, 256, (IMAGES_PER_STEP, size, size, 3), dtype=np.uint8), labels, **settings)


def step_loader(transform_id: str, image_size: int, augment: str, folder: Path) -> StepBatches:
    """One episode per step over random images, loaded as a training worker loads it."""
    dataset = bench_dataset(transform_id, image_size, folder)
    if augment == "device" and isinstance(dataset, FileDataset):
        dataset.decode_once()
    plan = np.arange(IMAGES_PER_STEP).reshape(1, 1, -1)
    return StepBatches(dataset, lambda epoch: plan, (0,), augment)


def evaluation_us_per_image(items: torch.utils.data.Dataset) -> float:
    """CPU microseconds per image of loading evaluation items one by one (as `embed_dataset`'s loader does),
    on one thread; the second of two passes."""
    with one_thread():
        for _ in range(2):
            start = time.process_time()
            for index in range(len(items)):
                items[index]
    return 1e6 * (time.process_time() - start) / len(items)


def decoding_us_per_image(dataset: FileDataset) -> float:
    """CPU microseconds per image of decoding the files alone."""
    start = time.process_time()
    for index in range(len(dataset)):
        dataset.load_image(index)
    return 1e6 * (time.process_time() - start) / len(dataset)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while the block runs, as in a loader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def host_us_per_image(batches: StepBatches, steps: int) -> float:
    """Median CPU microseconds per image of loading one step, on one thread as in a loader worker."""
    times = []
    with one_thread():
        for step in range(steps + 1):
            start = time.process_time()
            batches[0, 0]
            if step:   # the first step warms up
                times.append(time.process_time() - start)
    return 1e6 * statistics.median(times) / IMAGES_PER_STEP


def device_images_per_s(batches: StepBatches, device: torch.device, repeats: int) -> float:
    """Images per second of DeviceAugment on `device`, from uint8 crops in (pinned) host memory."""
    crops, _, parameters = batches[0, 0]
    if device.type == "cuda":
        crops, parameters = crops.pin_memory(), parameters.pin_memory()
    augment = DeviceAugment(batches.dataset.transform_id, batches.dataset.image_size)
    times = []
    for repeat in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        augment(crops.to(device, non_blocking=True), parameters.to(device, non_blocking=True))
        synchronize(device)
        if repeat:
            times.append(time.perf_counter() - start)
    return crops.shape[0] * crops.shape[1] / statistics.median(times)


@contextlib.contextmanager
def every_box_sent_as_drawn() -> Iterator[None]:
    """The loader as it was before large boxes were resized on the host: one canvas as large as the step's
    largest box."""
    bound = device_augment.MAX_SENT_SIDE
    device_augment.MAX_SENT_SIDE = float("inf")
    try:
        yield
    finally:
        device_augment.MAX_SENT_SIDE = bound


def loader_figures(image_size: int, folder: Path, workers: list[int], steps: int) -> dict:
    """Transform E (CUB-like files) through a DataLoader of `StepBatches` as training builds it: the wall-clock
    images per second per worker count (after the first step, which includes the workers' start), and the bytes
    a published 2-episode step sends to the device."""
    dataset = bench_dataset("E", image_size, folder)
    dataset.decode_once()
    rng = np.random.default_rng(1)
    plan = np.stack([np.stack([rng.permutation(IMAGES_PER_STEP) for _ in range(EPISODES_PER_STEP)])
                     for _ in range(steps)])
    batches = StepBatches(dataset, lambda epoch: plan, (0,), "device")
    one_step = step_loader("E", image_size, "device", folder)
    host = step_loader("E", image_size, "host", folder)
    with every_box_sent_as_drawn():
        unbounded = statistics.mean(sum(part.nbytes for part in batches[0, step]) for step in range(2))
        host_unbounded = host_us_per_image(one_step, steps=2)
        device_unbounded = device_images_per_s(one_step, torch.device("cpu"), repeats=2)
    figures = {"images_per_step": EPISODES_PER_STEP * IMAGES_PER_STEP, "sent_bytes_per_step_unbounded": unbounded,
               "max_sent_bytes_per_step": EPISODES_PER_STEP * IMAGES_PER_STEP
               * (device_augment.MAX_SENT_SIDE * image_size) ** 2 * 3,
               "host_us_per_image": {"host_transform": host_us_per_image(host, steps=2),
                                     "every_box_as_drawn": host_unbounded,
                                     "bounded": host_us_per_image(one_step, steps=2)},
               "device_augment_images_per_s_cpu": {"every_box_as_drawn": device_unbounded,
                                                   "bounded": device_images_per_s(one_step, torch.device("cpu"), 2)},
               "workers": {}}
    for count in workers:
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=count,
                                             sampler=[(0, step) for step in range(steps)])
        sizes, start = [], None
        for images, labels, parameters in loader:
            start = start or time.perf_counter()
            sizes.append(images.nbytes + labels.nbytes + parameters.nbytes)
        seconds = time.perf_counter() - start
        figures["workers"][str(count)] = {"images_per_s": (steps - 1) * figures["images_per_step"] / seconds,
                                          "sent_bytes_per_step": statistics.mean(sizes)}
    return figures


def model_images_per_s(device: torch.device, args: argparse.Namespace) -> float:
    settings = argparse.Namespace(num_classes=64, width=args.width, image_size=args.image_size, warmup=1,
                                  steps=args.model_steps, episodes=1)
    return IMAGES_PER_STEP / statistics.median(time_train_steps("resnet12", MODEL_VARIANT[device.type], device,
                                                                settings))


def print_loader_figures(figures: dict) -> None:
    host, device = figures["host_us_per_image"], figures["device_augment_images_per_s_cpu"]
    print(f"E loader, {figures['images_per_step']} images per step: sent per step "
          f"{figures['sent_bytes_per_step_unbounded'] / 2**20:.1f} MiB with every box as drawn, at most "
          f"{figures['max_sent_bytes_per_step'] / 2**20:.1f} MiB now; host us/image: transform "
          f"{host['host_transform']:.0f}, boxes as drawn {host['every_box_as_drawn']:.0f}, "
          f"bounded {host['bounded']:.0f}; "
          f"DeviceAugment images/s on the CPU: as drawn {device['every_box_as_drawn']:.0f}, bounded "
          f"{device['bounded']:.0f}", flush=True)
    for count, row in figures["workers"].items():
        print(f"  {count} worker(s): {row['images_per_s']:8.0f} images/s, {row['sent_bytes_per_step'] / 2**20:.1f} MiB "
              "per step", flush=True)


def run(args: argparse.Namespace) -> dict:
    if args.only_loader:
        with tempfile.TemporaryDirectory(prefix="bml_data_speed_") as folder:
            os.environ["BML_CACHE_DIR"] = str(Path(folder) / "cache")
            figures = loader_figures(args.image_size, Path(folder), args.loader_workers, args.loader_steps)
        print_loader_figures(figures)
        return {"loader": figures}
    devices = [torch.device("cuda" if torch.cuda.is_available() else "cpu")]   # no CPU-only figures on a GPU machine
    model = {device.type: model_images_per_s(device, args) for device in devices}
    training_device = devices[-1].type
    results = {}
    with tempfile.TemporaryDirectory(prefix="bml_data_speed_") as folder:
        os.environ["BML_CACHE_DIR"] = str(Path(folder) / "cache")   # E's decoded store, deleted with the folder
        print(f"{'id':2s} {'host us/img before':>18s} {'after':>8s} {'ratio':>6s} "
              + " ".join(f"{'augment img/s ' + d.type:>20s}" for d in devices)
              + f" {'model img/s ' + training_device:>18s} {'eval us/img float':>14s} {'uint8':>8s}", flush=True)
        for transform_id in TRANSFORMS:
            host_batches = step_loader(transform_id, args.image_size, "host", Path(folder))
            before = host_us_per_image(host_batches, args.steps)
            device_batches = step_loader(transform_id, args.image_size, "device", Path(folder))
            after = host_us_per_image(device_batches, args.steps)
            augment = {device.type: device_images_per_s(device_batches, device, args.repeats) for device in devices}
            results[transform_id] = {
                "host_us_per_image_before": before, "host_us_per_image_after": after,
                "device_images_per_s": augment[training_device], "device": training_device,
                "model_images_per_s": model[training_device],
                **{f"device_images_per_s_{name}": value for name, value in augment.items()},
                **{f"model_images_per_s_{name}": value for name, value in model.items()},
            }
            if transform_id == "E":
                results[transform_id]["host_us_per_image_decoding"] = decoding_us_per_image(host_batches.dataset)
            test_set = bench_dataset(transform_id, args.image_size, Path(folder), train=False)
            results[transform_id]["eval_host_us_per_image_float"] = evaluation_us_per_image(test_set)
            results[transform_id]["eval_host_us_per_image_uint8"] = evaluation_us_per_image(EvalCrops(test_set))
            evaluation = [results[transform_id][f"eval_host_us_per_image_{kind}"] for kind in ("float", "uint8")]
            print(f"{transform_id:2s} {before:18.0f} {after:8.0f} {before / after:5.1f}x "
                  + " ".join(f"{augment[d.type]:20.0f}" for d in devices) + f" {model[training_device]:18.1f}"
                  + f" {evaluation[0]:14.0f} {evaluation[1]:8.0f}", flush=True)
        results["loader"] = loader_figures(args.image_size, Path(folder), args.loader_workers, args.loader_steps)
    print_loader_figures(results["loader"])
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--steps", type=int, default=3, help="timed loader steps of 180 images (median reported)")
    parser.add_argument("--repeats", type=int, default=5, help="timed DeviceAugment calls (median reported)")
    parser.add_argument("--model-steps", type=int, default=2, help="timed training steps (median reported)")
    parser.add_argument("--width", type=float, default=1.0, help="channel-width multiplier of the timed model")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=sorted({1, min(4, available_cpus())}),
                        help="worker counts of the E loader case")
    parser.add_argument("--loader-steps", type=int, default=6, help="steps of the E loader case (the first untimed)")
    parser.add_argument("--only-loader", action="store_true", help="run the E loader case alone")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results, keyed by transform id (and 'loader'), to PATH")
    return parser


def main(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}", flush=True)
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
