"""The episode sampler: shot-major order, labels, reproducibility, ranks, epochs, validation; loaders."""
import numpy as np
import pytest
import torch

from bml.datasets import DatasetError, EpisodeSampler, build_episode_loader, build_shuffled_loader, episode_labels
from bml.datasets import sampler as sampler_module


def uneven_labels(num_classes: int = 12, seed: int = 0) -> np.ndarray:
    """Shuffled labels with 12..20 images per class and non-contiguous ids."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(12, 21, size=num_classes)
    return rng.permutation(np.repeat(np.arange(num_classes) * 3 + 1, counts))


def test_shot_major_order_and_labels():
    labels = uneven_labels()
    way, shot, query = 5, 2, 3
    episodes = EpisodeSampler(labels, way, shot, query, episodes=50).sample()
    assert episodes.shape == (50, way * (shot + query)) and episodes.dtype == np.int64
    for episode in episodes:
        assert len(set(episode.tolist())) == len(episode)                 # distinct images
        grid = labels[episode].reshape(shot + query, way)                 # row i: i-th image of every class
        assert (grid == grid[0]).all() and len(set(grid[0])) == way      # column c: one class, N distinct
        query_classes = labels[episode[way * shot:]]
        position_labels = episode_labels(way, way * query).numpy()
        assert (query_classes == grid[0][position_labels]).all()          # query j has label j mod N
    assert episode_labels(3, 7).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert episode_labels(3, 7).dtype == torch.long


def test_reproducible_per_seed_rank_epoch():
    labels = uneven_labels()
    make = lambda **kw: EpisodeSampler(labels, 5, 1, 4, episodes=20, **kw)
    np.testing.assert_array_equal(make(seed=3).sample(), make(seed=3).sample())
    assert not np.array_equal(make(seed=3).sample(), make(seed=4).sample())
    assert not np.array_equal(make(rank=0, world_size=2).sample(), make(rank=1, world_size=2).sample())
    sampler = make()
    first = sampler.sample()
    sampler.set_epoch(1)
    assert not np.array_equal(first, sampler.sample())
    sampler.set_epoch(0)
    np.testing.assert_array_equal(first, sampler.sample())


def test_iteration_as_batch_sampler():
    labels = uneven_labels()
    sampler = EpisodeSampler(labels, 4, 1, 2, episodes=6)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 6
    assert all(isinstance(b, list) and isinstance(b[0], int) and len(b) == 12 for b in batches)
    np.testing.assert_array_equal(np.array(batches), sampler.sample())
    dataset = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.from_numpy(labels))
    loader = build_episode_loader(dataset, sampler)
    for (indices, batch_labels), batch in zip(loader, batches):
        assert indices.tolist() == batch and (batch_labels.numpy() == labels[batch]).all()


def test_every_class_and_image_gets_drawn():
    labels = uneven_labels(num_classes=6)
    drawn = EpisodeSampler(labels, 3, 2, 2, episodes=400).sample()
    assert set(np.unique(drawn).tolist()) == set(range(len(labels)))
    counts = np.bincount(labels[drawn[:, 0]], minlength=labels.max() + 1)[np.unique(labels)]
    assert counts.min() > 400 / 6 * 0.6    # first drawn class roughly uniform


def test_chunked_drawing_gives_the_same_episodes(monkeypatch):
    labels = uneven_labels()
    whole = EpisodeSampler(labels, 5, 1, 3, episodes=30, seed=7).sample()
    monkeypatch.setattr(sampler_module, "_MAX_KEYS", 1)   # one episode per chunk
    np.testing.assert_array_equal(EpisodeSampler(labels, 5, 1, 3, episodes=30, seed=7).sample(), whole)


def test_validation_errors():
    labels = uneven_labels(num_classes=4)
    with pytest.raises(DatasetError, match="5-way episodes need 5 classes, but this split has only 4"):
        EpisodeSampler(labels, 5, 1, 1, episodes=1)
    with pytest.raises(DatasetError, match=r"class \d+ has only \d+ images, fewer than shot \+ query = 30"):
        EpisodeSampler(labels, 2, 10, 20, episodes=1)
    with pytest.raises(DatasetError, match="shot >= 1"):
        EpisodeSampler(labels, 2, 0, 1, episodes=1)


class _RandomPerItem(torch.utils.data.Dataset):
    """Returns numpy and torch random draws, to see how workers are seeded."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.tensor([float(np.random.randint(1 << 30)), float(torch.randint(1 << 30, ()))])


def test_shuffled_loader_workers_and_epochs_differ():
    loader = build_shuffled_loader(_RandomPerItem(), batch_size=4, num_workers=2, seed=0)
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        epochs.append([batch for batch in loader])
    (w0, w1), (w0_next, _) = epochs
    for column in (0, 1):                    # numpy draws, torch draws
        assert not torch.equal(w0[:, column], w1[:, column])        # two workers differ
        assert not torch.equal(w0[:, column], w0_next[:, column])   # same worker, next epoch


def test_shuffled_loader_shards_ranks():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    shards = [build_shuffled_loader(dataset, batch_size=5, seed=1, rank=r, world_size=2) for r in range(2)]
    indices = [torch.cat([b[0] for b in loader]).tolist() for loader in shards]
    assert len(indices[0]) == len(indices[1]) == 5 and not set(indices[0]) & set(indices[1])
