"""Classes the reliability cases name by class_path in configs and command lines."""

from __future__ import annotations

import os
import time

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


#: set in a process's environment to N: its N-th fit waits at step 3 for a signal (see AnnounceSteps)
HOLD_ENV = "REGFIT_TEST_HOLD_AT_FIT"


class AnnounceSteps(Callback):
    """Prints "training step 3" once per fit, so that a test signals a fit that is really
    training. In a process started with ``HOLD_ENV=N`` the N-th fit (a sweep runs its trials
    in one process) then waits there for the signal, up to a minute: a short fit must not
    finish between the line and the test's signal, or the trial completes instead of being
    stopped. A rerun started without it does not wait."""

    announced = 0  # fits of this process that reached step 3

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step != 3:
            return
        print("training step 3", flush=True)
        AnnounceSteps.announced += 1
        if str(AnnounceSteps.announced) == os.environ.get(HOLD_ENV):
            deadline = time.monotonic() + 60
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.02)  # SIGINT raises KeyboardInterrupt here; SIGKILL ends the process
