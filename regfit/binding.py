"""Parameters bound to optimizer steps: the lifecycle shared by the callbacks that act on
selected parameters once per real optimizer step (:class:`~regfit.Regularization`,
:class:`~regfit.constrain.Constrain`).

==============  ==========================================================================
hook            what happens
==============  ==========================================================================
setup           select the parameters, so selection errors surface before any step
on_fit_start    select again if a strategy replaced the parameters since setup
                (``ModelParallelStrategy`` shards them in ``configure_model``); bind them
                to the optimizers' param groups; register the optimizer step hooks
on_train_start  bind again if a resume replaced the param-group dicts
                (``Optimizer.load_state_dict`` does, after ``on_fit_start``)
teardown        remove the step hooks
==============  ==========================================================================
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from regfit.modes import Bucket
from regfit.term import Assignment, bucket_by_group

__all__ = ["BoundCallback", "check_distinct_names"]

log = logging.getLogger(__name__)


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
                f"{who} named {cb.name!r}. Give each a distinct `name` (e.g. `name: {cb.name}_2` in its init_args): "
                "the name keys its logs (weights/norm/<name>, train/penalty/<name>) and its checkpoint state."
            )
        seen[cb.name] = cb


class BoundCallback(Callback):
    """Base class: a subclass implements :meth:`select` and the step hooks it needs
    (:meth:`_pre_step`, :meth:`_post_step`) and keeps ``assignments``/``buckets``."""

    #: how messages name an instance ("Term", "Constraint")
    kind: ClassVar[str] = "Callback"

    assignments: list[Assignment]
    buckets: list[Bucket]

    def __init__(self, name: str) -> None:
        if not (isinstance(name, str) and name):
            raise ValueError(f"name={name!r}: give a non-empty string (the {self.kind.lower()}'s name in logs) or leave it out.")
        self._name = name
        # Lightning reads state_key on every hook call (six per step): made once, not each time.
        self._state_key = self._generate_state_key(name=name)
        self._hooks: list[Any] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def state_key(self) -> str:
        return self._state_key

    def select(self, pl_module: pl.LightningModule) -> None:
        """Set ``self.assignments`` from the module's parameters."""
        raise NotImplementedError

    def _bind(self, trainer: pl.Trainer) -> None:
        self.buckets, orphans = bucket_by_group(self.assignments, list(trainer.optimizers))
        if orphans:
            log.warning("%s %r: %d selected parameters are in no optimizer and are left alone: %s",
                        self.kind, self.name, len(orphans), ", ".join(orphans[:5]))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_distinct_names(trainer.callbacks)
        self.select(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        live = {id(p) for p in pl_module.parameters()}
        if any(id(a.param) not in live for a in self.assignments):
            self.select(pl_module)
        self._bind(trainer)
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_pre_hook(self._pre_step))
            self._hooks.append(opt.register_step_post_hook(self._post_step))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        live = {id(g) for opt in trainer.optimizers for g in opt.param_groups}
        if any(id(b.group) not in live for b in self.buckets):
            self._bind(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook. In full precision Lightning calls ``optimizer.step(closure)``,
        so it fires *before* forward and backward; under a GradScaler it fires after them,
        and only for a step that is really taken."""

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Optimizer step post-hook (not called for a step a GradScaler skips)."""
