"""regfit.data: IDX parsing, downloads, splitting, batching, and the data modules under Lightning.

Real digits come from the ``mnist_dir`` fixture (8,000 / 2,000 official test digits); downloads
go to a local ``http.server``; nothing touches the network.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from regfit.data import (
    DataError,
    FashionMNISTDataModule,
    MNISTDataModule,
    TensorBatches,
    build_split_from_test_set,
    main,
    read_idx,
    split_indices,
    write_idx,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def copy_files(src: Path, dst: Path, names=FILES) -> Path:
    """The four files without ``MD5SUMS``, so only the IDX structure is checked."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


def with_md5s(folder: Path, **overrides: str) -> type[MNISTDataModule]:
    """An MNISTDataModule whose 'official' MD5s are those of the files in ``folder``."""

    class LocalMNIST(MNISTDataModule):
        md5s = {name: md5(folder / name) for name in FILES} | {
            name.replace("_", "-") + ".gz": value for name, value in overrides.items()
        }

    return LocalMNIST


def loaded(dm: MNISTDataModule, stage: str | None = None) -> MNISTDataModule:
    dm.prepare_data()
    dm.setup(stage)
    return dm


# ----------------------------------------------------------------------------------------------
# Local mirrors
# ----------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextlib.contextmanager
def http_mirror(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (ephemeral port) from a thread; yield its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def mirror(mnist_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, served folder) of a local mirror holding the four files."""
    served = copy_files(mnist_dir, tmp_path / "mirror")
    with http_mirror(served) as url:
        yield url, served


@pytest.fixture
def dead_mirror() -> str:
    """A URL on a 127.0.0.1 port nothing listens on (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def raw_listing(data_dir: Path) -> list[str]:
    raw = data_dir / "MNIST" / "raw"
    return sorted(p.name for p in raw.iterdir()) if raw.exists() else []


# ----------------------------------------------------------------------------------------------
# IDX parsing on the real digits
# ----------------------------------------------------------------------------------------------


def test_built_split_is_the_official_test_set(mnist_dir: Path, mnist_source: Path) -> None:
    images = read_idx(mnist_source / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(mnist_source / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,)
    np.testing.assert_array_equal(read_idx(mnist_dir / "train-images-idx3-ubyte.gz"), images[:8000])
    np.testing.assert_array_equal(read_idx(mnist_dir / "train-labels-idx1-ubyte.gz"), labels[:8000])
    np.testing.assert_array_equal(read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz"), images[8000:])
    np.testing.assert_array_equal(read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz"), labels[8000:])
    # The shared files are the official ones: the MD5 table of the module matches them.
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert md5(mnist_source / name) == MNISTDataModule.md5s[name]


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


def test_write_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    digest = write_idx(tmp_path / "x-images-idx3-ubyte.gz", array)
    assert digest == md5(tmp_path / "x-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(read_idx(tmp_path / "x-images-idx3-ubyte.gz"), array)
    # Reproducible bytes: no timestamp in the gzip header.
    assert write_idx(tmp_path / "again-images-idx3-ubyte.gz", array) == digest


def _idx_bytes(path: Path) -> bytearray:
    return bytearray(gzip.decompress(path.read_bytes()))


@pytest.mark.parametrize(
    ("name", "corrupt", "message"),
    [
        ("train-labels-idx1-ubyte.gz", lambda d: d.__setitem__(2, 0x09) or d, "magic number"),
        ("train-images-idx3-ubyte.gz", lambda d: d.__setitem__(3, 2) or d, "bytes"),
        ("train-images-idx3-ubyte.gz", lambda d: d[:-100], "truncated"),
        ("t10k-labels-idx1-ubyte.gz", lambda d: d + b"\0", "trailing bytes"),
    ],
    ids=["bad-type-code", "wrong-ndim", "truncated", "trailing-bytes"],
)
def test_corrupt_idx_names_the_file(mnist_dir, tmp_path, name, corrupt, message) -> None:
    folder = copy_files(mnist_dir, tmp_path / "data")
    data = bytes(corrupt(_idx_bytes(mnist_dir / name)))
    (folder / name).write_bytes(gzip.compress(data, compresslevel=1))
    with pytest.raises(DataError, match=message) as excinfo:
        loaded(MNISTDataModule(data_dir=str(folder), download=False))
    assert str(folder / name) in str(excinfo.value)
    assert "delete" in str(excinfo.value)


def test_labels_where_images_belong_is_a_magic_error(mnist_dir: Path, tmp_path: Path) -> None:
    folder = copy_files(mnist_dir, tmp_path / "data")
    shutil.copy(folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="magic number 2051, expected 2049") as excinfo:
        loaded(MNISTDataModule(data_dir=str(folder), download=False), "test")
    assert "t10k-labels-idx1-ubyte.gz" in str(excinfo.value)


def test_truncated_gzip_stream_names_the_file(mnist_dir: Path, tmp_path: Path) -> None:
    folder = copy_files(mnist_dir, tmp_path / "data")
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="corrupt gzip") as excinfo:
        loaded(MNISTDataModule(data_dir=str(folder), download=False))
    assert str(path) in str(excinfo.value)


# ----------------------------------------------------------------------------------------------
# MD5 policy and where files are looked for
# ----------------------------------------------------------------------------------------------


def test_own_folder_is_checked_against_its_md5sums(mnist_dir: Path, tmp_path: Path) -> None:
    folder = copy_files(mnist_dir, tmp_path / "data", FILES + ("MD5SUMS",))
    labels = read_idx(folder / "train-labels-idx1-ubyte.gz")
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[::-1])  # valid IDX, other bytes
    with pytest.raises(DataError, match="MD5SUMS"):
        loaded(MNISTDataModule(data_dir=str(folder), download=False))
    dm = loaded(MNISTDataModule(data_dir=str(folder), download=False, verify_md5=False))
    assert len(dm.train_set.y) + len(dm.val_set.y) == 8000


def test_verify_md5_true_demands_the_official_files(mnist_dir: Path) -> None:
    with pytest.raises(DataError, match="expected f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        loaded(MNISTDataModule(data_dir=str(mnist_dir), download=False, verify_md5=True))


def test_data_dir_from_argument_env_or_default(monkeypatch, tmp_path, mnist_dir) -> None:
    monkeypatch.setenv("REGFIT_DATA_DIR", str(mnist_dir))
    assert MNISTDataModule().files.data_dir == mnist_dir
    assert MNISTDataModule(data_dir=str(tmp_path)).files.data_dir == tmp_path
    monkeypatch.delenv("REGFIT_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    dm = MNISTDataModule()
    assert dm.files.data_dir == tmp_path / "data"
    assert dm.files.download_dir == tmp_path / "data" / "MNIST" / "raw"


def test_download_folder_layout_is_found(mnist_dir: Path, tmp_path: Path) -> None:
    copy_files(mnist_dir, tmp_path / "MNIST" / "raw")  # torchvision's layout
    dm = loaded(with_md5s(mnist_dir)(data_dir=str(tmp_path), download=False), "test")
    assert len(dm.test_set.y) == 2000


# ----------------------------------------------------------------------------------------------
# Downloads from a local mirror
# ----------------------------------------------------------------------------------------------


def test_download_verifies_and_leaves_only_the_files(mirror, dead_mirror, tmp_path) -> None:
    url, served = mirror
    module = with_md5s(served)
    data_dir = tmp_path / "data"
    module(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    assert raw_listing(data_dir) == sorted(FILES)  # no temporary files left behind
    for name in FILES:
        assert md5(data_dir / "MNIST" / "raw" / name) == md5(served / name)
    # Present and valid: no network needed any more.
    dm = loaded(module(data_dir=str(data_dir), mirrors=[dead_mirror]))
    assert len(dm.train_set.y) + len(dm.val_set.y) == 8000 and len(dm.test_set.y) == 2000


def test_bad_md5_from_mirror_is_rejected_without_partial_file(mirror, tmp_path) -> None:
    url, served = mirror
    module = with_md5s(served, train_labels_idx1_ubyte="0" * 32)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="MD5 mismatch") as excinfo:
        module(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    assert "train-labels-idx1-ubyte.gz" in str(excinfo.value)
    assert raw_listing(data_dir) == ["train-images-idx3-ubyte.gz"]  # downloaded before it


def test_first_mirror_failing_falls_back_to_the_next(mirror, dead_mirror, tmp_path) -> None:
    url, served = mirror
    data_dir = tmp_path / "data"
    with_md5s(served)(data_dir=str(data_dir), mirrors=[dead_mirror, url]).prepare_data()
    assert raw_listing(data_dir) == sorted(FILES)


def test_corrupt_download_is_fetched_again(mirror, tmp_path) -> None:
    url, served = mirror
    module = with_md5s(served)
    data_dir = tmp_path / "data"
    module(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    bad = data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="delete it") as excinfo:
        module(data_dir=str(data_dir), mirrors=[url], download=False).prepare_data()
    assert str(bad) in str(excinfo.value)
    module(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    assert md5(bad) == md5(served / bad.name)
    assert raw_listing(data_dir) == sorted(FILES)


def test_offline_without_files_names_the_fix(dead_mirror, tmp_path) -> None:
    data_dir = tmp_path / "nothing"
    with pytest.raises(DataError) as excinfo:
        MNISTDataModule(data_dir=str(data_dir), mirrors=[dead_mirror]).prepare_data()
    message = str(excinfo.value)
    for needle in ("--data.data_dir", "REGFIT_DATA_DIR", "python -m regfit.data --from-test-set",
                   *FILES, str(data_dir), dead_mirror + FILES[0], "failed"):
        assert needle in message
    assert excinfo.value.__context__ is None and excinfo.value.__cause__ is None
    assert raw_listing(data_dir) == []


def test_a_mistyped_data_dir_leaves_no_empty_folders(dead_mirror, tmp_path) -> None:
    data_dir = tmp_path / "typo" / "deeper"
    with pytest.raises(DataError, match="MNIST data not found"):
        MNISTDataModule(data_dir=str(data_dir), mirrors=[dead_mirror]).prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_a_data_dir_that_cannot_hold_the_data_is_named(tmp_path) -> None:
    a_file = tmp_path / "train-images-idx3-ubyte.gz"
    a_file.write_bytes(b"")
    with pytest.raises(DataError, match=rf"data_dir {a_file} is a file; give the folder .* --data.data_dir={tmp_path}"):
        MNISTDataModule(data_dir=str(a_file))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: use a path under a file instead
        locked = a_file / "sub"
    with pytest.raises(DataError, match=r"cannot create .* to download into .*--data.data_dir you can write to"):
        MNISTDataModule(data_dir=str(locked / "data")).prepare_data()


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


def test_missing_files_without_download(tmp_path) -> None:
    with pytest.raises(DataError, match=r"download=False.*--data\.data_dir"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).prepare_data()
    with pytest.raises(DataError, match=r"prepare_data\(\) has not downloaded"):
        MNISTDataModule(data_dir=str(tmp_path)).setup("fit")  # setup never downloads


# ----------------------------------------------------------------------------------------------
# Splitting and batching
# ----------------------------------------------------------------------------------------------


def test_split_indices_disjoint_covering_and_seeded() -> None:
    train, val = split_indices(100, 17, seed=0)
    assert (len(train), len(val)) == (83, 17)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))
    again_train, again_val = split_indices(100, 17, seed=0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(val, split_indices(100, 17, seed=1)[1])


def test_datamodule_split_is_deterministic(mnist_dir: Path) -> None:
    a, b = (loaded(MNISTDataModule(data_dir=str(mnist_dir), seed=3), "fit") for _ in range(2))
    c = loaded(MNISTDataModule(data_dir=str(mnist_dir), seed=4), "fit")
    assert torch.equal(a.val_set.x, b.val_set.x) and torch.equal(a.train_set.y, b.train_set.y)
    assert not torch.equal(a.val_set.x, c.val_set.x)


def _epoch(batches: TensorBatches) -> tuple[torch.Tensor, list[int]]:
    xs, sizes = [], []
    for x, y in batches:
        assert torch.equal(x.long(), y)  # pairs stay together
        xs.append(y)
        sizes.append(len(y))
    return torch.cat(xs), sizes


def test_batches_cover_every_sample_once_and_reshuffle() -> None:
    x, y = torch.arange(103).float(), torch.arange(103)
    batches = TensorBatches(x, y, batch_size=10, shuffle=True, seed=0)
    assert len(batches) == 11
    first, sizes = _epoch(batches)
    second, _ = _epoch(batches)
    assert sizes == [10] * 10 + [3]
    assert torch.equal(first.sort().values, y) and torch.equal(second.sort().values, y)
    assert not torch.equal(first, second)


def test_set_epoch_reproduces_an_epoch_order() -> None:
    x, y = torch.arange(50).float(), torch.arange(50)
    a = TensorBatches(x, y, batch_size=8, shuffle=True, seed=1)
    b = TensorBatches(x, y, batch_size=8, shuffle=True, seed=1)
    a.sampler.set_epoch(3)
    b.sampler.set_epoch(3)
    assert torch.equal(_epoch(a)[0], _epoch(b)[0])  # a fresh loader (e.g. after resume) agrees


def test_drop_last() -> None:
    x, y = torch.arange(103).float(), torch.arange(103)
    batches = TensorBatches(x, y, batch_size=10, shuffle=True, drop_last=True)
    assert len(batches) == 10
    seen, sizes = _epoch(batches)
    assert sizes == [10] * 10 and len(seen.unique()) == 100


def test_sequential_batches_are_views_in_order() -> None:
    x, y = torch.arange(25).float(), torch.arange(25)
    batches = TensorBatches(x, y, batch_size=10)
    seen, sizes = _epoch(batches)
    assert torch.equal(seen, y) and sizes == [10, 10, 5]
    first_x, _ = next(iter(batches))
    assert first_x.data_ptr() == x.data_ptr()  # a slice, not a copy


@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_take_disjoint_equal_shards(shuffle: bool) -> None:
    x, y = torch.arange(103).float(), torch.arange(103)
    shards = [
        TensorBatches(x, y, batch_size=10, shuffle=shuffle, seed=5, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 6  # ceil(103 / 2) = 52 samples each
    seen = [_epoch(shard)[0] for shard in shards]
    assert len(seen[0]) == len(seen[1]) == 52
    # Together they cover everything; the one padding sample is the only repeat.
    assert set(torch.cat(seen).tolist()) == set(range(103))
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) <= 1


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


# ----------------------------------------------------------------------------------------------
# Building a split offline
# ----------------------------------------------------------------------------------------------


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
