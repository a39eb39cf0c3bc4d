"""The vectorised loss terms against plain references with explicit Python loops."""

import pytest
import torch
import torch.nn.functional as F

from bml.losses import global_position_loss, local_prototype_loss, mutual_kl_loss
from bml.losses.reference import looped_local_loss
from bml.models import BML
from bml.recipes import BML_LOSSES
from bml.scoring import class_prototypes, prototype_logits, squared_distances


def episode_features(way, shot, query, channels=6, size=2, seed=0):
    """Features whose queries cover every margin case: some sit on their own prototype (too
    easy), some on a wrong one (too hard), the rest in between."""
    g = torch.Generator().manual_seed(seed)
    features = 0.6 * torch.randn(way * (shot + query), channels, size, size, generator=g)
    support = features[: way * shot].reshape(shot, way, channels, -1).mean((0, 3))
    first_query = way * shot
    features[first_query] = support[0, :, None, None] + 0.01 * features[first_query]
    features[first_query + 1] = support[2 % way, :, None, None] + 0.01 * features[first_query + 1]
    return features.double().requires_grad_()


@pytest.mark.parametrize("epoch, alpha_1", [(1, 5.5), (37, 5.5), (100, 5.5), (50, 0.0), (80, 40.0)])
def test_local_loss_matches_looped_reference(epoch, alpha_1):
    way, shot, query = 3, 2, 3
    features = episode_features(way, shot, query, seed=epoch)
    expected, cases = looped_local_loss(features, way, shot, epoch, 100, alpha_1, 0.1)
    loss = local_prototype_loss(features, way, shot, epoch, 100, alpha_1, 0.1)
    if alpha_1:
        assert cases["too_easy"] and cases["too_hard"] and cases["margin"], cases
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, features)
    (expected_grad,) = torch.autograd.grad(expected, features)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_margin_changes_the_loss_only_when_active():
    features = episode_features(3, 2, 3, seed=5)
    plain = local_prototype_loss(features, 3, 2, 50, 100, alpha_1=0.0, alpha_2=0.1)
    with_margin = local_prototype_loss(features, 3, 2, 50, 100, alpha_1=5.5, alpha_2=0.1)
    assert with_margin > plain


def test_global_loss_matches_per_position_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 3, 3, generator=g, requires_grad=True)
    labels = torch.tensor([0, 6, 3, 3])
    per_position = [F.cross_entropy(logits[:, :, i, j], labels) for i in range(3) for j in range(3)]
    torch.testing.assert_close(global_position_loss(logits, labels), torch.stack(per_position).mean())


def test_mutual_loss_matches_formula_and_feeds_both_views():
    g = torch.Generator().manual_seed(2)
    global_features = torch.randn(5, 8, generator=g, requires_grad=True)
    local_features = torch.randn(5, 8, generator=g, requires_grad=True)
    T, batch = 4.0, 5

    def kl(a, b):
        terms = 0.0
        for i in range(batch):
            p_b = torch.softmax(b[i] / T, 0)
            terms = terms + (p_b * (torch.log_softmax(b[i] / T, 0) - torch.log_softmax(a[i] / T, 0))).sum()
        return T * T / batch * terms

    expected = kl(global_features, local_features) + kl(local_features, global_features)
    loss = mutual_kl_loss(global_features, local_features, T)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (global_features, local_features))
    expected_grads = torch.autograd.grad(expected, (global_features, local_features))
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_squared_distances_match_direct_difference(offset):
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 9, 640, generator=g) + offset
    b = torch.rand(5, 640, generator=g) + offset
    direct = (a[:, :, None, :].double() - b.double()).pow(2).sum(-1)
    torch.testing.assert_close(squared_distances(a, b).double(), direct, rtol=1e-4, atol=1e-2)
    assert squared_distances(b, b).diagonal().abs().max() < 1e-2
    assert squared_distances(b, b).min() >= 0


def test_prototypes_follow_shot_major_order():
    way, shot = 3, 2
    support = torch.arange(way * shot, dtype=torch.float32)[:, None]
    expected = torch.tensor([[1.5], [2.5], [3.5]])
    torch.testing.assert_close(class_prototypes(support, way), expected)
    assert prototype_logits(expected, expected).argmax(1).tolist() == [0, 1, 2]


def test_bml_total_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(0)
    way, shot, query = 3, 1, 2
    model = BML(num_classes=10, width=0.125).eval()
    images = torch.randn(way * (shot + query), 3, 32, 32)
    labels = torch.randint(0, 10, (images.shape[0],))
    weights = (2.0, 1.0, 0.5)
    losses = model.losses(images, labels, way=way, shot=shot, query=query, epoch=40, max_epoch=100,
                          alpha_1=5.5, alpha_2=0.1, T=4.0, weights=weights, unused_setting=True)
    assert set(losses) == {"global", "local", "mutual", "total"}
    assert all(v.dim() == 0 for v in losses.values())
    global_map, local_map = model(images)
    expected = {
        "global": global_position_loss(model.global_w(global_map), labels),
        "local": local_prototype_loss(local_map, way, shot, 40, 100, 5.5, 0.1),
        "mutual": mutual_kl_loss(global_map.mean((2, 3)), local_map.mean((2, 3)), 4.0),
    }
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value)
    torch.testing.assert_close(losses["total"], 2 * expected["global"] + expected["local"] + 0.5 * expected["mutual"])


def test_global_batch_images_reach_only_the_global_and_mutual_terms():
    torch.manual_seed(0)
    way, shot, query, extra = 3, 1, 2, 4
    model = BML(num_classes=10, width=0.125).eval()
    images = torch.randn(way * (shot + query) + extra, 3, 32, 32)
    labels = torch.randint(0, 10, (images.shape[0],))
    settings = dict(epoch=1, max_epoch=100, alpha_1=5.5, alpha_2=0.1, T=4.0, weights=(2.0, 1.0, 0.5))
    losses = model.losses(images, labels, way=way, shot=shot, query=query, global_batch=extra, **settings)
    global_map, local_map = model(images)
    episode = way * (shot + query)
    torch.testing.assert_close(losses["global"], global_position_loss(model.global_w(global_map), labels))
    torch.testing.assert_close(losses["local"], local_prototype_loss(local_map[:episode], way, shot, 1, 100, 5.5, 0.1))
    torch.testing.assert_close(losses["mutual"], mutual_kl_loss(global_map.mean((2, 3)), local_map.mean((2, 3)), 4.0))
    with pytest.raises(ValueError, match="shot-major"):
        model.losses(images, labels, way=way, shot=shot, query=query, global_batch=extra - 1, **settings)


def test_losses_reject_a_batch_that_is_not_one_episode():
    model = BML(num_classes=4, width=0.125)
    with pytest.raises(ValueError, match="shot-major"):
        model.losses(torch.randn(5, 3, 28, 28), torch.zeros(5, dtype=torch.long), way=2, shot=1, query=1, epoch=1,
                     max_epoch=100, **BML_LOSSES.model_settings())
