"""``python -m regfit.data --from-test-set SRC --out DST``: an MNIST folder built offline.

The official MNIST test set (10,000 digits, two files) is split into an MNIST-format folder
-- the four standard file names, gzip'd IDX, an ``MD5SUMS`` -- that
:class:`~regfit.data.MNISTDataModule` loads without a network::

    python -m regfit.data --from-test-set ../shared/data/mnist --out data/mnist-small
    regfit fit --config configs/mnist_l2.yaml --data.data_dir data/mnist-small
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from regfit.atomic import atomic_write_all
from regfit.data.checksums import MD5SUMS, file_md5, read_md5sums
from regfit.data.errors import DataError
from regfit.data.files import find_file
from regfit.data.idx import encode_idx, read_idx
from regfit.data.mnist import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS

__all__ = ["OutputError", "build_split_from_test_set", "main"]

log = logging.getLogger(__name__)


class OutputError(DataError):
    """The output folder cannot be written; the message names the path and the fix.

    ``python -m regfit.data`` exits 2 on it, as on a bad argument: the command line names a
    destination that cannot be used, and no file was written.
    """


def build_split_from_test_set(
    src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str], n_train: int = 8000
) -> Path:
    """Write an MNIST-format folder from the official test set alone (for offline use).

    The first ``n_train`` test digits become ``train-*``, the rest ``t10k-*`` (gzip'd IDX files
    with the four standard names), plus an ``MD5SUMS`` for them, so that
    ``MNISTDataModule(data_dir=dst_dir)`` loads it without a network.

    The five files are written together (:func:`~regfit.data.atomic.atomic_write_all`): when
    one cannot be written, none is, and a folder created for them is removed again.

    Args:
        src_dir: Folder with ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``;
            checked against its ``MD5SUMS`` file when there is one.
        dst_dir: Output folder (created; existing files replaced atomically).
        n_train: Digits in the new training set, ``0 < n_train < N``.

    Returns:
        ``dst_dir`` as a ``Path``.

    Raises:
        DataError: A source file is missing, corrupt or fails its MD5.
        OutputError: ``dst_dir`` is a file or cannot be created or written.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    images, labels = _read_test_set(src)
    if not 0 < n_train < len(labels):
        raise ValueError(f"n_train must be in (0, {len(labels)}), got {n_train}")
    parts = {
        TRAIN_IMAGES: images[:n_train],
        TRAIN_LABELS: labels[:n_train],
        TEST_IMAGES: images[n_train:],
        TEST_LABELS: labels[n_train:],
    }
    contents = {f"{stem}.gz": encode_idx(array, compress=True) for stem, array in parts.items()}
    contents[MD5SUMS] = "".join(f"{hashlib.md5(data).hexdigest()}  {name}\n" for name, data in contents.items()).encode()
    _write_folder(dst, contents)
    return dst


def _read_test_set(src: Path) -> tuple[np.ndarray, np.ndarray]:
    """The official test images and labels in ``src``, checked against its ``MD5SUMS`` if any."""
    sums = read_md5sums(src)
    arrays = []
    for stem in (TEST_IMAGES, TEST_LABELS):
        path = find_file(src, stem)
        if path is None:
            raise DataError(f"{src}: no {stem}.gz (or {stem}); pass the official test-set folder")
        if path.name in sums and (got := file_md5(path)) != sums[path.name]:
            raise DataError(f"{path}: MD5 {got} differs from {src / MD5SUMS} ({sums[path.name]})")
        arrays.append(read_idx(path))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{src}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _write_folder(dst: Path, contents: Mapping[str, bytes]) -> None:
    """Create ``dst`` if needed and write all ``contents`` into it, or nothing at all."""
    blocker = next((p for p in (*reversed(dst.parents), dst) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"cannot write the MNIST folder to {dst}: {blocker} is a file. Give --out a folder "
                          f"(created if missing), e.g. --out {blocker.parent / 'mnist'}.")
    created = [p for p in (dst, *dst.parents) if not p.exists()]  # innermost first
    try:
        refusing = dst.parent  # the folder that must let us create dst, then dst itself
        dst.mkdir(parents=True, exist_ok=True)
        refusing = dst
        atomic_write_all({dst / name: data for name, data in contents.items()})
    except OSError as exc:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if refusing != dst and exc.filename:  # mkdir names the folder it could not create
            refusing = Path(exc.filename).parent
        fix = "Give --out a folder you can write to (created if missing)"
        if exc.errno in (errno.EACCES, errno.EPERM):
            fix += f", or make {refusing} writable (chmod u+w {refusing})"
        raise OutputError(
            f"cannot write the MNIST folder to {dst}: {refusing}: {exc.strerror or exc}; nothing was written. {fix}."
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m regfit.data --from-test-set SRC --out DST [--n-train N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m regfit.data",
        description="Build an MNIST-format data folder offline from the official test-set files.",
    )
    parser.add_argument("--from-test-set", required=True, metavar="SRC", type=Path,
                        help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    parser.add_argument("--out", required=True, metavar="DST", type=Path, help="output folder")
    parser.add_argument("--n-train", type=int, default=8000, metavar="N",
                        help="test digits that become the training set (default 8000)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dst = build_split_from_test_set(args.from_test_set, args.out, args.n_train)
    except OutputError as exc:
        log.error("error: %s", exc)
        return 2
    except (DataError, ValueError) as exc:
        log.error("error: %s", exc)
        return 1
    log.info("Wrote %s (%d train / rest test). Use it with: --data.data_dir %s",
             dst, args.n_train, dst)
    return 0
