"""Evaluate a BML or baseline checkpoint with the published few-shot protocol (README, Evaluation).

    bml-eval --dataset miniImageNet --ckp_path pretrained_weights/miniImageNet.pth --n_shots 5  # or eval_bml.py
    bash eval_bml.sh miniImageNet A pretrained_weights/miniImageNet.pth 5     # the original command

Each image of the split is embedded once and all seeds x episodes are scored from those embeddings
(`bml.evaluation`): the published 10 x 2,000 episodes cost little more than one pass over the split.
Writes `<output_dir>/<dataset>_bml_eval_results_<K>shot.txt` and a JSON beside it with every view and
every vote's expected calibration error, both naming the checkpoint by path and sha256 (a file holding another
checkpoint's results is never replaced: the next free `..._<K>shot-2.txt`, ... is taken), and the JSON with the
fingerprint of the split evaluated and whether TF32 was in force. `--head proto cl2n support_cl2n logreg` scores every head
from the same embeddings (`bml.scoring.HEADS`); the text file reports `proto`, the published rule, and the JSON has every
head. `--calibrate` first fits each vote's temperature on val episodes (`bml.calibration`) and reports the
error before and after; `--save_calibration PATH` writes a copy of the checkpoint carrying the temperatures
(the checkpoint given is never modified).
"""

from __future__ import annotations

import argparse
import errno
import time
from pathlib import Path

import torch

from bml import cli
from bml.calibration import ECE_BINS, CalibrationMeter, calibrate
from bml.checkpoint import (CheckpointError, model_config, model_from_state, read_calibration, read_checkpoint,
                            save_checkpoint, with_calibration)
from bml.datasets import DatasetError, dataset_fingerprint, default_num_workers, input_transform_settings
from bml.evaluation import (CheckpointIdentity, EmbeddingOptions, EvaluationError, build_evaluation_dataset,
                            evaluate_heads, parse_seed_range, results_paths, write_results)
from bml.evaluation.base_means import base_means_dir
from bml.scoring import BASE_MEAN, COMBINED, HEADS, PROTO, heads_needing
from bml.utils import argtypes, messages
from bml.utils.device import configure_tf32, tf32_active
from bml.utils.distributed import DeviceError, resolve_device
from bml.utils.io import OutputError, check_output_file, check_output_folder, check_outputs_are_not_inputs

STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluate a BML or baseline checkpoint on few-shot episodes", add_help=False,
                                     parents=[cli.embedding_parser(), cli.dataset_parser(), cli.input_parser(),
                                              cli.episode_parser(), cli.device_parser(), cli.precision_parser()])
    parser.set_defaults(n_ways=5, n_shots=5, n_queries=15, amp="off")
    parser.add_argument("--test_dataset", default=None,
                        help="cross-domain: evaluate on this data set, with its resize/crop and the "
                             "normalisation of the model's transform")
    parser.add_argument("--split", choices=("val", "test"), default="test")

    episodes = parser.add_argument_group("episodes")
    episodes.add_argument("--episodes", type=argtypes.positive_int, default=2000, help="episodes per seed")
    episodes.add_argument("--seeds", type=parse_seed_range, nargs="+", default=[list(range(10))],
                          metavar="SEED", help="seeds, e.g. '0 1 2' or '0-9' (default 0-9)")

    parser.add_argument("--head", nargs="+", choices=tuple(HEADS), default=[PROTO], metavar="HEAD",
                        help="how each view's logits are made, scored from one embedding pass: "
                             + "; ".join(f"{name}: {head.description}" for name, head in HEADS.items())
                             + f". {PROTO} is always included: the results file reports it (default: %(default)s)")

    compute = parser.add_argument_group("compute")
    compute.add_argument("--storage", choices=tuple(STORAGE_DTYPES), default="float16",
                         help="dtype of the cached embeddings (scores are always float32)")
    compute.add_argument("--max_memory_gb", type=argtypes.number(0, above_minimum=True), default=None,
                         help="larger caches are memory-mapped (default: half of the available RAM)")
    compute.add_argument("--cache_dir", default=None,
                         help="folder of a memory-mapped cache (default: temp); the base-class means of cl2n are kept "
                              "in $BML_CACHE_DIR/base_means (default ~/.cache/bml/base_means)")

    calibration = parser.add_argument_group("calibration (temperature scaling of each vote's confidence)")
    calibration.add_argument("--calibrate", action="store_true",
                             help="fit each vote's temperature on val episodes (the --n_ways/--n_shots/--n_queries "
                                  "of this run) before evaluating (default: use the checkpoint's, if any)")
    calibration.add_argument("--calibration_episodes", type=argtypes.positive_int, default=1000,
                             help="val episodes the temperatures are fitted on (seed 0)")
    calibration.add_argument("--save_calibration", default=None, metavar="PATH",
                             help="with --calibrate: write a copy of the checkpoint carrying the temperatures to "
                                  "PATH (never --ckp_path itself), for python -m bml.predict")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="eval_results")
    output.add_argument("--json", default=None, help="JSON results path (default: beside the results file)")
    return parser


def check_calibration_output(args: argparse.Namespace) -> None:
    """--save_calibration needs --calibrate, and never overwrites the checkpoint evaluated (a released one)."""
    if args.save_calibration is None:
        return
    if not args.calibrate:
        raise OutputError(errno.EINVAL, "--save_calibration writes the temperatures --calibrate fits: add --calibrate")
    if Path(args.save_calibration).resolve() == Path(args.ckp_path).resolve():
        raise OutputError(errno.EEXIST, f"--save_calibration {args.save_calibration} is the checkpoint evaluated: "
                                        f"it is never modified; write the calibrated copy to another path")
    check_output_file(args.save_calibration, "--save_calibration")


def configure_precision(tf32: str, device: torch.device) -> bool:
    """--tf32 on a GPU, as training sets it; returns whether TF32 is in force (what the results record)."""
    if device.type == "cuda":
        configure_tf32(tf32)
    return tf32_active(tf32, device)


def main(args: argparse.Namespace) -> int:
    """Evaluate, print and then write the results, and return the exit code (1: a data, checkpoint or output
    problem). The output paths are checked before anything is embedded."""
    seeds = list(dict.fromkeys(seed for group in args.seeds for seed in group))
    try:
        args.device = resolve_device(args.device)
        tf32 = configure_precision(args.tf32, args.device)
        if args.num_workers is None:
            args.num_workers = default_num_workers()
        checkpoint = read_checkpoint(args.ckp_path)
        identity = CheckpointIdentity.of(args.ckp_path)
        messages.info(f"checkpoint {identity.path}: sha256 {identity.sha256}, {identity.size:,} bytes")
        config = model_config(checkpoint)
        dataset_name = args.dataset or config.get("dataset")
        if dataset_name is None:
            raise DatasetError(f"{args.ckp_path} does not record its data set: pass --dataset")
        transform, image_size = input_transform_settings({**config, "dataset": dataset_name}, args.image_size,
                                                         args.transform)
        dataset = build_evaluation_dataset(dataset_name, args.split, args.data_root, image_size, transform,
                                           args.test_dataset, args.allow_uncropped_cub)
        rule = cli.episode_rule(args)
        label = dataset.name if args.test_dataset is None else f"{dataset_name}_to_{dataset.name}"
        label += ("" if args.split == "test" else f"_{args.split}") + (f"_{rule.label}" if rule.label else "")
        inputs = {"--ckp_path": [args.ckp_path]}
        check_outputs_are_not_inputs({"--json": args.json}, inputs)   # before results_paths reads it
        paths = results_paths(label, args.n_shots, identity, args.output_dir, args.json)
        if paths.taken is not None:
            messages.info(f"{paths.taken} holds results that are not this checkpoint's; these go to {paths.text}")
        check_output_file(paths.text, "--output_dir")
        check_output_file(paths.json, "--json")
        check_calibration_output(args)
        check_outputs_are_not_inputs({"the results file of --output_dir": paths.text, "--json": paths.json,
                                      "--save_calibration": args.save_calibration}, inputs)
        if args.cache_dir is not None:
            check_output_folder(args.cache_dir, "--cache_dir")
        heads = list(dict.fromkeys([PROTO, *args.head]))
        base_dataset = (build_evaluation_dataset(dataset_name, "train", args.data_root, image_size, transform)
                        if heads_needing(BASE_MEAN, heads) else None)
        model = model_from_state(checkpoint, device=args.device, source=args.ckp_path)
        messages.info(f"Evaluating {args.ckp_path} ({config['model']}, views {', '.join(model.view_names)}) on "
                      f"{dataset}: {len(seeds)} seeds x {args.episodes} {args.n_ways}-way {args.n_shots}-shot "
                      f"{args.n_queries}-query episodes" + (f" ({rule.description})" if rule.label else ""))
        start = time.perf_counter()
        calibration, source = read_calibration(checkpoint), "checkpoint"
        if args.calibrate:
            val_set = build_evaluation_dataset(dataset_name, "val", args.data_root, image_size, transform,
                                               allow_uncropped_cub=args.allow_uncropped_cub)
            messages.info(f"Calibrating on {args.calibration_episodes} episodes of {val_set}")
            calibration, source = calibrate(model, val_set, args.n_ways, args.n_shots, args.n_queries,
                                            args.calibration_episodes, device=args.device, amp=args.amp,
                                            num_workers=args.num_workers, progress=not args.no_progress,
                                            rule=rule), "--calibrate"
            if args.save_calibration:
                save_checkpoint(args.save_calibration, with_calibration(checkpoint, calibration))
                messages.info(f"wrote {args.save_calibration}: {args.ckp_path} with the temperatures")
        meter = CalibrationMeter(calibration["temperatures"] if calibration else None)
        storage: dict = {}
        options = EmbeddingOptions(batch_size=args.embed_batch_size, device=args.device, amp=args.amp,
                                   num_workers=args.num_workers, storage_dtype=STORAGE_DTYPES[args.storage],
                                   max_memory_gb=args.max_memory_gb, cache_dir=args.cache_dir,
                                   progress=not args.no_progress)
        head_results = evaluate_heads(model, dataset, args.n_ways, args.n_shots, args.n_queries, args.episodes,
                                      seeds, heads, base_dataset, base_means_dir(), options,
                                      report=storage, logits_sink=meter, rule=rule)
    except (CheckpointError, DatasetError, DeviceError, EvaluationError, FileNotFoundError, MemoryError,
            OutputError) as problem:
        messages.error(str(problem))
        return 1
    metadata = {"model": config["model"], "dataset": dataset_name,
                "test_dataset": args.test_dataset, "split": args.split, "image_size": dataset.image_size,
                "way": args.n_ways, "shot": args.n_shots, "query": args.n_queries, "episodes": args.episodes,
                "within_group": rule.within_group, "distinct_drawers": rule.distinct_drawers,
                "seeds": seeds, "heads": {head: HEADS[head].description for head in heads},
                "storage": args.storage, **storage, "amp": args.amp, "tf32": tf32, "device": str(args.device),
                "data_fingerprint": dataset_fingerprint(dataset),
                "uncropped_cub": dataset.name == "CUB" and "CUB_test" not in Path(str(dataset.paths[0])).parts,
                "seconds": round(time.perf_counter() - start, 1)}
    metadata["calibration"] = {**(calibration or {}), "source": source if calibration else None,
                               "ece_bins": ECE_BINS, "ece": meter.summary()}
    for head, results in head_results.items():
        for name, summary in results.items():
            print(f"{head:>7} {name:>10}: {summary['acc']:.2f} +- {summary['ci95']:.2f}")
    results = head_results.pop(PROTO)
    print(f"==> Mean ACC on {label}: {results[COMBINED]['acc']:.2f}", flush=True)
    for name, errors in meter.summary().items():
        after = f", {errors['calibrated']:.4f} calibrated" if "calibrated" in errors else ""
        print(f"{name:>10}: ECE ({ECE_BINS} bins) {errors['uncalibrated']:.4f} uncalibrated{after}")
    try:
        write_results(results, label, paths, identity, metadata, head_results)
    except OSError as problem:
        messages.error(f"the results above could not be written: {problem}")
        return 1
    messages.info(f"wrote {paths.text} and {paths.json}")
    return 0


def command() -> None:
    """`eval_bml.py`, `python -m bml.evaluate` and the `bml-eval` command."""
    cli.run_command(get_args_parser, main, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    command()
