"""``RegModule``: the LightningModule base class of regfit models.

A subclass implements ``forward`` and ``data_loss(batch)``. RegModule trains on the data
loss, lets the :class:`~regfit.Regularization` callbacks add their penalties, and logs
data loss and penalty separately, so "my cost rises while accuracy improves" can be read
off the curves (the penalty term is growing, not the data loss).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.data import extract_batch_size
import torch
from torch import Tensor, nn

from regfit.regularization import is_logging_step, regularizations
from regfit.selection import last_parametrized_module

__all__ = ["RegModule"]


def _batch_size(batch: Any) -> int:
    """The batch size Lightning's own ``on_epoch`` means weight by (1 if none is found)."""
    try:
        return extract_batch_size(batch)
    except MisconfigurationException:
        return 1


class RegModule(pl.LightningModule):
    """LightningModule whose training objective is ``data_loss + Σ_terms λ·Σ c·R(w)``.

    Subclasses implement :meth:`forward` and :meth:`data_loss`; they may override
    :meth:`last_layer`, :meth:`validation_step` (call ``super()`` to keep
    ``val/data_loss``) and ``configure_optimizers`` (LightningCLI supplies one from the
    ``optimizer:`` section). Logged metrics:

    * ``train/data_loss`` (each step) and ``train/data_loss_epoch`` (epoch mean), ``train/penalty``, ``train/loss`` (= data +
      penalty) and ``train/penalty/<term>`` on logging steps;
    * ``train/penalty_epoch`` and ``train/penalty_epoch/<term>``: their means over the
      logging steps of each epoch;
    * ``val/data_loss`` (epoch, synchronized across processes).

    If you override ``training_step``, call :meth:`log_penalty` with the data loss to keep
    the penalty curves; if you override ``on_train_epoch_start`` or ``on_train_epoch_end``,
    call ``super()`` to keep ``train/data_loss_epoch``.
    """

    def data_loss(self, batch: Any) -> Tensor:
        """The task loss of one batch (e.g. cross-entropy); no penalty in it."""
        raise NotImplementedError(f"{type(self).__name__} must implement data_loss(batch).")

    def last_layer(self) -> nn.Module | None:
        """The module the ``last_layer`` selector keyword means (default: the last module
        owning parameters, in registration order). Override to name your head."""
        return last_parametrized_module(self)

    def _data_loss(self, batch: Any) -> Tensor:
        """:meth:`data_loss`, refused unless it is one number as a tensor (what the logs,
        the epoch mean and backward need)."""
        loss = self.data_loss(batch)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else f"{type(loss).__name__} {loss!r}"
            raise ValueError(
                f"{type(self).__name__}.data_loss(batch) must return a 0-d tensor (the batch's mean loss, with its "
                f"graph), got {got}. Return e.g. F.cross_entropy(logits, y) — not loss.item(), and with "
                "reduction='mean' rather than a loss per sample."
            )
        return loss

    # ---- steps --------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._data_loss(batch)
        # The step value is this process's micro-batch loss (rank 0's under DDP), not
        # synchronized per step; the epoch mean is averaged over processes.
        self.log("train/data_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self._accumulate_data_loss(loss, batch)  # for train/data_loss_epoch
        self.log_penalty(loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._data_loss(batch)
        self.log("val/data_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._data_loss(batch)
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
        # Epoch means over the logging steps, next to train/data_loss_epoch (no extra cost).
        self.log("train/penalty_epoch", total, on_step=False, on_epoch=True)
        # at least float32 (a bf16 loss is upcast), and float64 stays float64
        data = data_loss.detach().to(torch.promote_types(data_loss.dtype, torch.float32))
        self.log("train/loss", data + total, on_step=True, on_epoch=False)
        for name, value in values.items():
            value = value.to(data_loss.device)
            self.log(f"train/penalty/{name}", value, on_step=True, on_epoch=False)
            self.log(f"train/penalty_epoch/{name}", value, on_step=False, on_epoch=True)

    # ---- the epoch mean of the data loss --------------------------------------------------
    # Kept as a running Σ n·loss on the device (and Σ n as a Python int) rather than a
    # second ``self.log(on_epoch=True)`` per step: each ``self.log`` call is ~0.1–0.3 ms of host
    # time, which is most of a small model's step on a GPU. Reduced over processes once per
    # epoch (one all-reduce), as ``sync_dist=True`` would.
    def on_train_epoch_start(self) -> None:
        self._data_loss_sum, self._data_loss_count = None, 0

    def _accumulate_data_loss(self, data_loss: Tensor, batch: Any) -> None:
        """Add one micro-batch to the epoch mean, weighted by its size as Lightning's
        ``on_epoch`` means are."""
        n = _batch_size(batch)
        loss = data_loss.detach()
        acc = getattr(self, "_data_loss_sum", None)
        if acc is None:  # at least float32 (a bf16 loss is upcast), and float64 stays float64
            self._data_loss_sum = loss.to(torch.promote_types(loss.dtype, torch.float32)) * n
            self._data_loss_count = n
        else:
            acc.add_(loss, alpha=n)  # one kernel, no host synchronization
            self._data_loss_count += n

    def on_train_epoch_end(self) -> None:
        acc = getattr(self, "_data_loss_sum", None)
        if acc is None:
            return
        pair = torch.stack([acc, torch.full_like(acc, self._data_loss_count)])
        self._data_loss_sum = None
        pair = self.trainer.strategy.reduce(pair, reduce_op="sum")
        self.log("train/data_loss_epoch", pair[0] / pair[1], on_step=False, on_epoch=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Clip the data gradient, then add the coupled penalty gradients: the same order as
        # torch's weight_decay, which is added inside optimizer.step after any clipping.
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for cb in regularizations(self._trainer):
            cb.after_gradient_clipping(optimizer)

