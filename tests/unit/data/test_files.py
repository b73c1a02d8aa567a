"""regfit.data.files: where the files are looked for, the MD5 policy, and the errors that name the fix.

Downloads go to a local ``http.server``; nothing touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from regfit.data import DataError, MNISTDataModule, read_idx, write_idx
from tests.unit.data.support import FILES, copy_files, loaded, md5, raw_listing, with_md5s


def test_own_folder_is_checked_against_its_md5sums(mnist_dir: Path, tmp_path: Path) -> None:
    folder = copy_files(mnist_dir, tmp_path / "data", FILES + ("MD5SUMS",))
    labels = read_idx(folder / "train-labels-idx1-ubyte.gz")
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[::-1])  # valid IDX, other bytes
    with pytest.raises(DataError, match="MD5SUMS"):
        loaded(MNISTDataModule(data_dir=str(folder), download=False))
    dm = loaded(MNISTDataModule(data_dir=str(folder), download=False, verify_md5=False))
    assert len(dm.train_set.y) + len(dm.val_set.y) == 8000


def test_verify_md5_true_demands_the_official_files(mnist_dir: Path) -> None:
    with pytest.raises(DataError, match="expected f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        loaded(MNISTDataModule(data_dir=str(mnist_dir), download=False, verify_md5=True))


def test_data_dir_from_argument_env_or_default(monkeypatch, tmp_path, mnist_dir) -> None:
    monkeypatch.setenv("REGFIT_DATA_DIR", str(mnist_dir))
    assert MNISTDataModule().files.data_dir == mnist_dir
    assert MNISTDataModule(data_dir=str(tmp_path)).files.data_dir == tmp_path
    monkeypatch.delenv("REGFIT_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    dm = MNISTDataModule()
    assert dm.files.data_dir == tmp_path / "data"
    assert dm.files.download_dir == tmp_path / "data" / "MNIST" / "raw"


def test_download_folder_layout_is_found(mnist_dir: Path, tmp_path: Path) -> None:
    copy_files(mnist_dir, tmp_path / "MNIST" / "raw")  # torchvision's layout
    dm = loaded(with_md5s(mnist_dir)(data_dir=str(tmp_path), download=False), "test")
    assert len(dm.test_set.y) == 2000


def test_corrupt_download_is_fetched_again(mirror, tmp_path) -> None:
    url, served = mirror
    module = with_md5s(served)
    data_dir = tmp_path / "data"
    module(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    bad = data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="delete it") as excinfo:
        module(data_dir=str(data_dir), mirrors=[url], download=False).prepare_data()
    assert str(bad) in str(excinfo.value)
    module(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    assert md5(bad) == md5(served / bad.name)
    assert raw_listing(data_dir) == sorted(FILES)


def test_offline_without_files_names_the_fix(dead_mirror, tmp_path) -> None:
    data_dir = tmp_path / "nothing"
    with pytest.raises(DataError) as excinfo:
        MNISTDataModule(data_dir=str(data_dir), mirrors=[dead_mirror]).prepare_data()
    message = str(excinfo.value)
    for needle in ("--data.data_dir", "REGFIT_DATA_DIR", "python -m regfit.data --from-test-set",
                   *FILES, str(data_dir), dead_mirror + FILES[0], "failed"):
        assert needle in message
    assert excinfo.value.__context__ is None and excinfo.value.__cause__ is None
    assert raw_listing(data_dir) == []


def test_a_mistyped_data_dir_leaves_no_empty_folders(dead_mirror, tmp_path) -> None:
    data_dir = tmp_path / "typo" / "deeper"
    with pytest.raises(DataError, match="MNIST data not found"):
        MNISTDataModule(data_dir=str(data_dir), mirrors=[dead_mirror]).prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_a_data_dir_that_cannot_hold_the_data_is_named(tmp_path) -> None:
    a_file = tmp_path / "train-images-idx3-ubyte.gz"
    a_file.write_bytes(b"")
    with pytest.raises(DataError, match=rf"data_dir {a_file} is a file; give the folder .* --data.data_dir={tmp_path}"):
        MNISTDataModule(data_dir=str(a_file))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: use a path under a file instead
        locked = a_file / "sub"
    with pytest.raises(DataError, match=r"cannot create .* to download into .*--data.data_dir you can write to"):
        MNISTDataModule(data_dir=str(locked / "data")).prepare_data()


def test_missing_files_without_download(tmp_path) -> None:
    with pytest.raises(DataError, match=r"download=False.*--data\.data_dir"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).prepare_data()
    with pytest.raises(DataError, match=r"prepare_data\(\) has not downloaded"):
        MNISTDataModule(data_dir=str(tmp_path)).setup("fit")  # setup never downloads
