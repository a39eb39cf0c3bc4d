"""The ResNet-18 BML variant: released key names, shapes, forward/backward."""

import torch

from bml.checkpoint import load_model, model_config, read_checkpoint
from bml.models import BML, BaselineGlobal
from bml.recipes import BML_LOSSES
from fixtures import save_released_checkpoint
from test_checkpoint import bn_entries, random_state_dict


def basic_block_entries(prefix, in_channels, out_channels, downsample):
    entries = {f"{prefix}.conv1.weight": (out_channels, in_channels, 3, 3),
               f"{prefix}.conv2.weight": (out_channels, out_channels, 3, 3)}
    entries.update(bn_entries(f"{prefix}.bn1", out_channels))
    entries.update(bn_entries(f"{prefix}.bn2", out_channels))
    if downsample:
        entries[f"{prefix}.downsample.0.weight"] = (out_channels, in_channels, 1, 1)
        entries.update(bn_entries(f"{prefix}.downsample.1", out_channels))
    return entries


def stage_entries(prefix, in_channels, out_channels, downsample):
    entries = basic_block_entries(f"{prefix}.0", in_channels, out_channels, downsample)
    entries.update(basic_block_entries(f"{prefix}.1", out_channels, out_channels, False))
    return entries


def released_resnet18_shapes(num_classes, width=1.0):
    """The released ResNet-18 key list, at ``width`` (64/128/256/512 at 1.0)."""
    c1, c2, c3, c4 = (round(c * width) for c in (64, 128, 256, 512))
    entries = {"encoder.conv1.weight": (c1, 3, 3, 3)}
    entries.update(bn_entries("encoder.bn1", c1))
    entries.update(stage_entries("encoder.layer1", c1, c1, downsample=False))
    entries.update(stage_entries("encoder.layer2", c1, c2, downsample=True))
    entries.update(stage_entries("encoder.layer3", c2, c3, downsample=True))
    for view in ("global_view", "local_view"):
        entries.update(stage_entries(f"{view}.layer4", c3, c4, downsample=True))
    entries["global_w.weight"] = (num_classes, c4, 1, 1)
    entries["global_w.bias"] = (num_classes,)
    return entries


def test_released_resnet18_keys_load_strictly(tmp_path):
    shapes = released_resnet18_shapes(num_classes=64)
    weights = random_state_dict(shapes, seed=1)
    save_released_checkpoint(tmp_path / "r18.pth", weights, dataset="miniImageNet", backbone="Res18")
    model = load_model(tmp_path / "r18.pth")
    assert model.backbone == "resnet18" and not model.training
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_resnet18_recognised_by_keys_alone(tmp_path):
    weights = random_state_dict(released_resnet18_shapes(num_classes=10, width=0.25))
    torch.save({"model": weights}, tmp_path / "r18.pth")
    config = model_config(read_checkpoint(tmp_path / "r18.pth"))
    assert (config["backbone"], config["width"], config["num_classes"]) == ("resnet18", 0.25, 10)
    assert load_model(tmp_path / "r18.pth").backbone == "resnet18"


def test_resnet18_forward_backward_at_84px():
    torch.manual_seed(0)
    model = BML(num_classes=5, width=0.125, backbone="resnet18").train()
    assert not model.dropblocks()
    model.dropblock_step = 12
    assert model.dropblock_step == 12
    images = torch.randn(4, 3, 84, 84)
    global_map, local_map = model(images)
    assert global_map.shape == local_map.shape == (4, 64, 5, 5)
    losses = model.losses(images, torch.tensor([0, 1, 2, 3]), way=2, shot=1, query=1, epoch=1, max_epoch=100,
                          **BML_LOSSES.model_settings())
    losses["total"].backward()
    assert model.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.local_view.layer4[0].conv1.weight.grad.abs().sum() > 0
    eg, el = model.eval().embed(images)
    assert eg.shape == (4, 64 * 25)


def test_resnet18_baseline_pools_to_512_times_width():
    model = BaselineGlobal(num_classes=3, width=0.125, backbone="Res18").eval()
    (embedding,) = model.embed(torch.randn(2, 3, 32, 32))
    assert embedding.shape == (2, 64)
    assert "encoder.layer4.1.bn2.weight" in model.state_dict()
