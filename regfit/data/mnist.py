"""MNIST-format datasets (MNIST, Fashion-MNIST): four gzip'd IDX files, downloaded or your own.

Each is a :class:`~regfit.data.datamodule.TensorDataModule` that declares 1×28×28 images in
10 classes and reads them with :func:`~regfit.data.idx.read_idx`; where the files are looked
for, the MD5 policy and downloads are :class:`~regfit.data.files.DatasetFiles`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from regfit.data.datamodule import LabelledImages, Part, TensorDataModule
from regfit.data.files import DatasetFiles
from regfit.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx

__all__ = [
    "FILE_STEMS",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "TEST_IMAGES",
    "TEST_LABELS",
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
    "FashionMNISTDataModule",
    "MNISTDataModule",
]

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILE_STEMS = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
_PARTS = {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}

# What MNIST and Fashion-MNIST declare (MNISTDataModule.image_shape, .num_classes); a subclass
# for other MNIST-format files declares its own.
IMAGE_SIZE = 28
NUM_CLASSES = 10


class MNISTDataModule(TensorDataModule):
    """MNIST as in-memory tensors: fixed-seed train/val split of the training set, official test.

    Files are looked up in ``data_dir`` and then in ``data_dir/MNIST/raw`` (where downloads go);
    see :mod:`regfit.data.files` for the layout and the MD5 policy. ``prepare_data`` downloads
    what is missing (rank 0 only, as Lightning calls it); ``setup`` loads the tensors.

    Subclasses for other MNIST-format datasets set the class attributes only (``folder``,
    ``md5s``, ``mirrors``, ``mean``, ``std``, and ``image_shape``/``num_classes`` if they differ).

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

    image_shape: ClassVar[tuple[int, int, int]] = (1, IMAGE_SIZE, IMAGE_SIZE)
    num_classes: ClassVar[int] = NUM_CLASSES
    mean: ClassVar[float] = 0.1307
    std: ClassVar[float] = 0.3081
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
        if isinstance(mirrors, (str, bytes)):
            raise ValueError(f"mirrors={mirrors!r} must be a list of URLs, e.g. mirrors=[{mirrors!r}]")
        super().__init__(data_dir=data_dir, batch_size=batch_size, val_fraction=val_fraction, seed=seed,
                         drop_last=drop_last)
        self.files = DatasetFiles(
            data_dir=self.data_dir,
            name=self.folder,
            md5s=self.md5s,
            mirrors=tuple(self.mirrors if mirrors is None else mirrors),
            verify_md5=verify_md5,
            timeout=self.download_timeout,
            retries=self.download_retries,
        )
        self.download = download
        self._located: dict[str, Path] | None = None

    def prepare_data(self) -> None:
        """Find the files, downloading missing or corrupt ones when ``download`` is set."""
        self.files.locate(download=self.download)

    def load(self, part: Part) -> LabelledImages:
        """The images and labels of ``part`` from the files ``prepare_data`` made sure of."""
        if self._located is None:
            self._located = self._locate_loaded()
        images_path, labels_path = (self._located[stem] for stem in _PARTS[part])
        return LabelledImages(
            read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC), f"{images_path} and {labels_path}"
        )

    def _locate_loaded(self) -> dict[str, Path]:
        """The files ``prepare_data`` made sure of (``setup`` itself never downloads)."""
        reason = (
            "prepare_data() has not downloaded them (the Trainer calls it before setup(); "
            "call it yourself when using the data module without a Trainer)"
            if self.download
            else "downloading is disabled (download=False)"
        )
        return self.files.locate(download=False, offline_reason=reason)


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
