"""Test-time heads: each head on cached episodes against a per-episode reference written independently, cl2n
with a known base mean, and every head of eval_bml.py from one embedding pass."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bml import FewShotClassifier
from bml.datasets import build_dataset
from bml.evaluation import (EmbeddingOptions, base_class_means, base_means, cache, cached_scoring, protocol,
                            sample_episodes, score_episodes)
from bml.training.engine import evaluate
from bml.scoring import (COMBINED, HEADS, LOGREG_C, PROTO, episode_labels, fit_logistic_regression, head_scores,
                         votes_for)
from fixtures import make_cifar_fs_bml_checkpoint
from test_evaluation import load_entry_script

WAY, SHOT, QUERY, DIM = 5, 2, 4, 12
VIEWS = ("global", "local")
QUIET = EmbeddingOptions(progress=False)


class Points(torch.utils.data.Dataset):
    """Given embeddings as the 'images' of a data set."""

    def __init__(self, points: torch.Tensor, labels: np.ndarray):
        self.points, self.labels = points, labels

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int):
        return self.points[index], int(self.labels[index])


class TwoViews(torch.nn.Module):
    """A 'model' whose views are the points and the points reversed, plus one."""

    view_names = VIEWS

    def embed(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return points, points.flip(-1) + 1


def clustered_points(classes: int = 8, per_class: int = 10, seed: int = 0) -> Points:
    """Class centres plus noise, all offset from the origin: centring then matters."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, DIM, generator=generator)
    labels = np.repeat(np.arange(classes), per_class)
    points = 3 + centres[labels] + 1.2 * torch.randn(len(labels), DIM, generator=generator)
    return Points(points, labels)


def reference_logreg_predictions(support: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """One episode with its own solver (LBFGS, float64) on sum CE + ||W||^2 / (2 C), the bias unpenalised."""
    support, queries = F.normalize(support.double(), dim=-1), F.normalize(queries.double(), dim=-1)
    labels = episode_labels(WAY, len(support))
    weights = torch.zeros(WAY, support.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(WAY, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([weights, bias], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                               line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        solver.zero_grad()
        value = F.cross_entropy(support @ weights.T + bias, labels, reduction="sum")
        value = value + weights.square().sum() / (2 * LOGREG_C)
        value.backward()
        return value

    solver.step(loss)
    return (queries @ weights.T + bias).detach()


def reference_logits(head: str, support: torch.Tensor, queries: torch.Tensor,
                     base_mean: torch.Tensor) -> torch.Tensor:
    """One view of one episode, written out: explicit prototypes and squared differences."""
    if head == "logreg":
        return reference_logreg_predictions(support, queries)
    if head == "cl2n":
        support, queries = (F.normalize(x - base_mean, dim=-1) for x in (support, queries))
    if head == "support_cl2n":
        centre = torch.stack([support[c::WAY].mean(0) for c in range(WAY)]).mean(0)
        support, queries = (F.normalize(x - centre, dim=-1) for x in (support, queries))
    prototypes = torch.stack([support[c::WAY].mean(0) for c in range(WAY)])
    return -((queries[:, None, :] - prototypes[None]) ** 2).sum(-1)


@pytest.mark.parametrize("head", list(HEADS))
def test_each_head_on_cached_episodes_equals_a_per_episode_reference(head):
    data = clustered_points()
    model = TwoViews()
    cache = tuple(view.clone() for view in model.embed(data.points))
    base_means = tuple(torch.randn(DIM, generator=torch.Generator().manual_seed(1)) + 3 * (1 + v) for v in range(2))
    episodes = sample_episodes(data.labels, WAY, SHOT, QUERY, episodes=12, seeds=[0])
    scores = score_episodes(cache, episodes, WAY, SHOT, names=VIEWS, head=head, base_means=base_means,
                            progress=False, chunk_mb=1)
    labels = episode_labels(WAY, WAY * QUERY)
    for e, episode in enumerate(episodes):
        views = {name: reference_logits(head, view[episode[:WAY * SHOT]], view[episode[WAY * SHOT:]], mean)
                 for name, view, mean in zip(VIEWS, cache, base_means)}
        expected = {**views, COMBINED: views["global"] + views["local"]}
        for name, logits in expected.items():
            assert scores[name][e] == pytest.approx((logits.argmax(1) == labels).double().mean().item() * 100), \
                (head, name, e)
    assert set(scores) == set(votes_for(VIEWS))


def test_support_cl2n_ignores_what_an_episode_shares_and_counts_each_class_once():
    """A shift common to every image of an episode (a group's style) leaves support_cl2n's logits unchanged, not
    cl2n's; and its centre is the mean of the class prototypes, so a class with more shots does not pull it."""
    generator = torch.Generator().manual_seed(3)
    support, queries = torch.randn(WAY * SHOT, DIM, generator=generator), torch.randn(7, DIM, generator=generator)
    labels, shift, base_mean = episode_labels(WAY, WAY * SHOT), 4 * torch.randn(DIM, generator=generator), torch.zeros(DIM)
    for head, invariant in (("support_cl2n", True), ("cl2n", False)):
        plain = head_scores(head, support, labels, queries, WAY, base_mean).logits
        shifted = head_scores(head, support + shift, labels, queries + shift, WAY, base_mean).logits
        assert torch.allclose(plain, shifted, atol=1e-5) == invariant, head
    extra, extra_labels = torch.cat([support, support[:1] + 0.1]), torch.cat([labels, labels[:1]])   # 3 shots of class 0
    centre = torch.stack([extra[extra_labels == c].mean(0) for c in range(WAY)]).mean(0)
    unit_support, unit_queries = F.normalize(extra - centre, dim=-1), F.normalize(queries - centre, dim=-1)
    prototypes = torch.stack([unit_support[extra_labels == c].mean(0) for c in range(WAY)])
    expected = -(unit_queries[:, None] - prototypes[None]).square().sum(-1)
    torch.testing.assert_close(head_scores("support_cl2n", extra, extra_labels, queries, WAY).logits, expected)


def test_logreg_stack_is_each_episode_fitted_alone():
    """The batched fit is one optimisation over independent problems: an episode's result does not depend
    on the others in the stack."""
    generator = torch.Generator().manual_seed(0)
    support = F.normalize(torch.randn(4, WAY * SHOT, DIM, generator=generator), dim=-1)
    labels = episode_labels(WAY, WAY * SHOT)
    weights, bias = fit_logistic_regression(support, labels, WAY)
    alone_weights, alone_bias = fit_logistic_regression(support[2], labels, WAY)
    torch.testing.assert_close(weights[2], alone_weights, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias[2], alone_bias, rtol=1e-5, atol=1e-5)


def test_logreg_in_the_support_span_over_blocks_of_chunks_equals_the_full_features(monkeypatch):
    """The evaluation fits logreg in the support's span, on stacks of several gathered chunks: the same
    predictions as the head on the full features, episode by episode."""
    data = clustered_points(per_class=30)
    cache = tuple(view.clone() for view in TwoViews().embed(data.points))
    episodes = sample_episodes(data.labels, WAY, SHOT, QUERY, episodes=200, seeds=[0])
    monkeypatch.setattr(cached_scoring, "SPAN_FIT_EPISODES", 50)   # chunks of 1 MB hold ~180 episodes
    scores = score_episodes(cache, episodes, WAY, SHOT, names=VIEWS, head="logreg", progress=False, chunk_mb=1)
    index = torch.from_numpy(episodes)
    views = {name: head_scores("logreg", view[index[:, :WAY * SHOT]], episode_labels(WAY, WAY * SHOT),
                               view[index[:, WAY * SHOT:]], WAY) for name, view in zip(VIEWS, cache)}
    labels = episode_labels(WAY, WAY * QUERY)
    for name, vote in votes_for(VIEWS).items():
        expected = (vote(views).argmax(-1) == labels).double().mean(1).numpy() * 100
        np.testing.assert_allclose(scores[name], expected, err_msg=name)


def test_cl2n_centres_on_a_known_base_mean(tmp_path, monkeypatch):
    """base_class_means is the mean embedding of the base split, computed once and then read from its file;
    cl2n's logits are those of the centred, unit-length features."""
    base = clustered_points(classes=4, per_class=5, seed=3)
    model = TwoViews()
    means = base_class_means(model, base, QUIET, means_dir=tmp_path)
    torch.testing.assert_close(means[0], base.points.mean(0), rtol=1e-3, atol=1e-3)   # cached in float16
    torch.testing.assert_close(means[1], base.points.flip(-1).mean(0) + 1, rtol=1e-3, atol=1e-3)
    monkeypatch.setattr(base_means, "embed_dataset", lambda *a, **k: pytest.fail("embedded the base split again"))
    assert all(torch.equal(a, b) for a, b in zip(base_class_means(model, base, means_dir=tmp_path), means))

    support, queries = torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor([[3.0, 2.0]])
    base_mean = torch.tensor([2.0, 0.0])   # centred: support (1, 0) and (-1, 2)/sqrt(5), query (1, 2)/sqrt(5)
    scores = head_scores("cl2n", support, torch.tensor([0, 1]), queries, 2, base_mean)
    query = torch.tensor([1.0, 2.0]) / 5 ** 0.5
    expected = -torch.stack([(query - torch.tensor([1.0, 0.0])).square().sum(),
                             (query - torch.tensor([-1.0, 2.0]) / 5 ** 0.5).square().sum()])
    torch.testing.assert_close(scores.logits[0], expected)
    assert scores.logits.argmax().item() == 1 and head_scores(PROTO, support, torch.tensor([0, 1]),
                                                              queries, 2).logits.argmax().item() == 0


def test_eval_bml_scores_every_head_from_one_embedding_pass(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    checkpoint, data_root = make_cifar_fs_bml_checkpoint(tmp_path, images_per_class=12)
    embedded = []
    for module in (protocol, base_means):   # the test split's pass and the base classes'
        monkeypatch.setattr(module, "embed_dataset", lambda model, dataset, *args, **kw:
                            embedded.append(dataset.split) or cache.embed_dataset(model, dataset, *args, **kw))
    eval_bml = load_entry_script()

    def run(*heads: str) -> dict:
        args = eval_bml.get_args_parser().parse_args(
            ["--ckp_path", str(checkpoint), "--data_root", str(data_root), "--n_shots", "1", "--n_queries", "5",
             "--episodes", "6", "--seeds", "0", "1", "--num_workers", "0", "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path),
             "--json", str(tmp_path / "r.json"), "--no_progress", "--head", *heads])
        assert eval_bml.main(args) == 0
        return json.loads((tmp_path / "r.json").read_text())

    saved = run(*HEADS)
    assert embedded == ["test", "train"]                     # the test split once, the base classes once
    assert list(saved["results"]) == ["global", "local", COMBINED, "bml_scaled"]   # proto, as before
    assert list(saved["head_results"]) == [head for head in HEADS if head != PROTO]
    assert list(saved["heads"]) == list(HEADS)
    for results in saved["head_results"].values():
        assert list(results) == list(saved["results"])
        assert set(results[COMBINED]) == {"acc", "ci95", "per_seed"}
        assert list(results[COMBINED]["per_seed"]) == ["0", "1"]
    assert "logreg        bml:" in capsys.readouterr().out

    embedded.clear()
    again = run("cl2n")                                      # the base means come from their file now
    assert embedded == ["test"] and again["head_results"]["cl2n"] == saved["head_results"]["cl2n"]
    assert again["results"] == saved["results"] and "logreg" not in again["head_results"]


def test_heads_reach_validation_and_the_classifier(tmp_path):
    data = clustered_points()
    summary = evaluate(TwoViews(), data, way=WAY, shot=SHOT, query=QUERY, episodes=8, seed=0,
                       device=torch.device("cpu"), heads=("logreg", "cl2n"), base_dataset=clustered_points(seed=5))
    assert {"acc", "acc_global", "acc_logreg", "acc_logreg_global", "acc_cl2n_local"} <= set(summary)

    model = TwoViews()
    support = data.points[:40]
    labels = [f"c{label}" for label in data.labels[:40]]
    means = base_class_means(model, clustered_points(seed=5), QUIET)
    for head in HEADS:
        classifier = FewShotClassifier(model, transform=None, image_size=DIM, head=head, base_means=means,
                                       progress=False)
        classifier._check_input_tensor = lambda tensor: None   # points, not images
        logits = classifier.fit(list(support), labels).decision_function(list(data.points[40:]))
        views = [head_scores(head, view_support, torch.tensor(data.labels[:40]), view_queries, 4, mean)
                 for view_support, view_queries, mean in zip(model.embed(support), model.embed(data.points[40:]),
                                                             means)]
        torch.testing.assert_close(torch.from_numpy(logits), views[0].logits + views[1].logits)
    with pytest.raises(ValueError, match="unknown head 'nope'"):
        FewShotClassifier(model, transform=None, image_size=DIM, head="nope")
    with pytest.raises(ValueError, match="cl2n.*base_means"):
        FewShotClassifier(model, transform=None, image_size=DIM, head="cl2n")


def test_classifier_from_checkpoint_centres_cl2n_on_its_training_split(tmp_path, monkeypatch):
    monkeypatch.setenv("BML_CACHE_DIR", str(tmp_path))   # the base means file goes to its base_means folder
    torch.manual_seed(0)
    checkpoint, data_root = make_cifar_fs_bml_checkpoint(tmp_path, images_per_class=6)
    classifier = FewShotClassifier.from_checkpoint(checkpoint, device="cpu", head="cl2n", data_root=str(data_root),
                                                   progress=False)
    base = build_dataset("CIFAR-FS", "train", data_root, 32, train=False)
    expected = base_class_means(classifier.model, base, QUIET)
    assert all(torch.equal(a, b) for a, b in zip(classifier.base_means, expected))
    assert len(list((tmp_path / "base_means").glob("bml_base_means_*.pt"))) == 1
