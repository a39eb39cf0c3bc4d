"""A restricted unpickler for data set pickles.

Unpickling runs whatever callable the file names, so a downloaded data pickle is code. The data
pickles of the benchmarks (written by Python 2 with numpy, protocol 2) need only numpy's array,
dtype and scalar reconstruction, `_codecs.encode` (Python 3 bytes) and builtin containers: any other
global is refused before anything of the file runs.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DATA_HELP, DatasetError

_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]   # numpy's _reconstruct, any numpy version
_SCALAR = np.float64(0).__reduce__()[0]                     # numpy's scalar reconstruction

_MULTIARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_BUILTIN_MODULES = ("builtins", "__builtin__")               # Python 3 and Python 2 names
_BUILTINS = {
    "set": set, "frozenset": frozenset, "list": list, "dict": dict, "tuple": tuple, "bytes": bytes,
    "bytearray": bytearray, "str": str, "int": int, "float": float, "complex": complex, "bool": bool,
}

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{(module, "_reconstruct"): _RECONSTRUCT for module in _MULTIARRAY_MODULES},
    **{(module, "scalar"): _SCALAR for module in _MULTIARRAY_MODULES},
    **{(module, name): obj for module in _BUILTIN_MODULES for name, obj in _BUILTINS.items()},
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside ALLOWED_GLOBALS."""


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in ALLOWED_GLOBALS; anything else raises before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def load_pickle(path: str | Path) -> Any:
    """Read a data pickle (Python 2 or 3) with the restricted unpickler and latin1 strings."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DatasetError(f"expected {path.name} under {path.parent}: {DATA_HELP}") from None
    except RefusedGlobal as refused:
        raise DatasetError(
            f"refused to load {path}: it asks for the global '{refused}', but data pickles may hold only "
            f"numpy arrays and builtin containers; nothing of the file was run. Get the file from the "
            f"source named in the README, section Data"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DatasetError(f"cannot read {path}: not a valid data pickle ({error}); {DATA_HELP}") from None
