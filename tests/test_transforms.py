"""Transforms A-E, O and K: output shapes, scaled parameters, defaults, augmentation across workers/epochs."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from bml.datasets import (NORMALIZATION, TRANSFORM_IDS, ArrayDataset, DatasetError, DeviceAugment, EpisodeSampler,
                          build_step_loader, build_transform, dataset_defaults)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("transform_id", TRANSFORM_IDS)
@pytest.mark.parametrize("image_size", [84, 32, 28])
def test_output_shapes(transform_id, image_size):
    for train in (True, False):
        transform = build_transform(transform_id, image_size, train=train)
        for width, height in ((32, 32), (84, 84), (50, 40)):
            out = transform(random_image(width, height))
            assert out.shape == (3, image_size, image_size) and out.dtype == torch.float32


def test_scaled_parameters():
    def steps(transform_id, size, train):
        return {type(t).__name__: t for t in build_transform(transform_id, size, train).transforms}

    assert steps("A", 84, False)["Resize"].size == 92 and steps("A", 32, False)["Resize"].size == 35
    assert steps("D", 84, True)["RandomCrop"].padding == 8 and steps("D", 32, True)["RandomCrop"].padding == 3
    assert steps("B", 28, False)["Resize"].size == (28, 28)            # stored size -> input size
    assert "ColorJitter" not in steps("O", 28, True) and "RandomHorizontalFlip" not in steps("O", 28, True)
    assert set(steps("E", 84, True)) >= {"RandomResizedCrop", "ColorJitter", "RandomHorizontalFlip"}


def test_test_transforms_are_deterministic_and_normalised():
    image = random_image(32, 32)
    for transform_id in TRANSFORM_IDS:
        transform = build_transform(transform_id, 32, train=False)
        torch.testing.assert_close(transform(image), transform(image))
    mean, std = NORMALIZATION["D"]
    expected = T.Normalize(mean, std)(T.ToTensor()(image))
    torch.testing.assert_close(build_transform("D", 32)(image), expected)   # "as stored" at the stored size


def test_k_is_o_with_affine_distortions_in_training_only():
    image = Image.fromarray(np.full((40, 40, 3), 255, dtype=np.uint8))
    image.paste((0, 0, 0), (16, 12, 24, 28))                     # a stroke in the middle of white paper
    steps = [type(t).__name__ for t in build_transform("K", 28, train=True).transforms]
    assert steps == ["Resize", "RandomAffine", "RandomCrop", "ToTensor", "Normalize"]
    torch.testing.assert_close(build_transform("K", 28)(image), build_transform("O", 28)(image))   # test: as O
    torch.manual_seed(0)
    distorted = torch.stack([build_transform("K", 28, train=True)(image) for _ in range(20)])
    torch.manual_seed(0)
    shifted = torch.stack([build_transform("O", 28, train=True)(image) for _ in range(20)])
    paper = build_transform("K", 28)(Image.new("RGB", (40, 40), (255, 255, 255)))[0, 0, 0]
    corners = distorted[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    torch.testing.assert_close(corners, torch.full_like(corners, paper.item()))   # what turns in is paper
    assert not torch.allclose(distorted, shifted)
    with pytest.raises(DatasetError, match="host only: use --augment host"):
        DeviceAugment("K", 28)


def test_unknown_transform():
    with pytest.raises(DatasetError, match="unknown transform 'F': expected one of A, B, C, D, E, O, K"):
        build_transform("F")


@pytest.mark.parametrize("name, transform_id, image_size", [
    ("miniImageNet", "A", 84), ("tieredImageNet", "B", 84), ("FC100", "C", 84), ("CIFAR-FS", "D", 84),
    ("CUB", "E", 84), ("glyphs", "O", 32), ("omniglot", "O", 28), ("omniglot-small", "O", 28),
    ("cifar-fs", "D", 84), ("my_own_images", "A", 84),
])
def test_dataset_defaults(name, transform_id, image_size):
    defaults = dataset_defaults(name)
    assert (defaults.transform, defaults.image_size) == (transform_id, image_size)
    assert (defaults.mean, defaults.std) == NORMALIZATION[transform_id]


def test_augmentation_differs_across_steps_and_epochs():
    """Every index is the same image; two steps and two epochs must augment it differently."""
    image = np.asarray(random_image(32, 32))
    dataset = ArrayDataset(np.repeat(image[None], 8, axis=0), np.repeat(np.arange(2), 4), ["a", "b"],
                           transform=build_transform("D", 32, train=True))
    plan = EpisodeSampler(dataset.labels, way=2, shot=1, query=0, episodes=2).sample()
    step0, step1, step0_next, _ = [images for images, _ in build_step_loader(
        dataset, {0: plan, 1: plan}.__getitem__, (0, 0), first=(0, 0), last_epoch=1, steps_per_epoch=2, num_workers=2)]
    assert not torch.equal(step0, step1) and not torch.equal(step0, step0_next)
