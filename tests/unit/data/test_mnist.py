"""regfit.data.mnist: the data modules on the real digits, alone and under Lightning."""

from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from regfit.data import DataError, FashionMNISTDataModule, MNISTDataModule, TensorBatches, read_idx
from tests.unit.data.support import FILES, loaded


def test_datamodule_loads_real_digits(mnist_dir: Path, mnist_source: Path) -> None:
    dm = loaded(MNISTDataModule(data_dir=str(mnist_dir), download=False))
    x = torch.cat([dm.train_set.x, dm.val_set.x])
    y = torch.cat([dm.train_set.y, dm.val_set.y])
    assert x.shape == (8000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (8000,) and y.dtype == torch.int64
    assert (len(dm.train_set.y), len(dm.val_set.y)) == (6667, 1333)  # val_fraction = 1/6
    assert 0 <= int(y.min()) and int(y.max()) <= 9
    counts = torch.bincount(y, minlength=10)
    assert counts.sum() == 8000 and bool((counts > 600).all() and (counts < 1000).all())
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    # Normalization is (pixel / 255 - mean) / std: undoing it gives back the bytes.
    raw = read_idx(mnist_source / "t10k-images-idx3-ubyte.gz")[8000:]
    pixels = (dm.test_set.x * MNISTDataModule.std + MNISTDataModule.mean) * 255
    np.testing.assert_array_equal(pixels.round().to(torch.uint8).squeeze(1).numpy(), raw)
    np.testing.assert_array_equal(
        dm.test_set.y.numpy(), read_idx(mnist_source / "t10k-labels-idx1-ubyte.gz")[8000:]
    )


def test_uncompressed_files_load_the_same(mnist_dir: Path, tmp_path: Path) -> None:
    for name in FILES:
        plain_bytes = gzip.decompress((mnist_dir / name).read_bytes())
        (tmp_path / name.removesuffix(".gz")).write_bytes(plain_bytes)
    plain = loaded(MNISTDataModule(data_dir=str(tmp_path), download=False), "test")
    packed = loaded(MNISTDataModule(data_dir=str(mnist_dir), download=False), "test")
    assert torch.equal(plain.test_set.x, packed.test_set.x)
    assert torch.equal(plain.test_set.y, packed.test_set.y)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 64.0}, r"MNISTDataModule\(batch_size=64.0\): batch_size must be an integer ≥ 1"),
    ({"batch_size": 0}, r"MNISTDataModule\(batch_size=0\): batch_size must be an integer ≥ 1"),
    ({"seed": 1.5}, r"MNISTDataModule\(seed=1.5\): seed must be an integer ≥ 0"),
    ({"val_fraction": "0.1"}, r"val_fraction must be in \[0, 1\), got '0.1'"),
    ({"mirrors": "https://example.org/mnist/"}, r"mirrors='https://example.org/mnist/' must be a list of URLs"),
])
def test_bad_data_module_arguments_are_named(tmp_path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        MNISTDataModule(data_dir=str(tmp_path), **kwargs)


def test_datamodule_split_is_deterministic(mnist_dir: Path) -> None:
    a, b = (loaded(MNISTDataModule(data_dir=str(mnist_dir), seed=3), "fit") for _ in range(2))
    c = loaded(MNISTDataModule(data_dir=str(mnist_dir), seed=4), "fit")
    assert torch.equal(a.val_set.x, b.val_set.x) and torch.equal(a.train_set.y, b.train_set.y)
    assert not torch.equal(a.val_set.x, c.val_set.x)


def test_dataloaders_shard_by_trainer_rank(mnist_dir: Path) -> None:
    dm = loaded(MNISTDataModule(data_dir=str(mnist_dir), batch_size=100), "fit")
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        train, val = dm.train_dataloader(), dm.val_dataloader()
        assert (train.sampler.rank, train.sampler.world_size) == (rank, 2)
        assert len(train) == 34 and len(val) == 7  # ceil(3334 / 100), ceil(667 / 100)
        seen.append(torch.cat([x for x, _ in val]))
    dm.trainer = None
    assert len(dm.val_dataloader()) == 14
    # Both ranks' validation shards together are the validation set (one padding repeat).
    assert len(torch.cat(seen)) == 1334
    assert torch.equal(torch.cat(seen).unique(dim=0), dm.val_set.x.unique(dim=0))



# ----------------------------------------------------------------------------------------------
# Under Lightning
# ----------------------------------------------------------------------------------------------


class LinearProbe(L.LightningModule):
    """A Linear on flattened images; records what it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)
        self.train_batches: list[tuple[int, torch.Tensor]] = []
        self.val_labels: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.train_batches.append((self.current_epoch, y))
        return nn.functional.cross_entropy(self.linear(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if not self.trainer.sanity_checking:
            self.val_labels.append(y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_fit_runs_five_steps(mnist_dir: Path, tmp_path: Path) -> None:
    model = LinearProbe()
    trainer = _trainer(tmp_path, max_steps=5)
    trainer.fit(model, datamodule=MNISTDataModule(data_dir=str(mnist_dir), download=False))
    assert trainer.global_step == 5 and len(model.train_batches) == 5
    assert all(len(y) == 128 for _, y in model.train_batches)


def test_lightning_sets_the_epoch_of_reloaded_loaders(mnist_dir: Path, tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_dir), batch_size=64, download=False, seed=2)
    model = LinearProbe()
    trainer = _trainer(
        tmp_path, max_epochs=2, limit_train_batches=1, limit_val_batches=0,
        reload_dataloaders_every_n_epochs=1,  # a fresh loader per epoch: only set_epoch differs
    )
    trainer.fit(model, datamodule=dm)
    (e0, y0), (e1, y1) = model.train_batches
    assert (e0, e1) == (0, 1) and not torch.equal(y0, y1)
    expected = TensorBatches(dm.train_set.x, dm.train_set.y, 64, shuffle=True, seed=2)
    expected.sampler.set_epoch(1)
    assert torch.equal(next(iter(expected))[1], y1)


def test_validate_sees_every_validation_sample_once(mnist_dir: Path, tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False)
    model = LinearProbe()
    _trainer(tmp_path).validate(model, datamodule=dm)
    assert torch.equal(torch.cat(model.val_labels), dm.val_set.y)


def test_no_validation_split(mnist_dir: Path, tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_fraction=0.0)
    model = LinearProbe()
    _trainer(tmp_path, max_steps=2).fit(model, datamodule=dm)
    assert len(dm.train_set.y) == 8000 and dm.val_dataloader() == [] and not model.val_labels


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 0}, {"val_fraction": 1.0}, {"val_fraction": -0.1}]
)
def test_bad_arguments_fail_early(kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MNISTDataModule(**kwargs)



# ----------------------------------------------------------------------------------------------
# Fashion-MNIST shares the machinery
# ----------------------------------------------------------------------------------------------


def test_fashion_mnist_reuses_the_machinery(mnist_dir: Path, tmp_path: Path) -> None:
    fashion = loaded(FashionMNISTDataModule(data_dir=str(mnist_dir), download=False), "test")
    digits = loaded(MNISTDataModule(data_dir=str(mnist_dir), download=False), "test")
    torch.testing.assert_close(
        fashion.test_set.x * 0.3530 + 0.2860, digits.test_set.x * 0.3081 + 0.1307
    )
    assert fashion.files.download_dir == Path(mnist_dir) / "FashionMNIST" / "raw"
    assert fashion.files.mirrors == FashionMNISTDataModule.mirrors != MNISTDataModule.mirrors
    assert set(fashion.files.md5s) == set(MNISTDataModule.md5s)
    assert not set(fashion.files.md5s.values()) & set(MNISTDataModule.md5s.values())
    with pytest.raises(DataError, match="8d4fb7e6c68d591d4c3dfef9ec88bf0d"):  # not Fashion files
        loaded(FashionMNISTDataModule(data_dir=str(mnist_dir), download=False, verify_md5=True))
