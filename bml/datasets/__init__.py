"""Data: readers for every layout, the embedded `glyphs` set, Omniglot, transforms, the episode sampler.

    ds = build_dataset('miniImageNet', 'train', data_root=None, image_size=None, train=True)
    plan = EpisodeSampler(ds.labels, way=15, shot=5, query=7, episodes=500, seed=0, rank=0).sample()
    loader = build_step_loader(ds, {1: plan}.__getitem__, seed_key=(0, 0), first=(1, 0), last_epoch=1,
                               steps_per_epoch=500, num_workers=4)   # (images, labels) per episode
"""
from ..scoring import episode_labels   # its home is bml.scoring; re-exported for the data layer's users
from .base import ArrayDataset, FewShotDataset, FileDataset, ReadOptions, SplitData, with_normalization
from .errors import DatasetError
from .factory import (DATASET_NAMES, DATASETS, IMAGE_FOLDER, NATURAL_IMAGES_DATASET, SPLITS, DatasetDefaults,
                      DatasetLayout, InputSettings, build_dataset, canonical_name, dataset_defaults, dataset_flag_help,
                      dataset_layout, dataset_names, describe_datasets, input_transform_settings, read_split,
                      resolve_data_root, summarize)
from .fingerprint import dataset_fingerprint, split_fingerprint
from .npz import read_npz_arrays
from .readers import TIERED_LABELS
from .safe_pickle import load_pickle
from .device_augment import AUGMENT_MODES, DeviceAugment, draw_parameters
from .sampler import (EpisodeRule, EpisodeSampler, StepBatches, build_step_loader, default_num_workers, episode_sampler,
                      shuffled_batches)
from .transforms import NORMALIZATION, TRANSFORM_IDS, TransformSettings, build_transform, crop_transform

__all__ = [
    "AUGMENT_MODES", "ArrayDataset", "DATASETS", "DATASET_NAMES", "DatasetDefaults", "DatasetError", "DatasetLayout",
    "DeviceAugment", "EpisodeRule", "EpisodeSampler", "FewShotDataset", "FileDataset", "IMAGE_FOLDER", "InputSettings",
    "NATURAL_IMAGES_DATASET", "NORMALIZATION", "ReadOptions", "SPLITS", "SplitData", "StepBatches", "TIERED_LABELS",
    "TRANSFORM_IDS",
    "TransformSettings", "build_dataset", "build_step_loader", "build_transform",
    "canonical_name", "crop_transform", "dataset_defaults", "dataset_fingerprint",
    "dataset_flag_help", "dataset_layout", "dataset_names",
    "default_num_workers", "describe_datasets", "draw_parameters", "episode_labels", "episode_sampler",
    "input_transform_settings",
    "load_pickle", "read_npz_arrays", "read_split", "resolve_data_root", "shuffled_batches",
    "split_fingerprint", "summarize", "with_normalization",
]
