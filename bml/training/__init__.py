"""Training: one driver for BML and both baselines, one module per concern.

    flags        the training flags the entry points share (`get_common_parser`)
    settings     the recipe filled in and the derived settings: the only writer of `args`; the dry-run plan
    run_folder   which folder a run writes to, claimed and locked; the resume and next-step commands
    step_plan    which images each step uses (episodes or shuffled batches, per method)
    run_data     the splits opened and checked against every episode shape before any work
    state        the counters, what a step needs, and the training checkpoint (exact resume)
    wrappers     the loss as forward pass, DDP, torch.compile, optimiser and learning rate
    engine       `train_one_epoch`, `evaluate` (validation)
    guard        non-finite losses and diverging weights
    signals      SIGINT/SIGTERM as a request to stop after the step
    processes    what the processes of a distributed run agree on
    driver       `train`: the run from settings to the last checkpoint
"""

from bml.training.driver import TrainingOutcome, train
from bml.training.flags import get_common_parser, parse_training_args
from bml.training.settings import (SettingsError, apply_recipe, default_save_folder, finish_settings, parse_weights,
                                   resolve_episodes, run_plan)

__all__ = ["SettingsError", "TrainingOutcome", "apply_recipe", "default_save_folder", "finish_settings",
           "get_common_parser", "parse_training_args", "parse_weights", "resolve_episodes", "run_plan", "train"]
