"""Reliability: no crafted file runs code or corrupts memory, no wrong result is reported, no run or result
is lost (see docs/RELIABILITY.md, which names the test of each guarantee)."""
from __future__ import annotations

import argparse
import errno
import io
import zipfile

import numpy as np
import pytest

import eval_bml
import train_baseline
import train_bml
from bml import predict
from bml.datasets import DatasetError, build_dataset, read_npz_arrays
from fixtures import make_tiered


# ----------------------------------------------------------------------------------------------
# 1. A crafted .npz never reaches memory


def npz_with_member(path, key: str, header_dtype: str, payload: bytes, shape=(2, 4, 4, 3)) -> None:
    """An .npz whose member `key` declares `header_dtype` and holds `payload` after the header."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": header_dtype, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{key}.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:] + payload)


@pytest.mark.parametrize("header_dtype", ["|O", "<f4", "|V8", "|S1"])
def test_npz_refuses_non_integer_dtypes_before_allocating(tmp_path, header_dtype):
    path = tmp_path / "crafted.npz"
    npz_with_member(path, "images", header_dtype, b"\xef\xbe\xad\xde" * 256)   # pointer-like bytes
    with pytest.raises(DatasetError, match="only integer arrays"):
        read_npz_arrays([(path, "images")])


def test_tiered_with_object_images_is_a_dataset_error(tmp_path):
    make_tiered(tmp_path)
    images = np.empty(12, dtype=object)
    images[:] = [np.zeros((8, 8, 3), np.uint8)] * 12
    np.savez(tmp_path / "tieredImageNet" / "test_images.npz", images=images)   # an ordinary object-dtype savez
    with pytest.raises(DatasetError, match="stored as object"):
        build_dataset("tieredImageNet", "test", data_root=tmp_path)


def test_npz_of_integers_other_than_uint8_is_refused_for_images(tmp_path):
    np.savez(tmp_path / "wide.npz", images=np.zeros((2, 4, 4, 3), np.int64))
    with pytest.raises(DatasetError, match="stored as int64, expected uint8"):
        read_npz_arrays([(tmp_path / "wide.npz", "images")])


# ----------------------------------------------------------------------------------------------
# 3. Every numeric flag is validated when parsed, with the allowed range in the message


TRAIN_FLAGS = [("--width", "0", "> 0"), ("--image_size", "0", ">= 16"), ("--image_size", "1", ">= 16"),
               ("--image_size", "8", ">= 16"), ("--image_size", "-5", ">= 16"), ("--lr", "-1", ">= 0"),
               ("--drop_rate", "2", ">= 0 and < 1"), ("--num_workers", "-1", ">= 0"), ("--T", "0", "> 0"),
               ("--weights", "nan_1_1", "three numbers >= 0"), ("--n_train_queries", "0", ">= 1"),
               ("--lr", "nan", ">= 0"), ("--epochs", "0", ">= 1"), ("--seed", "-3", ">= 0"),
               ("--clip_grad", "-1", ">= 0"), ("--global_batch", "-1", ">= 0"), ("--n_ways", "1", ">= 2"),
               ("--episodes_per_step", "1.5", "an integer >= 1")]


@pytest.mark.parametrize("flag, value, allowed", TRAIN_FLAGS)
def test_train_flags_are_checked_when_parsed(flag, value, allowed, capsys):
    with pytest.raises(SystemExit):
        train_bml.get_args_parser().parse_args([flag, value])
    error = capsys.readouterr().err
    assert f"argument {flag}" in error and allowed in error and repr(value) in error


EVAL = (eval_bml.get_args_parser, ["--ckp_path", "x"])
PREDICT = (predict.get_args_parser, ["--ckp_path", "x", "--support", "s", "--query", "q"])


@pytest.mark.parametrize("entry, flag, value, allowed", [
    ((train_baseline.get_args_parser, []), "--batch_size", "0", ">= 1"),
    (EVAL, "--n_queries", "0", ">= 1"), (EVAL, "--batch_size", "0", ">= 1"), (EVAL, "--image_size", "8", ">= 16"),
    (EVAL, "--max_memory_gb", "0", "> 0"), (PREDICT, "--num_workers", "-1", ">= 0"),
    (PREDICT, "--image_size", "0", ">= 16"),
])
def test_other_entry_points_check_their_flags(entry, flag, value, allowed, capsys):
    get_parser, required = entry
    with pytest.raises(SystemExit):
        get_parser().parse_args([*required, flag, value])
    assert allowed in capsys.readouterr().err


def test_valid_flags_still_parse():
    args = train_bml.get_args_parser().parse_args(["--lr", "0", "--weights", "2_1_0", "--drop_rate", "0",
                                                   "--image_size", "16", "--width", "0.125"])
    assert (args.lr, args.weights, args.drop_rate, args.image_size, args.width) == (0.0, "2_1_0", 0.0, 16, 0.125)
