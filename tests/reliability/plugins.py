"""Classes the reliability cases name by class_path in configs and command lines."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from regfit.penalties import Penalty


class Exploding(Penalty):
    """R(w) = Σ|w|, with a gradient that is infinite everywhere: the guard must stop it."""

    name = "exploding"

    def value(self, w):
        return w.abs().sum()

    def grad(self, w):
        return torch.full_like(w, float("inf"))


class AnnounceSteps(Callback):
    """Prints "training step 3" once, so that a test signals a fit that is really training."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            print("training step 3", flush=True)
