"""The test-time rule in one place: prototypes, minus squared distances, each view's logits, the votes.

BML classifies a query by its nearest class prototype in each view (the mean support embedding of
the class) and combines the views' logits, minus the squared Euclidean distances, by a *vote*.
Evaluation, validation, the losses and `FewShotClassifier` all score with this module; it is the
bottom of the package and imports nothing else of `bml`.

The votes are the entries of `VOTES` plus each view alone (named after the view): a new vote is one
`VOTES` entry, and it then appears in `eval_bml.py`'s results, in validation's log and as a
`--vote` choice of `python -m bml.predict`. A vote sees every view's `ViewScores`, so a later
scoring head (e.g. logistic regression instead of nearest prototype) only changes how a view's
logits are made, not the votes.

Episodes are shot-major: position i * way + c of an episode holds the i-th image of its class c.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

COMBINED = "bml"
"""The published vote: the sum of the views' logits."""
SCALED = "bml_scaled"
"""Our extension: each view's logits divided by its episode's `prototype_spread` before the sum."""


def episode_labels(way: int, count: int, device: torch.device | None = None) -> torch.Tensor:
    """Episode labels of `count` shot-major positions: position j -> j % way."""
    return torch.arange(count, dtype=torch.long, device=device) % way


def class_prototypes(support: torch.Tensor, way: int) -> torch.Tensor:
    """Mean support embedding per class: (..., shot * way, D) in shot-major order -> (..., way, D)."""
    return support.unflatten(-2, (-1, way)).mean(-3)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||²`` for a (..., M, D) and b (N, D) or (..., N, D): shape (..., M, N).

    Expands ``||a||² + ||b||² - 2 a·b`` (one matmul, no (M, N, D) intermediate) in float32 with
    autocast off, clamped at 0: under bf16 the cancellation would swamp the small distances.
    """
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        a_norms = a.pow(2).sum(-1, keepdim=True)
        b_norms = b.pow(2).sum(-1).unsqueeze(-2)
        return (a_norms + b_norms - 2.0 * a @ b.transpose(-1, -2)).clamp_min(0.0)


def prototype_logits(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Minus the squared Euclidean distance of each query (..., M, D) to each prototype (N, D)."""
    return -squared_distances(query, prototypes)


def centered_prototype_logits(queries: torch.Tensor, query_squared_norms: torch.Tensor, center: torch.Tensor,
                              prototypes: torch.Tensor) -> torch.Tensor:
    """`prototype_logits` of many episodes from precomputed query terms: (E, Q, D) queries, (E, way, D)
    prototypes -> (E, Q, way).

    With c a reference point (the split's mean embedding) and `query_squared_norms` the (E, Q) values
    ||q - c||^2, ||q - p||^2 = ||q - c||^2 + ||p - c||^2 - 2 (q.(p - c) - c.(p - c)): one batched
    matrix product, and float32 cancellation at the scale of the distances, not of the non-negative
    embeddings.
    """
    prototypes = prototypes - center
    cross = torch.bmm(queries, prototypes.transpose(1, 2)) - (prototypes @ center).unsqueeze(1)
    return -(query_squared_norms.unsqueeze(-1) + prototypes.square().sum(-1).unsqueeze(1) - 2 * cross)


def prototype_spread(prototypes: torch.Tensor) -> torch.Tensor:
    """(..., way, D) prototypes -> (...) mean squared distance between two of an episode's prototypes.

    It uses the support images only (inductive) and is 1 for a 1-way episode, where it is undefined.
    """
    way = prototypes.shape[-2]
    if way < 2:
        return prototypes.new_ones(prototypes.shape[:-2])
    deviations = (prototypes - prototypes.mean(-2, keepdim=True)).square().sum(-1).mean(-1)
    return (2 * way / (way - 1) * deviations).clamp_min(torch.finfo(prototypes.dtype).tiny)


class ViewScores(NamedTuple):
    """One view's scores of a batch of queries: what a vote combines."""

    logits: torch.Tensor       # (..., Q, way): minus squared distances to the prototypes
    prototypes: torch.Tensor   # (..., way, D)


def summed_logits(views: Mapping[str, ViewScores]) -> torch.Tensor:
    """The published vote: the sum of the views' logits."""
    return sum(view.logits for view in views.values())


def spread_scaled_logits(views: Mapping[str, ViewScores]) -> torch.Tensor:
    """Each view's logits divided by its episode's `prototype_spread`, then summed: the view whose distances
    are larger (they can differ several-fold) does not outvote the other."""
    return sum(view.logits / prototype_spread(view.prototypes)[..., None, None] for view in views.values())


@dataclass(frozen=True)
class Vote:
    """A rule from every view's scores to the (..., Q, way) logits of one prediction."""

    combine: Callable[[Mapping[str, ViewScores]], torch.Tensor]
    description: str
    min_views: int = 1   # models with fewer views do not get this vote


VOTES: dict[str, Vote] = {
    COMBINED: Vote(summed_logits, "the sum of the views' logits (the published rule)"),
    SCALED: Vote(spread_scaled_logits, "each view's logits divided by its prototypes' mean squared distance, "
                                       "then summed (our extension)", min_views=2),
}
"""The votes beyond each view alone, in the order they are reported."""


def view_alone(name: str) -> Callable[[Mapping[str, ViewScores]], torch.Tensor]:
    """The vote of one view: its own logits."""
    return lambda views: views[name].logits


def votes_for(view_names: Sequence[str]) -> dict[str, Callable[[Mapping[str, ViewScores]], torch.Tensor]]:
    """Name -> rule of every vote a model with these views gets: each view alone, then the `VOTES` entries."""
    votes = {name: view_alone(name) for name in view_names}
    votes.update({name: vote.combine for name, vote in VOTES.items() if len(view_names) >= vote.min_views})
    return votes

