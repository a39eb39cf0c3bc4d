"""The test-time rule in one place: prototypes, minus squared distances, each view's logits, the votes.

BML classifies a query by its nearest class prototype in each view (the mean support embedding of
the class) and combines the views' logits, minus the squared Euclidean distances, by a *vote*.
Evaluation, validation, the losses and `FewShotClassifier` all score with this module; it is the
bottom of the package and imports nothing else of `bml`.

The votes are the entries of `VOTES` plus each view alone (named after the view): a new vote is one
`VOTES` entry, and it then appears in `eval_bml.py`'s results, in validation's log and as a
`--vote` choice of `python -m bml.predict`. A vote sees every view's `ViewScores`.

How one view's logits are made is a *head*, the entries of `HEADS`: `proto` (nearest prototype, the
published rule), `cl2n` (SimpleShot's centred L2: features centred on the base classes' mean
embedding, L2-normalised, then nearest prototype), `support_cl2n` (the same centred on the episode's own
support: a style every image of the episode shares, such as one alphabet's, drops out) and `logreg`
(RFS's multinomial logistic regression fitted on the support set of L2-normalised features). A new head is one `HEADS` entry; it then appears
in `eval_bml.py --head`, in validation and as a `--head` choice of `python -m bml.predict`. Every
vote applies to every head. A head names the side input its features need (`side_input`: `BASE_MEAN`
for `cl2n`; `heads_needing` answers which heads need it) and whether the evaluation's fast paths apply
to its classifier (`in_support_span`, `centred_fast_path`).

Episodes are shot-major: position i * way + c of an episode holds the i-th image of its class c.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

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



PROTO = "proto"
"""The published head: nearest prototype on the embeddings as they are."""
BASE_MEAN = "base_mean"
"""A head's side input: the base classes' mean embedding of every view (`bml.evaluation.base_class_means`),
the second argument of its `features`."""
SIDE_INPUTS = (BASE_MEAN,)
"""The side inputs the evaluation and `FewShotClassifier` know how to provide."""
LOGREG_C = 1.0
"""Inverse L2 strength of `logreg`, as in RFS (scikit-learn's default C): minimise
sum_i CE_i + ||W||^2 / (2 C), the bias unpenalised."""
LOGREG_ITERATIONS = 100
"""Accelerated gradient steps of `logreg`; with unit-norm features the error shrinks by about
1 - 1/sqrt(C * support images + 1) a step: below float32 resolution after 100 steps for 5-way 5-shot."""


def labelled_prototypes(support: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
    """Mean support embedding per class for any labels (any shots per class): (..., S, D), (S,) -> (..., way, D)."""
    one_hot = F.one_hot(labels, way).to(support.dtype).transpose(-1, -2)
    return (one_hot @ support) / one_hot.sum(-1, keepdim=True)


def l2_normalized(features: torch.Tensor, base_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Each embedding scaled to unit length (float32)."""
    return F.normalize(features.float(), dim=-1)


def centered_l2_normalized(features: torch.Tensor, base_mean: torch.Tensor | None) -> torch.Tensor:
    """Each embedding minus the base classes' mean embedding, then scaled to unit length (float32)."""
    if base_mean is None:
        raise ValueError("this head centres on the base classes' mean embedding: pass base_mean")
    return F.normalize(features.float() - base_mean.to(features.device, torch.float32), dim=-1)


def nearest_prototype(support: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, way: int) -> ViewScores:
    """Minus squared distances of (..., Q, D) queries to the class means of the (..., S, D) support."""
    prototypes = labelled_prototypes(support.float(), labels, way)
    return ViewScores(prototype_logits(queries, prototypes), prototypes)


def support_centred_prototype(support: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor,
                              way: int) -> ViewScores:
    """`nearest_prototype` on embeddings centred on the episode's support centre (the mean of its class
    prototypes: every class counts once whatever its shots), then L2-normalised.

    cl2n's centre is the base classes' mean; this one is the episode's, so a component that all its images
    share (in episodes within one group, the group's style) is removed before the comparison. Inductive: it
    uses the support only.
    """
    center = labelled_prototypes(support.float(), labels, way).mean(-2, keepdim=True)
    support, queries = (F.normalize(x.float() - center, dim=-1) for x in (support, queries))
    return nearest_prototype(support, labels, queries, way)


def fit_logistic_regression(support: torch.Tensor, labels: torch.Tensor, way: int, c: float = LOGREG_C,
                            iterations: int = LOGREG_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression of every episode of a (..., S, D) support stack at once: (..., way, D)
    weights and (..., way) biases minimising sum_i CE_i + ||W||^2 / (2 c).

    One vectorised optimisation over the whole stack (the episodes' problems are independent), run in the
    support's span: W = A^T X, so each step costs (S, S) products, not (S, D) ones. Nesterov's accelerated
    gradient with the step 1/L of the gradient's Lipschitz bound L = (max ||x||^2 + 1) / 2 + 1 / (c S) and
    momentum (sqrt(k) - 1) / (sqrt(k) + 1), k = L c S: the iterates are those of the same method on each
    episode alone.
    """
    support = support.float()
    count = support.shape[-2]
    targets = F.one_hot(labels, way).float().expand(*support.shape[:-1], way)
    gram = support @ support.transpose(-1, -2)
    strength = 1.0 / (c * count)   # the penalty per sample: mean CE + strength / 2 ||W||^2
    lipschitz = (gram.diagonal(dim1=-2, dim2=-1).amax(-1) + 1) / 2 + strength
    step = (1 / lipschitz)[..., None, None]
    root = (lipschitz / strength).sqrt()[..., None, None]
    momentum = (root - 1) / (root + 1)
    coefficients = support.new_zeros(targets.shape)                # A: W = A^T X
    bias = support.new_zeros((*targets.shape[:-2], 1, way))
    previous_coefficients, previous_bias = coefficients, bias
    for _ in range(iterations):
        ahead_coefficients = coefficients + momentum * (coefficients - previous_coefficients)
        ahead_bias = bias + momentum * (bias - previous_bias)
        residual = ((gram @ ahead_coefficients + ahead_bias).softmax(-1) - targets) / count
        previous_coefficients, previous_bias = coefficients, bias
        coefficients = ahead_coefficients - step * (residual + strength * ahead_coefficients)
        bias = ahead_bias - step * residual.sum(-2, keepdim=True)
    return coefficients.transpose(-1, -2) @ support, bias.squeeze(-2)


def logistic_regression(support: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, way: int) -> ViewScores:
    """The logits of (..., Q, D) queries under `fit_logistic_regression` of the (..., S, D) support."""
    weights, bias = fit_logistic_regression(support, labels, way)
    logits = queries.float() @ weights.transpose(-1, -2) + bias.unsqueeze(-2)
    return ViewScores(logits, labelled_prototypes(support.float(), labels, way))


def support_span_coordinates(support: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., S, D) support and (..., Q, D) queries in an orthonormal basis of the support's span: (..., S, S) and
    (..., Q, S). Inner products with the support and distances between support points are kept; the queries
    lose only their component orthogonal to the span, which no classifier fitted in the span can see."""
    basis, _ = torch.linalg.qr(support.transpose(-1, -2))
    return support @ basis, queries @ basis


@dataclass(frozen=True)
class Head:
    """How one view's logits are made: a per-image feature map, then a classifier fitted on the support."""

    classify: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], ViewScores]   # support, labels, queries, way
    description: str
    features: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None   # (x, side input); None: as is
    side_input: str | None = None   # what `features` takes besides the embeddings: one of `SIDE_INPUTS`, or None
    # `classify` sees the features only through inner products with the support (and is rotation invariant):
    # the evaluation may then fit it on `support_span_coordinates`, S dimensions instead of D, many episodes at once.
    in_support_span: bool = False
    # `classify` is `nearest_prototype`: the evaluation may then score cached episodes in the centred form
    # (`centered_prototype_logits`), each cached row's squared distance to the split's mean computed once.
    centred_fast_path: bool = False

    def __post_init__(self) -> None:
        if self.side_input not in (None, *SIDE_INPUTS):
            raise ValueError(f"unknown side input {self.side_input!r} of head {self.description!r}: use one of "
                             f"{', '.join(SIDE_INPUTS)}, or None")


HEADS: dict[str, Head] = {
    PROTO: Head(nearest_prototype, "nearest prototype (the published rule)", centred_fast_path=True),
    "cl2n": Head(nearest_prototype, "centred on the base classes' mean embedding, L2-normalised, nearest prototype",
                 centered_l2_normalized, side_input=BASE_MEAN, centred_fast_path=True),
    "support_cl2n": Head(support_centred_prototype, "centred on the episode's support centre (the mean of its class "
                                                    "prototypes), L2-normalised, nearest prototype"),
    "logreg": Head(logistic_regression, f"logistic regression on the L2-normalised support (C={LOGREG_C:g}, "
                                        f"{LOGREG_ITERATIONS} accelerated gradient steps)", l2_normalized,
                      in_support_span=True),
}
"""The heads, in the order they are reported."""


def heads_needing(side_input: str, heads: Iterable[str]) -> list[str]:
    """The heads of `heads` whose features take `side_input` (e.g. `BASE_MEAN`), in order: those its caller
    must provide it for. Names not in `HEADS` need nothing (their callers report them as unknown)."""
    return [name for name in heads if name in HEADS and HEADS[name].side_input == side_input]


def head_scores(head: str, support: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, way: int,
                base_mean: torch.Tensor | None = None) -> ViewScores:
    """One view's scores of (..., Q, D) queries under `HEADS[head]`, fitted on the (..., S, D) labelled support."""
    rule = HEADS[head]
    if rule.features is not None:
        support, queries = rule.features(support, base_mean), rule.features(queries, base_mean)
    return rule.classify(support, labels, queries, way)
