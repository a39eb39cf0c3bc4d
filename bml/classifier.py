"""`FewShotClassifier`: a trained checkpoint applied to your own images, scikit-learn style.

    clf = FewShotClassifier.from_checkpoint("output/.../best.pth")
    clf.fit(support_images, ["cat", "cat", "dog", "fox"])    # any number of shots per class
    clf.predict(query_images)         # -> ["dog", ...]
    clf.predict_proba(query_images)   # -> (n, classes) array, columns in clf.classes_ order

The few-shot evaluation's test-time rule (`bml.scoring`), with prototypes from however many shots each
class has: per view, a prototype is the mean support embedding of a class and the logits are minus the
squared Euclidean distances to the prototypes; a vote combines the views' logits (`vote='bml'`, the
default: their sum, BML's global + local; `'bml_scaled'`, or one view alone). The probabilities are the
softmax of the combined logits divided by the vote's temperature, fitted on val episodes and stored in
the checkpoint (`bml.calibration`); a checkpoint without one is uncalibrated (`temperature` None: T = 1),
and its probabilities are far too close to 0 and 1. A temperature belongs to the way and shot it was
fitted on: `fit` on a task of another shape warns (`CalibrationWarning`), as the confidences are then
only roughly calibrated. `head` chooses how each view's logits are made
(`bml.scoring.HEADS`: `'proto'`, the default, as above; `'cl2n'`, which needs the base classes' mean
embeddings, from the checkpoint's training split or given as `base_means`; `'support_cl2n'`; `'logreg'`).

Images may be PIL images, file paths (str or Path) or numpy uint8 arrays (H x W or H x W x C): these go
through the checkpoint's test transform (its data set's resize/crop and normalisation, at its input
size). Torch tensors are taken as model input that is already transformed: float (3, S, S) or
(N, 3, S, S), S the classifier's `image_size`.
"""
from __future__ import annotations

import os
import statistics
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from bml.checkpoint import model_config, model_from_state, read_calibration, read_checkpoint, temperature_problem
from bml.datasets import build_dataset, build_transform, input_transform_settings
from bml.datasets.image_files import image_problem, image_to_rgb
from bml.evaluation import EmbeddingOptions, base_class_means
from bml.evaluation.base_means import base_means_dir
from bml.scoring import BASE_MEAN, COMBINED, HEADS, PROTO, head_scores, heads_needing, votes_for

ImageLike = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor


class FewShotInputError(ValueError):
    """Images or labels that cannot be classified as given; the message says what to change."""


class CalibrationWarning(UserWarning):
    """The vote's temperature was fitted on episodes of another way or shot than the task given to `fit`."""


def describe_task(way: int, shots: Sequence[int]) -> str:
    """'5-way 1-shot', or '3-way 1- to 5-shot' when the classes have different numbers of shots."""
    low, high = min(shots), max(shots)
    return f"{way}-way {low}-shot" if low == high else f"{way}-way {low}- to {high}-shot"


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully (so truncated files fail here, not later) and convert it to RGB,
    as the data layer reads image folders."""
    problem = image_problem(path)
    if problem:
        raise ValueError(problem)
    with Image.open(path) as image:
        return image_to_rgb(image)


def class_order(labels: Sequence[Hashable]) -> list[Hashable]:
    """The distinct labels, sorted; in first-seen order when they cannot be compared with each other."""
    distinct = list(dict.fromkeys(labels))
    try:
        return sorted(distinct)
    except TypeError:
        return distinct


@dataclass
class Scores:
    """Scores of the readable images among the inputs of `FewShotClassifier.score`.

    Row i of `logits` belongs to input `kept[i]`; `unreadable` lists (input, reason) of the others.
    """

    logits: torch.Tensor
    kept: list[int]
    unreadable: list[tuple[str, str]]
    classes: list[Hashable]
    temperature: float = 1.0

    @property
    def probabilities(self) -> np.ndarray:
        """(n, classes) softmax of the vote's logits divided by the temperature, in float64."""
        return (self.logits.double() / self.temperature).softmax(dim=1).numpy()

    def ranked(self, rank: int) -> tuple[list[Hashable], np.ndarray]:
        """The class at `rank` (0: the prediction, 1: the runner-up) of every row and its probability.

        Ranked by logits: far from the prototypes, several probabilities may round to the same 0.
        """
        probabilities = self.probabilities
        columns = self.logits.argsort(dim=1, descending=True, stable=True)[:, rank].numpy()
        return [self.classes[c] for c in columns], probabilities[np.arange(len(columns)), columns]


class _ImageInputs(torch.utils.data.Dataset):
    """Inputs -> (index, model input or None, reason it is unreadable or None), so that a DataLoader
    can decode files in workers and a bad file never stops the pass."""

    def __init__(self, items: list[ImageLike], transform: Callable[[Image.Image], torch.Tensor]):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[index]
        if isinstance(item, torch.Tensor):
            return index, item.detach().cpu().float(), None
        if isinstance(item, np.ndarray):
            return index, self.transform(Image.fromarray(item).convert("RGB")), None
        if isinstance(item, Image.Image):
            return index, self.transform(item.convert("RGB")), None
        try:
            image = load_rgb(item)
        except Exception as error:   # a user's file may fail in any of PIL's decoders: report, never stop
            return index, None, f"{type(error).__name__}: {error}"
        return index, self.transform(image), None


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None]]
             ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Readable samples stacked into a batch; the unreadable ones as (index, reason)."""
    readable = [(index, tensor) for index, tensor, _ in samples if tensor is not None]
    unreadable = [(index, reason) for index, tensor, reason in samples if tensor is None]
    batch = torch.stack([tensor for _, tensor in readable]) if readable else None
    return [index for index, _ in readable], batch, unreadable


class FewShotClassifier:
    """Few-shot classification of new images with a trained BML or baseline model (nearest prototype, or `head`).

    `fit` sets the classes from labelled support images (any hashable labels, any number of shots
    per class); `classes_` is their sorted order (first-seen order when the labels are not mutually
    comparable) and the column order of `predict_proba`. `temperature` divides the vote's logits before
    the softmax (None: uncalibrated, T = 1); `calibrated_on` is the task it was fitted on (the calibration
    record's `fitted_on`, with its 'way' and 'shot'; None: not known, not checked).
    """

    def __init__(self, model: torch.nn.Module, transform: Callable[[Image.Image], torch.Tensor], image_size: int,
                 device: str | torch.device = "cpu", batch_size: int = 64, num_workers: int = 0,
                 progress: bool = True, vote: str = COMBINED, temperature: float | None = None,
                 head: str = PROTO, base_means: Sequence[torch.Tensor] | None = None,
                 calibrated_on: Mapping[str, Any] | None = None) -> None:
        votes = votes_for(model.view_names)
        if vote not in votes:
            raise FewShotInputError(f"unknown vote {vote!r} for a model with views {', '.join(model.view_names)}: "
                                    f"choose one of {', '.join(votes)}")
        if head not in HEADS:
            raise FewShotInputError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
        if heads_needing(BASE_MEAN, [head]) and base_means is None:
            raise FewShotInputError(f"head {head!r} centres on the base classes' mean embedding: pass base_means "
                                    f"(bml.evaluation.base_class_means), or use from_checkpoint")
        if temperature is not None and temperature_problem(temperature):
            raise FewShotInputError(f"temperature {temperature_problem(temperature)}: pass a calibrated temperature "
                                    f"(bml.calibration) or None")
        self.vote, self._combine = vote, votes[vote]
        self.temperature = temperature
        self.calibrated_on = dict(calibrated_on) if calibrated_on else None
        self.head = head
        self.base_means = None if base_means is None else tuple(mean.to(device) for mean in base_means)
        self.model = model.to(device).eval()
        self.transform, self.image_size = transform, int(image_size)
        self.device = torch.device(device)
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.classes_: list[Hashable] | None = None
        self.support_: tuple[torch.Tensor, ...] | None = None
        self.support_labels_: torch.Tensor | None = None
        self.shots_: list[int] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        batch_size: int = 64, num_workers: int = 0, image_size: int | None = None,
                        transform_id: str | None = None, progress: bool = True,
                        vote: str = COMBINED, head: str = PROTO, data_root: str | None = None) -> FewShotClassifier:
        """A released or own checkpoint with its data set's test transform and input size.

        `device` defaults to CUDA when available. `image_size` and `transform_id` ('A'..'E', 'O', 'K')
        override what the checkpoint records (with a warning when they differ from it). `vote`
        names how the views' logits are combined (`bml.scoring.votes_for`); its temperature is the
        checkpoint's calibration of that vote, None when it has none (`calibrated_on`: the task the calibration
        record says it was fitted on). `head` names how each view's logits
        are made (`bml.scoring.HEADS`); a head that centres on the base classes' mean embeds the training split
        of the checkpoint's data set (under `data_root`) once, its means then kept in the project's cache folder
        (`bml.evaluation.base_class_means`, `base_means_dir`). Raises FileNotFoundError
        for a missing file and `bml.checkpoint.CheckpointError` for a file that is not a matching
        model checkpoint.
        """
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        state = read_checkpoint(path)
        transform_id, size = input_transform_settings(model_config(state), image_size, transform_id)
        model = model_from_state(state, device=device, source=str(path))
        base_means = None
        if heads_needing(BASE_MEAN, [head]):
            dataset = model_config(state).get("dataset")
            if dataset is None:
                raise FewShotInputError(f"{path} does not record its data set, whose training split head {head!r} "
                                        f"centres on: pass base_means to FewShotClassifier")
            base_set = build_dataset(dataset, "train", data_root, size, train=False, transform=transform_id)
            options = EmbeddingOptions(batch_size=batch_size, device=device, num_workers=num_workers, progress=progress)
            base_means = base_class_means(model, base_set, options, means_dir=base_means_dir())
        calibration = read_calibration(state) or {}
        return cls(model, build_transform(transform_id, size, train=False), size, device, batch_size,
                   num_workers, progress, vote, calibration.get("temperatures", {}).get(vote), head, base_means,
                   calibration.get("fitted_on"))

    @property
    def view_names(self) -> tuple[str, ...]:
        return tuple(self.model.view_names)

    def fit(self, images: Sequence[ImageLike] | torch.Tensor, labels: Sequence[Hashable],
            skip_unreadable: bool = False) -> FewShotClassifier:
        """Set the classes and keep the support embeddings the head fits on (`proto`: their class means).

        Unreadable image files raise FewShotInputError naming all of them, or with
        `skip_unreadable` are left out with one warning; a class left without images is an error.
        A task whose way or shot differs from the one the temperature was fitted on warns
        (`CalibrationWarning`, the text of `calibration_mismatch`).
        """
        items, labels = self._as_items(images), list(labels)
        if len(labels) != len(items):
            raise FewShotInputError(f"fit got {len(items)} images but {len(labels)} labels")
        classes = class_order(labels)
        if len(classes) < 2:
            raise FewShotInputError(f"few-shot classification needs support images of at least two classes, "
                                    f"got {len(classes)}: {classes}")
        column = {label: c for c, label in enumerate(classes)}
        targets = torch.tensor([column[label] for label in labels], dtype=torch.long)
        kept: list[int] = []
        batches: list[tuple[torch.Tensor, ...]] = []
        unreadable: list[tuple[int, str]] = []
        for indices, views in self._embedded_batches(items, unreadable, "support"):
            kept += indices
            batches.append(views)
        self._report_unreadable(items, unreadable, skip_unreadable, "support")
        counts = torch.bincount(targets[kept], minlength=len(classes))
        empty = [classes[c] for c in torch.nonzero(counts == 0).flatten().tolist()]
        if empty:
            raise FewShotInputError(f"no readable support image for class(es) {empty}: give every class at "
                                    f"least one image")
        self.classes_, self.shots_ = classes, counts.tolist()
        self.support_ = tuple(torch.cat(view) for view in zip(*batches))
        self.support_labels_ = targets[kept].to(self.device)
        mismatch = self.calibration_mismatch()
        if mismatch:
            warnings.warn(CalibrationWarning(mismatch), stacklevel=2)
        return self

    def calibration_mismatch(self, checkpoint: str = "CHECKPOINT") -> str | None:
        """What to know when the vote's temperature was fitted on another way or shot than the fitted task, and
        how to fit one for it (`checkpoint` names the file in that command); None when it was fitted on this
        task's way and shot, when there is no temperature, or when the task it was fitted on is not known.

        Temperatures do not carry over between tasks (README, Calibration): one fitted on 1-shot episodes
        over-softens 5-shot confidences, one fitted on 5-way episodes is not that of 20-way ones.
        """
        if self.shots_ is None:
            raise RuntimeError("this FewShotClassifier is not fitted yet: call fit(support_images, labels) first")
        fitted = self.calibrated_on or {}
        if self.temperature is None or "way" not in fitted or "shot" not in fitted:
            return None
        way, shots = len(self.classes_), self.shots_
        if way == fitted["way"] and set(shots) == {fitted["shot"]}:
            return None
        return (f"vote {self.vote}'s temperature {self.temperature:.4g} was fitted on {fitted['way']}-way "
                f"{fitted['shot']}-shot val episodes, but this task is {describe_task(way, shots)}: its confidences "
                f"are only roughly calibrated, as a temperature does not carry over between tasks (README, "
                f"Calibration). Fit one for this task with: eval_bml.py --ckp_path {checkpoint} --calibrate "
                f"--n_ways {way} --n_shots {statistics.median_low(shots)} --save_calibration PATH")

    def score(self, images: Sequence[ImageLike] | torch.Tensor, skip_unreadable: bool = False) -> Scores:
        """The vote's logits of every readable image (unreadable ones: as in `fit`)."""
        if self.support_ is None:
            raise RuntimeError("this FewShotClassifier is not fitted yet: call fit(support_images, labels) first")
        items = self._as_items(images)
        logits, kept, unreadable = [], [], []
        for indices, embeddings in self._embedded_batches(items, unreadable, "query"):
            views = {name: head_scores(self.head, support, self.support_labels_, embedding, len(self.classes_),
                                       None if self.base_means is None else self.base_means[v])
                     for v, (name, embedding, support) in enumerate(zip(self.view_names, embeddings, self.support_))}
            logits.append(self._combine(views).cpu())
            kept += indices
        named_failures = self._report_unreadable(items, unreadable, skip_unreadable, "query")
        all_logits = torch.cat(logits) if logits else torch.empty(0, len(self.classes_))
        return Scores(all_logits, kept, named_failures, list(self.classes_), self.temperature or 1.0)

    def decision_function(self, images: Sequence[ImageLike] | torch.Tensor) -> np.ndarray:
        """(n, classes) logits of the vote (`'bml'`: the views' summed minus squared distances to the prototypes)."""
        return self.score(images).logits.numpy()

    def predict_proba(self, images: Sequence[ImageLike] | torch.Tensor) -> np.ndarray:
        """(n, classes) class probabilities (calibrated when `temperature` is set), columns in `classes_` order."""
        return self.score(images).probabilities

    def predict(self, images: Sequence[ImageLike] | torch.Tensor) -> list[Hashable]:
        """The class with the largest vote logit (`'bml'`: the nearest prototype summed over views) of every image."""
        return self.score(images).ranked(0)[0]

    def _as_items(self, images: Sequence[ImageLike] | ImageLike) -> list[ImageLike]:
        """A list of single images; batched tensors/arrays split, tensors checked against the input size."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            return [images]
        if isinstance(images, np.ndarray):
            return list(images) if images.ndim == 4 else [images]
        if isinstance(images, torch.Tensor):
            images = list(images) if images.dim() == 4 else [images]
        items = list(images)
        for item in items:
            if isinstance(item, torch.Tensor):
                self._check_input_tensor(item)
            elif not isinstance(item, (Image.Image, str, os.PathLike, np.ndarray)):
                raise TypeError(f"unsupported image type {type(item).__name__}: pass PIL images, paths, numpy "
                                f"uint8 arrays or transformed float tensors")
        return items

    def _check_input_tensor(self, tensor: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if not tensor.is_floating_point() or tuple(tensor.shape) != expected:
            raise FewShotInputError(
                f"a tensor image must be transformed model input, float of shape {expected} (or a batch "
                f"(N, {', '.join(map(str, expected))})); got {tensor.dtype} {tuple(tensor.shape)}. Pass PIL "
                f"images or paths to have the checkpoint's transform applied")

    @torch.inference_mode()
    def _embedded_batches(self, items: list[ImageLike], unreadable: list[tuple[int, str]],
                          role: str) -> Iterator[tuple[list[int], tuple[torch.Tensor, ...]]]:
        """(input indices, one (B, D) float32 embedding per view) per batch; failures appended to `unreadable`."""
        loader = torch.utils.data.DataLoader(_ImageInputs(items, self.transform), batch_size=self.batch_size,
                                             num_workers=self.num_workers, collate_fn=_collate,
                                             pin_memory=self.device.type == "cuda")
        large = len(items) > self.batch_size
        for indices, batch, failures in tqdm(loader, desc=f"embed {role}", unit="batch",
                                             disable=None if self.progress and large else True):
            unreadable += failures
            if batch is not None:
                yield indices, tuple(view.float() for view in self.model.embed(batch.to(self.device)))

    @staticmethod
    def _report_unreadable(items: list[ImageLike], unreadable: list[tuple[int, str]], skip: bool,
                           role: str) -> list[tuple[str, str]]:
        """Raise (or, with `skip`, warn once) listing every unreadable input; returns (input, reason)."""
        named = [(str(items[index]) if isinstance(items[index], (str, os.PathLike)) else f"image {index}", reason)
                 for index, reason in unreadable]
        if named:
            listing = "\n".join(f"  {name} ({reason})" for name, reason in named)
            message = f"{len(named)} of {len(items)} {role} files are not readable images"
            if not skip:
                raise FewShotInputError(f"{message}:\n{listing}")
            warnings.warn(f"{message}, skipped:\n{listing}", stacklevel=3)
        return named
