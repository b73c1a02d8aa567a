"""The physics the dynamics metrics report, on a real layer: a Linear → LayerNorm (no
affine) layer, whose weight is scale-invariant, trained with SGD and coupled L2 settles into
a rotational equilibrium that turns it by √(2ηλ) per step (Kosson et al. 2024), and the
logged angular update is the angle the test measures itself from weight snapshots."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from regfit import RegModule, Regularization
from regfit.callback import is_logging_step
from tests.helpers import column, read_metrics

D_IN, WIDTH, CLASSES, BATCH = 20, 64, 5, 32


class LayerNormNet(RegModule):
    """x → Linear(no bias) → LayerNorm(no affine) → Linear head; the first weight is the one regularized."""

    def __init__(self, lr: float, momentum: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(D_IN, WIDTH, bias=False)
        self.norm = nn.LayerNorm(WIDTH, elementwise_affine=False)
        self.head = nn.Linear(WIDTH, CLASSES)
        self.lr, self.momentum = lr, momentum

    def forward(self, x):
        return self.head(self.norm(self.layer(x)))

    def data_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class Noise:
    """A stream of fresh random batches with random labels: the gradient stays noise, the
    regime the equilibrium is derived for, and never runs out."""

    def __init__(self, steps: int):
        self.steps = steps

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for _ in range(self.steps):
            yield torch.randn(BATCH, D_IN, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)

    def __len__(self):
        return self.steps


class Snapshots(L.Callback):
    """The test's own measurement: the layer's weight before and after each logged update."""

    def __init__(self):
        self.before, self.angles = None, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if is_logging_step(trainer):
            self.before = pl_module.layer.weight.detach().double().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None:
            a, b = self.before.flatten(), pl_module.layer.weight.detach().double().flatten()
            self.angles.append(math.acos(min(1.0, float(a @ b / (a.norm() * b.norm())))))
            self.before = None


@pytest.fixture
def one_thread():
    """A tiny model's steps are faster on one thread (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rms(values):
    return math.sqrt(sum(v * v for v in values) / len(values))


@pytest.mark.parametrize(("momentum", "steps"), [(0.0, 3000), (0.9, 1200)])
def test_angular_update_reaches_the_rotational_equilibrium(tmp_path, one_thread, momentum, steps):
    lr, lam = 0.5, 0.01
    snapshots = Snapshots()
    reg = Regularization("l2", strength=lam, include=["layer.weight"])
    trainer = L.Trainer(max_epochs=1, callbacks=[snapshots, reg], logger=CSVLogger(tmp_path), log_every_n_steps=5,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(LayerNormNet(lr, momentum), Noise(steps))
    rows = read_metrics(trainer.logger)
    logged = column(rows, "weights/angular_update/l2")
    assert len(logged) == len(snapshots.angles) == steps // 5
    # equilibrium: after ~1/(4ηλ·gain) steps the norm has settled; keep the last two thirds
    tail = slice(len(logged) // 3, None)
    measured, direct = rms(logged[tail]), rms(snapshots.angles[tail])
    theory = math.sqrt(2 * lr * lam / (1 + momentum))  # √(2ηλ) for plain SGD
    predicted = column(rows, "weights/equilibrium_angle/l2")[-1]
    print(f"momentum {momentum}: logged {measured:.5f}, from snapshots {direct:.5f}, √(2ηλ/(1+β)) {theory:.5f}, "
          f"ratio {measured / theory:.4f}")
    assert predicted == pytest.approx(theory, rel=1e-6)
    assert measured == pytest.approx(direct, rel=0.05)  # the metric measures what it says
    assert measured == pytest.approx(theory, rel=0.15)  # and the physics holds
    assert reg.scale_invariant == {"layer.weight": True}
    # in equilibrium the penalty's share of the gradient, λ‖w‖/‖g‖, is √(q/2), q = ηλ/(1 − β) the
    # decay per step (plain SGD: √(ηλ/2) = θ/2)
    ratio = column(rows, "weights/grad_ratio/l2")[tail]
    assert sorted(ratio)[len(ratio) // 2] == pytest.approx(math.sqrt(lr * lam / (1 - momentum) / 2), rel=0.2)
