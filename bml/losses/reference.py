"""The local loss as the original code computed it: one query and one position at a time, with the margin's
decisions taken on the host (``.item()``).

Far too slow to train with; it is the plain statement of the loss that the vectorised
`local_prototype_loss` is tested against (tests/test_losses.py) and timed against (bench/train_step.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MARGIN_CASES = ("no_margin", "too_easy", "too_hard", "margin")


def looped_local_loss(features: torch.Tensor, way: int, shot: int, epoch: int, max_epoch: int, alpha_1: float,
                      alpha_2: float) -> tuple[torch.Tensor, dict[str, int]]:
    """(loss, how many query positions fell in each of `MARGIN_CASES`) of one shot-major episode's
    B x D x h x w feature maps, support first; the arguments are `local_prototype_loss`'s."""
    channels = features.shape[1]
    support, query = features[: way * shot], features[way * shot:]
    prototypes = []
    for c in range(way):
        maps = [support[i * way + c].reshape(channels, -1) for i in range(shot)]
        prototypes.append(torch.stack(maps).mean(0).mean(1))
    losses, cases = [], dict.fromkeys(MARGIN_CASES, 0)
    for j in range(query.shape[0]):
        y = j % way
        label = torch.tensor(y, device=features.device)
        positions = query[j].reshape(channels, -1)
        for s in range(positions.shape[1]):
            d = torch.stack([((positions[:, s] - p) ** 2).sum() for p in prototypes])
            dd = d.detach()
            probs = torch.softmax(-dd, 0)
            n = min((c for c in range(way) if c != y), key=lambda c: dd[c].item())
            if alpha_1 == 0:
                margin, case = 0.0, "no_margin"
            elif probs[y].item() > 0.5:
                margin, case = 0.0, "too_easy"
            elif probs[n].item() > 0.5:
                margin, case = 0.0, "too_hard"
            else:
                margin = alpha_1 * (epoch / max_epoch + 1e-8) / (1 + math.exp(-alpha_2 * (dd[y] - dd[n]).item()))
                case = "margin"
            cases[case] += 1
            logits = -(d + margin * F.one_hot(label, way))
            losses.append(F.cross_entropy(logits[None], label[None]))
    return torch.stack(losses).mean(), cases
