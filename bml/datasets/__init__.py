"""Data: readers for every layout, the embedded `glyphs` set, Omniglot, transforms, the episode sampler.

    ds = build_dataset('miniImageNet', 'train', data_root=None, image_size=None, train=True)
    sampler = EpisodeSampler(ds.labels, way=15, shot=5, query=7, episodes=500, seed=0, rank=0)
    loader = build_episode_loader(ds, sampler, num_workers=4)
"""
from .base import ArrayDataset, DatasetError, FewShotDataset, FileDataset, SplitData
from .factory import (DATASET_NAMES, SPLITS, DatasetDefaults, build_dataset, canonical_name, dataset_defaults,
                      read_split, resolve_data_root, summarize)
from .npz import read_npz_arrays
from .safe_pickle import load_pickle
from .sampler import EpisodeSampler, build_episode_loader, build_shuffled_loader, episode_labels, seed_worker
from .transforms import NORMALIZATION, TRANSFORM_IDS, build_transform

__all__ = [
    "ArrayDataset", "DATASET_NAMES", "DatasetDefaults", "DatasetError", "EpisodeSampler", "FewShotDataset",
    "FileDataset", "NORMALIZATION", "SPLITS", "SplitData", "TRANSFORM_IDS", "build_dataset",
    "build_episode_loader", "build_shuffled_loader", "build_transform", "canonical_name", "dataset_defaults",
    "episode_labels", "load_pickle", "read_npz_arrays", "read_split", "resolve_data_root", "seed_worker",
    "summarize",
]
