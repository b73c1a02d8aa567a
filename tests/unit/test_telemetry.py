"""regfit.telemetry and its use by the Regularization callback: what one step's measurement
logs, on logging steps only, once per real optimizer step (gradient accumulation too)."""

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
from regfit.penalties import L1
from regfit.telemetry import StepTelemetry
from tests.helpers import Batches, column, read_metrics


def direct_angle(a, b) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return math.acos(max(-1.0, min(1.0, float((a @ b) / (a.norm() * b.norm())))))


class NormNet(RegModule):
    """Linear (no bias) → LayerNorm (no affine) → ReLU → Linear: body.0.weight is scale-invariant."""

    def __init__(self, lr: float = 0.3, momentum: float = 0.0, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(10, width, bias=False), nn.LayerNorm(width, elementwise_affine=False), nn.ReLU())
        self.head = nn.Linear(width, 4)
        self.lr, self.momentum = lr, momentum

    def forward(self, x):
        return self.head(self.body(x))

    def data_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def data(n: int, batch: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 10, generator=g), torch.randint(0, 4, (batch,), generator=g)) for _ in range(n)]


def trainer(tmp_path, callbacks, **kw):
    kw = {"max_epochs": 1, "log_every_n_steps": 3, **kw}
    return L.Trainer(callbacks=callbacks, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, **kw)


# ---- one step, by hand -------------------------------------------------------------------------


def test_one_step_measured_against_its_definitions():
    model = NormNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    reg = Regularization("l2", strength=0.05, exclude=["bias"])
    term = reg.term
    term.bind(model, [opt])
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    weights = [a.param for a in term.assignments]
    before = [w.detach().clone() for w in weights]
    data_grads = [w.grad.clone() for w in weights]
    telemetry = StepTelemetry(term)
    telemetry.before_step()
    term.apply()  # coupled: g += λw
    opt.step()
    got = telemetry.after_step()
    assert not telemetry.pending
    angles = [direct_angle(a, w.detach()) for a, w in zip(before, weights)]
    assert got["weights/angular_update"] == pytest.approx(math.sqrt(sum(t * t for t in angles) / 2), rel=1e-4)
    eff = [0.3 / float(w.detach().double().square().sum()) for w in weights]
    assert got["weights/effective_lr"] == pytest.approx(math.sqrt(sum(e * e for e in eff) / 2), rel=1e-6)
    reg_norm = 0.05 * math.sqrt(sum(float(a.double().square().sum()) for a in before))
    data_norm = math.sqrt(sum(float(g.double().square().sum()) for g in data_grads))
    assert got["weights/grad_ratio"] == pytest.approx(reg_norm / data_norm, rel=1e-6)
    assert got["weights/equilibrium_angle"] == pytest.approx(math.sqrt(2 * 0.3 * 0.05))


def test_penalty_gradient_of_other_penalties_and_no_prediction():
    model = NormNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    term = Regularization(L1(), strength=0.01, include=["body.0.weight"]).term
    term.bind(model, [opt])
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    g = model.body[0].weight.grad.clone()
    telemetry = StepTelemetry(term)
    telemetry.before_step()
    opt.step()
    got = telemetry.after_step()
    n = model.body[0].weight.numel()  # no exact zeros: ‖sign(w)‖ = √n
    assert got["weights/grad_ratio"] == pytest.approx(0.01 * math.sqrt(n) / float(g.double().norm()), rel=1e-6)
    assert "weights/equilibrium_angle" not in got  # L1 has no rotational equilibrium


def test_tensors_without_a_gradient_are_left_out():
    model = NormNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    term = Regularization("l2", strength=0.01, exclude=["bias"]).term
    term.bind(model, [opt])
    telemetry = StepTelemetry(term)
    telemetry.before_step()  # no backward yet: nothing steps, nothing is kept
    assert not telemetry.pending and telemetry.after_step() == {}


# ---- in a Trainer ------------------------------------------------------------------------------


class Recorder(L.Callback):
    """The test's own snapshots: w before each logging step's update and after it."""

    def __init__(self, name="body.0.weight"):
        self.name, self.before, self.angles = name, None, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if is_logging_step(trainer):
            self.before = dict(pl_module.named_parameters())[self.name].detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before is not None:
            self.angles.append(direct_angle(self.before, dict(pl_module.named_parameters())[self.name]))
            self.before = None


@pytest.mark.parametrize("accumulate", [1, 3])
def test_logged_angle_is_the_angle_of_each_logged_optimizer_step(tmp_path, accumulate, monkeypatch):
    calls = []
    original = StepTelemetry.before_step
    monkeypatch.setattr(StepTelemetry, "before_step", lambda self: (calls.append(1), original(self))[1])
    recorder = Recorder()
    reg = Regularization("l2", strength=0.02, include=["body.0.weight"])
    t = trainer(tmp_path, [recorder, reg], accumulate_grad_batches=accumulate)
    t.fit(NormNet(), Batches(data(36)))
    rows = read_metrics(t.logger)
    logged = column(rows, "weights/angular_update/l2")
    steps = 36 // accumulate
    assert t.global_step == steps
    assert len(logged) == steps // 3 == len(recorder.angles) == len(calls)  # once per logged optimizer step
    assert logged == pytest.approx(recorder.angles, rel=1e-4)
    assert len(column(rows, "weights/effective_lr/l2")) == len(column(rows, "weights/grad_ratio/l2")) == len(logged)
    assert column(rows, "weights/equilibrium_angle/l2") == pytest.approx([math.sqrt(2 * 0.3 * 0.02)] * len(logged))
    assert reg.scale_invariant == {"body.0.weight": True}


def test_dynamics_off_logs_nothing_and_probes_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(StepTelemetry, "before_step", lambda self: calls.append(1))
    reg = Regularization("l2", strength=0.02, exclude=["bias"], dynamics=False)
    t = trainer(tmp_path, [reg])
    t.fit(NormNet(), Batches(data(9)))
    keys = set(read_metrics(t.logger)[0])
    assert not calls and reg.scale_invariant == {}
    assert "weights/norm/l2" in keys and not any(k.startswith(("weights/angular", "weights/effective", "weights/grad",
                                                               "weights/equilibrium")) for k in keys)
    assert repr(reg) == "Regularization(L2(), strength=0.02, mode=Coupled(), include=[], exclude=['bias'], " \
                        "scale='none', name='l2', dynamics=False)"
    with pytest.raises(ValueError, match="dynamics='yes'"):
        Regularization("l2", dynamics="yes")


def test_no_logger_no_measurement(monkeypatch):
    calls = []
    monkeypatch.setattr(StepTelemetry, "before_step", lambda self: calls.append(1))
    L.Trainer(max_epochs=1, callbacks=[Regularization("l2", strength=0.02)], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(NormNet(), Batches(data(4)))
    assert not calls
