"""regfit.timescale: weight decay given as a time constant; λ resolved from the trainer's
steps per epoch and the base lr, exactly one of strength/timescale, resume-exact."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from regfit import Regularization, attach
from regfit.modes import Coupled, Decoupled
from regfit.penalties import L1, L2
from regfit.regularization import steps_per_epoch
from regfit.timescale import check_timescale, decay_gain, timescale_strength
from tests.helpers import Batches, TinyNet, batches, column, read_metrics

N_SAMPLES = 192


def adam(lr=1e-3):
    return lambda p: torch.optim.Adam(p, lr=lr)


def sgd(lr=0.05, **kw):
    return lambda p: torch.optim.SGD(p, lr=lr, **kw)


def run(reg, optimizer, batch_size, epochs=1, tmp_path=None, ckpt=None, model=None, **kw):
    """Fit TinyNet on the same N_SAMPLES samples cut into batches of ``batch_size``."""
    data = batches(N_SAMPLES // batch_size, batch_size=batch_size)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[reg], logger=CSVLogger(tmp_path) if tmp_path else False,
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, deterministic=True, **kw)
    model = model or TinyNet(optimizer=optimizer)
    trainer.fit(model, Batches(data), ckpt_path=ckpt)
    return trainer, model


# ---- the arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"epoch": 5}, {"epochs": 5, "steps": 100}, {"epochs": 0}, {"steps": -1},
                                 {"epochs": float("nan")}, {"epochs": "5"}, 5, "5 epochs"])
def test_timescale_must_be_one_unit_and_a_positive_number(bad):
    with pytest.raises(ValueError, match="timescale="):
        check_timescale(bad)


def test_exactly_one_of_strength_and_timescale():
    assert Regularization("l2").strength == 1e-4  # neither: the default λ
    with pytest.raises(ValueError, match="give strength or timescale, not both"):
        Regularization("l2", strength=1e-3, timescale={"epochs": 5}, mode="decoupled")
    reg = Regularization("l2", timescale={"epochs": 5}, mode="decoupled")
    assert math.isnan(reg.strength)  # resolved at train start
    assert repr(reg) == ("Regularization(L2(), timescale={'epochs': 5.0}, mode=Decoupled(step='lr'), include=[], "
                         "exclude=[], scale='none', name='l2')")
    assert reg.config()["timescale"] == "{'epochs': 5.0}" and reg.config()["strength"] == "None"
    assert "timescale" not in Regularization("l2", strength=1e-3).config()  # older checkpoints compare equal
    with pytest.raises(ValueError, match="change the timescale"):
        reg.strength = 1e-3


@pytest.mark.parametrize(("penalty", "mode", "match"), [
    (L1(), "decoupled", "L1 does not shrink w in proportion"),
    (L2(), "proximal", "not for Proximal"),
    (L2(), "cautious", "not for CautiousDecoupled"),
])
def test_timescale_only_where_it_means_something(penalty, mode, match):
    with pytest.raises(ValueError, match=match):
        Regularization(penalty, timescale={"epochs": 5}, mode=mode)


def test_gain_per_mode_and_optimizer():
    w = torch.zeros(1, requires_grad=True)
    sgdm = torch.optim.SGD([w], lr=0.1, momentum=0.9, dampening=0.5)
    assert decay_gain(sgdm, sgdm.param_groups[0], Coupled(), 0.1) == pytest.approx(0.1 * 0.5 / 0.1)
    nesterov = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
    assert decay_gain(nesterov, nesterov.param_groups[0], Coupled(), 0.1) == pytest.approx(0.1 / 0.1)
    opt = torch.optim.Adam([w], lr=1e-3)
    assert decay_gain(opt, opt.param_groups[0], Decoupled(), 1e-3) == 1e-3
    assert decay_gain(opt, opt.param_groups[0], Decoupled(step="corrected"), 1e-3) == 1e-3
    assert decay_gain(opt, opt.param_groups[0], Decoupled(step="independent"), 1e-3) == 1.0  # lr_t/lr_0
    with pytest.raises(ValueError, match="needs torch.optim.SGD.*Adam divides"):
        decay_gain(opt, opt.param_groups[0], Coupled(), 1e-3)
    assert timescale_strength({"steps": 1000}, 1e-3, None) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="only known to a Lightning Trainer"):
        timescale_strength({"epochs": 5}, 1e-3, None)


# ---- resolved from the trainer ---------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [16, 64])
def test_decoupled_timescale_gives_lambda_eta_steps_per_epoch_one_over_tau(batch_size, tmp_path):
    tau, lr = 4.0, 1e-3
    reg = Regularization("l2", timescale={"epochs": tau}, mode="decoupled")
    trainer, _ = run(reg, adam(lr), batch_size, tmp_path=tmp_path)
    spe = N_SAMPLES // batch_size
    assert steps_per_epoch(trainer) == spe == trainer.global_step
    assert reg.strength * lr * spe == pytest.approx(1 / tau, rel=1e-12)
    logged = column(read_metrics(trainer.logger), "train/strength/l2")
    assert logged and logged == pytest.approx([reg.strength] * len(logged), rel=1e-6)


def test_steps_per_epoch_counts_optimizer_steps_under_accumulation():
    reg = Regularization("l2", timescale={"epochs": 2}, mode="decoupled")
    trainer, _ = run(reg, adam(1e-3), 16, accumulate_grad_batches=5)  # 12 batches → steps at 5, 10, 12
    assert trainer.global_step == steps_per_epoch(trainer) == 3
    assert reg.strength == pytest.approx(1 / (1e-3 * 2 * 3))


def test_coupled_sgd_timescale_counts_the_momentum():
    reg = Regularization("l2", timescale={"steps": 50})
    run(reg, sgd(lr=0.05, momentum=0.9), 16)
    assert reg.strength == pytest.approx((1 - 0.9) / (0.05 * 50))  # the momentum multiplies the decay by 10


def test_timescale_steps_is_the_decay_time_constant():
    """No data gradient: decoupled L2 alone shrinks w by e after τ steps (to first order)."""

    class Frozen(TinyNet):
        def data_loss(self, batch):
            return sum(p.sum() for p in self.parameters()) * 0.0  # a zero gradient

    model = Frozen(optimizer=sgd(lr=0.01))
    start = model.head.weight.detach().clone()
    run(Regularization("l2", timescale={"steps": 12}, mode="decoupled"), None, 16, model=model)  # 12 steps
    shrink = float(model.head.weight.detach().norm() / start.norm())
    assert shrink == pytest.approx((1 - 1 / 12) ** 12) and shrink == pytest.approx(math.exp(-1), rel=0.05)


def test_refused_at_fit_start_with_the_fix():
    with pytest.raises(ValueError, match="mode='decoupled'"):
        run(Regularization("l2", timescale={"epochs": 1}), adam(), 16)  # coupled + Adam

    class TwoGroups(TinyNet):
        def configure_optimizers(self):
            return torch.optim.Adam([{"params": self.body.parameters()}, {"params": self.head.parameters(), "lr": 0.1}],
                                    lr=1e-3)

    with pytest.raises(ValueError, match="different base learning rates.*Split the term"):
        run(Regularization("l2", timescale={"epochs": 1}, mode="decoupled"), None, 16, model=TwoGroups())


def test_attach_takes_a_timescale_in_steps_only():
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    hooks = attach(model, opt, Regularization("l2", timescale={"steps": 500}, mode="decoupled"))
    assert hooks.terms[0].strength == pytest.approx(1 / (1e-3 * 500))
    hooks.remove()
    with pytest.raises(ValueError, match=r"timescale=\{'steps': epochs × steps_per_epoch\}"):
        attach(model, opt, Regularization("l2", timescale={"epochs": 5}, mode="decoupled"))


# ---- resume ----------------------------------------------------------------------------------


def test_resume_is_exact_and_a_new_batch_size_resolves_the_same_timescale(tmp_path):
    make = lambda: Regularization("l2", timescale={"epochs": 3}, mode="decoupled")  # noqa: E731
    _, straight = run(make(), adam(1e-2), 16, epochs=4)
    first, half = run(make(), adam(1e-2), 16, epochs=2)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed = TinyNet(seed=7, optimizer=adam(1e-2))
    reg = make()
    run(reg, None, 16, epochs=4, ckpt=tmp_path / "half.ckpt", model=resumed)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    state = torch.load(tmp_path / "half.ckpt", weights_only=False)["callbacks"][reg.state_key]
    assert state["config"]["timescale"] == "{'epochs': 3.0}" and state["strength"] == reg.strength
    with pytest.warns(UserWarning, match=r"gives λ=.* in this run and gave λ=.*the same timescale"):
        other = make()
        run(other, None, 32, epochs=3, ckpt=tmp_path / "half.ckpt", model=TinyNet(optimizer=adam(1e-2)))
    assert other.strength * 1e-2 * (N_SAMPLES // 32) == pytest.approx(1 / 3)


def test_timescale_set_mid_run_is_resolved_at_once():
    reg = Regularization("l2", timescale={"epochs": 2}, mode="decoupled")
    run(reg, adam(1e-3), 16)
    reg.timescale = {"epochs": 4}
    assert reg.strength == pytest.approx(1 / (1e-3 * 4 * 12))
    with pytest.raises(ValueError, match="was given a strength"):
        Regularization("l2", strength=1e-3).timescale = {"epochs": 1}
