"""The base of regfit's data modules: a labelled image dataset held in memory as two tensors.

A dataset is one small subclass of :class:`TensorDataModule`. It *declares* what its data is
-- ``image_shape`` ``(C, H, W)``, ``num_classes``, and the ``mean``/``std`` that normalize it --
and implements :meth:`~TensorDataModule.load`, which reads one part (``"train"`` or
``"test"``) as uint8 arrays, in whatever file format the dataset comes in. It may also
override ``prepare_data`` to download or check files (Lightning calls it on one process
only). The base does the rest, the same for every dataset:

- checks the arrays against the declaration (a 32×32 file for a 28×28 dataset, label 10 of
  10 classes) and names the files and the fix;
- holds out a fixed-seed validation split of the training part (:func:`split_indices`);
- normalizes ``(pixel / 255 - mean) / std`` into float32 ``(N, C, H, W)``;
- serves :class:`~regfit.data.batches.TensorBatches`: shuffled per epoch for training,
  sharded by rank under DDP, resumable mid-epoch.

The models see the declaration in their first batch: :class:`regfit.models.MLP` and
:class:`regfit.models.CNN` check it against ``in_features`` / ``in_channels``,
``image_size`` and ``num_classes`` and name the option to change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

import lightning as L
import numpy as np
import torch

from regfit.data.batches import TensorBatches, split_indices
from regfit.data.errors import DataError
from regfit.data.files import DEFAULT_DATA_DIR, ENV_DATA_DIR
from regfit.hyperparams import check_int, is_number

__all__ = ["LabelledImages", "TensorDataModule", "TensorPair"]

Part = Literal["train", "test"]


class TensorPair(NamedTuple):
    """Images ``x`` (float32, ``(N, *image_shape)``, normalized) and labels ``y`` (int64)."""

    x: torch.Tensor
    y: torch.Tensor


class LabelledImages(NamedTuple):
    """One part of a dataset as read from its files, before any check.

    Attributes:
        images: uint8 pixels, ``(N, C, H, W)``, or ``(N, H, W)`` for one channel.
        labels: Integer class indices, ``(N,)``.
        source: Where they were read from (file paths), for error messages.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str


class TensorDataModule(L.LightningDataModule):
    """A labelled image dataset in memory: fixed-seed train/val split of ``"train"``, ``"test"`` as is.

    Subclasses declare the class attributes below and implement :meth:`load`; see the module
    docstring.

    Args:
        data_dir: Data folder. Default ``$REGFIT_DATA_DIR``, else ``./data``.
        batch_size: Samples per batch, for every stage.
        val_fraction: Fraction of the training part held out for validation,
            ``0 <= val_fraction < 1``. 0: no validation.
        seed: Seed of the train/val split and of the per-epoch shuffling.
        drop_last: Drop the last, incomplete training batch.
    """

    #: ``(channels, height, width)`` of every image.
    image_shape: ClassVar[tuple[int, int, int]]
    #: Labels are ``0 … num_classes - 1``.
    num_classes: ClassVar[int]
    #: Normalization ``(pixel / 255 - mean) / std``: one value, or one per channel.
    mean: ClassVar[float | tuple[float, ...]] = 0.0
    std: ClassVar[float | tuple[float, ...]] = 1.0

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        val_fraction: float = 1 / 6,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        call = type(self).__name__
        self._check_declaration()
        batch_size, seed = check_int(call, "batch_size", batch_size, 1), check_int(call, "seed", seed, 0)
        if not (is_number(val_fraction) and 0.0 <= val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        root = Path(data_dir or os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR).expanduser().absolute()
        if root.exists() and not root.is_dir():
            raise DataError(f"data_dir {root} is a file; give the folder that holds (or will hold) the dataset, "
                            f"e.g. --data.data_dir={root.parent}")
        self.save_hyperparameters()  # a subclass's own arguments too (Lightning walks the __init__ chain)
        self.data_dir = root
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.drop_last = drop_last
        self.train_set: TensorPair | None = None
        self.val_set: TensorPair | None = None
        self.test_set: TensorPair | None = None

    @classmethod
    def _check_declaration(cls) -> None:
        """A subclass that forgot a declaration fails here, not at the first batch."""
        shape = getattr(cls, "image_shape", None)
        if not (isinstance(shape, tuple) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise TypeError(f"{cls.__name__}.image_shape must be (channels, height, width), got {shape!r}")
        classes = getattr(cls, "num_classes", None)
        if not (isinstance(classes, int) and classes >= 1):
            raise TypeError(f"{cls.__name__}.num_classes must be an integer ≥ 1, got {classes!r}")
        for name in ("mean", "std"):
            value = getattr(cls, name)
            if isinstance(value, tuple) and len(value) != shape[0]:
                raise TypeError(f"{cls.__name__}.{name} has {len(value)} values for {shape[0]} channels")

    # -- what a subclass implements ------------------------------------------------------------

    def load(self, part: Part) -> LabelledImages:
        """Read one part of the dataset from wherever ``prepare_data`` left it.

        Args:
            part: ``"train"`` (split into training and validation sets) or ``"test"``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement load(part) -> LabelledImages")

    # -- Lightning hooks -----------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Load the tensors a stage needs (once).

        Args:
            stage: ``"fit"`` / ``"validate"`` load the split training part, ``"test"`` /
                ``"predict"`` the test part, ``None`` both.
        """
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self._checked(self.load("train"))
            val_size = round(len(labels) * self.val_fraction)
            train, val = split_indices(len(labels), val_size, self.seed)
            self.train_set = self._to_tensors(images[train.numpy()], labels[train.numpy()])
            self.val_set = self._to_tensors(images[val.numpy()], labels[val.numpy()])
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._to_tensors(*self._checked(self.load("test")))

    def train_dataloader(self) -> TensorBatches:
        """Shuffled training batches (a new order each epoch)."""
        return self._batches(self.train_set, "training", train=True)

    def val_dataloader(self) -> TensorBatches | list:
        """Sequential validation batches; ``[]`` (no validation) when ``val_fraction == 0``."""
        if self.val_set is not None and len(self.val_set.y) == 0:
            return []
        return self._batches(self.val_set, "validation")

    def test_dataloader(self) -> TensorBatches:
        """Sequential batches of the test part."""
        return self._batches(self.test_set, "test")

    def predict_dataloader(self) -> TensorBatches:
        """Sequential ``(x, y)`` batches of the test part."""
        return self._batches(self.test_set, "test")

    # -- the shared machinery ------------------------------------------------------------------

    def _checked(self, data: LabelledImages) -> tuple[np.ndarray, np.ndarray]:
        """``(N, C, H, W)`` uint8 images and int labels, as declared; else a DataError naming the source."""
        images, labels, source = data
        cls = type(self).__name__
        if images.ndim == 3 and self.image_shape[0] == 1:
            images = images[:, None]
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            found = f"{images.dtype} images of shape {images.shape[1:]}"
            raise DataError(
                f"{source}: {found}, but {cls} declares uint8 images of shape {self.image_shape} "
                f"({cls}.image_shape): replace the files, or use a data module that declares their shape"
            )
        if len(images) != len(labels):
            raise DataError(f"{source}: {len(images)} images but {len(labels)} labels; replace the mismatched file")
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            bad = int(labels.max()) if int(labels.max()) >= self.num_classes else int(labels.min())
            raise DataError(
                f"{source}: label {bad} outside 0..{self.num_classes - 1} ({cls}.num_classes = {self.num_classes}): "
                "replace the files, or use a data module that declares their number of classes"
            )
        return images, labels

    def _to_tensors(self, images: np.ndarray, labels: np.ndarray) -> TensorPair:
        """uint8 ``(N, C, H, W)`` -> normalized float32; labels -> int64."""
        # Parsed arrays view read-only bytes; torch wants writable memory (copy those only).
        images = images if images.flags.writeable else images.copy()
        x = torch.from_numpy(images).float()
        mean, std = self._per_channel(self.mean), self._per_channel(self.std)
        x.div_(255.0).sub_(mean).div_(std)
        return TensorPair(x, torch.from_numpy(labels.astype(np.int64)))

    @staticmethod
    def _per_channel(value: float | tuple[float, ...]) -> float | torch.Tensor:
        """A scalar stays a Python float (the same rounding as ever); a tuple broadcasts over channels."""
        return torch.tensor(value, dtype=torch.float32).view(-1, 1, 1) if isinstance(value, tuple) else value

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
