"""`python -m bml.doctor [--json] [--data_root DIR]`: would training run on this machine, and with what?

Answers in seconds, reading no image and allocating nothing on a GPU (device properties only): the Python,
torch, torchvision, CUDA and cuDNN versions; each visible GPU's name, compute capability and memory, whether
this torch build has kernels for it (if not, which build to install), and whether bf16 is native or
emulated on it; NCCL; the TF32 setting, processes and loader workers training would use; the free space
where the cache and the run folders go; the data root and, for each benchmark folder found there, whether
its files are complete (their presence, headers and ends: never the pixels).

The exit status is 1 when something found would stop training (a GPU this build has no kernels for, an
incomplete benchmark folder, a full disk), with one line per problem on stderr saying what to do; else 0.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import sys
import zipfile
from pathlib import Path

import torch

from bml.datasets import DatasetError, default_num_workers, read_split, resolve_data_root
from bml.datasets.image_files import cache_dir
from bml.datasets.omniglot import IMAGE_SETS
from bml.datasets.readers import CIFAR_FILES, MINI_IMAGENET_FILES
from bml.datasets.sampler import available_cpus
from bml.launch import process_count
from bml.recipes import PUBLISHED
from bml.utils.device import BF16_MIN_CAPABILITY, GpuInfo, missing_kernels, tf32_active
from bml.utils.messages import error

MIN_FREE_BYTES = 2 * 2**30
"""Less free space than this where checkpoints or the cache go stops a run soon (a published BML checkpoint
with its optimiser state is ~100 MB, written every epoch; CUB's decoded store takes 3.4 GB)."""
PICKLE_LAYOUTS = {"miniImageNet": MINI_IMAGENET_FILES, "CIFAR-FS": CIFAR_FILES, "FC100": CIFAR_FILES}
READ_WITHOUT_IMAGES = ("tieredImageNet", "CUB")
"""Layouts whose `read_split(load_images=False)` reads only labels, split lists and headers."""
PICKLE_STOP = b"."
DATA_HELP = "see README, section Data"
READ_ERRORS = (DatasetError, OSError, ValueError, EOFError, zipfile.BadZipFile)


def package_version(name: str) -> str | None:
    """Installed version of a distribution, without importing it (torchvision's import alone takes a second)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cudnn_version() -> str | None:
    """'9.24.0' (torch answers 92400); what torch says instead when this cuDNN cannot run on a visible GPU."""
    if not (torch.version.cuda and torch.backends.cudnn.is_available()):
        return None
    try:
        number = torch.backends.cudnn.version()
    except RuntimeError as failure:   # e.g. cuDNN 9.11+ on a GPU below compute capability 7.5
        return f"unusable here: {str(failure).split('. ')[0]}"
    return f"{number // 10000}.{number % 10000 // 100}.{number % 100}" if number else None


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": package_version("torchvision"), "cuda": torch.version.cuda, "cudnn": cudnn_version(),
            "arch_list": list(torch.cuda.get_arch_list())}


def gpus() -> tuple[list[dict], list[str]]:
    """(one entry per visible GPU, problems): properties only, no context memory allocated on the device."""
    entries, problems = [], []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(count):
        properties = torch.cuda.get_device_properties(index)
        gpu = GpuInfo(properties.name, (properties.major, properties.minor))
        problem = missing_kernels(gpu)
        entries.append({"index": index, **gpu.as_dict(), "memory_gib": round(properties.total_memory / 2**30, 1),
                        "build_has_kernels": problem is None,
                        "bf16": ("native" if gpu.capability >= BF16_MIN_CAPABILITY
                                 else "emulated (--amp bf16 trains in fp16)"),
                        "tf32_with_default_settings": tf32_active("on", torch.device("cuda", index))})
        if problem:
            problems.append(f"GPU {index}: {problem}")
    return entries, problems


def training_settings(gpu_count: int) -> dict:
    """What `train_bml.sh` would start here for a published recipe: processes, --augment, TF32, loader workers."""
    processes = process_count(argparse.Namespace(device=None, allow_more_processes=False), PUBLISHED.episodes_per_step,
                              gpu_count)
    return {"device": "cuda" if gpu_count else "cpu", "processes": processes,
            "augment": "device" if gpu_count else "host",
            "tf32": "on", "tf32_active": bool(gpu_count) and tf32_active("on", torch.device("cuda", 0)),
            "cpu_cores": available_cpus(), "loader_workers_per_process": default_num_workers(processes)}


def nccl() -> dict:
    available = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    version = ".".join(map(str, torch.cuda.nccl.version())) if available and torch.version.cuda else None
    return {"available": available, "version": version}


def free_space(folder: Path) -> tuple[dict, list[str]]:
    """Free bytes on the disk that holds `folder` (its nearest existing parent while it does not exist yet)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    problems = []
    if free < MIN_FREE_BYTES:
        problems.append(f"only {free / 2**30:.1f} GiB free under {folder}: training writes checkpoints every epoch "
                        f"(and its caches) there; free some space or point it elsewhere (-s DIR, BML_CACHE_DIR)")
    return {"path": str(folder), "free_gib": round(free / 2**30, 1)}, problems


def pickle_problem(path: Path) -> str | None:
    """Why a benchmark pickle is unusable (missing, empty, cut short), without unpickling its gigabytes."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size == 0:
        return f"{path} is empty: download it again"
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        if handle.read(1) != PICKLE_STOP:
            return f"{path} is cut short (it does not end as a pickle does): download it again"
    return None


def omniglot_problems(folder: Path) -> list[str]:
    if all((folder / f"{image_set}.npz").is_file() for image_set in IMAGE_SETS):
        return [] if (folder / "alphabets.csv").is_file() else [f"{folder / 'alphabets.csv'} is missing (the npz "
                                                                   "arrays need it)"]
    missing = [image_set for image_set in IMAGE_SETS if not (folder / image_set).is_dir()]
    return [f"{folder} has neither {' and '.join(f'{s}.npz' for s in IMAGE_SETS)} with alphabets.csv nor the PNG "
            f"folders ({', '.join(missing)} missing)"] if missing else []


def benchmark(name: str, root: Path) -> dict:
    """Whether the benchmark folder `root/name` is complete; per split, classes and images where cheap to read."""
    folder = root / name
    problems, splits = [], {}
    if name in PICKLE_LAYOUTS:
        problems = [problem for file in PICKLE_LAYOUTS[name].values() if (problem := pickle_problem(folder / file))]
    elif name == "omniglot":
        problems = omniglot_problems(folder)
    else:
        for split in ("train", "val", "test"):
            try:
                data = read_split(name, split, root, load_images=False)
            except READ_ERRORS as failure:
                problems.append(str(failure))
                continue
            splits[split] = {"classes": len(data.class_names), "images": len(data.labels)}
    return {"name": name, "folder": str(folder), "complete": not problems, "problems": problems, "splits": splits}


def data(data_root: str | None) -> tuple[dict, list[str]]:
    root = resolve_data_root(data_root)
    if not root.is_dir():
        return {"root": str(root), "exists": False, "benchmarks": [],
                "note": "no data root: only the embedded glyphs set can be trained on (README, Data)"}, []
    names = [*PICKLE_LAYOUTS, *READ_WITHOUT_IMAGES, "omniglot"]
    found = [benchmark(name, root) for name in names if (root / name).is_dir()]
    problems = [f"{entry['name']}: {problem}; {DATA_HELP}" for entry in found for problem in entry["problems"]]
    return {"root": str(root), "exists": True, "benchmarks": found}, problems


def diagnose(data_root: str | None = None) -> dict:
    """The whole report, with `problems`: one line per finding that would stop training, saying what to do."""
    gpu_entries, problems = gpus()
    report = {"versions": versions(), "gpus": gpu_entries, "nccl": nccl(),
              "training": training_settings(len(gpu_entries))}
    if len(gpu_entries) > 1 and not report["nccl"]["available"]:
        problems.append("this torch build has no NCCL: training on several GPUs needs it; install a CUDA build of "
                        "torch for Linux (README, Install), or train on one GPU (CUDA_VISIBLE_DEVICES=0)")
    if not gpu_entries and torch.version.cuda is None and Path("/proc/driver/nvidia/version").exists():
        report["note"] = ("an NVIDIA driver is loaded but this torch build is CPU-only: make install TORCH_INDEX= "
                          "installs the CUDA build (README, Install)")
    report["disk"] = {}
    for what, folder in (("cache", cache_dir()), ("runs", Path("output"))):
        report["disk"][what], found = free_space(folder)
        problems += found
    report["data"], found = data(data_root)
    report["problems"] = problems + found
    report["ok"] = not report["problems"]
    return report


def format_report(report: dict) -> str:
    v = report["versions"]
    lines = [f"Python {v['python']}, torch {v['torch']} (CUDA {v['cuda'] or 'none: CPU-only build'}"
             + (f", cuDNN {v['cudnn']}" if v["cudnn"] else "") + f"), torchvision {v['torchvision']}",
             f"this build's GPU architectures: {', '.join(v['arch_list']) or 'none'}"]
    for gpu in report["gpus"]:
        lines.append(f"GPU {gpu['index']}: {gpu['name']}, compute capability {gpu['capability']}, "
                     f"{gpu['memory_gib']} GiB; "
                     f"kernels in this build: {'yes' if gpu['build_has_kernels'] else 'NO'}; bf16 {gpu['bf16']}; "
                     f"TF32 with the default --tf32 on: {'yes' if gpu['tf32_with_default_settings'] else 'no'}")
    if not report["gpus"]:
        lines.append("no CUDA GPU visible: training runs on the CPU")
    if report.get("note"):
        lines.append(report["note"])
    nccl_state = report["nccl"]
    lines.append("NCCL: " + (f"available {nccl_state['version'] or ''}" if nccl_state["available"]
                             else "not available"))
    t = report["training"]
    lines.append(f"training here: {t['processes']} process(es) on {t['device']}, --augment {t['augment']}, "
                 f"{t['loader_workers_per_process']} loader worker(s) each ({t['cpu_cores']} CPU cores); --tf32 "
                 f"{t['tf32']}: {'TF32' if t['tf32_active'] else 'full fp32'} convolutions")
    for what, disk in report["disk"].items():
        lines.append(f"{what}: {disk['path']}, {disk['free_gib']} GiB free")
    d = report["data"]
    lines.append(f"data root: {d['root']}" + ("" if d["exists"] else f" ({d['note']})"))
    for entry in d["benchmarks"]:
        counts = ", ".join(f"{split} {c['classes']} classes / {c['images']} images"
                           for split, c in entry["splits"].items())
        lines.append(f"  {entry['name']}: {'complete' if entry['complete'] else 'INCOMPLETE'}"
                     + (f" ({counts})" if counts else ""))
    if d["exists"] and not d["benchmarks"]:
        lines.append("  no benchmark folder there (README, Data)")
    lines.append("nothing found that would stop training" if report["ok"]
                 else f"{len(report['problems'])} problem(s) would stop training (listed on stderr)")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bml.doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=None, help="default: $BML_DATA_ROOT, else data/")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    report = diagnose(args.data_root)
    print(json.dumps(report, indent=2) if args.json else format_report(report), flush=True)
    for problem in report["problems"]:
        error(problem)
    return 0 if report["ok"] else 1


def command() -> None:
    """`python -m bml.doctor` and the `bml-doctor` command."""
    sys.exit(main())


if __name__ == "__main__":
    command()
