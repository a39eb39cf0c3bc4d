"""Loss terms and prototype scoring shared by the models, the trainer and the evaluator."""

from bml.losses.distance import class_prototypes, prototype_logits, squared_distances
from bml.losses.terms import (
    distillation_kl,
    elastic_margin,
    global_position_loss,
    local_prototype_loss,
    mutual_kl_loss,
)

__all__ = [
    "class_prototypes",
    "distillation_kl",
    "elastic_margin",
    "global_position_loss",
    "local_prototype_loss",
    "mutual_kl_loss",
    "prototype_logits",
    "squared_distances",
]
