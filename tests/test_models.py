"""ResNet-12, DropBlock, BML and the baselines: shapes, keys, the DropBlock counter, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from bml.checkpoint import model_config, read_checkpoint, save_checkpoint
from bml.models import BML, BaselineGlobal, BaselineLocal, build_model
from bml.models.dropblock import DropBlock, expand_seeds, keep_probability
from bml.models.resnet12 import ResNet12Block
from bml.recipes import BML_LOSSES


def test_keep_probability_ramps_linearly_over_40000_steps():
    assert keep_probability(0.1, 0) == 1.0
    assert keep_probability(0.1, 20000) == pytest.approx(0.95)
    assert keep_probability(0.1, 40000) == pytest.approx(0.9)
    assert keep_probability(0.1, 90000) == pytest.approx(0.9)


def test_each_seed_drops_the_block_down_and_right_of_it():
    block_size, size = 3, 8
    seeds = torch.zeros(1, 1, size - block_size + 1, size - block_size + 1)
    seeds[0, 0, 1, 4] = 1
    dropped = expand_seeds(seeds, block_size)[0, 0]
    expected = torch.zeros(size, size)
    expected[1:4, 4:7] = 1
    assert dropped.shape == (size, size)
    assert torch.equal(dropped, expected)


def test_dropblock_drops_the_expected_fraction_in_whole_blocks():
    torch.manual_seed(0)
    drop = DropBlock(drop_rate=0.1, block_size=5).train()
    drop.step = 40000
    x = torch.ones(64, 32, 10, 10)
    out = drop(x)
    dropped = out == 0
    # Each unit is covered by as many seed positions as a 5x5 box around it holds (1..25).
    counts = F.conv2d(F.pad(torch.ones(1, 1, 6, 6), (4,) * 4), torch.ones(1, 1, 5, 5))
    expected = (1 - (1 - drop.gamma(10, 10, 5)) ** counts).mean().item()
    assert 0.07 < expected < 0.11
    assert dropped.float().mean().item() == pytest.approx(expected, abs=0.01)
    kept = out[~dropped]
    torch.testing.assert_close(kept, torch.full_like(kept, out.numel() / (~dropped).sum().item()))
    # Every dropped unit lies in some fully dropped 5x5 block.
    in_dropped_block = -F.max_pool2d(-dropped.float(), 5, stride=1)
    assert torch.equal(expand_seeds(in_dropped_block, 5).bool(), dropped)


@pytest.mark.parametrize("size, block_size", [(3, 3), (1, 1), (2, 2)])
def test_block_size_is_clamped_to_small_maps(size, block_size):
    torch.manual_seed(0)
    drop = DropBlock(drop_rate=0.5).train()
    drop.step = 10**6
    out = drop(torch.ones(200, 4, size, size))
    per_channel = (out == 0).flatten(2).all(2) | (out != 0).flatten(2).all(2)
    if size == block_size:
        assert per_channel.all()  # the single possible block covers the whole map
    assert 0.3 < (out == 0).float().mean() < 0.7


def test_dropblock_stays_out_of_compiled_graphs():
    """A changing counter must not recompile the graph each step: DropBlock runs eagerly between graphs."""
    from torch._dynamo.testing import CompileCounter

    class ConvDropBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.drop = torch.nn.Conv2d(3, 4, 3), DropBlock(drop_rate=0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.drop(self.conv(x) * 2)) + 1

    counter = CompileCounter()
    model = ConvDropBlock().train()
    model.drop.step = 10**6
    compiled = torch.compile(model, backend=counter)
    for _ in range(4):
        out = compiled(torch.ones(2, 3, 12, 12))
    assert model.drop.step == 10**6 + 4 and (out == 1).any()   # it counted and dropped
    assert counter.frame_count == 2   # the graphs before and after DropBlock, each compiled once


def test_eval_is_identity_and_does_not_count():
    drop = DropBlock(drop_rate=0.1).eval()
    drop.step = 50000
    x = torch.randn(2, 3, 5, 5)
    assert drop(x) is x
    assert drop.step == 50000
    block = ResNet12Block(3, 4, drop_rate=0.5).eval()
    torch.testing.assert_close(block(x), block(x))


def test_dropblock_step_counts_training_forwards_and_is_not_in_the_state_dict(tmp_path):
    model = BML(num_classes=5, width=0.125)
    keys = set(model.state_dict())
    images = torch.randn(2, 3, 28, 28)
    model.train()
    model(images)
    model(images)
    assert model.dropblock_step == 2
    assert {block.step for block in model.dropblocks()} == {2}
    model.eval()
    model(images)
    assert model.dropblock_step == 2
    model.dropblock_step = 31234
    assert {block.step for block in model.dropblocks()} == {31234}
    assert set(model.state_dict()) == keys
    save_checkpoint(tmp_path / "ckpt.pth", {"model": model.state_dict(), "dropblock_step": model.dropblock_step})
    state = read_checkpoint(tmp_path / "ckpt.pth")
    restored = BML(num_classes=5, width=0.125)
    restored.load_state_dict(state["model"], strict=True)
    restored.dropblock_step = state["dropblock_step"]
    assert restored.dropblock_step == 31234


def test_width_multiplier_and_feature_dims():
    model = BML(num_classes=7, width=0.25)
    assert model.encoder.layer1[0].conv1.out_channels == 16
    assert model.encoder.layer3[0].conv1.out_channels == 80
    assert model.global_w.weight.shape == (7, 160, 1, 1)
    assert BML(num_classes=2, width=0.001).encoder.layer1[0].conv1.out_channels == 1


def test_initialisation():
    model = BML(num_classes=7, width=0.25)
    bn = model.encoder.layer2[0].bn2
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    conv = model.local_view.layer[0].conv3.weight
    fan_out = conv.shape[0] * 9
    assert conv.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    assert model.global_w.weight.abs().max() <= (6 / (160 + 7)) ** 0.5


@pytest.mark.parametrize("size, width, map_size", [(28, 0.25, 1), (32, 0.25, 2), (84, 0.125, 5)])
def test_bml_forward_backward(size, width, map_size):
    torch.manual_seed(0)
    way, shot, query = 2, 1, 1
    model = BML(num_classes=6, width=width).train()
    model.dropblock_step = 40000
    images = torch.randn(way * (shot + query), 3, size, size)
    labels = torch.tensor([0, 5, 2, 3])
    global_map, local_map = model(images)
    assert global_map.shape == local_map.shape == (4, round(640 * width), map_size, map_size)
    losses = model.losses(images, labels, way=way, shot=shot, query=query, epoch=3, max_epoch=100,
                          **BML_LOSSES.model_settings())
    losses["total"].backward()
    for name in ("encoder.layer1.0.conv1.weight", "global_view.layer.0.conv1.weight",
                 "local_view.layer.0.conv1.weight", "global_w.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        eg, el = model.embed(images)
    assert eg.shape == el.shape == (4, round(640 * width) * map_size**2)
    assert eg.min() >= 0
    assert model.view_names == ("global", "local")


@pytest.mark.parametrize("spatial", [False, True])
def test_baselines(spatial):
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    global_model = BaselineGlobal(num_classes=3, width=0.125, spatial=spatial)
    local_model = BaselineLocal(width=0.125, spatial=spatial)
    losses = global_model.losses(images, labels, way=3, shot=1, query=1, epoch=2)
    assert set(losses) == {"global", "total"}
    losses["total"].backward()
    losses = local_model.losses(images, labels, way=3, shot=1, query=1, alpha_1=5.5, T=4.0)
    assert set(losses) == {"local", "total"}
    losses["total"].backward()
    for model, view in ((global_model, "global"), (local_model, "local")):
        assert model.view_names == (view,)
        assert model.encoder.layer4[0].conv1.weight.grad.abs().sum() > 0
        (embedding,) = model.eval().embed(images)
        assert embedding.shape == (6, 80)
    assert {k.split(".")[0] for k in global_model.state_dict()} == {"encoder", "global_w"}
    assert global_model.global_w.weight.dim() == (4 if spatial else 2)


def test_local_baseline_without_spatial_uses_pooled_prototypes():
    torch.manual_seed(0)
    model = BaselineLocal(width=0.125).eval()
    images = torch.randn(6, 3, 28, 28)
    (feature_map,) = model(images)
    pooled = feature_map.mean((2, 3))
    logits = -torch.cdist(pooled[3:], pooled[:3]) ** 2
    expected = F.cross_entropy(logits, torch.arange(3))
    torch.testing.assert_close(model.losses(images, way=3, shot=1, query=1)["local"], expected, rtol=1e-4, atol=1e-5)


def test_build_model_from_dict_and_namespace():
    from argparse import Namespace

    assert isinstance(build_model({"num_classes": 5, "width": 0.125}), BML)
    model = build_model(Namespace(model="bml", backbone="Res18", width=0.125, num_classes=5, dataset="x"))
    assert model.backbone == "resnet18"
    assert isinstance(build_model({"model": "global", "num_classes": 3, "width": 0.125, "spatial": True}), BaselineGlobal)
    assert isinstance(build_model({"model": "local", "width": 0.125}), BaselineLocal)
    with pytest.raises(ValueError, match="num_classes"):
        build_model({"model": "bml"})
    with pytest.raises(ValueError, match="backbone"):
        build_model({"num_classes": 3, "backbone": "vit"})


@pytest.mark.parametrize("spatial", [False, True])
def test_global_baseline_classifier_is_the_originals(spatial):
    """`global_w` with a Xavier-uniform weight (the default init's bound, 1/sqrt(fan_in), is below 0.95 of Xavier's here),
    and a checkpoint of it is recognised as the global baseline."""
    torch.manual_seed(0)
    model = BaselineGlobal(num_classes=200, width=0.125, spatial=spatial)
    weight = model.global_w.weight
    fan_in, fan_out = weight.shape[1], weight.shape[0]
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert 0.95 * bound < weight.abs().max() <= bound
    config = model_config({"model": model.state_dict()})
    assert (config["model"], config["num_classes"], config["spatial"]) == ("global", 200, spatial)
