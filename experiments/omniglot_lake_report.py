"""Summarise `experiments/omniglot_lake.sh`: the comparison's error table (markdown) and training curves (PNG), or
with --sweep the validation table of its sweep.

    python experiments/omniglot_lake_report.py output/omniglot_lake            # writes report.md and curves.png
    python experiments/omniglot_lake_report.py --sweep output/omniglot_lake_sweep   # writes report.md there
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bml.plot import CURVES, plot_runs, read_log
from omniglot_report import read_times   # beside this script

MODELS = ("bml", "global", "local")
GROUPINGS = ("within", "across")
# Lake, Salakhutdinov and Tenenbaum, Science 2015: error (%) on their 20 within-alphabet 20-way 1-shot runs.
PUBLISHED = {"People": 4.5, "Bayesian Program Learning": 3.3, "Siamese network (Koch et al. 2015)": 8.0}
AUGMENTATIONS = {"O": "shifts (O)", "K": "affine distortions and shifts (K)"}
VOTES = {"bml": "published vote (sum of the views)", "bml_scaled": "scaled vote (our extension)",
         "global": "global view alone", "local": "local view alone"}


def error_cell(result: dict) -> str:
    return f"{100 - result['acc']:.2f} ± {result['ci95']:.2f}"


def evaluation(run: Path, model: str, grouping: str) -> dict:
    return json.loads((run / "eval" / f"{model}_{grouping}.json").read_text())


def evaluated_models(run: Path) -> list[str]:
    return [model for model in MODELS if all((run / "eval" / f"{model}_{g}.json").is_file() for g in GROUPINGS)]


def model_label(model: str) -> str:
    return "**BML**" if model == "bml" else f"baseline-{model}"


def results_table(run: Path) -> str:
    """Test error (%) of every model (BML: both votes and each view) on within- and across-alphabet episodes,
    beside the published within-alphabet figures."""
    rows = ["| model | within one alphabet | across alphabets |", "|---|---|---|"]
    rows += [f"| {name} (published, the 20 runs) | {error:.1f} | - |" for name, error in PUBLISHED.items()]
    for model in evaluated_models(run):
        results = {g: evaluation(run, model, g)["results"] for g in GROUPINGS}
        for vote in (VOTES if model == "bml" else ["bml"]):
            label = f"{model_label(model)}, {VOTES[vote]}" if model == "bml" else model_label(model)
            rows.append(f"| {label} | " + " | ".join(error_cell(results[g][vote]) for g in GROUPINGS) + " |")
    return "\n".join(rows)


def best_validation(log: list[dict]) -> dict:
    """The validated epoch with the highest accuracy (what best.pth holds)."""
    return max((entry for entry in log if "val_acc" in entry), key=lambda entry: entry["val_acc"])


def sweep_table(sweep: Path) -> str:
    """One row per sweep run: its training data and episodes, and its best validation (within-alphabet 20-way
    1-shot, distinct drawers) of each vote and view."""
    times = read_times(sweep / "times.txt")
    rows = ["| run | input | training classes | augmentation | training episodes | best epoch "
            "| val error, published vote | scaled vote | global view | local view | minutes |", "|" + "---|" * 11]
    for name in times:
        config = json.loads((sweep / name / "config.json").read_text())
        best = best_validation(read_log(sweep / name / "log.txt"))
        classes = f"{config['num_classes']}" + (" (4 rotations)" if config.get("rotation_classes") else " (upright)")
        shape = (f"{config['n_train_ways']}w{config['n_train_shots']}s{config['n_train_queries']}q"
                 + (", within one alphabet" if config.get("train_within_group") else "")
                 + (f", {config['episodes_per_step']} a step" if config.get("episodes_per_step", 1) > 1 else ""))
        errors = [f"{100 - best[key]:.2f}" for key in ("val_acc_bml_scaled", "val_acc_global", "val_acc_local")]
        augmentation = AUGMENTATIONS.get(config["transform"], config["transform"])
        rows.append(f"| {name} | {config['image_size']} px | {classes} | {augmentation} | {shape} | {best['epoch']} | "
                    f"{100 - best['val_acc']:.2f} ± "
                    f"{best['val_ci95']:.2f} | {' | '.join(errors)} | {times[name] / 60:.1f} |")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> None:
    run = Path(args.run)
    if args.sweep:
        report = sweep_table(run) + "\n"
    else:
        times = read_times(run / "times.txt")
        timing = ", ".join(f"{model_label(model)} {times[model] / 60:.1f} min" for model in MODELS if model in times)
        evaluation_time = sum(seconds for name, seconds in times.items() if name.startswith("eval_"))
        report = (f"{results_table(run)}\n\nTraining wall time: {timing}; all evaluations: "
                  f"{evaluation_time / 60:.1f} min.\n")
        models = [model for model in MODELS if (run / model / "log.txt").is_file()]
        plot_runs([run / model for model in models], run / CURVES, labels=[model_label(m).strip("*") for m in models])
    (run / "report.md").write_text(report)
    print(report + f"wrote {run / 'report.md'}" + ("" if args.sweep else f" and {run / CURVES}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="the output folder of experiments/omniglot_lake.sh final (or sweep)")
    parser.add_argument("--sweep", action="store_true", help="the folder is the sweep's")
    main(parser.parse_args())
