"""A kind of model is one `FewShotModel` subclass plus its entry in `MODELS`: a toy kind added there alone is
built by `build_model` and recognised from its checkpoint's keys."""

import pytest
import torch
from torch import nn

from bml.checkpoint import load_model, model_config, read_checkpoint, save_checkpoint
from bml.models import MODELS, FewShotModel, build_model
from bml.models.backbones import backbone_channels, build_encoder, canonical_backbone
from bml.models.base import pooled


class ToyModel(FewShotModel):
    """An encoder and a head of its own: the defaults build it from the backbone settings and read its width."""

    view_names = ("toy",)
    kind = "toy"
    identifying_keys = ("toy_head.",)

    def __init__(self, width: float = 1.0, drop_rate: float = 0.1, backbone: str = "resnet12") -> None:
        super().__init__()
        self.backbone = canonical_backbone(backbone)
        self.encoder = build_encoder(self.backbone, width, drop_rate)
        self.toy_head = nn.Linear(backbone_channels(self.backbone, width)[-1], 2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.encoder(images),)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        return (pooled(self.encoder(images)),)


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setitem(MODELS, ToyModel.kind, ToyModel)


def test_build_model_builds_the_toy_kind(toy_kind):
    model = build_model({"model": "toy", "backbone": "Res18", "width": 0.125})
    assert isinstance(model, ToyModel) and model.backbone == "resnet18"
    with pytest.raises(ValueError, match="expected one of bml, global, local, toy"):
        build_model({"model": "nope"})


@pytest.mark.parametrize("backbone", ["resnet12", "resnet18"])
def test_the_toy_kind_is_recognised_from_its_keys(toy_kind, tmp_path, backbone):
    torch.manual_seed(0)
    model = build_model({"model": "toy", "backbone": backbone, "width": 0.125})
    save_checkpoint(tmp_path / "toy.pth", {"model": model.state_dict()})   # no config
    config = model_config(read_checkpoint(tmp_path / "toy.pth"))
    assert (config["model"], config["backbone"], config["width"]) == ("toy", backbone, 0.125)
    loaded = load_model(tmp_path / "toy.pth")
    assert isinstance(loaded, ToyModel)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
