"""A training method is its model (one `FewShotModel` subclass, one `MODELS` entry), one `METHODS` entry and an
entry point built on `get_common_parser`: a toy method added that way alone is planned, trained, resumed,
recognised from its checkpoint and evaluated by the same code as BML."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bml import methods
from bml.checkpoint import model_config, read_checkpoint
from bml.evaluate import get_args_parser as eval_parser
from bml.evaluate import main as evaluate_main
from bml.launch import main as launch_main
from bml.models import MODELS, FewShotModel
from bml.models.backbones import backbone_channels, build_encoder, canonical_backbone
from bml.models.base import pooled, required_num_classes
from bml.training import get_common_parser, train


class ToyClassifier(FewShotModel):
    """A base-class classifier on pooled features, trained with plain cross-entropy."""

    view_names = ("toy",)
    kind = "toy"
    identifying_keys = ("toy_classifier.",)

    def __init__(self, num_classes: int, width: float = 1.0, drop_rate: float = 0.1,
                 backbone: str = "resnet12") -> None:
        super().__init__()
        self.encoder = build_encoder(canonical_backbone(backbone), width, drop_rate)
        self.toy_classifier = nn.Linear(backbone_channels(backbone, width)[-1], num_classes)

    @classmethod
    def from_settings(cls, settings):
        return cls(required_num_classes(settings, cls.kind), width=float(settings.get("width") or 1.0),
                   backbone=settings.get("backbone") or "resnet12")

    @classmethod
    def settings_from_weights(cls, weights):
        return {"num_classes": weights["toy_classifier.weight"].shape[0], "spatial": False}

    def forward(self, images):
        return (self.encoder(images),)

    def embed(self, images):
        return (pooled(self.encoder(images)),)

    def losses(self, images, labels, **ignored):
        loss = F.cross_entropy(self.toy_classifier(self.embed(images)[0]), labels)
        return {"toy": loss, "total": loss}


TOY_METHOD = methods.Method("toy", "toy-classifier", batches=False, run_name_parts=lambda args: ["toy"])


def toy_parser():
    return get_common_parser("Train the toy classifier on episodes' base labels", model="toy")


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(MODELS, "toy", ToyClassifier)
    monkeypatch.setitem(methods.METHODS, "toy", TOY_METHOD)


TINY = ["--dataset", "glyphs", "--width", "0.125", "--image_size", "32", "--epochs", "2", "--episodes_per_epoch", "3",
        "--n_train_ways", "5", "--n_train_shots", "1", "--n_train_queries", "2", "--eval_freq", "2",
        "--val_episodes", "10", "--n_shots", "1", "--n_queries", "2", "--num_workers", "0"]


def test_a_toy_method_trains_resumes_and_evaluates(toy_method, tmp_path, capsys):
    folder = tmp_path / "run"
    args = toy_parser().parse_args([*TINY, "--epochs", "1", "-s", str(folder)])
    assert train(args).exit_code == 0
    args = toy_parser().parse_args([*TINY, "-s", str(folder), "--is_continue"])
    assert train(args).exit_code == 0
    assert "Resuming" in capsys.readouterr().out
    checkpoint = read_checkpoint(folder / "last.pth")
    assert checkpoint["epoch"] == 2 and checkpoint["config"].model == "toy"
    assert model_config({"model": checkpoint["model"]})["model"] == "toy"   # its keys alone name it

    out = tmp_path / "results"
    assert evaluate_main(eval_parser().parse_args(
        ["--ckp_path", str(folder / "last.pth"), "--split", "val", "--n_shots", "1", "--n_queries", "2",
         "--episodes", "10", "--seeds", "0", "--num_workers", "0", "--device", "cpu", "--output_dir", str(out),
         "--no_progress"])) == 0
    saved = json.loads(next(out.glob("*.json")).read_text())
    assert saved["model"] == "toy" and set(saved["results"]) == {"toy", "bml"}


def test_the_launcher_plans_a_toy_method_as_itself(toy_method, tmp_path, capsys, monkeypatch):
    script = tmp_path / "train_toy.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nfrom toy_entry import get_args_parser\n")
    (tmp_path / "toy_entry.py").write_text(f"from {__name__} import toy_parser as get_args_parser\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert launch_main([str(script), *TINY, "--dry_run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "toy" and "toy-classifier" in plan["save_folder"]
    assert sys.modules.get("toy_entry") is not None
