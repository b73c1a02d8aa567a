"""The Regularization callback on the modules researchers write: clipping hooks of their own,
plain LightningModules, manual optimization, fine-tuning callbacks that unfreeze tensors,
λ changed mid-run, custom training steps, SWA, and optimizers that already decay."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BackboneFinetuning, StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from regfit import RegModule, Regularization
from regfit.penalties import L2
from tests.helpers import Batches, TinyNet, batches, column, fit, max_param_diff, read_metrics, reference_loop

LAM = 1e-2


class ClipsItself(TinyNet):
    """Lightning's documented pattern: configure_gradient_clipping without super()."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(self.parameters(), 0.1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def test_a_clipping_hook_without_super_keeps_the_coupled_term_after_clipping():
    data = batches(30)
    model = ClipsItself()
    ref = copy.deepcopy(model)
    fit(model, data, [Regularization(L2(), strength=0.05)])
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05), data, clip=0.1)
    assert max_param_diff(model, ref) <= 1e-12


class Plain(L.LightningModule):
    """A LightningModule that knows nothing of regfit."""

    def __init__(self, lr: float = 0.5):
        super().__init__()
        self.net = TinyNet()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def test_a_plain_lightning_module_is_regularized_too():
    """The step engine hangs on the optimizer's hooks, not on RegModule."""
    data = batches(50)
    plain = Plain(lr=0.05)
    ref = copy.deepcopy(plain.net)
    fit(plain, data, [Regularization(L2(), strength=1e-2)])
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2), data)
    assert max_param_diff(plain.net, ref) == 0.0


def test_a_plain_lightning_module_with_clipping_gets_the_coupled_gradient_after_clipping():
    data = batches(30)
    plain = Plain()
    ref = copy.deepcopy(plain.net)
    fit(plain, data, [Regularization(L2(), strength=0.05)], gradient_clip_val=0.1)
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05), data, clip=0.1)
    assert max_param_diff(plain.net, ref) <= 1e-12


class Manual(Plain):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        self.manual_backward(F.cross_entropy(self.net(x), y))
        self.clip_gradients(opt, gradient_clip_val=0.1, gradient_clip_algorithm="norm")
        opt.step()


def test_manual_optimization_gets_the_same_step():
    data = batches(30)
    model = Manual()
    ref = copy.deepcopy(model.net)
    fit(model, data, [Regularization(L2(), strength=0.05)])
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05), data, clip=0.1)
    assert max_param_diff(model.net, ref) <= 1e-12


class Finetuned(RegModule):
    """BackboneFinetuning's layout: a frozen ``backbone`` unfrozen at an epoch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(12, 16), nn.Tanh()).double()
        self.head = nn.Linear(16, 3).double()

    def forward(self, x):
        return self.head(self.backbone(x))

    def data_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)


def test_tensors_unfrozen_mid_fit_are_regularized_from_then_on():
    """BackboneFinetuning freezes the backbone, then unfreezes it into a new param group:
    the term binds again at the next step and decays the backbone with that group's lr."""
    data = batches(4)
    runs = {}
    for lam in (0.0, 0.5):
        model = Finetuned()
        reg = Regularization(L2(), strength=lam, mode="decoupled")
        fit(model, data, [BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False), reg], max_epochs=2)
        runs[lam] = (model, reg)
    model, reg = runs[0.5]
    assert "backbone.0.weight" in [a.name for a in reg.term.assignments]
    bucket = next(b for b in reg.term.buckets if "backbone.0.weight" in b.names)
    assert bucket.group is model.trainer.optimizers[0].param_groups[1]  # the group BackboneFinetuning added
    # with λ > 0 the backbone moved differently in epoch 2: the term acted on it
    assert max_param_diff(runs[0.0][0].backbone, model.backbone) > 1e-4


class SetsStrength(L.Callback):
    def __init__(self, reg, at, value):
        self.reg, self.at, self.value = reg, at, value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            self.reg.strength = self.value


def test_strength_can_be_changed_mid_run_and_logs_and_checkpoints_follow(tmp_path):
    reg = Regularization(L2(), strength=LAM)
    with pytest.raises(ValueError, match="strength=-5 must be a finite number ≥ 0"):
        reg.strength = -5
    with pytest.raises(ValueError, match="strength=nan"):
        reg.term.strength = float("nan")
    logger = CSVLogger(tmp_path)
    data = batches(10, dtype=torch.float32)
    trainer = L.Trainer(max_epochs=1, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[SetsStrength(reg, 4, 0.5), reg])
    trainer.fit(TinyNet(dtype=torch.float32), Batches(data))
    strengths = column(read_metrics(logger), "train/strength/l2")
    assert strengths[:4] == pytest.approx([LAM] * 4) and strengths[4:] == [0.5] * 6
    ckpt = tmp_path / "end.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"][reg.state_key]
    assert state["strength"] == 0.5 and "0.01" in state["config"]["strength"]
    # resuming with the configured λ continues with the one the run had reached
    resumed = Regularization(L2(), strength=LAM)
    again = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=[resumed])
    again.fit(TinyNet(dtype=torch.float32), Batches(data), ckpt_path=ckpt)
    assert resumed.strength == 0.5


class CustomStep(TinyNet):
    """A training_step of its own that never calls log_penalty."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def test_a_custom_training_step_keeps_the_penalty_curves(tmp_path):
    logger = CSVLogger(tmp_path)
    fit(CustomStep(dtype=torch.float32), batches(10, dtype=torch.float32), [Regularization(L2(), strength=LAM)],
        logger=logger, log_every_n_steps=5)
    rows = read_metrics(logger)
    assert len(column(rows, "train/penalty")) == 2 and len(column(rows, "train/penalty/l2")) == 2
    assert len(column(rows, "train/loss")) == 2
    for r in rows:
        if r.get("train/loss"):
            assert float(r["train/loss"]) > float(r["train/penalty"]) > 0


def test_a_plain_module_logs_the_penalty_totals_too(tmp_path):
    logger = CSVLogger(tmp_path)
    fit(Plain(), batches(10), [Regularization(L2(), strength=LAM)], logger=logger, log_every_n_steps=5)
    rows = read_metrics(logger)
    assert len(column(rows, "train/penalty")) == 2 and len(column(rows, "train/loss")) == 2


def test_a_model_output_as_data_loss_says_return_its_loss():
    from transformers.modeling_outputs import CausalLMOutput

    class ReturnsOutput(TinyNet):
        def data_loss(self, batch):
            x, y = batch
            logits = self(x)
            return CausalLMOutput(loss=F.cross_entropy(logits, y), logits=logits.repeat(100, 100))

    with pytest.raises(ValueError, match=r"returned a CausalLMOutput .*return its loss: `return self.model\(\*\*batch\).loss`") as err:
        fit(ReturnsOutput(), batches(2))
    assert len(str(err.value)) < 400  # the message, not the logits


class BatchNormNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3).double()

    def forward(self, x):
        return self.bn(super().forward(x))


def test_swa_batch_norm_epoch_adds_no_coupled_gradient(monkeypatch):
    """Lightning's SWA runs one more epoch with backward skipped and one optimizer step on
    stale gradients: the engine runs no phase for it."""
    from regfit.term import Term

    calls = []
    original = Term.apply

    def spy(self, group_ids=None, grad_scale=1.0):
        calls.append(self._trainer_skip())
        return original(self, group_ids, grad_scale)

    model = BatchNormNet()
    data = batches(4)
    reg = Regularization(L2(), strength=LAM)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1, annealing_epochs=1)
    trainer_box = {}

    class Grab(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            trainer_box["t"] = trainer

    monkeypatch.setattr(Term, "_trainer_skip", lambda self: bool(trainer_box["t"].fit_loop._skip_backward), raising=False)
    monkeypatch.setattr(Term, "apply", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(model, data, [Grab(), swa, reg], max_epochs=2)
    assert calls and not any(calls)  # applied on real steps only, never while backward is skipped


def test_an_optimizer_that_already_decays_is_reported_at_fit_start():
    class AdamWNet(TinyNet):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)  # weight_decay=0.01 by default

    with pytest.warns(UserWarning, match=r"AdamW's own weight_decay=0.01 also decays the 3 tensors .* decayed twice"):
        fit(AdamWNet(), batches(2), [Regularization(L2(), exclude=["bias", "norm"])])


def test_lbfgs_is_refused_at_fit_start():
    class LBFGSNet(TinyNet):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(ValueError, match="LBFGS evaluates its closure several times"):
        fit(LBFGSNet(), batches(2), [Regularization(L2())])


def test_a_term_whose_own_step_diverges_is_refused_at_fit_start():
    class BigLR(TinyNet):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=10.0)

    with pytest.raises(ValueError, match=r"\|1 − lr·λ·c\| = 9 > 1"):
        fit(BigLR(), batches(2), [Regularization(L2(), strength=1.0)])
    with pytest.raises(ValueError, match=r"decoupled step η·λ·c = 10 ≥ 1"):
        fit(BigLR(), batches(2), [Regularization(L2(), strength=1.0, mode="decoupled")])


def test_repr_and_config_come_from_the_terms_settings():
    reg = Regularization(L2(), strength=LAM, exclude=["bias"], on_nonfinite="skip")
    assert repr(reg) == ("Regularization(L2(), strength=0.01, mode=Coupled(), include=[], exclude=['bias'], "
                         "scale='none', name='l2', on_nonfinite='skip')")
    assert reg.config()["on_nonfinite"] == "'skip'"
    assert set(reg.config()) == set(reg.term.settings())
