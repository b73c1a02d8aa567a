"""The ``Constrain`` callback: project selected weights onto a constraint set after every
real optimizer step (Keras's kernel constraints, for any torch optimizer).

It shares :class:`~regfit.Regularization`'s selection (include/exclude rules) and its
timing: the step engine (:mod:`regfit.engine`) projects after the optimizer update, once
per real step — not per micro-batch under gradient accumulation, and not at all for a
step a GradScaler skips.
A constraint has no strength and no penalty value, so it adds nothing to
``train/penalty``; it logs ``weights/norm/<name>`` like a term.
"""

from __future__ import annotations

import logging
from typing import Sequence

import lightning.pytorch as pl

from regfit.callback import BoundCallback, is_logging_step
from regfit.constraints import Constraint
from regfit.projection import Projection
from regfit.selection import Selector

__all__ = ["Constrain"]

log = logging.getLogger(__name__)


class Constrain(BoundCallback):
    """After each optimizer step, ``w ← project(w)`` for every selected parameter.

    Args:
        constraint: a :mod:`regfit.constraints` object (``MaxNorm``, ``UnitNorm``,
            ``NonNeg``, ``MinMaxNorm`` or your own ``Constraint``).
        include: selector rules (default: every trainable parameter), as for
            ``Regularization``.
        exclude: rules removing parameters, e.g. ``["bias", "last_layer"]``.
        name: the name in logs and checkpoints (default: the constraint's short name).

    Like the optimizer (and Keras), a step projects the selected weights that have a
    gradient in it: the others did not move. The initial weights are not projected (as
    in Keras); a weight lies in the set from its first update on. With several post-step callbacks (a
    proximal term, another constraint) they run in the order of ``trainer.callbacks``.

    Example (YAML, under ``trainer.callbacks``)::

        - class_path: regfit.constrain.Constrain
          init_args:
            constraint: {class_path: regfit.constraints.MaxNorm, init_args: {max_value: 3.0}}
            exclude: [bias, last_layer]
    """

    kind = "Constraint"

    def __init__(
        self,
        constraint: Constraint,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        if not isinstance(constraint, Constraint):
            raise ValueError(
                f"Constrain(constraint={constraint!r}): give a regfit.constraints.Constraint, "
                "e.g. Constrain(MaxNorm(3.0)) or in YAML class_path: regfit.constraints.MaxNorm."
            )
        super().__init__(constraint.name if name is None else name)
        self.projection = Projection(constraint, Selector(include=include, exclude=exclude), self.name)
        self.bound = self.projection

    @property
    def constraint(self) -> Constraint:
        return self.projection.constraint

    @property
    def selector(self) -> Selector:
        return self.projection.selector

    def __repr__(self) -> str:
        return (f"Constrain({self.constraint!r}, include={list(self.selector.include)}, "
                f"exclude={list(self.selector.exclude)}, name={self.name!r})")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        log.info("Constraint %r: %s on %d tensors.", self.name, self.constraint, len(self.assignments))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not is_logging_step(trainer) or not self.assignments:
            return
        pl_module.log(f"weights/norm/{self.name}", self.projection.norm(), on_step=True, on_epoch=False)
