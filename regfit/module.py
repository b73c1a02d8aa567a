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

from regfit.regularization import regularizations
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

    * ``train/data_loss`` (each step) and ``train/data_loss_epoch`` (epoch mean);
    * ``val/data_loss`` (epoch, synchronized across processes);
    * and, from the :class:`~regfit.Regularization` callbacks, ``train/penalty``,
      ``train/loss`` (= data + penalty), ``train/penalty/<term>`` on logging steps and
      their epoch means ``train/penalty_epoch``, ``train/penalty_epoch/<term>`` — also when
      you override ``training_step``.

    A ``training_step`` of your own may call :meth:`log_penalty` with its data loss so that
    ``train/loss`` adds the penalty to exactly that (otherwise the loss the step returns is
    used); if you override ``on_train_epoch_start`` or ``on_train_epoch_end``, call
    ``super()`` to keep ``train/data_loss_epoch``.
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
        if isinstance(loss, Tensor) and loss.ndim == 0:
            return loss
        if isinstance(loss, Tensor):
            got = f"a tensor of shape {tuple(loss.shape)}"
        elif isinstance(getattr(loss, "loss", None), Tensor):  # a Hugging Face ModelOutput
            raise ValueError(
                f"{type(self).__name__}.data_loss(batch) returned a {type(loss).__name__} (a model's whole output); "
                "return its loss: `return self.model(**batch).loss` (pass labels so that the model computes it)."
            )
        else:
            shown = repr(loss) if isinstance(loss, (int, float, str, type(None))) else "…"
            got = f"{type(loss).__name__} {shown[:80]}"
        raise ValueError(
            f"{type(self).__name__}.data_loss(batch) must return a 0-d tensor (the batch's mean loss, with its "
            f"graph), got {got}. Return e.g. F.cross_entropy(logits, y) — not loss.item(), and with "
            "reduction='mean' rather than a loss per sample."
        )

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
        """Say which data loss ``train/loss`` (= data loss + penalty) adds the penalty to in
        this batch. The :class:`~regfit.Regularization` callbacks log the penalties on the
        steps whose metrics reach the loggers (the value is not needed for the gradient,
        which they inject in closed form, so other steps pay nothing for it)."""
        self._regfit_data_loss = data_loss.detach()

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

