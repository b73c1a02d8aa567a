"""regfit.data.offline: ``python -m regfit.data --from-test-set SRC --out DST``."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import regfit.atomic
from regfit.data import DataError, MNISTDataModule, build_split_from_test_set, main
from regfit.data.offline import OutputError
from tests.unit.data.support import FILES, REPO_ROOT, copy_files, loaded


def run_command(*args: str) -> subprocess.CompletedProcess:
    """``python -m regfit.data ARGS`` with this checkout first on the path."""
    pythonpath = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "regfit.data", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=pythonpath), timeout=120)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder``, made unwritable: mode 0o500, and for root, whom modes do not stop, ``chattr +i``."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o500)
    immutable = False
    try:
        if os.access(folder, os.W_OK):
            chattr = shutil.which("chattr")
            if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode:
                pytest.skip("root without a working `chattr +i`: no way to make a folder read-only here")
            immutable = True
        yield folder
    finally:
        if immutable:
            subprocess.run([shutil.which("chattr"), "-i", str(folder)], check=True)
        folder.chmod(0o700)


def test_build_split_checks_the_source_md5sums(mnist_source: Path, tmp_path: Path) -> None:
    src = copy_files(mnist_source, tmp_path / "src", ("t10k-images-idx3-ubyte.gz",
                                                      "t10k-labels-idx1-ubyte.gz"))
    (src / "MD5SUMS").write_text("0" * 32 + "  t10k-labels-idx1-ubyte.gz\n")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        build_split_from_test_set(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="n_train"):
        build_split_from_test_set(mnist_source, tmp_path / "out", n_train=10_000)
    assert main(["--from-test-set", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1


def test_cli_builds_a_loadable_folder(mnist_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "small"
    pythonpath = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath)
    result = subprocess.run(
        [sys.executable, "-m", "regfit.data", "--from-test-set", str(mnist_source),
         "--out", str(out), "--n-train", "500"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--data.data_dir" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "MD5SUMS"])
    dm = loaded(MNISTDataModule(data_dir=str(out), download=False))
    assert len(dm.train_set.y) + len(dm.val_set.y) == 500 and len(dm.test_set.y) == 9500


def test_a_read_only_out_exits_2_with_one_paragraph_naming_the_path_and_the_fix(mnist_source, tmp_path) -> None:
    with read_only(tmp_path / "locked") as locked:
        result = run_command("--from-test-set", str(mnist_source), "--out", str(locked))
        assert list(locked.iterdir()) == []  # not even a temporary file
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert "Traceback" not in message and "\n" not in message  # one paragraph
    assert message.startswith(f"error: cannot write the MNIST folder to {locked}: {locked}: ")
    assert "nothing was written" in message and "--out" in message and f"chmod u+w {locked}" in message


@pytest.mark.parametrize("where", ["read-only folder", "new folder in a read-only one", "a file", "below a file"])
def test_an_unusable_out_leaves_nothing_behind(where, mnist_source, tmp_path, caplog) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with read_only(tmp_path / "locked") as locked:
        out = {"read-only folder": locked, "new folder in a read-only one": locked / "new" / "deeper",
               "a file": a_file, "below a file": a_file / "sub"}[where]
        assert main(["--from-test-set", str(mnist_source), "--out", str(out)]) == 2
        assert list(locked.iterdir()) == []
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["locked", "notes.txt"]
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert str(out) in record.getMessage() and "--out" in record.getMessage()
    if "file" in where:
        assert f"{a_file} is a file" in record.getMessage()


def test_a_write_failing_midway_leaves_no_half_written_folder(mnist_source, tmp_path, monkeypatch) -> None:
    """The third of the five files fails (a full disk): none of them is written, the new folder
    is removed, and an existing folder keeps its previous files byte for byte."""
    real_open, opened = open, []

    def disk_full_on_third_file(path, mode="r", *args, **kwargs):
        if "x" in mode:
            opened.append(path)
            if len(opened) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    previous = build_split_from_test_set(mnist_source, tmp_path / "previous", n_train=500)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    monkeypatch.setattr(regfit.atomic, "open", disk_full_on_third_file, raising=False)
    with pytest.raises(OutputError, match="No space left on device; nothing was written"):
        build_split_from_test_set(mnist_source, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()
    opened.clear()
    with pytest.raises(OutputError):
        build_split_from_test_set(mnist_source, previous, n_train=8000)
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
