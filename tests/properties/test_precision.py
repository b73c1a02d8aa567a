"""Mixed precision: penalties in float32 at least; a step skipped by the GradScaler applies
no coupled, decoupled or proximal update."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision

from regfit import Regularization
from regfit.penalties import L1, L2, LHalf
from tests.helpers import TinyNet, batches, fit
from tests.helpers import column, read_metrics

MODES = {"coupled": L2(), "decoupled": L2(), "proximal": L1()}
SKIP_STEP = 2


@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_mixed_trains_finite_with_float32_penalties(mode, tmp_path):
    data = batches(12, dtype=torch.float32)
    model = TinyNet(dtype=torch.float32, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    unregularized = copy.deepcopy(model)
    reg = Regularization(MODES[mode], strength=0.05, mode=mode, exclude=["bias", "norm"])
    logger = CSVLogger(tmp_path)
    fit(model, data, [reg], precision="bf16-mixed", logger=logger, log_every_n_steps=4)
    fit(unregularized, data, [Regularization(MODES[mode], strength=0.0, mode=mode)], precision="bf16-mixed")
    assert reg.penalty_value().dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logged = column(read_metrics(logger), "train/penalty")
    assert len(logged) == 3 and all(v > 0 for v in logged)
    # the term acted: the regularized weights are smaller than the unregularized ones
    assert model.body[0].weight.norm() < 0.99 * unregularized.body[0].weight.norm()


def test_penalty_of_half_precision_weights_is_summed_in_float32():
    # 4096 entries of 1.0 in bf16: a bf16 running sum stalls at 256; float32 gets it exactly.
    w = torch.ones(4096, dtype=torch.bfloat16)
    for penalty, expected in ((L2(), 2048.0), (L1(), 4096.0), (LHalf(), 4096.0)):
        total = penalty.total([w], [1.0])
        assert total.dtype == torch.float32 and total.item() == expected, penalty


class InfAt(TinyNet):
    """The data loss is inf at one step: the GradScaler finds inf gradients and skips it."""

    def data_loss(self, batch):
        loss = super().data_loss(batch)
        return loss * float("inf") if self.trainer.global_step == SKIP_STEP else loss


class Watch(L.Callback):
    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[batch_idx] = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[batch_idx] = copy.deepcopy(pl_module.state_dict())


def check_skipped_step_applies_nothing(mode: str, accelerator: str, **trainer_kwargs) -> None:
    model = InfAt(dtype=torch.float32, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    watch = Watch()
    # λ large enough that one decay / prox step is visible in every weight
    trainer = fit(model, batches(5, dtype=torch.float32), [Regularization(MODES[mode], strength=0.1, mode=mode), watch],
                  accelerator=accelerator, **trainer_kwargs)
    scaler = trainer.precision_plugin.scaler
    assert scaler is not None and scaler.get_scale() < 2.0**16  # the scaler did skip a step (and backed off)
    for k, v in watch.before[SKIP_STEP].items():
        assert torch.equal(v, watch.after[SKIP_STEP][k]), f"{mode}: {k} changed on the skipped step"
    for k, v in watch.before[SKIP_STEP + 1].items():  # and the next, real step does change them
        if k.endswith("weight"):
            assert not torch.equal(v, watch.after[SKIP_STEP + 1][k]), f"{mode}: {k} unchanged on a real step"


@pytest.mark.parametrize("mode", list(MODES))
def test_step_skipped_by_grad_scaler_applies_no_update_cpu(mode):
    # fp16 autocast with a real torch.amp.GradScaler on CPU (Lightning's "16-mixed" flag
    # itself maps to bf16 on CPU, so the plugin is built by hand).
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    check_skipped_step_applies_nothing(mode, "cpu", plugins=[plugin])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", list(MODES))
def test_step_skipped_by_grad_scaler_applies_no_update_cuda(mode):
    check_skipped_step_applies_nothing(mode, "gpu", precision="16-mixed")
