"""regfit.data.download: from local mirrors (an ``http.server`` on 127.0.0.1), verified, atomic."""

from __future__ import annotations

import pytest

from regfit.data import DataError
from tests.unit.data.support import FILES, loaded, md5, raw_listing, with_md5s


def test_download_verifies_and_leaves_only_the_files(mirror, dead_mirror, tmp_path) -> None:
    url, served = mirror
    module = with_md5s(served)
    data_dir = tmp_path / "data"
    module(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    assert raw_listing(data_dir) == sorted(FILES)  # no temporary files left behind
    for name in FILES:
        assert md5(data_dir / "MNIST" / "raw" / name) == md5(served / name)
    # Present and valid: no network needed any more.
    dm = loaded(module(data_dir=str(data_dir), mirrors=[dead_mirror]))
    assert len(dm.train_set.y) + len(dm.val_set.y) == 8000 and len(dm.test_set.y) == 2000


def test_bad_md5_from_mirror_is_rejected_without_partial_file(mirror, tmp_path) -> None:
    url, served = mirror
    module = with_md5s(served, train_labels_idx1_ubyte="0" * 32)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="MD5 mismatch") as excinfo:
        module(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    assert "train-labels-idx1-ubyte.gz" in str(excinfo.value)
    assert raw_listing(data_dir) == ["train-images-idx3-ubyte.gz"]  # downloaded before it


def test_first_mirror_failing_falls_back_to_the_next(mirror, dead_mirror, tmp_path) -> None:
    url, served = mirror
    data_dir = tmp_path / "data"
    with_md5s(served)(data_dir=str(data_dir), mirrors=[dead_mirror, url]).prepare_data()
    assert raw_listing(data_dir) == sorted(FILES)
