"""The one table of heads: a head added to `bml.scoring.HEADS`, and nowhere else, reaches the evaluation's
results, eval_bml.py's JSON, `FewShotClassifier` and `python -m bml.predict`; the side input and the fast
path it declares are what the evaluation gives it."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from bml import FewShotClassifier, scoring
from bml.evaluation import EmbeddingOptions, cached_scoring, evaluate_heads, sample_episodes, score_episodes
from bml.predict import get_args_parser, main as predict_main
from bml.scoring import BASE_MEAN, COMBINED, PROTO, ViewScores, episode_labels, labelled_prototypes
from fixtures import make_cifar_fs_bml_checkpoint
from test_evaluation import load_entry_script
from test_heads import QUERY, SHOT, VIEWS, WAY, TwoViews, clustered_points
from test_predict import COLOURS, make_support, solid

COSINE = "cosine"
FIRST_CLASS = "first_class"


def first_class(support: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, way: int) -> ViewScores:
    """A toy classifier: every query gets the first class."""
    logits = queries.new_zeros((*queries.shape[:-1], way))
    logits[..., 0] = 1.0
    return ViewScores(logits, labelled_prototypes(support, labels, way))


@pytest.fixture
def toy_heads(monkeypatch):
    """Two toy heads, each added as one entry of the table: nearest prototype on unit-length features (the
    centred fast path applies), and a head that centres on the base mean (which it must be given) and then
    always answers the first class."""
    monkeypatch.setitem(scoring.HEADS, COSINE, scoring.Head(
        scoring.nearest_prototype, "nearest prototype on L2-normalised features", scoring.l2_normalized,
        centred_fast_path=True))
    monkeypatch.setitem(scoring.HEADS, FIRST_CLASS, scoring.Head(
        first_class, "always the first class, after centring on the base mean", scoring.centered_l2_normalized,
        side_input=BASE_MEAN))


def test_added_heads_reach_evaluate_heads_with_their_side_input_and_fast_path(toy_heads, monkeypatch):
    data = clustered_points()
    centred = []
    statistics = cached_scoring.centered_statistics
    monkeypatch.setattr(cached_scoring, "centered_statistics",
                        lambda *args: centred.append(args) or statistics(*args))
    results = evaluate_heads(TwoViews(), data, WAY, SHOT, QUERY, episodes=12, seeds=[0, 1],
                             heads=(PROTO, COSINE, FIRST_CLASS), base_dataset=clustered_points(seed=5),
                             options=EmbeddingOptions(storage_dtype=torch.float32, progress=False))
    assert list(results) == [PROTO, COSINE, FIRST_CLASS]
    assert len(centred) == 2 * len(VIEWS)                  # proto and cosine declare the fast path, first_class not
    assert {vote: result["acc"] for vote, result in results[FIRST_CLASS].items()} == \
        {vote: 100 / WAY for vote in results[PROTO]}      # balanced queries: a fifth in the first class

    cache = tuple(view.clone() for view in TwoViews().embed(data.points))
    episodes = sample_episodes(data.labels, WAY, SHOT, QUERY, episodes=12, seeds=[0])
    scores = score_episodes(cache, episodes, WAY, SHOT, names=VIEWS, head=COSINE, progress=False)
    labels = episode_labels(WAY, WAY * QUERY)
    for e, episode in enumerate(episodes):   # written out: unit-length rows, explicit class means and differences
        summed = 0
        for view in cache:
            rows = F.normalize(view[episode], dim=-1)
            support, queries = rows[:WAY * SHOT], rows[WAY * SHOT:]
            prototypes = torch.stack([support[c::WAY].mean(0) for c in range(WAY)])
            summed = summed + -((queries[:, None, :] - prototypes[None]) ** 2).sum(-1)
        assert scores[COMBINED][e] == pytest.approx((summed.argmax(1) == labels).double().mean().item() * 100)
    with pytest.raises(ValueError, match="first_class.*base_means"):
        score_episodes(cache, episodes, WAY, SHOT, names=VIEWS, head=FIRST_CLASS, progress=False)


def test_added_heads_reach_eval_bml_the_classifier_and_predict(tmp_path, toy_heads, monkeypatch, capsys):
    monkeypatch.setenv("BML_CACHE_DIR", str(tmp_path))   # the base means file goes to its base_means folder
    torch.manual_seed(0)
    checkpoint, data_root = make_cifar_fs_bml_checkpoint(tmp_path, images_per_class=12)
    eval_bml = load_entry_script()
    args = eval_bml.get_args_parser().parse_args(
        ["--ckp_path", str(checkpoint), "--data_root", str(data_root), "--n_shots", "1", "--n_queries", "5",
         "--episodes", "5", "--seeds", "0", "--num_workers", "0", "--output_dir", str(tmp_path), "--cache_dir",
         str(tmp_path), "--json", str(tmp_path / "r.json"), "--no_progress", "--head", COSINE, FIRST_CLASS])
    assert eval_bml.main(args) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved["head_results"]) == [COSINE, FIRST_CLASS]
    assert saved["heads"][FIRST_CLASS] == scoring.HEADS[FIRST_CLASS].description
    assert {vote: result["acc"] for vote, result in saved["head_results"][FIRST_CLASS].items()} == \
        {vote: 100 / 5 for vote in saved["results"]}
    assert len(list((tmp_path / "base_means").glob("bml_base_means_*.pt"))) == 1   # the base means were embedded for first_class
    assert f"{FIRST_CLASS}        bml:" in capsys.readouterr().out

    support = sorted(make_support(tmp_path / "support").rglob("*.png"))
    labels = [path.parent.name for path in support]
    queries = [solid(tmp_path / "query" / f"{name}.png", colour, (30, 30)) for name, colour in COLOURS.items()]
    classifier = FewShotClassifier.from_checkpoint(checkpoint, device="cpu", head=FIRST_CLASS,
                                                   data_root=str(data_root), progress=False)
    assert classifier.fit(support, labels).predict(queries) == ["blue"] * len(COLOURS)   # the first of the sorted
    assert classifier.base_means is not None
    with pytest.raises(ValueError, match="first_class.*base_means"):
        FewShotClassifier(classifier.model, transform=None, image_size=32, head=FIRST_CLASS)

    assert COSINE in get_args_parser().format_help() and FIRST_CLASS in get_args_parser().format_help()
    predict_args = get_args_parser().parse_args(
        ["--ckp_path", str(checkpoint), "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"),
         "--out", str(tmp_path / "p.csv"), "--device", "cpu", "--head", FIRST_CLASS, "--data_root", str(data_root),
         "--num_workers", "0", "--no_progress"])
    assert predict_main(predict_args) == 0
    with open(tmp_path / "p.csv") as file:
        assert [row["prediction"] for row in csv.DictReader(file)] == ["blue"] * len(COLOURS)
    assert f"head {FIRST_CLASS}" in capsys.readouterr().out
