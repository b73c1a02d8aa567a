"""regfit.data.offline: ``python -m regfit.data --from-test-set SRC --out DST``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from regfit.data import DataError, MNISTDataModule, build_split_from_test_set, main
from tests.unit.data.support import FILES, REPO_ROOT, copy_files, loaded


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
