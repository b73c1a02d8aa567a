"""The Lightning side of a bound term or constraint: the lifecycle that
:class:`~regfit.Regularization` and :class:`~regfit.constrain.Constrain` share.

==================  ===========================================================================
hook                what happens
==================  ===========================================================================
setup               names checked distinct; the tensors selected, so selection errors
                    surface before any step
on_fit_start        select again if a strategy replaced the parameters since setup
                    (``ModelParallelStrategy`` shards them in ``configure_model``); bind to the
                    optimizers' param groups; join each optimizer's
                    :class:`~regfit.engine.StepEngine`, which runs the step
on_train_start      bind again if a resume replaced the param-group dicts
                    (``Optimizer.load_state_dict`` does, after ``on_fit_start``)
each epoch start    bind again if a frozen tensor the rules select became trainable
                    (``BaseFinetuning`` unfreezes at epoch starts); new param groups are
                    followed by the engine at every step
teardown            leave the engines (the last one out removes the optimizer's hooks)
==================  ===========================================================================

The callback itself does no per-step work beyond reading ``global_step``: the engine runs
the phases from the optimizers' own hooks, so a module that overrides
``configure_gradient_clipping`` (without calling ``super()``), a plain ``LightningModule``
and manual optimization all get the same order — coupled gradients after clipping.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning.pytorch.utilities import rank_zero_warn

from regfit.binding import Bound
from regfit.engine import StepEngine, bind_checked

__all__ = ["BoundCallback", "check_distinct_names", "is_logging_step"]



def check_distinct_names(callbacks: list[Any]) -> None:
    """Terms and constraints are told apart by name in the logs (``weights/norm/<name>``,
    ``train/penalty/<name>``) and checkpoints: two with one name are an error."""
    seen: dict[str, BoundCallback] = {}
    for cb in callbacks:
        if not isinstance(cb, BoundCallback):
            continue
        if cb.name in seen:
            kinds = {seen[cb.name].kind, cb.kind}
            who = f"Two {cb.kind.lower()}s are" if len(kinds) == 1 else "A term and a constraint are both"
            raise ValueError(
                f"{who} named {cb.name!r}. Give each a distinct `name`: name='{cb.name}_2' in Python, or "
                f"`name: {cb.name}_2` in its init_args. The name keys its logs (weights/norm/<name>, "
                "train/penalty/<name>) and its checkpoint state."
            )
        seen[cb.name] = cb


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes step metrics to the loggers at this step."""
    if not trainer.loggers:
        return False
    return bool(trainer._logger_connector.should_update_logs)


class BoundCallback(Callback):
    """Base class: a subclass sets ``self.bound`` (a :class:`~regfit.term.Term` or
    :class:`~regfit.projection.Projection`) and adds its logging and state."""

    #: how messages name an instance ("Term", "Constraint")
    kind: ClassVar[str] = "Callback"
    bound: Bound

    def __init__(self, name: str) -> None:
        if not (isinstance(name, str) and name):
            raise ValueError(f"name={name!r}: give a non-empty string (the {self.kind.lower()}'s name in logs) or leave it out.")
        self._name = name
        # Lightning reads state_key on every hook call (six per step): made once, not each time.
        self._state_key = self._generate_state_key(name=name)
        # Until setup has checked the names, the key is unique to this instance, so that two
        # callbacks with one name reach check_distinct_names (an error naming `name=`)
        # instead of Lightning's "more than one stateful callback" at Trainer(...).
        self._key_checked = False
        self._engines: list[StepEngine] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def state_key(self) -> str:
        return self._state_key if self._key_checked else f"{self._state_key}#{id(self):x}"

    @property
    def assignments(self):
        return self.bound.assignments

    @property
    def buckets(self):
        return self.bound.buckets

    def select(self, pl_module: pl.LightningModule) -> None:
        """Select the tensors of ``pl_module`` (selection errors are raised here)."""
        self.bound.assign(pl_module)

    # ---- lifecycle -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_distinct_names(trainer.callbacks)
        self._key_checked = True
        self.select(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        live = {id(p) for p in pl_module.parameters()}
        if any(id(a.param) not in live for a in self.bound.assignments):
            self.select(pl_module)
        for warning in bind_checked(self.bound, list(trainer.optimizers)):
            rank_zero_warn(warning)
        for opt in trainer.optimizers:
            engine = StepEngine.of(opt)
            engine.add(self.bound)
            # Lightning's SWA steps once with stale gradients in its batch-norm epoch.
            engine.skip_step = lambda: bool(trainer.fit_loop._skip_backward)
            self._engines.append(engine)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.bound.refresh()  # a resume replaced the param groups: bind to the new ones

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and self.bound.woke():  # after every callback's on_train_epoch_start
            self.bound.refresh()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for engine in self._engines:
            engine.remove(self.bound)
        self._engines.clear()
