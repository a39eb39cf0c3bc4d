"""Summarise an `experiments/omniglot_cpu.sh` run: the results table (markdown) and training curves (PNG);
or, with --sweep, the validation table of an `experiments/omniglot_sweep.sh` run.

    python experiments/omniglot_report.py output/omniglot_full             # writes report.md and curves.png there
    python experiments/omniglot_report.py output/omniglot_full output/omniglot_full_seed1   # + mean over seeds
    python experiments/omniglot_report.py --sweep output/omniglot_sweep    # writes report.md there

A run trained with some of the models only (MODELS=...) is reported for those.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bml.checkpoint import read_checkpoint
from bml.plot import CURVES, plot_runs, read_log

MODELS = ("bml", "global", "local")
TASKS = ((5, 1), (5, 5), (20, 1), (20, 5))
# Snell et al. 2017, Table 1 (Prototypical Networks, Omniglot, Vinyals split).
PROTONETS = {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9}


def read_times(path: Path) -> dict[str, int]:
    return {name: int(seconds) for name, seconds in (line.split() for line in path.read_text().splitlines())}


def cell(result: dict) -> str:
    return f"{result['acc']:.2f} ± {result['ci95']:.2f}"


def trained_models(run: Path) -> list[str]:
    """The models of `run` that were trained and evaluated on every task."""
    return [model for model in MODELS if (run / model / "log.txt").is_file()
            and all((run / "eval" / f"{model}_{way}w{shot}s.json").is_file() for way, shot in TASKS)]


def row_label(model: str, name: str) -> str:
    return {"bml": f"**{model}**" if model == "bml" else f"baseline-{model}",
            "bml_scaled": "bml, scaled vote (our extension)",
            "global": "bml, global view alone", "local": "bml, local view alone"}[name]


def saved_evaluations(run: Path, model: str) -> list[dict]:
    """The evaluation JSON of `model` on every task, in TASKS order."""
    return [json.loads((run / "eval" / f"{model}_{way}w{shot}s.json").read_text()) for way, shot in TASKS]


def evaluations(run: Path, model: str) -> dict[str, list[dict]]:
    """For each prediction of `model` (BML: the votes and each view), its results on every task."""
    per_task = [entry["results"] for entry in saved_evaluations(run, model)]
    names = ["bml", "bml_scaled", "global", "local"] if model == "bml" else ["bml"]
    return {name: [results[name] for results in per_task] for name in names if name in per_task[0]}


def results_table(run: Path) -> str:
    """One row per model (BML also per view), one column per task, plus Prototypical Networks."""
    header = "| model | " + " | ".join(f"{way}-way {shot}-shot" for way, shot in TASKS) + " |"
    rows = [header, "|" + "---|" * (len(TASKS) + 1)]
    rows.append("| Prototypical Networks (published, Conv-4) | "
                + " | ".join(f"{PROTONETS[task]:.1f}" for task in TASKS) + " |")
    for model in trained_models(run):
        for name, results in evaluations(run, model).items():
            rows.append(f"| {row_label(model, name)} | " + " | ".join(cell(result) for result in results) + " |")
    return "\n".join(rows)


def heads_table(run: Path) -> str:
    """One row per model and test-time head (`eval_bml.py --head`; the model's prediction: BML's summed
    views, a baseline's one view), one column per task; empty when the evaluations have no other head."""
    rows = []
    for model in trained_models(run):
        saved = saved_evaluations(run, model)
        per_head = {"proto": [entry["results"] for entry in saved]}
        for head in saved[0].get("head_results", {}):
            per_head[head] = [entry["head_results"][head] for entry in saved]
        name = "BML" if model == "bml" else f"baseline-{model}"
        rows += [f"| {name} | {head} | " + " | ".join(cell(results["bml"]) for results in per_task) + " |"
                 for head, per_task in per_head.items()]
    if len(rows) <= len(trained_models(run)):
        return ""
    header = "| model | head | " + " | ".join(f"{way}-way {shot}-shot" for way, shot in TASKS) + " |"
    return "\n".join([header, "|" + "---|" * (len(TASKS) + 2), *rows])


def calibration_table(run: Path) -> str:
    """Expected calibration error (15 bins) on the test episodes of every model's votes, before and after the
    temperatures stored in its checkpoint (fitted on val at the end of training), one column per task; empty
    when the evaluations report none."""
    rows = []
    for model in trained_models(run):
        calibrations = [entry.get("calibration", {}) for entry in saved_evaluations(run, model)]
        if not all("ece" in calibration and "temperatures" in calibration for calibration in calibrations):
            continue
        fitted = calibrations[0].get("fitted_on", {})
        name = "BML" if model == "bml" else f"baseline-{model}"
        for vote in calibrations[0]["ece"] if model == "bml" else [model]:   # a baseline's one view
            cells = [f"{c['ece'][vote]['uncalibrated']:.3f} → {c['ece'][vote]['calibrated']:.3f}" for c in calibrations]
            rows.append(f"| {name} | `{vote}` | {calibrations[0]['temperatures'][vote]:.3g} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    setting = f"{fitted.get('way')}-way {fitted.get('shot')}-shot val" if fitted else "val"
    header = (f"| model | vote | T (fitted on {setting}) | " + " | ".join(f"{way}-way {shot}-shot" for way, shot in TASKS)
              + " |")
    return "\n".join([header, "|" + "---|" * (len(TASKS) + 3), *rows])


def seeds_table(runs: list[Path]) -> str:
    """Mean test accuracy over runs that differ only in their training seed, each run's value in brackets."""
    header = "| model | " + " | ".join(f"{way}-way {shot}-shot" for way, shot in TASKS) + " |"
    rows = [header, "|" + "---|" * (len(TASKS) + 1)]
    trained = [set(trained_models(run)) for run in runs]
    models = [model for model in MODELS if all(model in models_of_run for models_of_run in trained)]
    for model in models:
        per_run = [evaluations(run, model) for run in runs]
        for name in (name for name in per_run[0] if all(name in results for results in per_run)):
            cells = []
            for task in range(len(TASKS)):
                values = [results[name][task]["acc"] for results in per_run]
                cells.append(f"{sum(values) / len(values):.2f} ({', '.join(f'{value:.2f}' for value in values)})")
            rows.append(f"| {row_label(model, name)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_curves(run: Path, path: Path) -> None:
    """The three models' curves overlaid (bml.plot): one panel per loss term, lr, images/s, val accuracy."""
    models = trained_models(run)
    plot_runs([run / model for model in models], path,
              labels=[model if model == "bml" else f"baseline-{model}" for model in models])


def first_conv_norm(checkpoint: Path) -> float:
    """Norm of the first convolution's weight: the BatchNorm after it makes the layer scale-invariant, so a
    large norm means a small effective learning rate (the local loss's early gradients can inflate it)."""
    return read_checkpoint(checkpoint)["model"]["encoder.layer1.0.conv1.weight"].norm().item()


def sweep_table(sweep: Path) -> str:
    """One row per sweep run: its settings, final loss terms and last validation accuracies."""
    times = read_times(sweep / "times.txt")
    rows = ["| run | episode / batch | loss weights | clip | final losses (global / local / mutual) | first-conv "
            "norm | val | val global view | val local view | val scaled vote | minutes |", "|" + "---|" * 11]
    for name in times:
        config = json.loads((sweep / name / "config.json").read_text())
        log = read_log(sweep / name / "log.txt")
        last = log[-1]
        validated = [entry for entry in log if "val_acc" in entry][-1]
        shape = (f"{config['n_train_ways']}w{config['n_train_shots']}s{config['n_train_queries']}q"
                 if config["model"] != "global" else f"shuffled {config['batch_size']}")
        if config.get("global_batch"):
            shape += f" + {config['global_batch']} shuffled"
        losses = " / ".join(f"{last[f'train_{term}']:.2f}" if f"train_{term}" in last else "-"
                            for term in ("global", "local", "mutual"))
        views = [f"{validated[key]:.2f}" if key in validated else "-"
                 for key in ("val_acc_global", "val_acc_local", "val_acc_bml_scaled")]
        weights = config.get("weights", "-") if config["model"] == "bml" else "-"
        clip = f"{config['clip_grad']:g}" if config.get("clip_grad") else "-"
        rows.append(f"| {name} | {shape} | {weights} | {clip} | {losses} | {first_conv_norm(sweep / name / 'last.pth'):.1f} "
                    f"| {validated['val_acc']:.2f} ± {validated['val_ci95']:.2f} | {' | '.join(views)} "
                    f"| {times[name] / 60:.1f} |")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> None:
    run = Path(args.runs[0])
    if len(args.runs) > 1:
        path = run.parent / f"{run.name}_seeds.md"
        path.write_text(seeds_table([Path(folder) for folder in args.runs]) + "\n")
        print(path.read_text() + f"wrote {path}")
        return
    if args.sweep:
        report = sweep_table(run) + "\n"
        (run / "report.md").write_text(report)
        print(report)
        return
    times = read_times(run / "times.txt")
    timing = ", ".join(f"{model} {times[model] / 60:.1f} min" for model in MODELS if model in times)
    evaluation_time = sum(seconds for name, seconds in times.items() if name.startswith("eval_"))
    heads, calibration = heads_table(run), calibration_table(run)
    report = (f"{results_table(run)}\n\nTraining wall time: {timing}; all evaluations: "
              f"{evaluation_time / 60:.1f} min.\n" + (f"\nTest-time heads:\n\n{heads}\n" if heads else "")
              + (f"\nExpected calibration error on the test episodes, uncalibrated → calibrated:\n\n{calibration}\n"
                 if calibration else ""))
    (run / "report.md").write_text(report)
    plot_curves(run, run / CURVES)
    print(report)
    print(f"wrote {run / 'report.md'} and {run / CURVES}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="run",
                        help="the output folder of an experiments/omniglot_cpu.sh run; several folders (runs that "
                             "differ in --seed only): a table of the mean over them")
    parser.add_argument("--sweep", action="store_true", help="the folder is an experiments/omniglot_sweep.sh run")
    main(parser.parse_args())
