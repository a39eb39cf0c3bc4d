"""Random-number state: seeding, capture and restore for exact resumes, and isolated seeded blocks.

Captured states are stored as tensors and plain Python values only, so a checkpoint holding them
still loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from several integers (e.g. seed, rank, epoch, step)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """This process's Python, NumPy, torch and CUDA generator states, as checkpoint-safe values."""
    _, np_keys, np_pos, np_has_gauss, np_cached_gaussian = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached_gaussian)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss_next},
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored only when as many GPUs are visible."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda", [])
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"].tolist()),
                     python_state["gauss_next"]))


@contextlib.contextmanager
def isolated_cpu_rng(seed: int) -> Iterator[None]:
    """Run a block with the CPU generators (torch, NumPy, Python) seeded by `seed`, then put them back.

    Used for data augmentation, so that an image batch depends only on its own seed and loading
    it never shifts the random stream of the training process (dropout, DropBlock).
    """
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
