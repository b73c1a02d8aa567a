"""What the notebooks share: where the digits are, a small MNIST model, and a quiet Trainer.

Every notebook starts with ``from _setup import ...``. Two environment variables steer it:

* ``REGFIT_SMOKE=1`` shrinks every run to a few steps (the test suite executes the
  notebooks this way; the committed outputs come from full runs).
* ``REGFIT_DATA_DIR`` names an MNIST folder to use as is.

Without ``REGFIT_DATA_DIR`` the digits come from ``<repo>/data/mnist``: when it is empty and
the official MNIST test-set files sit beside the repository (``../shared/data/mnist``), an
offline 8,000 / 2,000 split is built from them there; otherwise ``MNISTDataModule``
downloads the full dataset into it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from regfit.models import MLP
from regfit.data import FILE_STEMS, MNISTDataModule, build_split_from_test_set

__all__ = ["SMOKE", "pick", "mnist_data_dir", "mnist", "MemoryLogger", "DigitsMLP", "fit", "accuracy"]

SMOKE = os.environ.get("REGFIT_SMOKE", "") not in ("", "0")
REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"

# Lightning's banners ("GPU available: False", "LOCAL_RANK: 0") are noise in a notebook.
for _name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is not a `torch.utils.data.DataLoader`.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")  # a torch deprecation inside Lightning


def pick(full: Any, smoke: Any) -> Any:
    """``full`` for a real run, ``smoke`` under ``REGFIT_SMOKE=1``."""
    return smoke if SMOKE else full


def mnist_data_dir() -> Path:
    """The MNIST folder the notebooks train on (see the module docstring for the order)."""
    if os.environ.get("REGFIT_DATA_DIR"):
        return Path(os.environ["REGFIT_DATA_DIR"])
    target = REPO / "data" / "mnist"
    has_all = all(any(target.glob(f"{stem}*")) for stem in FILE_STEMS)
    if not has_all and (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        build_split_from_test_set(SHARED_MNIST, target, n_train=8000)
    return target


def mnist(batch_size: int = 128, seed: int = 0) -> MNISTDataModule:
    """The data module on :func:`mnist_data_dir` (downloads only when no local files exist)."""
    return MNISTDataModule(data_dir=str(mnist_data_dir()), batch_size=batch_size, seed=seed)


class MemoryLogger(Logger):
    """Keeps every logged metric in memory: ``logger.history["train/penalty"]`` is a list of
    ``(step, value)`` pairs, ready to plot."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.history[key].append((int(step or 0), float(value)))

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one metric."""
        pairs = self.history.get(key, [])
        return [s for s, _ in pairs], [v for _, v in pairs]

    def last(self, key: str) -> float:
        """The last logged value of one metric."""
        return self.history[key][-1][1]


class DigitsMLP(MLP):
    """:class:`regfit.models.MLP` (784 → hidden… → 10, ReLU; a LayerNorm after each hidden
    Linear with ``norm=True``) with the optimizer a notebook picks and a seed.

    Args:
        hidden: Widths of the hidden layers.
        optimizer: ``params -> torch.optim.Optimizer``; SGD(lr=0.05, momentum=0.9) by default.
        norm: Put a LayerNorm after each hidden Linear.
        seed: Seed of the initialization, so two models built alike start identical.
        bias: Give the hidden Linears a bias (without one, and with ``norm``, their weights
            are scale-invariant).
    """

    def __init__(
        self,
        hidden: Sequence[int] = (256,),
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        norm: bool = False,
        seed: int = 0,
        bias: bool = True,
    ) -> None:
        torch.manual_seed(seed)
        super().__init__(widths=hidden, norm="layer" if norm else "none", bias=bias)
        self._optimizer = optimizer or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer(self.parameters())


def fit(
    model: L.LightningModule,
    callbacks: Sequence[L.Callback] = (),
    epochs: int = 2,
    data: MNISTDataModule | None = None,
    log_every: int = 5,
    **trainer_kwargs: Any,
) -> tuple[L.Trainer, MemoryLogger]:
    """Train ``model`` on the digits on the CPU; under ``REGFIT_SMOKE=1``, 4 steps of 1 epoch."""
    logger = MemoryLogger()
    kwargs: dict[str, Any] = dict(
        max_epochs=pick(epochs, 1),
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=pick(log_every, 1),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if SMOKE:
        kwargs.update(limit_train_batches=4, limit_val_batches=2)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(model, datamodule=data or mnist())
    return trainer, logger


@torch.no_grad()
def accuracy(model: nn.Module, data: MNISTDataModule | None = None) -> float:
    """Accuracy on the held-out test digits (all of them, also in smoke mode)."""
    data = data or mnist()
    data.prepare_data()
    data.setup("test")
    model.eval()
    x, y = data.test_set
    return (model(x).argmax(1) == y).float().mean().item()
