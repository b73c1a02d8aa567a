"""The step engine: when, in one optimizer step, each term and constraint acts.

One :class:`StepEngine` per optimizer holds the terms (:class:`~regfit.term.Term`) and
constraints (:class:`~regfit.projection.Projection`) bound to it and runs them in the
phases of every *real* step, in this order::

    backward (all micro-batches) → clipping          (the training loop's own)
    1. gradient     coupled terms: g ← g + λ·c·∇R(w)
    2. pre_update   decoupled terms: w ← w − η·λ·c·∇R(w); modes that need w_t keep it (cautious)
       optimizer update
    3. post_update  proximal and cautious terms, then constraints (in the order added)

Everything hangs on the optimizer's own step hooks, so it works in any loop that calls
``optimizer.step()`` — a plain PyTorch loop, Hugging Face ``Trainer``/Accelerate, Lightning:

* ``optimizer.step()`` without a closure (a plain loop; a ``torch.amp.GradScaler``, which
  calls it only for a step it takes): phases 1–2 run in the step pre-hook, after anything
  the loop did to the gradients before (clipping, unscaling), 3 in the post-hook.
* ``optimizer.step(closure)`` (Lightning's automatic optimization, which runs forward,
  backward, ``on_before_optimizer_step`` and gradient clipping inside the closure): the
  pre-hook wraps the closure, and phases 1–2 run when it returns — after clipping, whatever
  the module's ``configure_gradient_clipping`` does.
* A step a GradScaler skips (inf/NaN gradients) never calls ``optimizer.step``, so no
  phase runs. A fused optimizer that unscales itself (the scaler sets ``optimizer.grad_scale``
  and ``optimizer.found_inf`` and calls ``step`` either way) is handled too: nothing runs
  when ``found_inf`` is set (one host sync per step, only there), and coupled gradients
  are added at the scale the gradients still carry.

Each term's update goes through the non-finite guard (:mod:`regfit.guard`). Before each
step the engine compares the optimizer's param groups with what its members were bound
to (O(number of groups)) and binds them again when they changed (a new param group,
groups replaced by ``load_state_dict``); see :mod:`regfit.binding` for tensors that become
trainable.

Closure optimizers that evaluate the closure several times per step to search along a
direction (``torch.optim.LBFGS``) are refused: the loss they see would not include the
penalty that the gradient does.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Literal

import torch

from regfit.binding import Bound, decay_report, optimizer_signature
from regfit.guard import apply_guarded, stability_problem
from regfit.projection import Projection
from regfit.term import Term

__all__ = ["StepEngine", "Phase", "refuse_closure_optimizers", "bind_checked"]

log = logging.getLogger(__name__)

Phase = Literal["gradient", "pre_update", "post_update"]

# The engine of each optimizer that has one (weak: it goes when the optimizer does).
_ENGINES: "weakref.WeakKeyDictionary[torch.optim.Optimizer, StepEngine]" = weakref.WeakKeyDictionary()


def refuse_closure_optimizers(optimizer: torch.optim.Optimizer) -> None:
    """An optimizer that re-evaluates the closure to search a line (LBFGS) would see a loss
    without the penalty beside a gradient with it: an error naming the way out."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            f"{type(optimizer).__name__} evaluates its closure several times per step to search along a direction, "
            "and the loss it compares would not contain the penalty that regfit adds to the gradient. Use a first-order "
            "optimizer (SGD, Adam, …) with regfit's terms, or add the penalty to the loss yourself for LBFGS "
            "(e.g. loss + λ·Σ penalty.value(w))."
        )


def bind_checked(bound: Bound, optimizers: list[torch.optim.Optimizer]) -> list[str]:
    """Bind ``bound`` to the optimizers' param groups and check that it can act there.

    Raises ``ValueError`` for a closure optimizer that searches a line and for a term whose
    own step blows the weights up at this lr (:func:`regfit.guard.stability_problem`).
    Returns the warnings to show: selected tensors that no optimizer updates, and the
    optimizers' own weight decay beside a term (:func:`regfit.binding.decay_report`)."""
    for opt in optimizers:
        refuse_closure_optimizers(opt)
    warnings = []
    orphans = bound.bind(None, optimizers)
    if orphans:
        warnings.append(f"{bound.kind} {bound.name!r}: {len(orphans)} selected parameters are in no optimizer, so no "
                        f"step moves them and the {bound.kind.lower()} leaves them alone: {', '.join(orphans[:5])}")
    if isinstance(bound, Term):
        problem = stability_problem(bound)
        if problem:
            raise ValueError(f"Term {bound.name!r} ({bound.penalty!r}, {bound.mode.name}, λ={bound.strength:g}): {problem}")
        report = decay_report(bound, optimizers)
        if report:
            warnings.append(report.message(", ".join(sorted({type(o).__name__ for o in optimizers}))))
    return warnings


class StepEngine:
    """Runs the terms and constraints bound to one optimizer in the phases of its steps.

    Use :meth:`of` to get the optimizer's engine (made, and its hooks registered, on first
    use), :meth:`add`/:meth:`remove` members; the hooks go when the last member does.

    Attributes:
        skip_step: a callable that says the coming step is not a training step (Lightning's
            SWA batch-norm epoch steps with stale gradients): nothing runs then.
        count_steps: add 1 to every term's ``step`` after each real step (what a strength
            schedule reads when no trainer sets it).
        dormant_every: every how many steps to look whether a frozen tensor a member would
            select became trainable (0: never; the Lightning callbacks look at each epoch).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        refuse_closure_optimizers(optimizer)
        self._optimizer = weakref.ref(optimizer)
        self.members: list[Bound] = []
        self.skip_step: Callable[[], bool] | None = None
        self.count_steps = False
        self.dormant_every = 0
        self._steps = 0
        self._skipping = False  # this step runs no phase (found_inf, skip_step)
        self._waiting = False  # a wrapped closure has not returned yet
        self._signature = optimizer_signature(optimizer)
        self._ids = {id(g) for g in optimizer.param_groups}
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> StepEngine:
        """The optimizer's engine, made on first use."""
        engine = _ENGINES.get(optimizer)
        if engine is None:
            engine = _ENGINES[optimizer] = cls(optimizer)
        return engine

    @staticmethod
    def existing(optimizer: torch.optim.Optimizer) -> StepEngine | None:
        """The optimizer's engine if it has one (nothing is made)."""
        return _ENGINES.get(optimizer)

    @staticmethod
    def holding(member: Bound) -> StepEngine | None:
        """The engine that runs ``member`` now, if any."""
        return next((e for e in list(_ENGINES.values()) if member in e.members), None)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer()

    def add(self, member: Bound) -> None:
        """Run ``member`` (a bound Term or Projection) in this optimizer's steps, after those
        added before it."""
        if not isinstance(member, (Term, Projection)):
            raise TypeError(f"StepEngine runs Terms and Projections, not {type(member).__name__}.")
        if member not in self.members:
            self.members.append(member)

    def remove(self, member: Bound) -> None:
        """Stop running ``member``; the last one out removes the optimizer's hooks."""
        if member in self.members:
            self.members.remove(member)
        if not self.members:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            opt = self.optimizer
            if opt is not None and _ENGINES.get(opt) is self:
                del _ENGINES[opt]

    # ---- the phases --------------------------------------------------------------------------
    def run(self, phase: Phase, grad_scale: float = 1.0) -> None:
        """Run one phase for every member, on this optimizer's param groups."""
        ids = self._ids
        if phase == "post_update":
            for m in self.members:
                if isinstance(m, Projection):
                    m.apply(ids)
                elif m.mode.phase == "post_update":
                    apply_guarded(m, ids)
            return
        for m in self.members:
            if not isinstance(m, Term):
                continue
            if phase == "pre_update" and m.mode.prepares:
                m.prepare(ids)
            if m.mode.phase == phase:
                apply_guarded(m, ids, grad_scale=grad_scale)

    def refresh(self) -> None:
        """Bind the members again if this optimizer's param groups changed (or, every
        ``dormant_every`` steps, a frozen tensor they would select became trainable)."""
        opt = self.optimizer
        if opt is None:
            return
        signature = optimizer_signature(opt)
        look = self.dormant_every and self._steps % self.dormant_every == 0
        if signature == self._signature and not look:
            return
        changed = signature != self._signature
        for m in self.members:
            if changed or m.woke():
                m.refresh()
        self._signature = signature
        self._ids = {id(g) for g in opt.param_groups}

    def _before_update(self, optimizer: torch.optim.Optimizer, first: bool = True) -> None:
        """Phases 1 and 2, once the gradients are final."""
        if first:
            self._skipping = bool(self.skip_step and self.skip_step())
            found_inf = getattr(optimizer, "found_inf", None)
            if found_inf is not None and bool(found_inf):  # a fused optimizer will skip this step
                self._skipping = True
            if self._skipping:
                return
            self.refresh()
        elif self._skipping:
            return
        grad_scale = getattr(optimizer, "grad_scale", None)
        scale = 1.0 if grad_scale is None else float(grad_scale)
        self.run("gradient", scale)
        if first:
            self.run("pre_update")

    # ---- the optimizer's hooks ---------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # args[0] is the optimizer itself (the hooks see step's own arguments).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._before_update(optimizer)
            return None
        calls = [0]

        def closure_then_regularize() -> Any:
            result = closure()
            # The gradients are final now (backward, on_before_optimizer_step, clipping ran).
            self._waiting = False
            self._before_update(optimizer, first=calls[0] == 0)
            calls[0] += 1
            return result

        self._waiting = True
        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_regularize}
        return (args[0], closure_then_regularize, *args[2:]), kwargs

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._waiting:  # the optimizer ignored its closure: phases 1–2 never ran
            self._waiting = False
            raise RuntimeError(
                f"{type(optimizer).__name__}.step(closure) returned without calling the closure, so regfit's coupled "
                "and decoupled terms could not act after backward. Call the closure in step(), or call "
                "optimizer.step() without one after backward."
            )
        if self._skipping:
            self._skipping = False
            return
        self.run("post_update")
        self._steps += 1
        if self.count_steps:
            for m in self.members:
                if isinstance(m, Term):
                    m.step += 1
