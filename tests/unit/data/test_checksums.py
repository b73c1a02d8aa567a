"""regfit.data.checksums: MD5s of files and ``MD5SUMS`` files; one that cannot be read is named."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from regfit.data import DataError, MNISTDataModule, build_split_from_test_set, main
from regfit.data.checksums import file_md5, read_md5sums
from tests.unit.data.support import FILES, copy_files, loaded


def test_md5sum_output_in_text_and_binary_mode(tmp_path: Path) -> None:
    (tmp_path / "a b.gz").write_bytes(b"spaces in the name")
    digest = hashlib.md5(b"spaces in the name").hexdigest()
    assert file_md5(tmp_path / "a b.gz") == digest
    (tmp_path / "MD5SUMS").write_text(f"{digest}  a b.gz\n\n{'F' * 32} *binary.gz\r\n")
    assert read_md5sums(tmp_path) == {"a b.gz": digest, "binary.gz": "f" * 32}
    assert read_md5sums(tmp_path / "no-such-folder") == {}


NOT_UTF8 = b"\xff\xfe9\x00f\x00b\x00"  # md5sum output saved as UTF-16 (a Windows editor's default)


@pytest.mark.parametrize("content, message", [
    (NOT_UTF8, r"not a text file of MD5 sums \(byte 0 is not UTF-8\)"),
    (b"9fb629c4189551a2d022fa330f9573f3  t10k-images-idx3-ubyte.gz\nMD5 (x.gz) = 0123\n",
     r"line 2 is not md5sum output"),
], ids=["not-utf8", "bsd-format-line"])
def test_an_unreadable_md5sums_beside_your_files_is_named_with_the_fix(content, message, mnist_dir, tmp_path) -> None:
    folder = copy_files(mnist_dir, tmp_path / "data")
    (folder / "MD5SUMS").write_bytes(content)
    with pytest.raises(DataError, match=message) as excinfo:
        loaded(MNISTDataModule(data_dir=str(folder), download=False))
    text = str(excinfo.value)
    assert text.startswith(f"{folder / 'MD5SUMS'}: ")
    assert "md5sum *.gz > MD5SUMS) or delete it" in text
    # Followed: regenerated, the folder loads.
    (folder / "MD5SUMS").write_text("".join(f"{file_md5(folder / n)}  {n}\n" for n in FILES))
    assert len(loaded(MNISTDataModule(data_dir=str(folder), download=False), "test").test_set.y) == 2000


def test_an_unreadable_md5sums_in_the_test_set_folder_is_named(mnist_source, tmp_path, caplog) -> None:
    src = copy_files(mnist_source, tmp_path / "src", ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    (src / "MD5SUMS").write_bytes(NOT_UTF8)
    with pytest.raises(DataError, match="not a text file of MD5 sums"):
        build_split_from_test_set(src, tmp_path / "out")
    assert main(["--from-test-set", str(src), "--out", str(tmp_path / "out")]) == 1
    assert str(src / "MD5SUMS") in caplog.text and not (tmp_path / "out").exists()
