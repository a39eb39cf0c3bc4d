"""A backbone is one entry of `BACKBONES`: a toy one added there alone builds BML and both baselines, is offered
by the `--backbone` choices, and its checkpoints are recognised from their keys."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from bml.checkpoint import load_model, model_config, read_checkpoint, save_checkpoint
from bml.models import BML, BaselineGlobal, BaselineLocal, build_model
from bml.models.backbones import BACKBONES, Backbone, backbone_flag_choices, canonical_backbone


def toy_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), nn.ReLU())


def toy_stages(channels, first_stage: int = 1, in_channels: int = 3) -> nn.Sequential:
    """Stages named `stem`, `stage2`, ... (the stem's key is the toy's signature)."""
    stages = OrderedDict()
    for index, out_channels in enumerate(channels, start=first_stage):
        stages["stem" if index == 1 else f"stage{index}"] = toy_stage(in_channels, out_channels)
        in_channels = out_channels
    return nn.Sequential(stages)


TOY = Backbone(
    channels=(8, 12, 16, 20),
    trunk=lambda channels, drop_rate: toy_stages(channels),
    view=lambda in_channels, out_channels, drop_rate: toy_stages([out_channels], 4, in_channels),
    encoder=lambda channels, drop_rate: toy_stages(channels),
    flag_name="Toy",
    signature_key="stem.0.weight",
    view_last_stage_key="stage4.0.weight",
    encoder_last_stage_key="stage4.0.weight",
)
SETTINGS = [
    {"model": "bml", "num_classes": 5},
    {"model": "global", "num_classes": 4, "spatial": True},
    {"model": "global", "num_classes": 3},
    {"model": "local"},
]


@pytest.fixture
def toy_backbone(monkeypatch):
    monkeypatch.setitem(BACKBONES, "toy", TOY)


def test_the_toy_backbone_is_named_and_offered(toy_backbone):
    assert canonical_backbone("TOY") == canonical_backbone("toy") == "toy"
    assert backbone_flag_choices() == ("Res12", "Res18", "Toy")
    with pytest.raises(ValueError, match="'toy' \\('Toy'\\)"):
        canonical_backbone("vit")


@pytest.mark.parametrize("model_class", [BML, BaselineGlobal, BaselineLocal])
def test_every_model_builds_and_embeds_with_the_toy_backbone(toy_backbone, model_class):
    settings = next(s for s in SETTINGS if s["model"] == model_class.kind)
    model = build_model({**settings, "backbone": "Toy", "width": 0.5}).eval()
    assert type(model) is model_class and model.backbone == "toy"
    with torch.no_grad():
        feature_maps = model(torch.randn(2, 3, 32, 32))
        embeddings = model.embed(torch.randn(2, 3, 32, 32))
    assert len(feature_maps) == len(embeddings) == len(model.view_names)
    assert all(feature_map.shape == (2, 10, 2, 2) for feature_map in feature_maps)


@pytest.mark.parametrize("settings", SETTINGS)
def test_a_toy_checkpoint_is_recognised_from_its_keys_alone(toy_backbone, tmp_path, settings):
    torch.manual_seed(0)
    model = build_model({**settings, "backbone": "toy", "width": 0.5})
    save_checkpoint(tmp_path / "toy.pth", {"model": model.state_dict()})   # no config
    config = model_config(read_checkpoint(tmp_path / "toy.pth"))
    assert (config["model"], config["backbone"], config["width"]) == (settings["model"], "toy", 0.5)
    assert (config["num_classes"], config["spatial"]) == (settings.get("num_classes"), settings.get("spatial", False))
    loaded = load_model(tmp_path / "toy.pth")
    assert type(loaded) is type(model) and loaded.backbone == "toy"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
