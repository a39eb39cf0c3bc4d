"""Evaluate a BML or baseline checkpoint with the published few-shot protocol (README, Evaluation).

    python eval_bml.py --dataset miniImageNet --ckp_path pretrained_weights/miniImageNet.pth --n_shots 5
    bash eval_bml.sh miniImageNet A pretrained_weights/miniImageNet.pth 5     # the original command

Each image of the split is embedded once and all seeds x episodes are scored from those embeddings
(`bml.evaluation`): the published 10 x 2,000 episodes cost little more than one pass over the split.
Writes `<output_dir>/<dataset>_bml_eval_results_<K>shot.txt` and a JSON beside it with every view.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bml import cli
from bml.checkpoint import CheckpointError, model_config, model_from_state, read_checkpoint
from bml.datasets import DatasetError, input_transform_settings
from bml.evaluation import (COMBINED, EvaluationError, build_evaluation_dataset, evaluate_episodes,
                            parse_seed_range, results_paths, write_results)
from bml.utils import argtypes
from bml.utils.distributed import DeviceError, resolve_device
from bml.utils.io import OutputError, check_output_file

STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluate a BML or baseline checkpoint on few-shot episodes", add_help=False,
                                     parents=[cli.embedding_parser(), cli.dataset_parser(), cli.input_parser(),
                                              cli.episode_parser(), cli.device_parser(), cli.precision_parser()])
    parser.set_defaults(n_ways=5, n_shots=5, n_queries=15, num_workers=4, amp="off")
    parser.add_argument("--test_dataset", default=None,
                        help="cross-domain: evaluate on this data set, with its resize/crop and the "
                             "normalisation of the model's transform")
    parser.add_argument("--split", choices=("val", "test"), default="test")

    episodes = parser.add_argument_group("episodes")
    episodes.add_argument("--episodes", type=argtypes.positive_int, default=2000, help="episodes per seed")
    episodes.add_argument("--seeds", type=parse_seed_range, nargs="+", default=[list(range(10))],
                          metavar="SEED", help="seeds, e.g. '0 1 2' or '0-9' (default 0-9)")

    compute = parser.add_argument_group("compute")
    compute.add_argument("--storage", choices=tuple(STORAGE_DTYPES), default="float16",
                         help="dtype of the cached embeddings (scores are always float32)")
    compute.add_argument("--max_memory_gb", type=argtypes.number(0, above_minimum=True), default=None,
                         help="larger caches are memory-mapped (default: half of the available RAM)")
    compute.add_argument("--cache_dir", default=None, help="folder of a memory-mapped cache (default: temp)")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="eval_results")
    output.add_argument("--json", default=None, help="JSON results path (default: beside the results file)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Evaluate, print and then write the results, and return the exit code (1: a data, checkpoint or output
    problem). The output paths are checked before anything is embedded."""
    seeds = list(dict.fromkeys(seed for group in args.seeds for seed in group))
    try:
        args.device = resolve_device(args.device)
        checkpoint = read_checkpoint(args.ckp_path)
        config = model_config(checkpoint)
        dataset_name = args.dataset or config.get("dataset")
        if dataset_name is None:
            raise DatasetError(f"{args.ckp_path} does not record its data set: pass --dataset")
        transform, image_size = input_transform_settings({**config, "dataset": dataset_name}, args.image_size,
                                                         args.transform)
        dataset = build_evaluation_dataset(dataset_name, args.split, args.data_root, image_size, transform,
                                           args.test_dataset,
                                           args.allow_uncropped_cub)
        label = dataset.name if args.test_dataset is None else f"{dataset_name}_to_{dataset.name}"
        label += "" if args.split == "test" else f"_{args.split}"
        text_path, json_path = results_paths(label, args.n_shots, args.output_dir, args.json)
        check_output_file(text_path, "--output_dir")
        check_output_file(json_path, "--json")
        model = model_from_state(checkpoint, device=args.device, source=args.ckp_path)
        print(f"Evaluating {args.ckp_path} ({config['model']}, views {', '.join(model.view_names)}) on {dataset}: "
              f"{len(seeds)} seeds x {args.episodes} {args.n_ways}-way {args.n_shots}-shot "
              f"{args.n_queries}-query episodes", flush=True)
        start = time.perf_counter()
        storage: dict = {}
        results = evaluate_episodes(model, dataset, args.n_ways, args.n_shots, args.n_queries, args.episodes, seeds,
                                    batch_size=args.embed_batch_size, device=args.device, amp=args.amp,
                                    num_workers=args.num_workers, storage_dtype=STORAGE_DTYPES[args.storage],
                                    max_memory_gb=args.max_memory_gb, cache_dir=args.cache_dir,
                                    progress=not args.no_progress and sys.stderr.isatty(), report=storage)
    except (CheckpointError, DatasetError, DeviceError, EvaluationError, FileNotFoundError, MemoryError,
            OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    metadata = {"checkpoint": str(args.ckp_path), "model": config["model"], "dataset": dataset_name,
                "test_dataset": args.test_dataset, "split": args.split, "image_size": dataset.image_size,
                "way": args.n_ways, "shot": args.n_shots, "query": args.n_queries, "episodes": args.episodes,
                "seeds": seeds, "storage": args.storage, **storage, "amp": args.amp, "device": str(args.device),
                "uncropped_cub": dataset.name == "CUB" and "CUB_test" not in Path(str(dataset.paths[0])).parts,
                "seconds": round(time.perf_counter() - start, 1)}
    for name, summary in results.items():
        print(f"{name:>10}: {summary['acc']:.2f} +- {summary['ci95']:.2f}")
    print(f"==> Mean ACC on {label}: {results[COMBINED]['acc']:.2f}", flush=True)
    try:
        write_results(results, label, args.n_shots, args.output_dir, args.json, metadata)
    except OSError as error:
        print(f"error: the results above could not be written: {error}", file=sys.stderr)
        return 1
    print(f"wrote {text_path} and {json_path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()], description=__doc__.split("\n")[0],
                                     formatter_class=cli.HelpFormatter)
    sys.exit(main(parser.parse_args()))
