"""`--augment device`: the batched colour jitter, flips and normalisation against torchvision, their
parameter and output distributions, the host/device split of the loader and the loader settings."""
from __future__ import annotations

import errno
import itertools
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import ColorJitter, RandomResizedCrop

from bml.datasets import (NORMALIZATION, ArrayDataset, DeviceAugment, FileDataset, StepBatches, build_dataset,
                          build_step_loader, build_transform, default_num_workers, draw_parameters)
from bml.datasets.transforms import shift_padding
from bml.training import finish_settings
from bml.utils.distributed import DistributedContext
from fixtures import make_image_folder

import train_bml
from bml.datasets import sampler as sampler_module
from bml.datasets import decoded, device_augment
from bml.datasets.device_augment import BOX, FACTORS, FLIP, ORDER, SHIFT, draw_resized_crops
from bml.utils.rng import derive_seed, isolated_cpu_rng

ADJUSTMENTS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
PERMUTATIONS = list(itertools.permutations(range(3)))


def smooth_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Colourful images with smooth gradients and edges, like photographs rather than noise: (N, S, S, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    phases = rng.uniform(0, 2 * np.pi, (count, 3, 1, 1))
    frequencies = rng.uniform(1, 4, (count, 3, 1, 1))
    waves = 0.5 + 0.4 * np.sin(frequencies * (x + 2 * y) * np.pi + phases)
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05) * rng.uniform(-0.3, 0.3, (count, 3, 1, 1))
    return np.clip(255 * (waves + disc), 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def fixed_parameters(count: int, size: int) -> torch.Tensor:
    """No crop; factors over the whole range, every order of the three adjustments, flips on every other image."""
    generator = torch.Generator().manual_seed(1)
    parameters = torch.zeros(count, 13)
    parameters[:, BOX] = torch.tensor([0.0, 0.0, size, size])
    parameters[:, FACTORS] = torch.empty(count, 3).uniform_(0.6, 1.4, generator=generator)
    parameters[:, ORDER] = torch.tensor([PERMUTATIONS[i % 6] for i in range(count)], dtype=torch.float32)
    parameters[:, FLIP] = torch.arange(count) % 2
    return parameters


def reference(image: torch.Tensor, row: torch.Tensor, transform_id: str) -> torch.Tensor:
    """One image through torchvision's functional ops (PIL image or uint8 tensor), in the row's order."""
    for operation in row[ORDER].long().tolist():
        image = ADJUSTMENTS[operation](image, float(row[FACTORS][operation]))
    if row[FLIP]:
        image = TF.hflip(image)
    mean, std = NORMALIZATION[transform_id]
    return TF.normalize(TF.to_tensor(image) if isinstance(image, Image.Image) else image, mean, std)


def test_fixed_parameters_match_torchvision_functional_ops_image_by_image():
    """Same parameters: the batch equals torchvision's tensor ops on each image up to float rounding
    (tolerance 1e-5 in normalised units; measured 0, the same arithmetic), and its PIL ops within their
    uint8 arithmetic: PIL cuts to whole levels after each of the three adjustments and blends contrast
    with a whole-level mean gray, measured up to 3.3 levels of 255 and 1.3 on average (tolerance 4 and 1.5)."""
    crops = smooth_images(24, 20)
    parameters = fixed_parameters(24, 20)
    augmented = DeviceAugment("A", 20)(torch.from_numpy(crops).reshape(2, 12, 20, 20, 3), parameters.reshape(2, 12, 13))
    assert augmented.shape == (2, 12, 3, 20, 20)
    augmented = augmented.reshape(24, 3, 20, 20)
    tensor_ops = torch.stack([reference(torch.from_numpy(c).permute(2, 0, 1).float() / 255, row, "A")
                              for c, row in zip(crops, parameters)])
    pil_ops = torch.stack([reference(Image.fromarray(c), row, "A") for c, row in zip(crops, parameters)])
    assert (augmented - tensor_ops).abs().max() < 1e-5
    std = torch.tensor(NORMALIZATION["A"][1]).view(3, 1, 1)
    levels = ((augmented - pil_ops) * std * 255).abs()
    assert levels.max() <= 4.0 and levels.mean() < 1.5
    assert not torch.equal(augmented[0], augmented[1])                 # the adjustments did something


def crop_on_device(image: np.ndarray, transform_id: str, size: int, geometry: list[float]) -> np.ndarray:
    augment = DeviceAugment(transform_id, size)
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    return augment.crop(images, torch.tensor([geometry])).squeeze(0).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("stored, box", [(84, (5, 9, 60, 47)), (84, (30, 30, 10, 12)), (84, (0, 0, 84, 84)),
                                         (120, (10, 20, 100, 90)), (200, (0, 0, 200, 150))])
def test_device_crop_matches_pil_resized_crop(stored, box):
    """A and E: the crop box resized to 84 px as torchvision's `resized_crop` does it on a PIL image
    (enlarging, and shrinking with antialiasing), within PIL's rounding to whole levels after each of its
    two passes: tolerance 1 level of 255 (measured: max 0.98, mean 0.3; the whole image unchanged: 0)."""
    image = smooth_images(1, stored)[0]
    pil = np.asarray(TF.resized_crop(Image.fromarray(image), *box, [84, 84])).astype(np.float32)
    difference = np.abs(crop_on_device(image, "A", 84, [*box, 0, 0]) - pil)
    assert difference.max() <= 1.0 and difference.mean() < 0.4


@pytest.mark.parametrize("transform_id, stored, size, shift", [("D", 32, 84, (-8, 5)), ("C", 32, 84, (8, -8)),
                                                               ("O", 28, 28, (-2, 1)), ("O", 28, 28, (2, -2))])
def test_device_shift_matches_pil_resize_pad_and_crop(transform_id, stored, size, shift):
    """B, C, D and O: Resize((S, S)), then RandomCrop's padded crop at offset shift + padding (zero fill; edge
    for O). Within 1 level (PIL's rounding of the resize); exact when no resize is needed (O)."""
    padding, mode = shift_padding(transform_id, size)
    image = smooth_images(1, stored)[0]
    resized = TF.resize(Image.fromarray(image), [size, size])
    pil = np.asarray(TF.crop(TF.pad(resized, padding, padding_mode=mode), shift[0] + padding, shift[1] + padding,
                             size, size)).astype(np.float32)
    difference = np.abs(crop_on_device(image, transform_id, size, [0, 0, stored, stored, *shift]) - pil)
    assert difference.max() <= (1.0001 if stored != size else 0.0)


def test_pil_and_torch_resize_differ_by_about_one_level():
    """Why the device crop uses PIL's weights rather than torch's resize: torch's antialiased bilinear
    resize differs from PIL's by up to a few levels (measured on smooth images: mean ~0.3, max ~4 of 255)."""
    image = smooth_images(1, 84)[0]
    for top, left, height, width, size in [(5, 9, 60, 47, 84), (0, 0, 84, 84, 32), (20, 3, 31, 40, 84)]:
        pil = np.asarray(TF.resized_crop(Image.fromarray(image), top, left, height, width, [size, size]))
        tensor = TF.resized_crop(torch.from_numpy(image).permute(2, 0, 1), top, left, height, width, [size, size],
                                 antialias=True).permute(1, 2, 0).numpy()
        difference = np.abs(pil.astype(int) - tensor.astype(int))
        assert 0 < difference.max() <= 6 and difference.mean() < 1.0


def test_parameters_follow_color_jitter_and_flip_distributions():
    """4,000 draws against torchvision's ColorJitter(0.4, 0.4, 0.4).get_params and the flip's p = 0.5,
    within 5 standard errors: factor means and variances, the frequency of each of the 6 orders."""
    draws = 4000
    parameters = draw_parameters(draws, "B", (84, 84), 84)
    factors, orders, flips = parameters[:, FACTORS], parameters[:, ORDER].long(), parameters[:, FLIP]
    jitter = torchvision_jitter_parameters(draws)
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    error = 0.8 / np.sqrt(12 * draws)
    assert (factors.mean(0) - jitter["factors"].mean(0)).abs().max() < 5 * error * np.sqrt(2)
    assert (factors.var(0) - 0.8 ** 2 / 12).abs().max() < 0.1 * 0.8 ** 2 / 12
    frequency = np.bincount([PERMUTATIONS.index(tuple(o)) for o in orders.tolist()], minlength=6) / draws
    reference_frequency = np.bincount([PERMUTATIONS.index(o) for o in jitter["orders"]], minlength=6) / draws
    assert np.abs(frequency - 1 / 6).max() < 5 * np.sqrt(1 / 6 * 5 / 6 / draws)
    assert np.abs(reference_frequency - 1 / 6).max() < 5 * np.sqrt(1 / 6 * 5 / 6 / draws)
    assert abs(flips.mean() - 0.5) < 5 * 0.5 / np.sqrt(draws)
    assert draw_parameters(3, "O", (28, 28), 28).shape == (3, 6)
    shifts = parameters[:, SHIFT]
    assert shifts.min() == -8 and shifts.max() == 8 and (shifts == shifts.round()).all()
    counts = torch.bincount((shifts + 8).long().flatten(), minlength=17) / (2 * draws)
    assert (counts - 1 / 17).abs().max() < 5 * np.sqrt(1 / 17 * 16 / 17 / (2 * draws))


@pytest.mark.parametrize("height, width", [(84, 84), (60, 150)])
def test_crop_boxes_follow_random_resized_crop(height, width):
    """4,000 boxes against torchvision's RandomResizedCrop.get_params: the means of top, left, height and
    width agree within 5 standard errors, and the boxes fit the image."""
    draws = 4000
    boxes = draw_resized_crops(draws, height, width)
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    reference_boxes = torch.tensor([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                                    for _ in range(draws)], dtype=torch.float32)
    assert (boxes[:, 2:] >= 1).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
    assert (boxes[:, 1] + boxes[:, 3] <= width).all() and (boxes == boxes.round()).all()
    error = ((boxes.var(0) + reference_boxes.var(0)) / draws).sqrt()
    assert ((boxes.mean(0) - reference_boxes.mean(0)).abs() < 5 * error).all()


def torchvision_jitter_parameters(draws: int) -> dict:
    """ColorJitter's own draws: factors by adjustment, and the order of the three among its four operations."""
    torch.manual_seed(0)
    factors, orders = [], []
    for _ in range(draws):
        order, brightness, contrast, saturation, _ = ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), None)
        factors.append((brightness, contrast, saturation))
        orders.append(tuple(int(i) for i in order if i < 3))
    return {"factors": torch.tensor(factors), "orders": orders}


@pytest.mark.parametrize("transform_id", ["A", "D"])
def test_output_statistics_match_the_host_transform(transform_id):
    """2,000 augmented copies of one image through the host transform (PIL) and through DeviceAugment:
    the per-channel means agree within PIL's bias (it cuts to whole levels after each adjustment: about
    1.2 levels darker, 0.02 normalised units) plus 4 standard errors, the standard deviations within 4%."""
    draws, size = 2000, 16
    image = Image.fromarray(smooth_images(1, size)[0])
    torch.manual_seed(0)
    host = torch.stack([build_transform(transform_id, size, train=True)(image) for _ in range(draws)])
    stored = torch.from_numpy(np.array(image)).expand(draws, size, size, 3)
    device = DeviceAugment(transform_id, size)(stored, draw_parameters(draws, transform_id, (size, size), size))
    host_means, device_means = host.mean(dim=(2, 3)), device.mean(dim=(2, 3))      # (draws, 3)
    standard_error = ((host_means.var(0) + device_means.var(0)) / draws).sqrt()
    assert ((device_means.mean(0) - host_means.mean(0)).abs() < 0.02 + 4 * standard_error).all()
    host_std, device_std = host.transpose(0, 1).reshape(3, -1).std(1), device.transpose(0, 1).reshape(3, -1).std(1)
    assert ((host_std - device_std).abs() / host_std).max() < 0.04


def test_device_path_equals_host_path_without_jitter():
    """Transform O (shifts only, stored at the input size): the device path gives the host path's batch."""
    images = smooth_images(12, 28)
    dataset = ArrayDataset(images, np.arange(12) % 3, ["a", "b", "c"], transform=build_transform("O", 28, train=True),
                           transform_id="O", image_size=28)
    plans = {1: np.arange(12).reshape(2, 6)}.__getitem__
    host = StepBatches(dataset, plans, (0, 0), augment="host")[1, 1]
    crops, labels, parameters = StepBatches(dataset, plans, (0, 0), augment="device")[1, 1]
    assert crops.dtype == torch.uint8 and crops.shape == (6, 28, 28, 3) and parameters.shape == (6, 6)
    assert torch.equal(host[1], labels)
    assert torch.equal(host[0], DeviceAugment("O", 28)(crops, parameters))


def test_device_loader_yields_float_images_with_jitter_and_flips():
    images = smooth_images(12, 20)
    dataset = ArrayDataset(images, np.arange(12) % 3, ["a", "b", "c"], transform=build_transform("A", 20, train=True),
                           transform_id="A", image_size=20)
    plans = {0: np.arange(12).reshape(2, 1, 6)}.__getitem__
    batches = list(build_step_loader(dataset, plans, (0, 0), first=(0, 0), last_epoch=0, steps_per_epoch=2,
                                     augment="device"))
    assert len(batches) == 2 and batches[0][0].shape == (1, 6, 3, 20, 20) and batches[0][0].dtype == torch.float32
    assert batches[0][1].tolist() == [[0, 1, 2, 0, 1, 2]]
    _, _, parameters = StepBatches(dataset, plans, (0, 0), augment="device")[0, 0]
    assert parameters.shape == (1, 6, 13) and len(set(parameters[0, :, FACTORS.start].tolist())) == 6


@pytest.mark.parametrize("cpus, processes, expected", [(1, 1, 1), (2, 1, 1), (16, 1, 8), (16, 8, 1), (64, 4, 8)])
def test_default_num_workers_fits_the_machine(monkeypatch, cpus, processes, expected):
    monkeypatch.setattr(sampler_module, "available_cpus", lambda: cpus)
    assert default_num_workers(processes) == expected <= cpus


def test_default_workers_raise_no_dataloader_warning():
    images = smooth_images(6, 8)
    dataset = ArrayDataset(images, np.arange(6) % 2, ["a", "b"], transform=build_transform("D", 8, train=True),
                           transform_id="D", image_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(build_step_loader(dataset, {0: np.arange(6).reshape(3, 2)}.__getitem__, (0,), first=(0, 0),
                                         last_epoch=0, steps_per_epoch=3, num_workers=default_num_workers(),
                                         augment="device"))
    assert len(batches) == 3


def mixed_size_dataset(root, transform_id: str = "E", size: int = 16) -> FileDataset:
    """Six PNG files of six different sizes (smooth colours; written unless there), one class each, read as
    CUB's files are."""
    sizes = [(40, 30), (25, 52), (33, 33), (60, 21), (18, 44), (50, 47)]
    paths = []
    for k, (height, width) in enumerate(sizes):
        path = root / f"class_{k}.png"
        if not path.exists():
            Image.fromarray(smooth_images(1, max(height, width), seed=k)[0][:height, :width]).save(path)
        paths.append(str(path))
    return FileDataset(np.array(paths), np.arange(6), [str(k) for k in range(6)],
                       transform=build_transform(transform_id, size, train=True), name="mixed", split="train",
                       transform_id=transform_id, image_size=size)


def drawn_parameters(dataset: FileDataset, key: tuple[int, ...], count: int) -> torch.Tensor:
    """The parameters a step drew, redrawn from its seed on the images' own sizes."""
    sizes = torch.tensor([dataset.load_array(i).shape[:2] for i in range(count)])
    with isolated_cpu_rng(derive_seed(*key)):
        return draw_parameters(count, dataset.transform_id, sizes, dataset.image_size)


def test_images_of_mixed_sizes_send_their_crop_boxes(tmp_path):
    """Files of different sizes: each image's box is drawn on its own size and only its pixels are sent, in one
    canvas as large as the largest box; the device's crop of what was sent equals torchvision's `resized_crop`
    of the whole image with the drawn box (PIL, within 1 level, as for stored images). At 32 px no box is longer
    than twice the output (the images are at most 60 px), so none is resized on the host."""
    dataset = mixed_size_dataset(tmp_path, size=32)
    plans = {0: np.arange(6).reshape(1, 1, 6)}.__getitem__
    sent, labels, parameters = StepBatches(dataset, plans, (3, 0), augment="device")[0, 0]
    drawn = drawn_parameters(dataset, (3, 0, 0, 0), 6)
    boxes = drawn[:, BOX].long()
    assert sent.dtype == torch.uint8 and labels.tolist() == [list(range(6))]
    assert sent.shape[1:] == (6, int(boxes[:, 2].max()), int(boxes[:, 3].max()), 3)
    assert torch.equal(parameters[0, :, BOX], torch.cat([torch.zeros(6, 2), boxes[:, 2:].float()], dim=1))
    assert torch.equal(parameters[0, :, SHIFT.start:], drawn[:, SHIFT.start:])    # colours, order and flips as drawn
    cropped = DeviceAugment("E", 32).crop(sent[0].permute(0, 3, 1, 2).float(), parameters[0])
    for image_index, box in enumerate(boxes.tolist()):
        pil = np.asarray(TF.resized_crop(dataset.load_image(image_index), *box, [32, 32])).astype(np.float32)
        difference = np.abs(cropped[image_index].permute(1, 2, 0).numpy() - pil)
        assert difference.max() <= 1.0


def test_large_boxes_are_resized_on_the_host(tmp_path, monkeypatch):
    """A box longer than MAX_SENT_SIDE output sizes is cropped and resized to S x S in PIL on the host, as
    torchvision does it, and the device leaves it as it is: exactly torchvision's crop, whatever the box."""
    monkeypatch.setattr(device_augment, "MAX_SENT_SIDE", 0)
    dataset = mixed_size_dataset(tmp_path)
    plans = {0: np.arange(6).reshape(1, 6)}.__getitem__
    sent, _, parameters = StepBatches(dataset, plans, (3, 0), augment="device")[0, 0]
    boxes = drawn_parameters(dataset, (3, 0, 0, 0), 6)[:, BOX].long().tolist()
    assert sent.shape == (6, 16, 16, 3) and (parameters[:, BOX] == torch.tensor([0.0, 0.0, 16, 16])).all()
    cropped = DeviceAugment("E", 16).crop(sent.permute(0, 3, 1, 2).float(), parameters).round()
    expected = np.stack([np.asarray(TF.resized_crop(dataset.load_image(i), *box, [16, 16]))
                         for i, box in enumerate(boxes)])
    assert np.array_equal(cropped.permute(0, 2, 3, 1).numpy(), expected.astype(np.float32))


def test_a_step_of_large_photographs_sends_a_bounded_canvas(tmp_path):
    """Photographs much larger than the output (as CUB's ~500 px ones at 84 px): a step sends at most
    (MAX_SENT_SIDE * S)^2 pixels per image, where one large box used to set the canvas of the whole step, and each
    image still comes out as torchvision's `resized_crop` of its drawn box (within 1 level of 255)."""
    size, sizes = 16, [(150, 210), (240, 180), (40, 30), (200, 200), (25, 60), (170, 120)]
    paths = []
    for k, (height, width) in enumerate(sizes):
        paths.append(str(tmp_path / f"photo_{k}.png"))
        Image.fromarray(smooth_images(1, max(height, width), seed=k)[0][:height, :width]).save(paths[-1])
    dataset = FileDataset(np.array(paths), np.arange(6), [str(k) for k in range(6)],
                          transform=build_transform("E", size, train=True), name="photos", split="train",
                          transform_id="E", image_size=size)
    plans = {0: np.arange(6).reshape(1, 6)}.__getitem__
    sent, _, parameters = StepBatches(dataset, plans, (7, 0), augment="device")[0, 0]
    boxes = drawn_parameters(dataset, (7, 0, 0, 0), 6)[:, BOX].long()
    assert (boxes[:, 2:].amax(dim=1) > device_augment.MAX_SENT_SIDE * size).any()    # some boxes are large
    assert sent.nbytes <= 6 * (device_augment.MAX_SENT_SIDE * size) ** 2 * 3
    cropped = DeviceAugment("E", size).crop(sent.permute(0, 3, 1, 2).float(), parameters)
    for image_index, box in enumerate(boxes.tolist()):
        pil = np.asarray(TF.resized_crop(dataset.load_image(image_index), *box, [size, size])).astype(np.float32)
        assert np.abs(cropped[image_index].permute(1, 2, 0).numpy() - pil).max() <= 1.0


def test_device_augment_makes_no_tensor_from_host_values_per_step(monkeypatch):
    """The normalisation constants are made once per (device, dtype): made at every step, each would be a blocking
    host-to-device copy on CUDA. After a first step, further steps (and the evaluation's conversion with the same
    statistics) create no tensor from Python values."""
    images, parameters = torch.from_numpy(smooth_images(4, 20)), fixed_parameters(4, 20)
    augment = DeviceAugment("A", 20)
    first = augment(images, parameters)
    made, tensor = [], torch.tensor
    monkeypatch.setattr(torch, "tensor",
                        lambda *args, **kwargs: made.append(kwargs.get("device")) or tensor(*args, **kwargs))
    for _ in range(3):
        assert torch.equal(augment(images, parameters), first)
        device_augment.to_model_input(images, *NORMALIZATION["A"])
    assert made == []


@pytest.mark.parametrize("height, width", [(10, 200), (200, 10)])
def test_boxes_of_narrow_images_fall_back_to_torchvision_centre_crop(height, width):
    """No try fits an image 20 times wider than high (or higher than wide): the box is RandomResizedCrop's
    centred fallback, per image, with the images' sizes given one per image."""
    torch.manual_seed(0)
    expected = RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
    boxes = draw_resized_crops(4, torch.tensor([height, 84, height, 84]), torch.tensor([width, 84, width, 84]))
    assert boxes[0].tolist() == boxes[2].tolist() == list(expected)
    assert (boxes[1::2, 2:] <= 84).all() and not torch.equal(boxes[1], boxes[0])


def test_file_steps_do_not_depend_on_the_workers(tmp_path):
    """Images of mixed sizes: a step's uint8 canvas and parameters come from its seed alone, as for stored
    images (so resume stays exact): the same with 0 and 2 loader workers, and on a second pass."""
    dataset = mixed_size_dataset(tmp_path, transform_id="A")
    plans = {0: np.arange(12).reshape(3, 4) % 6}.__getitem__

    def steps(workers: int) -> list:
        loader = DataLoader(StepBatches(dataset, plans, (5,), augment="device"), batch_size=None,
                            sampler=[(0, 0), (0, 1), (0, 2)], num_workers=workers)
        return list(loader)

    for first, second in zip(steps(0), steps(2)):
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(steps(0)[0][2], steps(0)[1][2])


def test_files_are_decoded_once_into_a_store(tmp_path, monkeypatch):
    """With --augment device the files are decoded once into a memory-mapped store: the same pixels as
    decoding each file, pickled by path (workers map it, never copy it), reused by the next run, rebuilt
    when a file changes."""
    monkeypatch.setenv("BML_CACHE_DIR", str(tmp_path / "cache"))
    dataset = mixed_size_dataset(tmp_path)
    build_step_loader(dataset, {0: np.arange(6).reshape(1, 6)}.__getitem__, (0,), first=(0, 0), last_epoch=0,
                      steps_per_epoch=1, augment="device")
    assert dataset.decoded is not None
    for i in range(6):
        assert np.array_equal(dataset.load_array(i), np.asarray(dataset.load_image(i)))
    assert len(pickle.dumps(dataset.decoded)) < 2000 and not list((tmp_path / "cache").glob(".*"))
    built = sorted((tmp_path / "cache").iterdir())
    assert [path.suffixes for path in built] == [[".index", ".npy"], [".npy"]]

    with monkeypatch.context() as patch:
        patch.setattr(decoded, "atomic_write", None)        # a second build would fail: the store is reused
        again = mixed_size_dataset(tmp_path)
        again.decode_once()
        assert again.decoded.pixels_path == dataset.decoded.pixels_path
    Image.fromarray(smooth_images(1, 40, seed=9)[0][:40, :30]).save(tmp_path / "class_0.png")
    changed = mixed_size_dataset(tmp_path)
    changed.decode_once()
    assert changed.decoded.pixels_path != dataset.decoded.pixels_path
    assert np.array_equal(changed.load_array(0), np.asarray(changed.load_image(0)))


def test_store_is_skipped_without_space_and_interrupted_builds_leave_nothing(tmp_path, monkeypatch, capsys):
    """Pixels needing more than half the free space, or a disk that fills up: no store, a note, and the files
    decoded at every access. A build interrupted (Ctrl-C) leaves no file behind."""
    monkeypatch.setenv("BML_CACHE_DIR", str(tmp_path / "cache"))
    dataset = mixed_size_dataset(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(decoded.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
        dataset.decode_once()
    assert dataset.decoded is None and "more than half the free space" in capsys.readouterr().err
    assert np.array_equal(dataset.load_array(2), np.asarray(dataset.load_image(2)))

    def full_disk(path, mode="wb"):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(decoded, "atomic_write", full_disk)             # the disk fills up while writing
        assert decoded.open_decoded_images(dataset.paths, dataset.load_array, "mixed train") is None
    assert "No space left" in capsys.readouterr().err

    def interrupted(index: int) -> np.ndarray:
        if index == 3:
            raise KeyboardInterrupt
        return dataset.load_array(index)

    with pytest.raises(KeyboardInterrupt):
        decoded.open_decoded_images(dataset.paths, interrupted, "mixed train")
    assert list((tmp_path / "cache").iterdir()) == []


def test_training_defaults_fit_the_device_and_the_machine(monkeypatch, simulate_gpu, tmp_path):
    """--augment: device on a GPU (simulated), host on a CPU; --num_workers from the machine; given values win."""
    simulate_gpu((9, 0))
    monkeypatch.setattr(sampler_module, "available_cpus", lambda: 2)

    def settings(device: str, *flags: str):
        args = train_bml.get_args_parser().parse_args(["--dataset", "glyphs", "-s", str(tmp_path), *flags])
        args.model = "bml"
        finish_settings(args, DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device(device)))
        return args

    assert (settings("cuda").augment, settings("cpu").augment, settings("cpu").num_workers) == ("device", "host", 1)
    given = settings("cpu", "--augment", "device", "--num_workers", "0")
    assert (given.augment, given.num_workers) == ("device", 0)
