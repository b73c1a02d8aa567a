"""Strength schedules: values at given steps, their effect on the update, logging, resume."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from regfit import Regularization
from regfit.penalties import L1, L2
from regfit.schedules import Constant, Cosine, FollowLR, LinearWarmup, Step
from tests.helpers import Batches, TinyNet, batches, fit


def test_schedule_values_at_given_steps():
    assert [Constant()(t) for t in (0, 7, 10**6)] == [1.0, 1.0, 1.0]
    assert [LinearWarmup(10)(t) for t in (0, 1, 5, 10, 11, 500)] == [0.0, 0.1, 0.5, 1.0, 1.0, 1.0]
    assert LinearWarmup(4, start=0.2)(2) == pytest.approx(0.6)
    c = Cosine(total_steps=110, warmup_steps=10, final=0.1)
    assert c(0) == 0.0 and c(5) == 0.5 and c(10) == pytest.approx(1.0)
    assert c(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(π/2) = 0
    assert c(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert c(110) == pytest.approx(0.1) and c(10**5) == pytest.approx(0.1)
    assert [Step(step_size=3, gamma=0.5)(t) for t in (0, 2, 3, 5, 6, 9)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    assert FollowLR()(123, lr_ratio=0.25) == 0.25 and FollowLR()(0) == 1.0


@pytest.mark.parametrize("make, match", [
    (lambda: LinearWarmup(0), "warmup_steps"),
    (lambda: LinearWarmup(2.5), "warmup_steps"),
    (lambda: Cosine(total_steps=10, warmup_steps=10), "warmup must end"),
    (lambda: Cosine(total_steps=10, final=-1.0), "final"),
    (lambda: Step(step_size=0), "step_size"),
    (lambda: Step(step_size=5, gamma=float("nan")), "gamma"),
])
def test_bad_schedule_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_regularization_rejects_a_non_schedule():
    with pytest.raises(ValueError, match="regfit.schedules"):
        Regularization(L2(), schedule=lambda step: 1.0)


def zero_data_gradient(model):
    """Make the data loss contribute nothing, so only the penalty moves the weights."""
    model.data_loss = lambda batch, m=model: 0.0 * m(batch[0]).sum()
    return model


@pytest.mark.parametrize("schedule", [LinearWarmup(4), Cosine(total_steps=8, warmup_steps=2, final=0.1), Step(3, 0.5)],
                         ids=lambda s: type(s).__name__)
def test_schedule_sets_the_strength_of_each_step(schedule):
    """SGD + coupled L2 with zero data gradient: w_T = w_0 · Π_t (1 − lr·λ·m(t)), t = 0..T−1."""
    lr, lam, steps = 0.1, 0.5, 10
    model = zero_data_gradient(TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=lr)))
    before = model.head.weight.detach().clone()
    fit(model, batches(steps), [Regularization(L2(), strength=lam, schedule=schedule)])
    factor = math.prod(1 - lr * lam * schedule(t) for t in range(steps))
    assert torch.allclose(model.head.weight, before * factor, rtol=1e-12, atol=0)


def test_follow_lr_tracks_the_lr_scheduler():
    """FollowLR with coupled L2: λ_t = λ·lr_t/lr_0, so the shrink per step is 1 − lr_t·λ·lr_t/lr_0."""
    lr, lam, steps = 0.2, 0.5, 6
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # noqa: E731
    model = zero_data_gradient(ScheduledNet(lr, sched, opt=torch.optim.SGD))
    before = model.head.weight.detach().clone()
    fit(model, batches(steps), [Regularization(L2(), strength=lam, schedule=FollowLR())])
    lrs = [lr * 0.5 ** (t // 2) for t in range(steps)]
    factor = math.prod(1 - lr_t * lam * (lr_t / lr) for lr_t in lrs)
    assert torch.allclose(model.head.weight, before * factor, rtol=1e-12, atol=0)


def test_strength_is_logged_per_term_on_logging_steps(tmp_path):
    logger = CSVLogger(tmp_path)
    schedule = LinearWarmup(4)
    fit(TinyNet(dtype=torch.float32), batches(8, dtype=torch.float32),
        [Regularization(L2(), strength=0.1, schedule=schedule), Regularization(L1(), strength=0.01)],
        logger=logger, log_every_n_steps=2)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/strength/l2")]
    # logged after steps 2, 4, 6, 8 (step index t = 1, 3, 5, 7 when each update was made)
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7]
    assert [float(r["train/strength/l2"]) for r in rows] == pytest.approx([0.1 * schedule(t) for t in (1, 3, 5, 7)])
    assert all(float(r["train/strength/l1"]) == pytest.approx(0.01) for r in rows)


class ScheduledNet(TinyNet):
    def __init__(self, lr=0.05, scheduler=None, opt=torch.optim.Adam, **kw):
        super().__init__(**kw)
        self.lr, self.scheduler, self.opt = lr, scheduler, opt

    def configure_optimizers(self):
        opt = self.opt(self.parameters(), lr=self.lr)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


class RecordStrength(L.Callback):
    """The strength each term applies, read when the update is made."""

    def __init__(self):
        self.seen = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for cb in trainer.callbacks:
            if isinstance(cb, Regularization):
                self.seen.setdefault(cb.name, {})[trainer.global_step] = cb.term.strength_now()


def test_schedule_position_survives_resume(tmp_path):
    """λ at step k after a resume equals λ at step k without, and so do the weights."""
    data = Batches(batches(5))
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)  # noqa: E731

    def terms():
        return [Regularization(L2(), strength=0.05, schedule=Cosine(total_steps=20, warmup_steps=4), name="cos"),
                Regularization(L1(), strength=1e-3, mode="decoupled", schedule=FollowLR(), name="follow")]

    def trainer(max_epochs, rec):
        return L.Trainer(max_epochs=max_epochs, callbacks=[*terms(), rec], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)

    whole = ScheduledNet(0.01, sched)
    halves = copy.deepcopy(whole)
    rec_whole, rec_a, rec_b = RecordStrength(), RecordStrength(), RecordStrength()
    trainer(4, rec_whole).fit(whole, data)

    first = trainer(2, rec_a)
    first.fit(halves, data)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed = ScheduledNet(0.01, sched, seed=123)  # other initial weights: all must come from the checkpoint
    trainer(4, rec_b).fit(resumed, data, ckpt_path=tmp_path / "half.ckpt")

    for name in ("cos", "follow"):
        assert sorted(rec_b.seen[name]) == list(range(10, 20))
        combined = {**rec_a.seen[name], **rec_b.seen[name]}
        assert combined == rec_whole.seen[name]  # exactly the same λ_t at every step
    assert rec_whole.seen["follow"][19] == pytest.approx(1e-3 * 0.7 ** 6)
    assert max((a - b).abs().max().item() for a, b in zip(whole.parameters(), resumed.parameters())) == 0.0
