"""``RegModule``: the LightningModule base class of regfit models.

A subclass implements ``forward`` and ``data_loss(batch)``. RegModule trains on the data
loss, lets the :class:`~regfit.Regularization` callbacks add their penalties, and logs
data loss and penalty separately, so "my cost rises while accuracy improves" can be read
off the curves (the penalty term is growing, not the data loss).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from regfit.regularization import is_logging_step, regularizations
from regfit.selection import last_parametrized_module

__all__ = ["RegModule"]


class RegModule(pl.LightningModule):
    """LightningModule whose training objective is ``data_loss + Σ_terms λ·Σ c·R(w)``.

    Subclasses implement :meth:`forward` and :meth:`data_loss`; they may override
    :meth:`last_layer`, :meth:`validation_step` (call ``super()`` to keep
    ``val/data_loss``) and ``configure_optimizers`` (LightningCLI supplies one from the
    ``optimizer:`` section). Logged metrics:

    * ``train/data_loss`` (each step) and ``train/data_loss_epoch`` (epoch mean), ``train/penalty``, ``train/loss`` (= data +
      penalty) and ``train/penalty/<term>`` on logging steps;
    * ``val/data_loss`` (epoch, synchronized across processes).

    If you override ``training_step``, call :meth:`log_penalty` with the data loss to keep
    the penalty curves.
    """

    def data_loss(self, batch: Any) -> Tensor:
        """The task loss of one batch (e.g. cross-entropy); no penalty in it."""
        raise NotImplementedError(f"{type(self).__name__} must implement data_loss(batch).")

    def last_layer(self) -> nn.Module | None:
        """The module the ``last_layer`` selector keyword means (default: the last module
        owning parameters, in registration order). Override to name your head."""
        return last_parametrized_module(self)

    # ---- steps --------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.data_loss(batch)
        # Two names rather than Lightning's automatic _step/_epoch suffixes, so the step
        # curve keeps the documented name train/data_loss.
        self.log("train/data_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        # The epoch mean is averaged over processes (one all-reduce per epoch); the step value
        # is this process's micro-batch loss (rank 0's under DDP), not synchronized per step.
        self.log("train/data_loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log_penalty(loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.data_loss(batch)
        self.log("val/data_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.data_loss(batch)
        self.log("test/data_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    # ---- penalties ----------------------------------------------------------------------
    def penalty_values(self) -> dict[str, Tensor]:
        """Each term's current λ·Σ c·R(w), keyed by term name (no autograd graph)."""
        return {cb.name: cb.penalty_value() for cb in regularizations(self._trainer)}

    def log_penalty(self, data_loss: Tensor) -> None:
        """Log ``train/penalty``, ``train/loss`` and ``train/penalty/<term>``.

        Computed only on steps whose metrics reach the loggers: the value is not needed
        for the gradient (the callbacks inject that in closed form), so other steps pay
        nothing for it.
        """
        if self._trainer is None or not is_logging_step(self.trainer):
            return
        values = self.penalty_values()
        total = torch.stack(list(values.values())).sum() if values else torch.zeros((), device=data_loss.device)
        total = total.to(data_loss.device)
        self.log("train/penalty", total, on_step=True, on_epoch=False)
        # at least float32 (a bf16 loss is upcast), and float64 stays float64
        data = data_loss.detach().to(torch.promote_types(data_loss.dtype, torch.float32))
        self.log("train/loss", data + total, on_step=True, on_epoch=False)
        for name, value in values.items():
            self.log(f"train/penalty/{name}", value.to(data_loss.device), on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Clip the data gradient, then add the coupled penalty gradients: the same order as
        # torch's weight_decay, which is added inside optimizer.step after any clipping.
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for cb in regularizations(self._trainer):
            cb.after_gradient_clipping(optimizer)

