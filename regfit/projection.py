"""A projection: one constraint applied to the selected tensors after every real step.

The constraint analogue of a :class:`~regfit.term.Term`: a
:class:`~regfit.constraints.Constraint` (``MaxNorm``, ``NonNeg``, …), the tensors a
:class:`~regfit.selection.Selector` picks, and a name. It has no strength and no penalty
value; the step engine (:mod:`regfit.engine`) projects its tensors that have a gradient
after the optimizer update, like the proximal terms.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from regfit.binding import Assignment, Bound
from regfit.constraints import Constraint
from regfit.selection import Selector
from regfit.sharding import is_sharded

__all__ = ["Projection"]


class Projection(Bound):
    """``w ← constraint.project(w)`` for the selected tensors, after every real step."""

    kind = "Constraint"

    def __init__(self, constraint: Constraint, selector: Selector, name: str) -> None:
        self.constraint = constraint
        self.selector = selector
        self.name = name
        self._init_binding()

    def assign(self, model: nn.Module) -> list[Assignment]:
        assignments = super().assign(model)
        sharded = [a.name for a in assignments if is_sharded(a.param)]
        if sharded:
            raise NotImplementedError(
                f"Constraint {self.name!r}: {', '.join(sharded[:3])}{' …' if len(sharded) > 3 else ''} are sharded "
                "(DTensor) parameters, which constraints do not support yet. Exclude them (exclude=[...]) or "
                "train with --trainer.strategy=ddp.")
        return assignments

    def apply(self, group_ids: set[int] | None = None) -> None:
        """Project the tensors of the given param groups that have a gradient (they moved)."""
        with torch.no_grad():
            for bucket in self.buckets:
                if group_ids is None or id(bucket.group) in group_ids:
                    params = bucket.stepping()
                    if params:
                        self.constraint.project_(params)

    def norm(self) -> Tensor:
        """‖w‖₂ over all selected tensors (logged as ``weights/norm/<name>``)."""
        with torch.no_grad():
            ws = [a.param for a in self.assignments]
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ws)).float()) if ws else torch.zeros(())
