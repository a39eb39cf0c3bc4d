"""The one table of votes: a vote added there reaches the evaluation's results and the predictor."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from bml import FewShotClassifier, scoring
from bml.classifier import FewShotInputError
from bml.models import BML, BaselineLocal
from bml.predict import get_args_parser, main as predict_main
from bml.scoring import (COMBINED, SCALED, ViewScores, class_prototypes, prototype_logits, prototype_spread,
                         votes_for)
from fixtures import make_cifar_fs_bml_checkpoint, save_released_checkpoint
from test_evaluation import load_entry_script
from test_predict import COLOURS, make_support, solid

FIRST_CLASS = "first_class"


def first_class(views: dict[str, ViewScores]) -> torch.Tensor:
    """A toy vote: every query gets the first class."""
    logits = torch.zeros_like(next(iter(views.values())).logits)
    logits[..., 0] = 1.0
    return logits


@pytest.fixture
def toy_vote(monkeypatch):
    """The toy vote, added as one entry of the table."""
    monkeypatch.setitem(scoring.VOTES, FIRST_CLASS, scoring.Vote(first_class, "always the first class"))


def test_votes_of_one_and_two_views():
    assert list(votes_for(("global", "local"))) == ["global", "local", COMBINED, SCALED]
    assert list(votes_for(("local",))) == ["local", COMBINED]


def test_votes_on_hand_made_scores():
    """Shapes with and without an episode dimension; the scaled vote divides by the prototypes' mean squared
    pairwise distance."""
    generator = torch.Generator().manual_seed(0)
    support = torch.randn(2, 3 * 4, 5, generator=generator)            # 2 episodes, 3-shot 4-way, 5 dims
    queries = torch.randn(2, 6, 5, generator=generator)
    prototypes = class_prototypes(support, way=4)
    torch.testing.assert_close(prototypes[1, 2], support[1, 2::4].mean(0))
    pairs = torch.cdist(prototypes[0], prototypes[0]).square()
    assert prototype_spread(prototypes)[0] == pytest.approx((pairs.sum() / (4 * 3)).item(), rel=1e-5)
    views = {name: ViewScores(prototype_logits(queries[e], prototypes[e]), prototypes[e])
             for e, name in enumerate(("global", "local"))}
    votes = votes_for(tuple(views))
    torch.testing.assert_close(votes[COMBINED](views), views["global"].logits + views["local"].logits)
    scaled = sum(view.logits / prototype_spread(view.prototypes) for view in views.values())
    torch.testing.assert_close(votes[SCALED](views), scaled)
    assert votes["local"](views) is views["local"].logits


def test_a_vote_added_to_the_table_reaches_eval_bml_and_predict(tmp_path, toy_vote, capsys):
    torch.manual_seed(0)
    checkpoint, data_root = make_cifar_fs_bml_checkpoint(tmp_path)
    eval_bml = load_entry_script()
    args = eval_bml.get_args_parser().parse_args(
        ["--ckp_path", str(checkpoint), "--data_root", str(data_root), "--n_shots", "1", "--episodes", "5",
         "--seeds", "0", "--num_workers", "0", "--output_dir", str(tmp_path), "--json", str(tmp_path / "r.json"),
         "--no_progress"])
    assert eval_bml.main(args) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert list(results) == ["global", "local", COMBINED, SCALED, FIRST_CLASS]
    assert results[FIRST_CLASS]["acc"] == 20.0      # 5-way episodes, a fifth of the queries in the first class

    assert FIRST_CLASS in get_args_parser().format_help()
    support = make_support(tmp_path / "support")
    query = solid(tmp_path / "query" / "red.png", COLOURS["red"], (30, 30))
    predict_args = get_args_parser().parse_args(
        ["--ckp_path", str(checkpoint), "--support", str(support), "--query", str(query.parent), "--out",
         str(tmp_path / "p.csv"), "--device", "cpu", "--vote", FIRST_CLASS, "--num_workers", "0"])
    assert predict_main(predict_args) == 0
    with open(tmp_path / "p.csv") as file:
        assert [row["prediction"] for row in csv.DictReader(file)] == ["blue"]   # the first of blue, grey, red
    assert f"vote {FIRST_CLASS}" in capsys.readouterr().out


def test_classifier_votes_and_unknown_vote(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_released_checkpoint(tmp_path / "bml.pth", BML(num_classes=4, width=0.125), dataset="glyphs")
    support = sorted(make_support(tmp_path / "support").rglob("*.png"))
    labels = [path.parent.name for path in support]
    queries = [solid(tmp_path / f"q{i}.png", colour, (20, 24)) for i, colour in enumerate(COLOURS.values())]
    scores = {vote: FewShotClassifier.from_checkpoint(checkpoint, device="cpu", vote=vote).fit(support, labels)
              .decision_function(queries) for vote in ("global", "local", COMBINED)}
    torch.testing.assert_close(torch.from_numpy(scores[COMBINED]),
                               torch.from_numpy(scores["global"] + scores["local"]))
    with pytest.raises(FewShotInputError, match="unknown vote 'nope'.*global, local, bml, bml_scaled"):
        FewShotClassifier.from_checkpoint(checkpoint, device="cpu", vote="nope")
    with pytest.raises(FewShotInputError, match="unknown vote 'bml_scaled' for a model with views local"):
        FewShotClassifier(BaselineLocal(width=0.125), transform=None, image_size=32, vote=SCALED)
