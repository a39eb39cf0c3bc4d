"""The BML training losses (the paper; docs/ARCHITECTURE.md "Models"): global per-position
cross-entropy, local prototype loss with the elastic margin, and the cross-view mutual KL. All are
vectorised over queries, positions and classes, with no host synchronisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bml.scoring import class_prototypes, episode_labels, squared_distances

MARGIN_EPS = 1e-8


def global_position_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of B x C x h x w per-position logits against each image's label, averaged
    over positions (and images)."""
    batch, _, height, width = logits.shape
    return F.cross_entropy(logits.float(), labels.view(batch, 1, 1).expand(batch, height, width))


def elastic_margin(distances: torch.Tensor, labels: torch.Tensor, epoch: int, max_epoch: int,
                   alpha_1: float, alpha_2: float) -> torch.Tensor:
    """Margin added to the true-class distance (shape of ``labels``), from detached distances.

    With P = softmax(-d) and n the hardest negative (closest wrong prototype), the margin is
    ``alpha_1 * (epoch/max_epoch + 1e-8) * sigmoid(alpha_2 * (d_y - d_n))``, and 0 for samples
    that are too easy (P_y > 0.5) or too hard (P_n > 0.5), or when alpha_1 is 0.
    """
    distances = distances.detach()
    probs = torch.softmax(-distances, dim=-1)
    true_index = labels.unsqueeze(-1)
    true_distance = distances.gather(-1, true_index).squeeze(-1)
    negative_distances = distances.scatter(-1, true_index, float("inf"))
    hard_distance, hard_index = negative_distances.min(dim=-1)
    true_prob = probs.gather(-1, true_index).squeeze(-1)
    hard_prob = probs.gather(-1, hard_index.unsqueeze(-1)).squeeze(-1)
    margin = alpha_1 * (epoch / max_epoch + MARGIN_EPS) * torch.sigmoid(alpha_2 * (true_distance - hard_distance))
    active = (true_prob <= 0.5) & (hard_prob <= 0.5)
    return torch.where(active, margin, torch.zeros_like(margin))


def local_prototype_loss(features: torch.Tensor, way: int, shot: int, epoch: int | torch.Tensor, max_epoch: int,
                         alpha_1: float, alpha_2: float) -> torch.Tensor:
    """Episodic loss on a shot-major episode's feature maps (B x D x h x w, support first).

    Prototypes average each class's support maps over shots and positions; every query position
    is classified by minus its squared distance to the prototypes, plus the elastic margin on
    the true class, and the cross-entropy is averaged over queries and positions. With
    ``alpha_1 = 0`` and 1x1 maps this is the plain prototypical loss on pooled features.
    """
    num_support = way * shot
    support, query = features[:num_support], features[num_support:]
    prototypes = class_prototypes(support.flatten(2).mean(2), way)
    query_positions = query.flatten(2).transpose(1, 2)
    distances = squared_distances(query_positions, prototypes)
    labels = episode_labels(way, query.shape[0], features.device)
    labels = labels.unsqueeze(1).expand(distances.shape[:2])
    margin = elastic_margin(distances, labels, epoch, max_epoch, alpha_1, alpha_2)
    logits = -(distances + margin.unsqueeze(-1) * F.one_hot(labels, way))
    return F.cross_entropy(logits.reshape(-1, way), labels.reshape(-1))


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """``T²/B * Σ softmax(teacher/T) (log softmax(teacher/T) - log softmax(student/T))``;
    gradients flow into both arguments."""
    student_log_probs = F.log_softmax(student.float() / T, dim=1)
    teacher_log_probs = F.log_softmax(teacher.float() / T, dim=1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="sum", log_target=True)
    return kl * (T * T / student.shape[0])


def mutual_kl_loss(global_features: torch.Tensor, local_features: torch.Tensor, T: float) -> torch.Tensor:
    """Cross-view mutual loss on pooled B x D features: KL_T(g, l) + KL_T(l, g)."""
    return distillation_kl(global_features, local_features, T) + distillation_kl(local_features, global_features, T)
