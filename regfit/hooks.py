"""regfit in any training loop: :func:`attach` terms and constraints to an optimizer.

::

    from regfit import Regularization, attach

    hooks = attach(model, optimizer,
                   Regularization("l2", strength=1e-4, exclude=["bias", "norm"]),
                   Regularization("l1", strength=1e-5, mode="proximal", include=["body.0.*"]))
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    hooks.penalty()   # {term name: λ·Σc·R(w)}, no graph
    hooks.remove()    # the optimizer is as before

The terms act from the optimizer's own step hooks (:mod:`regfit.engine`): once per real
step, after whatever the loop did to the gradients before ``optimizer.step()`` (clipping,
a GradScaler's unscaling), and not at all for a step a ``torch.amp.GradScaler`` skips.
The equivalences of the Lightning path hold: coupled ``L2`` ≡ ``SGD(weight_decay=λ)``,
decoupled ``L2`` + Adam ≡ ``AdamW``, proximal ``L1`` gives exact zeros, and a tied tensor
is regularized once.

Hugging Face ``Trainer`` makes its optimizer itself; attach to it once it exists, from a
``TrainerCallback``'s ``on_train_begin(args, state, control, model=..., optimizer=...)``
(see the README for the recipe). A strength schedule counts the real steps taken since
:func:`attach`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from regfit.binding import Bound
from regfit.callback import BoundCallback, check_distinct_names
from regfit.engine import StepEngine, bind_checked, refuse_closure_optimizers
from regfit.term import Term

__all__ = ["attach", "Hooks", "unwrap"]

log = logging.getLogger(__name__)

#: every how many steps a plain loop looks for frozen tensors that became trainable
DORMANT_EVERY = 50


class Hooks:
    """The terms and constraints :func:`attach` bound to one optimizer.

    Attributes:
        model: the model they select from.
        optimizer: the optimizer whose steps they act in.
        bound: the bound :class:`~regfit.term.Term` s and
            :class:`~regfit.projection.Projection` s, in the order given.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, bound: list[Bound]) -> None:
        self.model = model
        self.optimizer = optimizer
        self.bound = bound
        self._engine: StepEngine | None = None

    @property
    def terms(self) -> list[Term]:
        return [b for b in self.bound if isinstance(b, Term)]

    def penalty(self) -> dict[str, Tensor]:
        """Each term's λ·Σ c·R(w) at the current weights, by term name (no autograd graph)."""
        return {t.name: t.value() for t in self.terms}

    def rebind(self) -> None:
        """Select and bind again now: after unfreezing tensors that are already in the
        optimizer (otherwise seen within ``DORMANT_EVERY`` steps), or after changing the
        model. New param groups are seen at the next step by themselves."""
        for b in self.bound:
            b.assign(self.model)
            b.bind(None, [self.optimizer])

    def remove(self) -> None:
        """Detach: the optimizer's hooks are removed and it steps as before."""
        if self._engine is not None:
            for b in self.bound:
                self._engine.remove(b)
            self._engine = None

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(f"{b.kind.lower()} {b.name!r}" for b in self.bound)
        return f"Hooks({type(self.optimizer).__name__}: {names}{'' if self._engine else '; removed'})"


def unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper that forwards ``step`` to it (Accelerate's
    ``AcceleratedOptimizer``, as Hugging Face ``Trainer`` holds it; Lightning's
    ``LightningOptimizer``): the hooks must be on the one whose ``step`` really runs."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, *regularizations: Any) -> Hooks:
    """Run regfit terms and constraints in every step of ``optimizer``.

    Args:
        model: the model whose parameters the terms select (names as in
            ``model.named_parameters()``; ``last_layer`` as for a RegModule).
        optimizer: any ``torch.optim.Optimizer`` that the loop steps with
            ``optimizer.step()`` (a wrapper such as Accelerate's ``AcceleratedOptimizer`` is
            unwrapped). Closure optimizers that search a line (``LBFGS``) are refused: their
            loss would not contain the penalty.
        *regularizations: :class:`~regfit.Regularization` and
            :class:`~regfit.constrain.Constrain` objects (each used by one loop at a time).

    Returns:
        :class:`Hooks`: ``penalty()`` for the values to log, ``remove()`` to detach.

    Raises:
        ValueError: a selection that matches nothing, two terms with one name, a term whose
            own step would blow the weights up at this lr (e.g. decoupled lr·λ ≥ 1), an
            LBFGS optimizer.
    """
    if not regularizations:
        raise ValueError("attach(model, optimizer, ...) needs at least one Regularization (or Constrain) to attach.")
    for r in regularizations:
        if not isinstance(r, BoundCallback):
            raise ValueError(f"attach() takes Regularization and Constrain objects, got {type(r).__name__} {r!r:.80}.")
    optimizer = unwrap(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"attach(model, optimizer, ...): optimizer must be a torch.optim.Optimizer, got "
                         f"{type(optimizer).__name__}.")
    refuse_closure_optimizers(optimizer)
    check_distinct_names(list(regularizations))
    _refuse_attached_twice(optimizer, regularizations)
    bound = [r.bound for r in regularizations]
    for b in bound:
        b.assign(model)
        for warning in bind_checked(b, [optimizer]):
            log.warning(warning)
        if isinstance(b, Term) and math.isnan(b.strength):  # an epoch timescale: no Trainer counts the steps
            b.strength_now()  # raises, naming the fix
    hooks = Hooks(model, optimizer, bound)
    engine = StepEngine.of(optimizer)
    engine.count_steps = True
    engine.dormant_every = DORMANT_EVERY
    for b in bound:
        engine.add(b)
    hooks._engine = engine
    return hooks


def _refuse_attached_twice(optimizer: torch.optim.Optimizer, regularizations: tuple[Any, ...]) -> None:
    """A term attached twice would act twice per step (a notebook cell run again): refuse
    a Regularization that is attached already, and a second term of the same name on
    one optimizer."""
    engine = StepEngine.existing(optimizer)
    taken = {m.name: m for m in engine.members} if engine is not None else {}
    for r in regularizations:
        holder = StepEngine.holding(r.bound)
        if holder is not None:
            where = "this optimizer" if holder is engine else f"another optimizer ({type(holder.optimizer).__name__})"
            raise ValueError(
                f"{r.kind} {r.name!r} is attached to {where} already, and attaching it again would make it act twice "
                "per step. Call .remove() on the Hooks that attach() returned first (or keep using them)."
            )
        if r.name in taken:
            raise ValueError(
                f"{r.kind} {r.name!r}: a {taken[r.name].kind.lower()} of that name is attached to this "
                f"{type(optimizer).__name__} already; both would act in every step. Call .remove() on the Hooks that "
                f"attach() returned before attaching again (a notebook cell run twice), or give the new one another "
                f"name=."
            )
