"""MNIST-format data modules (MNIST, Fashion-MNIST) as in-memory tensors, without torchvision.

The whole dataset lives in memory as two tensors (normalized float32 images ``(N, 1, 28, 28)``
and int64 labels); batches are cut from them by :class:`~regfit.data.batches.TensorBatches`.
Where the files are looked for, the MD5 policy and downloads are :mod:`regfit.data.files`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, NamedTuple

import lightning as L
import numpy as np
import torch

from regfit.data.batches import TensorBatches, split_indices
from regfit.data.errors import DataError
from regfit.data.files import DEFAULT_DATA_DIR, ENV_DATA_DIR, DatasetFiles
from regfit.data.idx import IMAGE_SIZE, IMAGES_MAGIC, LABELS_MAGIC, NUM_CLASSES, read_idx
from regfit.hyperparams import check_int, is_number

__all__ = [
    "FILE_STEMS",
    "TEST_IMAGES",
    "TEST_LABELS",
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "TensorPair",
]

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_STEMS = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


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
    #: Further tries of a mirror after a transient failure (cut-off transfer, HTTP 5xx).
    download_retries: ClassVar[int] = 2

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
            retries=self.download_retries,
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
