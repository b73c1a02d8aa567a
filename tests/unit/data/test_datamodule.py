"""regfit.data.datamodule: a dataset declares its image shape and classes; the base checks, splits,
normalizes and batches, and regfit's models train on it."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import pytest
import torch

from regfit import Regularization
from regfit.data import DataError, LabelledImages, MNISTDataModule, TensorDataModule
from regfit.models import CNN, MLP
from tests.unit.data.support import loaded


class NpzImages(TensorDataModule):
    """A dataset in another format, in a few lines: ``train.npz``/``test.npz`` with ``x`` (N, 3, 8, 8)
    uint8 and ``y`` in 0..3."""

    image_shape: ClassVar[tuple[int, int, int]] = (3, 8, 8)
    num_classes: ClassVar[int] = 4
    mean: ClassVar[tuple[float, ...]] = (0.5, 0.4, 0.3)
    std: ClassVar[tuple[float, ...]] = (0.25, 0.2, 0.1)

    def load(self, part):
        path = self.data_dir / f"{part}.npz"
        with np.load(path) as f:
            return LabelledImages(f["x"], f["y"], str(path))


def write_npz(folder: Path, n_train: int = 120, n_test: int = 40, shape=(3, 8, 8), classes: int = 4) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("test", n_test)):
        np.savez(folder / f"{part}.npz", x=rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                 y=rng.integers(0, classes, n, dtype=np.int64))
    return folder


def test_a_dataset_in_another_format_is_one_small_subclass(tmp_path) -> None:
    dm = loaded(NpzImages(data_dir=str(write_npz(tmp_path)), batch_size=16, val_fraction=0.25))
    assert dm.train_set.x.shape == (90, 3, 8, 8) and dm.val_set.x.shape == (30, 3, 8, 8)
    assert dm.test_set.x.dtype == torch.float32 and dm.test_set.y.dtype == torch.int64
    # Per-channel normalization: undoing it gives back the bytes of each channel.
    with np.load(tmp_path / "test.npz") as f:
        raw = f["x"]
    mean, std = torch.tensor(NpzImages.mean).view(3, 1, 1), torch.tensor(NpzImages.std).view(3, 1, 1)
    np.testing.assert_array_equal(((dm.test_set.x * std + mean) * 255).round().to(torch.uint8).numpy(), raw)
    assert [len(y) for _, y in dm.train_dataloader()] == [16] * 5 + [10]


def with_sgd(model: L.LightningModule) -> L.LightningModule:
    """The optimizer LightningCLI would add from the config's ``optimizer:`` section."""
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.05)
    return model


@pytest.mark.parametrize("make_model", [
    lambda: CNN(channels=(4,), hidden=8, in_channels=3, image_size=8, num_classes=4),
    lambda: MLP(widths=[8], in_features=3 * 8 * 8, num_classes=4),
], ids=["cnn", "mlp"])
def test_regfit_models_train_on_the_declared_shape(make_model, tmp_path) -> None:
    dm = NpzImages(data_dir=str(write_npz(tmp_path)), batch_size=16)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1, default_root_dir=tmp_path,
                        callbacks=[Regularization("l2", strength=1e-4, exclude=["bias"])])
    trainer.fit(with_sgd(make_model()), datamodule=dm)
    assert trainer.global_step == 3


def test_a_model_built_for_the_mnist_shape_names_the_option(tmp_path) -> None:
    dm = NpzImages(data_dir=str(write_npz(tmp_path)), batch_size=16)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"image_size"):
        trainer.fit(with_sgd(CNN()), datamodule=dm)  # in_channels=1, image_size=28


def test_files_of_another_shape_than_declared_are_named(mnist_dir: Path) -> None:
    class Mnist32(MNISTDataModule):
        image_shape = (1, 32, 32)

    with pytest.raises(DataError, match=r"images of shape \(1, 28, 28\), but Mnist32 declares uint8 images "
                                        r"of shape \(1, 32, 32\) \(Mnist32.image_shape\)") as excinfo:
        loaded(Mnist32(data_dir=str(mnist_dir), download=False), "test")
    assert str(mnist_dir / "t10k-images-idx3-ubyte.gz") in str(excinfo.value)


def test_labels_beyond_the_declared_classes_are_named(mnist_dir: Path, tmp_path) -> None:
    class Mnist5(MNISTDataModule):
        num_classes = 5

    with pytest.raises(DataError, match=r"label 9 outside 0..4 \(Mnist5.num_classes = 5\)") as excinfo:
        loaded(Mnist5(data_dir=str(mnist_dir), download=False), "test")
    assert str(mnist_dir / "t10k-labels-idx1-ubyte.gz") in str(excinfo.value)
    folder = write_npz(tmp_path, classes=4)
    np.savez(folder / "test.npz", x=np.zeros((2, 3, 8, 8), np.uint8), y=np.array([0, -1]))
    with pytest.raises(DataError, match=r"label -1 outside 0..3"):
        loaded(NpzImages(data_dir=str(folder)), "test")


def test_a_data_module_without_its_declaration_fails_at_construction(tmp_path) -> None:
    class Undeclared(TensorDataModule):
        pass

    with pytest.raises(TypeError, match=r"Undeclared.image_shape must be \(channels, height, width\)"):
        Undeclared(data_dir=str(tmp_path))

    class TwoMeans(NpzImages):
        mean = (0.5, 0.5)

    with pytest.raises(TypeError, match="TwoMeans.mean has 2 values for 3 channels"):
        TwoMeans(data_dir=str(tmp_path))


def test_mnist_declares_what_its_files_hold() -> None:
    from regfit.data import IMAGE_SIZE, NUM_CLASSES

    assert MNISTDataModule.image_shape == (1, IMAGE_SIZE, IMAGE_SIZE) == (1, 28, 28)
    assert MNISTDataModule.num_classes == NUM_CLASSES == 10
