"""The training loss terms shared by the models; their prototype scoring is `bml.scoring`'s."""

from bml.losses.terms import (
    distillation_kl,
    elastic_margin,
    global_position_loss,
    local_prototype_loss,
    mutual_kl_loss,
)

__all__ = [
    "distillation_kl",
    "elastic_margin",
    "global_position_loss",
    "local_prototype_loss",
    "mutual_kl_loss",
]
