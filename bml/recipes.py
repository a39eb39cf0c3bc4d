"""Training recipes per data set and method: the published settings (the paper's, see docs/ARCHITECTURE.md), and
CPU-sized ones for the small sets.

The entry scripts leave every recipe flag at None; `apply_recipe` fills what the user did not
give (`bml.training.settings.apply_recipe`), so `python train_bml.py --dataset CUB` trains exactly as published while any flag given
on the command line still wins. A data set's transform and input size are not a recipe's: they
come from its one table, `bml.datasets.dataset_defaults`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bml.utils import argtypes

LR_BY_OPTIMIZER = {"SGD": 0.1, "adam": 1e-3}
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
DECAY_STEP_GAMMA = 0.1
"""--decay_step N: the lr is multiplied by this every N epochs (the original's tieredImageNet schedule)."""
ORIGINAL_EVAL_FREQ = 20
ORIGINAL_EVAL_EPISODES = 2000
"""The original evaluated this many test episodes every ORIGINAL_EVAL_FREQ epochs during training, each a
forward pass that advanced its DropBlock counter (`bml.training.step_plan.dropblock_counter`)."""
DROPBLOCK_COUNTERS = ("original", "steps")


@dataclass(frozen=True)
class LRSchedule:
    """Step decay: after `fraction * epochs` epochs the lr is multiplied by the matching gamma.

    Fractions rather than epoch numbers, so that a shortened run (`--epochs 10`) still decays at
    the same points of its schedule; at the published epoch counts they give the published epochs
    (0.5 and 0.7 of 100 = after epochs 50 and 70).
    """

    fractions: tuple[float, ...]
    gammas: dict[str, tuple[float, ...]]

    def milestones(self, epochs: int) -> tuple[int, ...]:
        """Epoch counts after which each decay applies (at least 1, so a 1-epoch run is valid)."""
        return tuple(max(1, round(fraction * epochs)) for fraction in self.fractions)


def decay_step_milestones(decay_step: int, epochs: int) -> tuple[int, ...]:
    """--decay_step N: the epochs N, 2N, ... before the last one, after which the lr is multiplied by
    DECAY_STEP_GAMMA (the original decayed there whatever --epochs was)."""
    return tuple(range(decay_step, epochs, decay_step))


PUBLISHED_SCHEDULE = LRSchedule(fractions=(0.5, 0.7), gammas={"SGD": (0.06, 0.2), "adam": (0.1, 0.1)})


@dataclass(frozen=True)
class BMLLosses:
    """The published BML loss settings: `train_bml.py`'s defaults (the paper's, the same for every data set)."""

    weights: str = "2_1_0.5"   # global, local and mutual loss weights, joined by '_'
    alpha_1: float = 5.5       # scale of the local loss's elastic margin
    alpha_2: float = 0.1       # slope of the margin's sigmoid of the distance gap
    T: float = 4.0             # temperature of the mutual KL loss

    def model_settings(self) -> dict:
        """These settings as keyword arguments of `BML.losses` (the weights as numbers)."""
        return {"alpha_1": self.alpha_1, "alpha_2": self.alpha_2, "T": self.T,
                "weights": argtypes.weight_values(self.weights)}


BML_LOSSES = BMLLosses()


@dataclass(frozen=True)
class Recipe:
    """Defaults for the flags a dataset's published (or CPU-sized) recipe decides."""

    width: float = 1.0
    drop_rate: float = 0.1
    epochs: int = 100
    episodes_per_epoch: int = 500
    n_train_ways: int = 15                # the published training episode: 15-way 5-shot 7-query
    n_train_shots: int = 5
    n_train_queries: int = 7
    n_ways: int = 5
    n_shots: int = 1
    n_queries: int = 15
    val_episodes: int = 2000
    eval_freq: int = 20
    save_freq: int = 20
    batch_size: int = 128
    optim: str = "SGD"
    clip_grad: float = 0.0                # max gradient norm of a step; 0: off (as published)
    schedule: LRSchedule = field(default=PUBLISHED_SCHEDULE)
    # lr x0.1 every this many epochs instead of `schedule` (tieredImageNet: 40, as the original at any --epochs).
    decay_step: int | None = None
    # Episodes (global baseline: batches) averaged into one optimiser step over all processes together. The
    # published models: 2, one per GPU on 2 GPUs; the CPU-sized recipes: 1. The launchers start at most this many
    # processes and each runs its share.
    episodes_per_step: int = 1
    # Recipes whose training split includes the val classes (tieredImageNet): nothing is chosen on val.
    trains_on_val: bool = False
    # What drives the DropBlock ramp: 'original', the forward passes the original's schedule made (its test
    # episodes every 20 epochs included: full drop near epoch 68 of 100); 'steps', the training steps only.
    dropblock_counter: str = "original"


PUBLISHED = Recipe(episodes_per_step=2)
# CPU-sized, chosen on val (docs/RESULTS.md, "The demo"): a narrow network on small images, 8 short epochs of
# wide 1-shot episodes, the gradient norm clipped as for Omniglot; about 40,000 training images in all.
GLYPHS = Recipe(width=0.25, epochs=8, episodes_per_epoch=52, n_train_ways=32, n_train_shots=1,
                n_train_queries=2, val_episodes=300, eval_freq=2, save_freq=0, batch_size=64, clip_grad=10.0,
                dropblock_counter="steps")
# Omniglot's episodes and clipping were chosen on val (docs/RESULTS.md): wide episodes, and a clipped gradient
# norm so that the local loss's first gradients do not stall the trunk.
OMNIGLOT = Recipe(width=0.25, epochs=20, episodes_per_epoch=100, n_train_ways=100, n_train_shots=1,
                  n_train_queries=1, val_episodes=600, eval_freq=5, save_freq=0, batch_size=64, clip_grad=10.0,
                  dropblock_counter="steps")
# tieredImageNet: the original's lr x0.1 every 40 epochs, over BML's 200 epochs (its train_bml.sh passes
# --epochs 200) and over the baselines' 100 (`METHOD_RECIPES`: its train_baseline.sh passes no --epochs).
TIERED = dataclasses.replace(PUBLISHED, epochs=200, eval_freq=40, decay_step=40, trains_on_val=True)

RECIPES: dict[str, Recipe] = {
    "miniImageNet": PUBLISHED,
    "tieredImageNet": TIERED,
    "FC100": PUBLISHED,
    "CIFAR-FS": PUBLISHED,
    "CUB": PUBLISHED,
    "glyphs": GLYPHS,
    "omniglot": OMNIGLOT,
    "omniglot-lake": OMNIGLOT,
    "omniglot-small": OMNIGLOT,
}
"""BML's recipe of each data set, and the baselines' where `METHOD_RECIPES` has none; any other name is an
image-folder data set: its recipe is derived from its size (`folder_recipe`)."""

METHOD_RECIPES: dict[tuple[str, str], Recipe] = {
    ("tieredImageNet", "global"): dataclasses.replace(TIERED, epochs=100),
    ("tieredImageNet", "local"): dataclasses.replace(TIERED, epochs=100),
}
"""(data set, method) pairs whose recipe differs from the data set's: the original's baselines on tieredImageNet
ran its default 100 epochs."""

MAX_FOLDER_IMAGE_SIZE = 84   # the published input size: larger images are resized down to it


@dataclass(frozen=True)
class FolderFacts:
    """What an image folder's recipe depends on, read from its file listing and one image header."""

    train_classes: int
    train_images: int
    min_train_images_per_class: int
    val_classes: int              # 0: no val/ folder
    min_val_images_per_class: int
    image_side: int               # the shorter side of its first training image


FOLDER_RULE = (f"an image folder's recipe (bml.recipes.folder_recipe): the published one, with training episodes of "
               f"min({PUBLISHED.n_train_ways}, classes) ways, min({PUBLISHED.n_train_shots}, m // 2) shots and "
               f"min({PUBLISHED.n_train_queries}, m - shots) queries (m: the fewest images of a training class); "
               f"steps per epoch = training images // images per episode (every image about once an epoch), "
               f"1 to {PUBLISHED.episodes_per_epoch}; one episode per step; validation episodes of "
               f"min({PUBLISHED.n_ways}, "
               f"val classes) ways, 1 shot, min({PUBLISHED.n_queries}, m_val - 1) queries, none without a val/ "
               f"folder; image size min({MAX_FOLDER_IMAGE_SIZE}, the images' shorter side)")


def folder_recipe(facts: FolderFacts) -> tuple[Recipe, int]:
    """The recipe of an image folder, and its image size, as `FOLDER_RULE` states.

    Raises ValueError when the folder cannot make a training episode (fewer than 2 classes, or a class of
    fewer than 2 images)."""
    if facts.train_classes < 2 or facts.min_train_images_per_class < 2:
        raise ValueError(f"the training split has {facts.train_classes} classes and its smallest class "
                         f"{facts.min_train_images_per_class} images: an episode needs at least 2 classes of at "
                         "least 2 images (one support, one query)")
    ways = min(PUBLISHED.n_train_ways, facts.train_classes)
    shots = min(PUBLISHED.n_train_shots, facts.min_train_images_per_class // 2)
    queries = min(PUBLISHED.n_train_queries, facts.min_train_images_per_class - shots)
    steps = min(PUBLISHED.episodes_per_epoch, max(1, facts.train_images // (ways * (shots + queries))))
    validates = facts.val_classes >= 2 and facts.min_val_images_per_class >= 2
    recipe = dataclasses.replace(
        PUBLISHED, n_train_ways=ways, n_train_shots=shots, n_train_queries=queries, episodes_per_epoch=steps,
        episodes_per_step=1, n_ways=min(PUBLISHED.n_ways, facts.val_classes) if validates else PUBLISHED.n_ways,
        n_queries=min(PUBLISHED.n_queries, facts.min_val_images_per_class - 1) if validates else PUBLISHED.n_queries,
        eval_freq=PUBLISHED.eval_freq if validates else 0)
    return recipe, min(MAX_FOLDER_IMAGE_SIZE, facts.image_side)


def get_recipe(dataset: str, method: str = "bml", folder: FolderFacts | None = None) -> Recipe:
    """The recipe of `method` ('bml', 'global', 'local', ...) on a named data set; an image folder's is derived
    from its `folder` facts when given."""
    if (dataset, method) in METHOD_RECIPES:
        return METHOD_RECIPES[(dataset, method)]
    if dataset in RECIPES:
        return RECIPES[dataset]
    return folder_recipe(folder)[0] if folder is not None else PUBLISHED


def lr_factor(completed_epochs: int, milestones: list[int], gammas: list[float]) -> float:
    """Multiplier of the base lr once `completed_epochs` epochs are done."""
    factor = 1.0
    for milestone, gamma in zip(milestones, gammas):
        if completed_epochs >= milestone:
            factor *= gamma
    return factor


def lr_schedule(base_lr: float, milestones: list[int], gammas: list[float]) -> list[list]:
    """The schedule as [first_epoch, lr] pairs (epochs from 1): [[1, 0.1], [51, 0.006], [71, 0.0012]]."""
    return [[1, base_lr]] + [[milestone + 1, round(base_lr * lr_factor(milestone, milestones, gammas), 12)]
                             for milestone in sorted(set(milestones))]
