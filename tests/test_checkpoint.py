"""Checkpoints: atomic saves, safe loads, released key names, strict architecture checks."""

import argparse
from pathlib import Path

import pytest
import torch

from bml.checkpoint import CheckpointError, load_model, model_config, read_checkpoint, save_checkpoint
from bml.models import BML, BaselineGlobal, BaselineLocal
from fixtures import save_released_checkpoint

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn_entries(prefix, channels):
    shapes = {"num_batches_tracked": ()}
    return {f"{prefix}.{name}": shapes.get(name, (channels,)) for name in BN}


def resnet12_block_entries(prefix, in_channels, out_channels):
    """The released key names: ``{conv1,bn1,conv2,bn2,conv3,bn3}`` and ``downsample.{0,1}`` of one block."""
    entries = {}
    for i, conv_in in ((1, in_channels), (2, out_channels), (3, out_channels)):
        entries[f"{prefix}.conv{i}.weight"] = (out_channels, conv_in, 3, 3)
        entries.update(bn_entries(f"{prefix}.bn{i}", out_channels))
    entries[f"{prefix}.downsample.0.weight"] = (out_channels, in_channels, 1, 1)
    entries.update(bn_entries(f"{prefix}.downsample.1", out_channels))
    return entries


def released_bml_shapes(num_classes=64):
    """Key -> shape of a released ResNet-12 BML checkpoint, written from the released key list."""
    entries = {}
    for index, (c_in, c_out) in enumerate(((3, 64), (64, 160), (160, 320)), start=1):
        entries.update(resnet12_block_entries(f"encoder.layer{index}.0", c_in, c_out))
    for view in ("global_view", "local_view"):
        entries.update(resnet12_block_entries(f"{view}.layer.0", 320, 640))
    entries["global_w.weight"] = (num_classes, 640, 1, 1)
    entries["global_w.bias"] = (num_classes,)
    return entries


def random_state_dict(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        key: torch.tensor(7) if key.endswith("num_batches_tracked") else torch.rand(shape, generator=g) + 0.5
        for key, shape in shapes.items()
    }


def released_checkpoint(path, weights):
    return save_released_checkpoint(path, weights, dataset="miniImageNet", backbone="Res12", lr=0.1)


class CreatesMarkerFile:
    """Unpickling this would create a file: it must never happen on load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_released_checkpoint_loads_strictly(tmp_path):
    weights = random_state_dict(released_bml_shapes())
    path = released_checkpoint(tmp_path / "max_acc.pth", weights)
    model = load_model(path)
    assert isinstance(model, BML) and not model.training
    assert set(model.state_dict()) == set(weights)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    config = model_config(read_checkpoint(path))
    assert config == {"model": "bml", "backbone": "resnet12", "width": 1.0, "num_classes": 64,
                      "spatial": False, "drop_rate": 0.1, "dataset": "miniImageNet"}
    assert read_checkpoint(path)["config"].lr == 0.1


def test_mismatched_checkpoint_fails_naming_the_keys(tmp_path):
    weights = random_state_dict(released_bml_shapes(num_classes=5))
    del weights["local_view.layer.0.bn2.running_var"]
    weights["local_view.layer.0.extra.weight"] = torch.zeros(3)
    weights["encoder.layer2.0.conv3.weight"] = torch.zeros(160, 160, 1, 1)
    path = released_checkpoint(tmp_path / "bad.pth", weights)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    message = str(error.value)
    assert "missing (1): local_view.layer.0.bn2.running_var" in message
    assert "unexpected (1): local_view.layer.0.extra.weight" in message
    assert "encoder.layer2.0.conv3.weight: checkpoint (160, 160, 1, 1), model (160, 160, 3, 3)" in message


def test_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": CreatesMarkerFile(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere.pth"):
        load_model(tmp_path / "nowhere.pth")


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_unreadable_file_is_a_checkpoint_error(tmp_path, damage):
    path = tmp_path / "broken.pth"
    if damage == "truncated":
        torch.save({"model": {"weight": torch.zeros(4096)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_checkpoint(path)


def test_own_checkpoints_round_trip_with_config_and_ddp_prefix(tmp_path):
    torch.manual_seed(0)
    model = BML(num_classes=6, width=0.125)
    ddp_weights = {f"module.{key}": value for key, value in model.state_dict().items()}
    config = argparse.Namespace(model="bml", backbone="resnet12", width=0.125, num_classes=6, image_size=32,
                                dataset="glyphs", transform="O")
    save_checkpoint(tmp_path / "c.pth", {"model": ddp_weights, "epoch": 2, "config": config, "dropblock_step": 900})
    loaded = load_model(tmp_path / "c.pth")
    assert loaded.dropblock_step == 900
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert model_config(read_checkpoint(tmp_path / "c.pth"))["transform"] == "O"


@pytest.mark.parametrize("model", [BaselineGlobal(5, width=0.125, spatial=True), BaselineGlobal(5, width=0.25),
                                   BaselineLocal(width=0.125, backbone="resnet18")])
def test_baselines_are_recognised_by_their_keys(tmp_path, model):
    torch.save({"model": model.state_dict()}, tmp_path / "b.pth")
    loaded = load_model(tmp_path / "b.pth")
    assert type(loaded) is type(model)
    assert loaded.spatial == model.spatial and loaded.backbone == model.backbone
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_save_is_atomic(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"epoch": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"epoch": 2, "bad": lambda: None})
    assert read_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in Path(tmp_path).iterdir()] == ["ckpt.pth"]
