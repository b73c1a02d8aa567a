"""MNIST-format data modules without torchvision.

The whole dataset lives in memory as two tensors (normalized float32 images ``(N, 1, 28, 28)``
and int64 labels); batches are cut from them by slicing or ``index_select``, never by a
per-sample ``__getitem__`` and a collate function.

File layout
-----------
``data_dir`` (argument, else ``$REGFIT_DATA_DIR``, else ``./data``) is searched in this order,
and the first folder holding all four files wins:

1. ``data_dir`` itself -- a folder you filled: the four ``*-ubyte.gz`` files (or their
   uncompressed versions), e.g. one written by ``python -m regfit.data --from-test-set``;
2. ``data_dir/<folder>/raw`` (``folder`` is ``MNIST`` or ``FashionMNIST``) -- where downloads
   go. It is the layout torchvision uses, so an existing torchvision download is reused.

MD5 policy (``verify_md5=None``, the default): a MD5 guards a download, so files in the
download folder are checked against the official MD5s (a corrupt one is downloaded again);
files you put in ``data_dir`` yourself are checked against an ``MD5SUMS`` file beside them
when there is one, and otherwise only their IDX structure is validated. ``verify_md5=True``
requires the official files everywhere; ``verify_md5=False`` checks no MD5 at all.

Offline use::

    python -m regfit.data --from-test-set ../shared/data/mnist --out data/mnist-small
    regfit fit --config configs/mnist_l2.yaml --data.data_dir data/mnist-small
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import http.client
import logging
import math
import os
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import lightning as L
import numpy as np
import torch

from regfit.hyperparams import check_int, is_number

log = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "DatasetFiles",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "ShardedOrder",
    "TensorBatches",
    "TensorPair",
    "build_split_from_test_set",
    "main",
    "parse_idx",
    "read_idx",
    "split_indices",
    "write_idx",
]

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_STEMS = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# IDX magic = 0x0000 | type code (0x08: unsigned byte) | number of dimensions.
IMAGES_MAGIC = 0x0803  # 2051
LABELS_MAGIC = 0x0801  # 2049
IMAGE_SIZE = 28
NUM_CLASSES = 10

ENV_DATA_DIR = "REGFIT_DATA_DIR"
DEFAULT_DATA_DIR = "./data"
MD5SUMS = "MD5SUMS"

_FIX_HINT = (
    "To fix it, either pass `--data.data_dir DIR` (data_dir=DIR in Python) pointing at a folder "
    f"with the four files, or set {ENV_DATA_DIR}=DIR, or build a small split offline from the "
    "official test-set files: `python -m regfit.data --from-test-set SRC --out DIR`, "
    "then use `--data.data_dir DIR`."
)


class DataError(RuntimeError):
    """Data files are missing, corrupt or could not be downloaded; the message names the fix."""


# --------------------------------------------------------------------------------------------
# IDX files: pure functions over bytes and paths
# --------------------------------------------------------------------------------------------


def _magic_for(stem: str) -> int:
    return IMAGES_MAGIC if "-images-" in stem else LABELS_MAGIC


def parse_idx(data: bytes, source: str | os.PathLike[str] = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX (unsigned byte) buffer.

    Layout: 2 zero bytes, type code ``0x08``, ``ndim``; ``ndim`` big-endian uint32 sizes; the
    data, row-major. The buffer length must match the header exactly.

    Args:
        data: The raw (already decompressed) file content.
        source: Name used in error messages.

    Returns:
        A read-only ``uint8`` array viewing ``data``, of the shape the header declares.

    Raises:
        DataError: The header is not an unsigned-byte IDX header or the length does not match.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        raise DataError(f"{source}: not an unsigned-byte IDX file (magic number {magic})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"{source}: {what}: header {dims} needs {expected} bytes, file has {len(data)}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    """File content, gunzipped when it starts with the gzip magic (whatever its suffix)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # bad CRC, truncated stream
        raise DataError(f"{path}: corrupt gzip stream ({exc})") from None


def read_idx(path: str | os.PathLike[str], magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip'd or not) and check its magic number and shape.

    Args:
        path: The file.
        magic: Expected magic number: 2051 (images, must be ``(N, 28, 28)``) or 2049 (labels,
            ``(N,)`` in 0..9). ``None`` infers it from an MNIST file name (``idx3`` / ``idx1``).

    Returns:
        The ``uint8`` array.

    Raises:
        DataError: Naming the file, when it is corrupt, truncated or of the wrong kind.
    """
    path = Path(path)
    if magic is None:
        magic = _magic_for(path.name)
    try:
        data = _read_bytes(path)
        array = parse_idx(data, path)
        found = int.from_bytes(data[:4], "big")
        if found != magic:
            raise DataError(f"{path}: magic number {found}, expected {magic}")
        if magic == IMAGES_MAGIC and array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{path}: images of shape {array.shape[1:]}, expected (28, 28)")
        if magic == LABELS_MAGIC and array.size and int(array.max()) >= NUM_CLASSES:
            raise DataError(f"{path}: label {int(array.max())} outside 0..{NUM_CLASSES - 1}")
    except DataError as exc:
        raise DataError(
            f"{exc} -- delete {path} to download it again (download=True), or replace it"
        ) from None
    return array


def _temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path``: same filesystem, so ``os.replace`` is atomic."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    tmp = _temp_path(path)
    try:
        with open(tmp, "xb") as f:  # unlike mkstemp's 0600, respects the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> str:
    """Write a ``uint8`` array as an IDX file, gzip'd when the name ends in ``.gz``.

    The gzip header carries no timestamp, so equal arrays give equal bytes (and MD5s).

    Args:
        path: Destination; written atomically.
        array: Unsigned-byte data, 1 to 255 dimensions.

    Returns:
        The MD5 of the written file.
    """
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)  # 9 is 15x slower for 2% less
    _atomic_write(path, data)
    return hashlib.md5(data).hexdigest()


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_md5sums(folder: Path) -> dict[str, str]:
    """``{file name: md5}`` from ``folder/MD5SUMS`` (``md5sum`` output format); empty if absent."""
    sums = folder / MD5SUMS
    if not sums.is_file():
        return {}
    table = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            table[parts[1].lstrip("*")] = parts[0].lower()
    return table


def _find(folder: Path, stem: str) -> Path | None:
    """``stem.gz`` (preferred: it is what MD5s are published for) or ``stem`` in ``folder``."""
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def _fetch(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    """Stream ``url`` into ``dest`` atomically; ``md5`` mismatch leaves nothing behind."""
    request = urllib.request.Request(url, headers={"User-Agent": "regfit"})
    tmp = _temp_path(dest)
    try:
        digest = hashlib.md5()
        with open(tmp, "xb") as f, urllib.request.urlopen(request, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(f"MD5 mismatch (got {digest.hexdigest()}, expected {md5})")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _reason(exc: BaseException) -> str:
    """One line for a failed download, without the socket traceback."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _download(
    name: str, dest: Path, mirrors: Sequence[str], md5: str | None, timeout: float
) -> list[str] | None:
    """Try each mirror in order; return ``None`` on success, else the reasons they failed."""
    reasons = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        log.info("Downloading %s", url)
        try:
            _fetch(url, dest, md5, timeout)
            return None
        # URLError, HTTPError and timeouts are OSErrors; a cut connection is an HTTPException.
        except (OSError, http.client.HTTPException, ValueError, DataError) as exc:
            reasons.append(f"{url}: {_reason(exc)}")
    return reasons or ["no mirrors configured"]


# --------------------------------------------------------------------------------------------
# Finding, checking and downloading the files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetFiles:
    """Where the four files of one MNIST-format dataset are, how to check them, how to get them.

    Args:
        data_dir: Searched first, for a folder of files you provide.
        name: Dataset name; downloads go to ``data_dir/<name>/raw``.
        md5s: Official MD5 of each downloadable (``.gz``) file.
        mirrors: Base URLs tried in order for each file.
        verify_md5: MD5 policy, see the module docstring.
        timeout: Seconds before a silent download connection is given up.
    """

    data_dir: Path
    name: str
    md5s: Mapping[str, str]
    mirrors: tuple[str, ...]
    verify_md5: bool | None = None
    timeout: float = 30.0

    @property
    def download_dir(self) -> Path:
        """Where downloads go: ``data_dir/<name>/raw`` (torchvision's layout)."""
        return self.data_dir / self.name / "raw"

    @property
    def search_dirs(self) -> tuple[Path, ...]:
        """Folders searched, in order: your folder first, then the download folder."""
        return tuple(dict.fromkeys((self.data_dir, self.download_dir)))

    def locate(self, download: bool, offline_reason: str = "download=False") -> dict[str, Path]:
        """Paths of the four files, by stem; download the missing or corrupt ones if asked.

        Args:
            download: Download into :attr:`download_dir` when no folder is complete and valid.
            offline_reason: Why not downloading, for the error message.

        Raises:
            DataError: Files are missing and not downloaded, or corrupt and not replaceable.
        """
        for folder in self.search_dirs:
            found = {stem: _find(folder, stem) for stem in FILE_STEMS}
            if not all(found.values()):
                continue
            files = {stem: path for stem, path in found.items() if path is not None}
            expected = self._expected_md5s(folder)
            problems = [p for path in files.values() if (p := self._md5_problem(path, expected))]
            if not problems:
                return files
            if not (download and folder == self.download_dir):
                fix = (
                    "delete it to download it again (download=True)"
                    if folder == self.download_dir
                    else f"replace it, fix {folder / MD5SUMS}, or set verify_md5=False"
                )
                raise DataError(f"{self.name}: bad file: {'; '.join(problems)}; {fix}")
            break  # corrupt download: fetch it again below
        if not download:
            raise self._not_found(offline_reason)
        return self._download_all()

    def _expected_md5s(self, folder: Path) -> Mapping[str, str]:
        """``{file name: md5}`` the files in ``folder`` must match under the MD5 policy."""
        if self.verify_md5 is False:
            return {}
        if self.verify_md5 or folder == self.download_dir:
            return self.md5s
        return _read_md5sums(folder)

    def _md5_problem(self, path: Path, expected: Mapping[str, str]) -> str | None:
        if self.verify_md5 and path.name not in expected:
            return (
                f"{path}: an uncompressed file cannot be checked against the official MD5 "
                "(published for the .gz); provide the .gz or set verify_md5=False"
            )
        want = expected.get(path.name)
        if want is not None and (got := _md5(path)) != want:
            return f"{path}: MD5 {got}, expected {want}"
        return None

    def _download_all(self) -> dict[str, Path]:
        folder = self.download_dir
        created = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(
                f"cannot create {folder} to download into ({exc.strerror or exc}): give a --data.data_dir you can "
                "write to, or one that already holds the dataset files"
            ) from None
        try:
            expected = self._expected_md5s(folder)
            for stem in FILE_STEMS:
                name = f"{stem}.gz"
                path = _find(folder, stem)
                if path is not None and self._md5_problem(path, expected) is None:
                    continue
                if path is not None:
                    log.warning("%s fails its MD5 check; downloading it again", path)
                reasons = _download(name, folder / name, self.mirrors, expected.get(name), self.timeout)
                if reasons is not None:
                    raise self._not_found(f"downloading {name} failed: " + "; ".join(reasons))
        except DataError:
            for p in created:  # a mistyped data_dir leaves no empty folders behind
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise
        return {stem: _find(folder, stem) or folder / f"{stem}.gz" for stem in FILE_STEMS}

    def _not_found(self, reason: str) -> DataError:
        missing = [
            f"{stem}.gz"
            for stem in FILE_STEMS
            if not any(_find(folder, stem) for folder in self.search_dirs)
        ]
        what = ", ".join(missing) if missing else "a complete set of valid files"
        looked = " and ".join(str(folder) for folder in self.search_dirs)
        return DataError(
            f"{self.name} data not found: {what} (looked in {looked}); {reason}. {_FIX_HINT}"
        )


# --------------------------------------------------------------------------------------------
# Splitting and batching
# --------------------------------------------------------------------------------------------


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint train/validation indices of ``range(n)``, fixed by ``seed``.

    Args:
        n: Number of samples.
        val_size: Number of validation samples, ``0 <= val_size < n``.
        seed: Seed of the ``torch.Generator`` drawing the permutation.

    Returns:
        ``(train, val)`` sorted int64 index tensors that together cover ``range(n)`` once.
    """
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


class ShardedOrder:
    """The order in which one rank visits ``n`` samples in an epoch.

    Shuffled orders are a permutation drawn from ``(seed, epoch)`` alone, so every rank draws
    the same one and resuming at an epoch reproduces it. Under ``world_size > 1`` the order is
    padded by wrapping around to a multiple of ``world_size`` (like ``DistributedSampler``, so
    every rank runs the same number of batches) and rank ``r`` takes positions ``r::world_size``.

    Lightning calls ``set_epoch`` on a loader's ``sampler`` before each epoch; without a
    Trainer, each ``epoch_indices()`` call moves on to the next epoch.

    Args:
        n: Number of samples.
        shuffle: Draw a new permutation each epoch; else visit in order.
        seed: Base seed of the per-epoch permutations.
        rank: This process's rank.
        world_size: Number of processes sharing the data.
    """

    def __init__(
        self, n: int, shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``epoch_indices()`` return the order of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) if self.n else 0

    def epoch_indices(self) -> torch.Tensor | None:
        """This rank's indices for the current epoch, then advance the epoch.

        Returns:
            An int64 tensor, or ``None`` for the identity order (read by slicing, no copy).
        """
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.shuffle and self.world_size == 1:
            return None
        if self.shuffle:
            # SeedSequence mixes (seed, epoch) so that seed s, epoch e+1 != seed s+1, epoch e.
            entropy = [self.seed % 2**64, epoch]
            g = torch.Generator().manual_seed(
                int(np.random.SeedSequence(entropy).generate_state(1)[0])
            )
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        padded = len(self) * self.world_size
        if padded > self.n:
            order = torch.cat([order, order[: padded - self.n]])
        return order[self.rank :: self.world_size]


class TensorBatches:
    """Batches ``(x[i], y[i])`` cut from in-memory tensors by slicing or ``index_select``.

    An iterable with ``__len__``, which Lightning accepts as a dataloader. It is not a
    ``torch.utils.data.DataLoader``, so Lightning neither injects a ``DistributedSampler`` nor
    re-instantiates it: sharding is done here, from ``rank`` and ``world_size``.

    Args:
        x: Inputs, first dimension = samples.
        y: Targets, same first dimension.
        batch_size: Samples per batch.
        shuffle: New random order each epoch (training); else sequential.
        seed: Base seed of the shuffling.
        drop_last: Drop the last batch when it is smaller than ``batch_size``.
        rank: This process's rank.
        world_size: Number of processes; each rank gets a disjoint shard.

    Example:
        >>> batches = TensorBatches(torch.arange(10.0), torch.arange(10), batch_size=4)
        >>> len(batches), [len(y) for _, y in batches]
        (3, [4, 4, 2])
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.drop_last = drop_last
        # Named `sampler` because Lightning calls `dataloader.sampler.set_epoch(epoch)` before
        # every epoch; this keeps the shuffle right across reloaded loaders and resumed runs.
        self.sampler = ShardedOrder(len(x), shuffle, seed, rank, world_size)
        # Lightning reads `batch_sampler` whenever `sampler` exists (to detect shuffling).
        self.batch_sampler = None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.sampler.epoch_indices()
        stop = len(self) * self.batch_size
        for start in range(0, stop, self.batch_size):
            end = start + self.batch_size
            if indices is None:
                yield self.x[start:end], self.y[start:end]
            else:
                batch = indices[start:end]
                yield self.x.index_select(0, batch), self.y.index_select(0, batch)


# --------------------------------------------------------------------------------------------
# Data modules
# --------------------------------------------------------------------------------------------


class TensorPair(NamedTuple):
    """Images ``x`` (float32, ``(N, 1, 28, 28)``, normalized) and labels ``y`` (int64)."""

    x: torch.Tensor
    y: torch.Tensor


class MNISTDataModule(L.LightningDataModule):
    """MNIST as in-memory tensors: fixed-seed train/val split of the training set, official test.

    Files are looked up in ``data_dir`` and then in ``data_dir/MNIST/raw`` (where downloads go);
    see the module docstring for the layout and the MD5 policy. ``prepare_data`` downloads
    what is missing (rank 0 only, as Lightning calls it); ``setup`` loads the tensors.

    Subclasses for other MNIST-format datasets set the class attributes only.

    Args:
        data_dir: Data folder. Default ``$REGFIT_DATA_DIR``, else ``./data``.
        batch_size: Samples per batch, for every stage.
        val_fraction: Fraction of the official training set held out for validation,
            ``0 <= val_fraction < 1`` (1/6 gives the usual 50,000 / 10,000). 0: no validation.
        seed: Seed of the train/val split and of the per-epoch shuffling.
        mirrors: Base URLs tried in order for each file. Default: the class's ``mirrors``.
        download: Download missing or corrupt files in ``prepare_data``.
        verify_md5: ``None``: official MD5s for the download folder, ``MD5SUMS`` (if present)
            for your own folder. ``True``: official MD5s everywhere. ``False``: no MD5 check.
        drop_last: Drop the last, incomplete training batch.

    Example:
        >>> dm = MNISTDataModule(data_dir="data", batch_size=256)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> x, y = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    """

    folder: ClassVar[str] = "MNIST"
    #: Official MD5 of each downloadable file.
    md5s: ClassVar[Mapping[str, str]] = {
        f"{TRAIN_IMAGES}.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        f"{TRAIN_LABELS}.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        f"{TEST_IMAGES}.gz": "9fb629c4189551a2d022fa330f9573f3",
        f"{TEST_LABELS}.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    mirrors: ClassVar[tuple[str, ...]] = (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    )
    mean: ClassVar[float] = 0.1307
    std: ClassVar[float] = 0.3081
    num_classes: ClassVar[int] = NUM_CLASSES
    image_shape: ClassVar[tuple[int, int, int]] = (1, IMAGE_SIZE, IMAGE_SIZE)
    download_timeout: ClassVar[float] = 30.0

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        val_fraction: float = 1 / 6,
        seed: int = 0,
        mirrors: Sequence[str] | None = None,
        download: bool = True,
        verify_md5: bool | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        call = type(self).__name__
        batch_size, seed = check_int(call, "batch_size", batch_size, 1), check_int(call, "seed", seed, 0)
        if not (is_number(val_fraction) and 0.0 <= val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if isinstance(mirrors, (str, bytes)):
            raise ValueError(f"mirrors={mirrors!r} must be a list of URLs, e.g. mirrors=[{mirrors!r}]")
        root = Path(data_dir or os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR).expanduser().absolute()
        if root.exists() and not root.is_dir():
            raise DataError(f"data_dir {root} is a file; give the folder that holds (or will hold) the dataset, "
                            f"e.g. --data.data_dir={root.parent}")
        self.save_hyperparameters()
        self.files = DatasetFiles(
            data_dir=root,
            name=self.folder,
            md5s=self.md5s,
            mirrors=tuple(self.mirrors if mirrors is None else mirrors),
            verify_md5=verify_md5,
            timeout=self.download_timeout,
        )
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.download = download
        self.drop_last = drop_last
        self.train_set: TensorPair | None = None
        self.val_set: TensorPair | None = None
        self.test_set: TensorPair | None = None

    # -- Lightning hooks -----------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Find the files, downloading missing or corrupt ones when ``download`` is set."""
        self.files.locate(download=self.download)

    def setup(self, stage: str | None = None) -> None:
        """Load the tensors a stage needs (once).

        Args:
            stage: ``"fit"`` / ``"validate"`` load the split training set, ``"test"`` /
                ``"predict"`` the test set, ``None`` both.
        """
        files = None
        if stage in (None, "fit", "validate") and self.train_set is None:
            files = self._locate_loaded()
            images, labels = self._load(files[TRAIN_IMAGES], files[TRAIN_LABELS])
            val_size = round(len(labels) * self.val_fraction)
            train, val = split_indices(len(labels), val_size, self.seed)
            self.train_set = self._to_tensors(images[train.numpy()], labels[train.numpy()])
            self.val_set = self._to_tensors(images[val.numpy()], labels[val.numpy()])
        if stage in (None, "test", "predict") and self.test_set is None:
            files = files or self._locate_loaded()
            self.test_set = self._to_tensors(*self._load(files[TEST_IMAGES], files[TEST_LABELS]))

    def _locate_loaded(self) -> dict[str, Path]:
        """The files ``prepare_data`` made sure of (``setup`` itself never downloads)."""
        reason = (
            "prepare_data() has not downloaded them (the Trainer calls it before setup(); "
            "call it yourself when using the data module without a Trainer)"
            if self.download
            else "downloading is disabled (download=False)"
        )
        return self.files.locate(download=False, offline_reason=reason)

    @staticmethod
    def _load(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(images_path, IMAGES_MAGIC)
        labels = read_idx(labels_path, LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(
                f"{images_path} holds {len(images)} images but {labels_path} holds "
                f"{len(labels)} labels; replace the mismatched file"
            )
        return images, labels

    def _to_tensors(self, images: np.ndarray, labels: np.ndarray) -> TensorPair:
        """uint8 ``(N, 28, 28)`` -> normalized float32 ``(N, 1, 28, 28)``; labels -> int64."""
        # Parsed arrays view read-only bytes; torch wants writable memory (copy those only).
        images = images if images.flags.writeable else images.copy()
        x = torch.from_numpy(images).unsqueeze(1).float()
        x.div_(255.0).sub_(self.mean).div_(self.std)
        return TensorPair(x, torch.from_numpy(labels.astype(np.int64)))

    def _batches(self, data: TensorPair | None, name: str, train: bool = False) -> TensorBatches:
        if data is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not loaded the {name} set")
        # Under DDP each rank takes its own shard; Lightning only does this for DataLoaders.
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return TensorBatches(
            data.x,
            data.y,
            self.batch_size,
            shuffle=train,
            seed=self.seed,
            drop_last=self.drop_last and train,
            rank=rank,
            world_size=world,
        )

    def train_dataloader(self) -> TensorBatches:
        """Shuffled training batches (a new order each epoch)."""
        return self._batches(self.train_set, "training", train=True)

    def val_dataloader(self) -> TensorBatches | list:
        """Sequential validation batches; ``[]`` (no validation) when ``val_fraction == 0``."""
        if self.val_set is not None and len(self.val_set.y) == 0:
            return []
        return self._batches(self.val_set, "validation")

    def test_dataloader(self) -> TensorBatches:
        """Sequential batches of the official test set."""
        return self._batches(self.test_set, "test")

    def predict_dataloader(self) -> TensorBatches:
        """Sequential ``(x, y)`` batches of the official test set."""
        return self._batches(self.test_set, "test")


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017): same format and machinery, its own files and statistics.

    Args: as :class:`MNISTDataModule`; downloads go to ``data_dir/FashionMNIST/raw``.
    """

    folder: ClassVar[str] = "FashionMNIST"
    md5s: ClassVar[Mapping[str, str]] = {
        f"{TRAIN_IMAGES}.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        f"{TRAIN_LABELS}.gz": "25c81989df183df01b3e8a0aad5dffbe",
        f"{TEST_IMAGES}.gz": "bef4ecab320f06d8554ea6380940ec79",
        f"{TEST_LABELS}.gz": "bb300cfdad3c16e7a12e480ee83fdc2e",
    }
    mirrors: ClassVar[tuple[str, ...]] = (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    )
    mean: ClassVar[float] = 0.2860
    std: ClassVar[float] = 0.3530


# --------------------------------------------------------------------------------------------
# Offline split from the official test set
# --------------------------------------------------------------------------------------------


def build_split_from_test_set(
    src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str], n_train: int = 8000
) -> Path:
    """Write an MNIST-format folder from the official test set alone (for offline use).

    The first ``n_train`` test digits become ``train-*``, the rest ``t10k-*`` (gzip'd IDX files
    with the four standard names), plus an ``MD5SUMS`` for them, so that
    ``MNISTDataModule(data_dir=dst_dir)`` loads it without a network.

    Args:
        src_dir: Folder with ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``;
            checked against its ``MD5SUMS`` file when there is one.
        dst_dir: Output folder (created; existing files replaced atomically).
        n_train: Digits in the new training set, ``0 < n_train < N``.

    Returns:
        ``dst_dir`` as a ``Path``.

    Raises:
        DataError: A source file is missing, corrupt or fails its MD5.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    sums = _read_md5sums(src)
    arrays = []
    for stem in (TEST_IMAGES, TEST_LABELS):
        path = _find(src, stem)
        if path is None:
            raise DataError(f"{src}: no {stem}.gz (or {stem}); pass the official test-set folder")
        if path.name in sums and (got := _md5(path)) != sums[path.name]:
            raise DataError(f"{path}: MD5 {got} differs from {src / MD5SUMS} ({sums[path.name]})")
        arrays.append(read_idx(path))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{src}: {len(images)} images but {len(labels)} labels")
    if not 0 < n_train < len(labels):
        raise ValueError(f"n_train must be in (0, {len(labels)}), got {n_train}")
    dst.mkdir(parents=True, exist_ok=True)
    parts = {
        TRAIN_IMAGES: images[:n_train],
        TRAIN_LABELS: labels[:n_train],
        TEST_IMAGES: images[n_train:],
        TEST_LABELS: labels[n_train:],
    }
    md5s = {f"{stem}.gz": write_idx(dst / f"{stem}.gz", a) for stem, a in parts.items()}
    _atomic_write(dst / MD5SUMS, "".join(f"{m}  {n}\n" for n, m in md5s.items()).encode())
    return dst


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
    except (DataError, ValueError) as exc:
        log.error("error: %s", exc)
        return 1
    log.info("Wrote %s (%d train / rest test). Use it with: --data.data_dir %s",
             dst, args.n_train, dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
