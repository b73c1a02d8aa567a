"""regfit.data.idx: IDX parsing and writing on the real digits; corrupt files name themselves."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from regfit.data import DataError, MNISTDataModule, read_idx, write_idx
from tests.unit.data.support import copy_files, loaded, md5


def test_built_split_is_the_official_test_set(mnist_dir: Path, mnist_source: Path) -> None:
    images = read_idx(mnist_source / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(mnist_source / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,)
    np.testing.assert_array_equal(read_idx(mnist_dir / "train-images-idx3-ubyte.gz"), images[:8000])
    np.testing.assert_array_equal(read_idx(mnist_dir / "train-labels-idx1-ubyte.gz"), labels[:8000])
    np.testing.assert_array_equal(read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz"), images[8000:])
    np.testing.assert_array_equal(read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz"), labels[8000:])
    # The shared files are the official ones: the MD5 table of the module matches them.
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert md5(mnist_source / name) == MNISTDataModule.md5s[name]


def test_write_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    digest = write_idx(tmp_path / "x-images-idx3-ubyte.gz", array)
    assert digest == md5(tmp_path / "x-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(read_idx(tmp_path / "x-images-idx3-ubyte.gz"), array)
    # Reproducible bytes: no timestamp in the gzip header.
    assert write_idx(tmp_path / "again-images-idx3-ubyte.gz", array) == digest


def _idx_bytes(path: Path) -> bytearray:
    return bytearray(gzip.decompress(path.read_bytes()))


@pytest.mark.parametrize(
    ("name", "corrupt", "message"),
    [
        ("train-labels-idx1-ubyte.gz", lambda d: d.__setitem__(2, 0x09) or d, "magic number"),
        ("train-images-idx3-ubyte.gz", lambda d: d.__setitem__(3, 2) or d, "bytes"),
        ("train-images-idx3-ubyte.gz", lambda d: d[:-100], "truncated"),
        ("t10k-labels-idx1-ubyte.gz", lambda d: d + b"\0", "trailing bytes"),
    ],
    ids=["bad-type-code", "wrong-ndim", "truncated", "trailing-bytes"],
)
def test_corrupt_idx_names_the_file(mnist_dir, tmp_path, name, corrupt, message) -> None:
    folder = copy_files(mnist_dir, tmp_path / "data")
    data = bytes(corrupt(_idx_bytes(mnist_dir / name)))
    (folder / name).write_bytes(gzip.compress(data, compresslevel=1))
    with pytest.raises(DataError, match=message) as excinfo:
        loaded(MNISTDataModule(data_dir=str(folder), download=False))
    assert str(folder / name) in str(excinfo.value)
    assert "delete" in str(excinfo.value)


def test_labels_where_images_belong_is_a_magic_error(mnist_dir: Path, tmp_path: Path) -> None:
    folder = copy_files(mnist_dir, tmp_path / "data")
    shutil.copy(folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="magic number 2051, expected 2049") as excinfo:
        loaded(MNISTDataModule(data_dir=str(folder), download=False), "test")
    assert "t10k-labels-idx1-ubyte.gz" in str(excinfo.value)


def test_truncated_gzip_stream_names_the_file(mnist_dir: Path, tmp_path: Path) -> None:
    folder = copy_files(mnist_dir, tmp_path / "data")
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt gzip") as excinfo:
        loaded(MNISTDataModule(data_dir=str(folder), download=False))
    assert str(path) in str(excinfo.value)
