"""Small models and a reference training loop shared by the tests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from regfit import RegModule


class TinyNet(RegModule):
    """body (Linear → Tanh → LayerNorm → Linear → Tanh) → head, float64 by default."""

    def __init__(self, d_in: int = 12, width: int = 16, n_out: int = 3, seed: int = 0, dtype=torch.float64,
                 optimizer=None, norm: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        layers = [nn.Linear(d_in, width), nn.Tanh()]
        if norm:
            layers.append(nn.LayerNorm(width))
        layers += [nn.Linear(width, width), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_out)
        self.to(dtype)
        self._optimizer = optimizer or (lambda params: torch.optim.SGD(params, lr=0.1))

    def forward(self, x):
        return self.head(self.body(x))

    def data_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return self._optimizer(self.parameters())


def batches(n_batches: int, batch_size: int = 16, d_in: int = 12, n_out: int = 3, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch_size, d_in, generator=g, dtype=dtype)
        y = torch.randint(0, n_out, (batch_size,), generator=g)
        out.append((x, y))
    return out


class Batches:
    """A fixed list of batches that Lightning iterates as one loader (a bare list would be
    read as a list of loaders)."""

    def __init__(self, data):
        self.data = list(data)

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)


def fit(model: L.LightningModule, data, callbacks=(), max_steps=None, **trainer_kwargs) -> L.Trainer:
    """Fit for exactly one pass over `data` (a list of batches) unless max_steps is given."""
    kwargs = dict(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    kwargs.update(trainer_kwargs)
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    trainer = L.Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(model, Batches(data))
    return trainer


def reference_loop(model: nn.Module, optimizer: torch.optim.Optimizer, data, extra_loss=None, clip=None):
    """A plain torch loop: data loss (+ extra_loss(model) through autograd), backward, step."""
    for x, y in data:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return model


def finite_differences(penalty, w: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of ``penalty.value`` at ``w``, entry by entry (use float64)."""
    fd = torch.empty_like(w)
    for i in range(w.numel()):
        e = torch.zeros(w.numel(), dtype=w.dtype)
        e[i] = h
        e = e.view_as(w)
        fd.view(-1)[i] = (penalty.value(w + e) - penalty.value(w - e)) / (2 * h)
    return fd


def read_metrics(logger) -> list[dict[str, str]]:
    """The rows of a CSVLogger's metrics.csv."""
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows, key):
    """The float values of ``key`` in the rows that have one."""
    return [float(r[key]) for r in rows if r.get(key)]


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


ROOT = Path(__file__).resolve().parents[1]


def launch_ranks(args: list[str], out: Path, attempts: int = 2) -> None:
    """Run a multi-process worker (``python ARGS OUT``) from the repo root; the workers write
    their results under ``out`` and the calling test compares them.

    A launch is retried once if it crashes: on this shared 2-core machine a gloo rank was
    seen to abort (SIGABRT, ~1 run in 6) before training began. The workers assert
    nothing themselves, so a retry cannot hide a wrong result; a worker that fails twice
    fails the test with its output.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    for attempt in range(attempts):
        proc = subprocess.run([sys.executable, *args, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        if proc.returncode == 0:
            return
    raise AssertionError(f"{' '.join(args)} failed {attempts}×:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])


class ResidualCNN(nn.Module):
    """conv-BN-ReLU stem → a residual block (conv-BN-ReLU-conv-BN, + stem) → pool → fc → head,
    for 28×28 digits: the unit groups of a ResNet in miniature (the block's output channels
    are coupled to the stem's through the addition)."""

    def __init__(self, width: int = 8, inner: int = 6, hidden: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(width, inner, 3, padding=1), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(width * 7 * 7, hidden)
        self.head = nn.Linear(hidden, 10)
        self.example_input_array = torch.zeros(2, 1, 28, 28)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))))
        return self.head(torch.relu(self.fc(self.pool(h).flatten(1))))


def mnist_digits(mnist_source, n: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` official MNIST test digits as (N, 1, 28, 28) float32 in [0, 1], labels."""
    from regfit.data import read_idx

    images = torch.from_numpy(read_idx(Path(mnist_source) / "t10k-images-idx3-ubyte.gz")[:n].copy())
    labels = torch.from_numpy(read_idx(Path(mnist_source) / "t10k-labels-idx1-ubyte.gz")[:n].copy()).long()
    return images.float().div_(255).unsqueeze(1), labels


class LayerNormMLP(RegModule):
    """784 → Linear(no bias) → LayerNorm → ReLU → Linear → 10: body.0.weight is scale-invariant."""

    def __init__(self, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(784, width, bias=False), nn.LayerNorm(width), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))

    def data_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)
