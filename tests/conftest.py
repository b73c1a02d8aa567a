"""Shared fixtures: the official MNIST test-set files and a small MNIST folder built from them.

CI checks the repository out at ``X`` and the shared data at ``X/../shared``; the 10,000 real
test digits there stand in for the full dataset, so no test touches the network.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_SOURCE = REPO_ROOT.parent / "shared" / "data" / "mnist"
MNIST_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="session")
def mnist_source() -> Path:
    """The folder with the official MNIST test-set files (and their ``MD5SUMS``)."""
    missing = [name for name in MNIST_TEST_FILES if not (MNIST_SOURCE / name).is_file()]
    if missing:
        # Not a skip: CI always has these files, so their absence is a broken checkout.
        pytest.fail(
            f"official MNIST test-set files missing from {MNIST_SOURCE}: {', '.join(missing)} "
            "(expected beside the repository, in ../shared/data/mnist)",
            pytrace=False,
        )
    return MNIST_SOURCE


@pytest.fixture(scope="session")
def mnist_dir(mnist_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MNIST-format folder: 8,000 train (first test digits) / 2,000 test, gzip'd IDX files.

    Use it as ``MNISTDataModule(data_dir=str(mnist_dir))`` or ``--data.data_dir <mnist_dir>``;
    treat it as read-only, it is shared by the whole session.
    """
    from regfit.data import build_split_from_test_set  # lazy: only tests that need data pay

    return build_split_from_test_set(mnist_source, tmp_path_factory.mktemp("mnist"), n_train=8000)
