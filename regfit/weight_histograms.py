"""``WeightHistograms``: a histogram of every regularized tensor at each epoch end, on W&B.

Histograms show what a scalar norm hides: whether L1 or L1/2 pushes a layer's weights
to exactly zero, or group lasso empties whole rows. Only W&B stores them well, so the
callback writes to the :class:`~lightning.pytorch.loggers.WandbLogger` s of the trainer and
does nothing without one. ``regfit fit`` adds it automatically.

Keys: ``weights/hist/<term>/<parameter name>``.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from regfit.regularization import regularizations

__all__ = ["WeightHistograms"]


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers (none: W&B is not in use)."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class WeightHistograms(Callback):
    """Log a histogram of each regularized parameter tensor at the end of every training epoch.

    Args:
        num_bins: histogram bins (W&B allows at most 512).
    """

    def __init__(self, num_bins: int = 64) -> None:
        if not 1 <= num_bins <= 512:
            raise ValueError(f"num_bins={num_bins} must be in 1..512 (the W&B limit).")
        self.num_bins = num_bins

    def histograms(self, trainer: pl.Trainer) -> dict[str, object]:
        """``{key: wandb.Histogram}`` for every tensor of every Regularization term."""
        import wandb  # only when a W&B logger is in use

        out = {}
        for cb in regularizations(trainer):
            for a in cb.term.assignments:
                values = a.param.detach().float().flatten().cpu().numpy()
                out[f"weights/hist/{cb.name}/{a.name}"] = wandb.Histogram(values, num_bins=self.num_bins)
        return out

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers or not trainer.is_global_zero:
            return
        hists = self.histograms(trainer)
        if hists:
            for lg in loggers:
                # WandbLogger plots every metric against trainer/global_step; keep that axis.
                lg.experiment.log({**hists, "trainer/global_step": trainer.global_step})
