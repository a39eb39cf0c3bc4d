"""Training augmentation on the training device (`--augment device`): the workers send uint8 images and
per-image random parameters, `DeviceAugment` crops, resizes, jitters, flips and normalises a whole step.

Host side, per image: for images held in one array (`ArrayDataset`: every published data set but CUB)
the stored image is sent as it is, with its crop drawn as torchvision draws it (`draw_parameters`,
vectorised over the step): a copy of the pixels and a few numbers. For images of mixed sizes (CUB's
files, read from their decoded store, `bml.datasets.decoded`) the box is drawn on each image's own size
and only its pixels are sent (`cut_regions`); a box longer than twice the output size is resized on the
host instead, in PIL as torchvision does, which bounds a step's transfer.

Device side, batched: the crop and resize are one resampling matrix per image and axis with PIL's
bilinear weights (antialiased when shrinking, taps clipped to the crop box, as torchvision's
`resized_crop` of a PIL image computes them), and the padded shift of B, C, D and O is folded into
the same matrices (zero or edge rows). Then torchvision's tensor formulas for ColorJitter
(`adjust_brightness`, `adjust_contrast`, `adjust_saturation`) with per-image factors in a per-image
order, the flips and the normalisation. torchvision's tensor ops take one factor (and one crop box)
per call, and kornia's ColorJitter uses one order per batch and its resize is not PIL's, so these
few lines are written here; tests compare them image by image with torchvision's functional ops.

The parameters are drawn in the worker from the step's seed, so a step depends on that seed alone
(exact resume, the same augmentation on a CPU and a GPU), with torchvision's distributions:
RandomResizedCrop's scale (0.08, 1) and ratio (3/4, 4/3) with its ten tries and centre-crop
fallback, RandomCrop's padded offsets, ColorJitter factors uniform in [0.6, 1.4] applied in a
uniformly random order (the relative order of the three in its permutation of four operations,
hue being off), flip with probability 0.5.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import DatasetError
from .transforms import (CROP_RATIO, CROP_SCALE, HOST_ONLY_TRANSFORMS, JITTER, NORMALIZATION, check_transform_id,
                         crop_transform, has_jitter_and_flip, shift_padding)

AUGMENT_MODES = ("host", "device")
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
# Columns of a parameter row: the crop box in the stored image (top, left, height, width) and the shift
# of the resized box (rows, columns; out[i] = resized[i + shift]); for A-E also the three colour
# factors (by adjustment), the adjustments in the order they apply, and the flip flag (1.0 = flip).
BOX, SHIFT, FACTORS, ORDER, FLIP = slice(0, 4), slice(4, 6), slice(6, 9), slice(9, 12), 12
GEOMETRY_COLUMNS, ALL_COLUMNS = 6, 13
_CROP_TRIES = 10
MAX_SENT_SIDE = 2
"""A crop box with a side longer than this many output sizes is resized on the host (`cut_regions`), so a step
sends at most (MAX_SENT_SIDE * S)^2 pixels per image, whatever the photographs' sizes."""


def parameter_columns(transform_id: str) -> int:
    return ALL_COLUMNS if has_jitter_and_flip(transform_id) else GEOMETRY_COLUMNS


def draw_resized_crops(count: int, height: int | torch.Tensor, width: int | torch.Tensor) -> torch.Tensor:
    """RandomResizedCrop.get_params for `count` images at once: (count, 4) boxes (top, left, h, w).

    `height` and `width`: one image size for all, or (count,) tensors, one per image."""
    height = torch.as_tensor(height, dtype=torch.float32).expand(count)
    width = torch.as_tensor(width, dtype=torch.float32).expand(count)
    area = (height * width)[:, None]
    log_ratio = torch.log(torch.tensor(CROP_RATIO))
    target_area = area * torch.empty(count, _CROP_TRIES).uniform_(*CROP_SCALE)
    aspect = torch.exp(torch.empty(count, _CROP_TRIES).uniform_(log_ratio[0].item(), log_ratio[1].item()))
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.float().argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = (torch.rand(count) * (height - h + 1)).floor()
    left = (torch.rand(count) * (width - w + 1)).floor()
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, centre_crops(height, width))


def centre_crops(height: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """RandomResizedCrop's boxes when none of its tries fits, (count, 4): the largest centred box within
    the ratio range (torch.round rounds halves to even, as Python's round in torchvision)."""
    low, high = min(CROP_RATIO), max(CROP_RATIO)
    ratio = width / height
    w = torch.where(ratio > high, (height * high).round(), width)
    h = torch.where(ratio < low, (width / low).round(), height)
    return torch.stack([((height - h) / 2).floor(), ((width - w) / 2).floor(), h, w], dim=1)


def draw_parameters(count: int, transform_id: str, stored_size: tuple[int, int] | torch.Tensor, image_size: int
                    ) -> torch.Tensor:
    """Parameters of `count` training images of transform `transform_id`, (count, 13) float32 ((count, 6)
    for 'O'; 'K' augments on the host only), from torch's CPU generator (the loader seeds it per step).

    `stored_size`: (height, width) of the images sent, or (count, 2) sizes, one per image.
    """
    check_transform_id(transform_id)
    size = int(image_size)
    sizes = torch.as_tensor(stored_size, dtype=torch.float32).expand(count, 2)
    if transform_id in ("A", "E"):
        geometry = torch.cat([draw_resized_crops(count, sizes[:, 0], sizes[:, 1]), torch.zeros(count, 2)], dim=1)
    else:   # Resize((S, S)) then RandomCrop(S, padding): offset i in the padded image is a shift of i - padding
        padding, _ = shift_padding(transform_id, size)
        box = torch.cat([torch.zeros(count, 2), sizes], dim=1)
        geometry = torch.cat([box, torch.randint(0, 2 * padding + 1, (count, 2)).float() - padding], dim=1)
    if not has_jitter_and_flip(transform_id):
        return geometry.contiguous()
    factors = torch.empty(count, 3).uniform_(1 - JITTER, 1 + JITTER)
    order = torch.rand(count, 3).argsort(dim=1).float()
    flip = (torch.rand(count, 1) < 0.5).float()
    return torch.cat([geometry, factors, order, flip], dim=1)


def cut_regions(images: Sequence[np.ndarray], parameters: torch.Tensor, image_size: int
                ) -> tuple[np.ndarray, torch.Tensor]:
    """Images of any sizes and their drawn parameters -> (N, H, W, 3) uint8 and the parameters of what is sent.

    Each image's crop box is cut out (a copy of its pixels, no resampling) and placed at the top left of
    one canvas, as large as the largest box of the batch (zero elsewhere: the device's taps never reach
    outside a box). A box with a side above MAX_SENT_SIDE * S (most boxes of CUB's ~500 px photographs
    at 84 px) is cropped and resized to S x S here, in PIL as torchvision's `resized_crop` does (the device
    then leaves it as it is), so the canvas is at most (MAX_SENT_SIDE * S)^2 pixels per image: one large box
    would otherwise make the whole step's transfer that large.
    """
    size = int(image_size)
    boxes = parameters[:, BOX].long().tolist()
    regions = []
    for image, (top, left, height, width) in zip(images, boxes):
        region = image[top:top + height, left:left + width]
        if max(height, width) > MAX_SENT_SIDE * size:
            region = np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize((size, size), Image.BILINEAR))
        regions.append(region)
    sent = torch.tensor([region.shape[:2] for region in regions], dtype=torch.float32).reshape(-1, 2)
    canvas = np.zeros((len(regions), int(sent[:, 0].max()), int(sent[:, 1].max()), 3), dtype=np.uint8)
    for slot, region in zip(canvas, regions):
        slot[:region.shape[0], :region.shape[1]] = region
    parameters = parameters.clone()
    parameters[:, BOX] = torch.cat([torch.zeros_like(sent), sent], dim=1)
    return canvas, parameters


def resampling_matrices(start: torch.Tensor, length: torch.Tensor, shift: torch.Tensor, in_size: int, out_size: int,
                        edge: bool) -> torch.Tensor:
    """(N, out_size, in_size) weights along one axis: resize the span [start, start + length) to out_size
    with PIL's bilinear filter (support widened by the shrink factor: antialiasing; taps outside the span
    dropped and the rest renormalised), then out[i] = resized[i + shift], out of range: 0 or the edge."""
    source = torch.arange(out_size, device=start.device) + shift[:, None]                    # (N, out)
    if edge:
        source = source.clamp(0, out_size - 1)
    inside = ((source >= 0) & (source < out_size)).float()
    scale = (length / out_size)[:, None, None]
    support = scale.clamp(min=1.0)
    centre = (source[..., None] + 0.5) * scale                                                 # (N, out, 1)
    position = torch.arange(in_size, device=start.device) - start[:, None, None]               # (N, 1, in)
    weights = (1 - ((position - centre + 0.5) / support).abs()).clamp(min=0)
    weights = weights * ((position >= 0) & (position < length[:, None, None]))
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-12) * inside[..., None]


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """torchvision's `rgb_to_grayscale` of a float batch, (N, 1, H, W)."""
    red, green, blue = images.unbind(dim=-3)
    return (0.2989 * red + 0.587 * green + 0.114 * blue).unsqueeze(dim=-3)


class DeviceAugment:
    """Transform `transform_id` at `image_size` pixels, batched: uint8 images (..., H, W, 3) and their
    parameters (..., 13) -> normalised float images (..., 3, S, S), on the images' device."""

    def __init__(self, transform_id: str, image_size: int) -> None:
        if check_transform_id(transform_id) in HOST_ONLY_TRANSFORMS:
            raise DatasetError(f"transform {transform_id}'s affine distortions run on the host only: use --augment "
                               "host")
        self.size, self.transform_id = int(image_size), transform_id
        self.jitter_and_flip = has_jitter_and_flip(transform_id)
        self.edge = shift_padding(transform_id, self.size)[1] == "edge"

    def __call__(self, images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        *leading, height, width, channels = images.shape
        images = images.reshape(-1, height, width, channels).permute(0, 3, 1, 2).float()
        parameters = parameters.reshape(images.shape[0], -1).to(images.device)
        images = self.crop(images, parameters).div(255)
        if self.jitter_and_flip:
            images = jitter_and_flip(images, parameters)
        return normalize(images, *NORMALIZATION[self.transform_id]).reshape(*leading, channels, self.size, self.size)

    def crop(self, images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """Crop, resize and shift (N, 3, H, W) to (N, 3, S, S): one matrix product per axis."""
        top, left, height, width = parameters[:, BOX].unbind(dim=1)
        shift_rows, shift_columns = parameters[:, SHIFT].unbind(dim=1)
        rows = resampling_matrices(top, height, shift_rows, images.shape[-2], self.size, self.edge)
        columns = resampling_matrices(left, width, shift_columns, images.shape[-1], self.size, self.edge)
        return rows[:, None] @ images @ columns[:, None].transpose(-1, -2)


def jitter_and_flip(images: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """ColorJitter (per-image factors and order) then the flips, on a float batch (N, 3, H, W) in [0, 1].

    Each adjustment is torchvision's blend `factor * image + (1 - factor) * base` clamped to [0, 1], with
    base 0 (brightness), the mean gray level (contrast) or the gray image (saturation).
    """
    factors, order, flip = parameters[:, FACTORS], parameters[:, ORDER].long(), parameters[:, FLIP].bool()
    for position in range(order.shape[1]):
        operation = order[:, position].view(-1, 1, 1, 1)
        factor = factors.gather(1, order[:, position:position + 1]).view(-1, 1, 1, 1)
        gray = grayscale(images)
        base = torch.where(operation == SATURATION, gray, gray.mean(dim=(-3, -2, -1), keepdim=True))
        base = torch.where(operation == BRIGHTNESS, torch.zeros_like(base), base)
        images = (factor * images + (1.0 - factor) * base).clamp(0, 1)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


@functools.lru_cache(maxsize=64)
def channel_constants(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a (3, 1, 1) tensor on `device`, made once per (values, device, dtype): made at every call it
    would be a blocking host-to-device copy per step on CUDA. A normal tensor even when first asked for under
    inference mode, so that training can use it too."""
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device).view(3, 1, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, 3, H, W) floats in [0, 1] normalised per channel (torchvision's Normalize: the same two operations,
    so the same values)."""
    mean, std = (channel_constants(tuple(map(float, values)), images.device, images.dtype) for values in (mean, std))
    return images.sub(mean).div(std)


def to_model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, H, W, 3) test crops -> normalised (N, 3, H, W) floats: torchvision's ToTensor and Normalize,
    on the images' device, in the same (contiguous) memory layout."""
    return normalize(images.permute(0, 3, 1, 2).contiguous().float().div(255), mean, std)


class EvalCrops(torch.utils.data.Dataset):
    """Item i of a `FewShotDataset` built with its test transform, as the uint8 S x S crop (the deterministic
    resize and crop in PIL) and its label: 4 times less to copy to the device than floats, and no
    conversion on the host; `to_model_input(images, crops.mean, crops.std)` finishes it there. The crop, mean
    and std are those of the dataset's `input_settings` (a cross-domain evaluation's statistics are the model's,
    `with_normalization`)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        settings = dataset.input_settings
        self.crop = crop_transform(settings.transform, settings.image_size, train=False)
        self.mean, self.std = tuple(settings.mean), tuple(settings.std)

    @staticmethod
    def applies_to(dataset) -> bool:
        """Whether the items of `dataset` are the test transform of its `input_settings` and nothing else
        (`FewShotDataset.uses_test_transform`): they are then `to_model_input` of these crops."""
        return bool(getattr(dataset, "uses_test_transform", False))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        crop = self.crop(self.dataset.load_image(index))
        return torch.from_numpy(np.array(crop, dtype=np.uint8)), int(self.dataset.labels[index])


class DeviceAugmentLoader:
    """Wraps a loader of (uint8 images, labels, parameters) into one of (float images, labels) on `device`.

    On CUDA the copies from pinned memory are asynchronous and the augmentation's kernels queue
    behind them, so the host only launches work (as timm's PrefetchLoader does for normalisation).
    """

    def __init__(self, loader: Iterable, augment: DeviceAugment, device: torch.device) -> None:
        self.loader, self.augment, self.device = loader, augment, torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, parameters in self.loader:
            images = images.to(self.device, non_blocking=True)
            parameters = parameters.to(self.device, non_blocking=True)
            yield self.augment(images, parameters), labels.to(self.device, non_blocking=True)
