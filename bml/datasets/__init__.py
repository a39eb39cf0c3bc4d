"""Data: readers for every layout, the embedded `glyphs` set, Omniglot, transforms, the episode sampler.

    ds = build_dataset('miniImageNet', 'train', data_root=None, image_size=None, train=True)
    plan = EpisodeSampler(ds.labels, way=15, shot=5, query=7, episodes=500, seed=0, rank=0).sample()
    loader = build_step_loader(ds, plan, seed_key=(0, 0, 0), num_workers=4)   # (images, labels) per episode
"""
from ..scoring import episode_labels   # its home is bml.scoring; re-exported for the data layer's users
from .base import ArrayDataset, DatasetError, FewShotDataset, FileDataset, SplitData
from .factory import (DATASET_NAMES, NATURAL_IMAGES_DATASET, SPLITS, DatasetDefaults, InputSettings, build_dataset,
                      canonical_name, dataset_defaults, input_transform_settings, read_split, resolve_data_root,
                      summarize)
from .npz import read_npz_arrays
from .safe_pickle import load_pickle
from .sampler import EpisodeSampler, StepBatches, build_step_loader, shuffled_batches
from .transforms import NORMALIZATION, TRANSFORM_IDS, build_transform

__all__ = [
    "ArrayDataset", "DATASET_NAMES", "DatasetDefaults", "DatasetError", "EpisodeSampler", "FewShotDataset",
    "FileDataset", "InputSettings", "NATURAL_IMAGES_DATASET", "NORMALIZATION", "SPLITS", "SplitData", "StepBatches",
    "TRANSFORM_IDS", "build_dataset", "build_step_loader", "build_transform", "canonical_name", "dataset_defaults",
    "episode_labels", "input_transform_settings", "load_pickle", "read_npz_arrays", "read_split",
    "resolve_data_root", "shuffled_batches", "summarize",
]
