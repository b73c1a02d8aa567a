"""Strength schedules: λ as a function of the optimizer step.

A schedule is a small object whose ``__call__(step, lr_ratio)`` returns a multiplier
m ≥ 0 of the term's strength, so the strength in effect at step ``step`` is

.. math::  \\lambda_t = \\lambda \\cdot m(t)

``step`` is the number of optimizer steps already taken (Lightning's
``trainer.global_step`` when the step starts: 0 for the first update). Lightning restores
``global_step`` from a checkpoint, so a resumed run continues the schedule where it
stopped without any state of its own. ``lr_ratio`` is lr_t / lr_0 of the param group being
regularized; only :class:`FollowLR` reads it — every other schedule is independent of the
learning-rate schedule.

=====================  ===================================================================
schedule               m(t)
=====================  ===================================================================
``Constant()``         1
``LinearWarmup(W)``    start + (1 − start)·min(t/W, 1)
``Cosine(T, W)``       linear warmup over W steps, then final + (1 − final)·½(1 + cos(π·p)),
                       p = (t − W)/(T − W) clipped to [0, 1]
``Step(S, γ)``         γ^⌊t/S⌋ (torch ``StepLR``)
``FollowLR()``         lr_t / lr_0: λ follows the lr schedule (as AdamW's effective decay
                       ηλ does), also in ``coupled`` mode
=====================  ===================================================================

In YAML::

    regularization:
      strength: 1.0e-4
      schedule:
        class_path: regfit.schedules.Cosine
        init_args: {total_steps: 10000, warmup_steps: 500}
"""

from __future__ import annotations

import math

from regfit.hyperparams import Hyperparams, check_int, check_number

__all__ = ["Schedule", "Constant", "LinearWarmup", "Cosine", "Step", "FollowLR"]


def _check_steps(cls: str, arg: str, value: int, minimum: int = 1) -> int:
    return check_int(cls, arg, value, minimum, " (a number of optimizer steps)")


def _check_fraction(cls: str, arg: str, value: float) -> float:
    return check_number(cls, arg, value, lambda v: math.isfinite(v) and v >= 0, f"a finite multiplier ≥ 0, e.g. {arg}=0.0")


class Schedule(Hyperparams):
    """Base class: ``__call__(step, lr_ratio=1.0)`` returns the multiplier m(step) ≥ 0."""

    def __call__(self, step: int, lr_ratio: float = 1.0) -> float:
        raise NotImplementedError


class Constant(Schedule):
    """m(t) = 1: the plain strength (the default when no schedule is given).

    >>> Constant()(1000)
    1.0
    """

    def __call__(self, step, lr_ratio=1.0):
        return 1.0


class LinearWarmup(Schedule):
    """Ramp λ linearly from ``start``·λ to λ over ``warmup_steps`` steps, then hold it.

    .. math::  m(t) = s + (1 - s)\\,\\min(t / W, 1)

    >>> [LinearWarmup(4)(t) for t in (0, 2, 4, 9)]
    [0.0, 0.5, 1.0, 1.0]
    """

    def __init__(self, warmup_steps: int, start: float = 0.0) -> None:
        self.warmup_steps = _check_steps("LinearWarmup", "warmup_steps", warmup_steps)
        self.start = _check_fraction("LinearWarmup", "start", start)

    def __call__(self, step, lr_ratio=1.0):
        return self.start + (1.0 - self.start) * min(step / self.warmup_steps, 1.0)


class Cosine(Schedule):
    """Optional linear warmup, then cosine annealing of λ to ``final``·λ at ``total_steps``.

    .. math::  m(t) = f + (1 - f)\\,\\tfrac12\\bigl(1 + \\cos(\\pi p)\\bigr),\\quad
               p = \\mathrm{clip}\\bigl((t - W)/(T - W), 0, 1\\bigr)

    (during warmup, t < W: m(t) = t/W). To *increase* λ over training, use ``final > 1``.

    >>> s = Cosine(total_steps=10)
    >>> s(0), s(5), s(10), s(20)
    (1.0, 0.5, 0.0, 0.0)
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> None:
        self.total_steps = _check_steps("Cosine", "total_steps", total_steps)
        self.warmup_steps = _check_steps("Cosine", "warmup_steps", warmup_steps, minimum=0)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"Cosine(warmup_steps={warmup_steps}, total_steps={total_steps}): the warmup must end "
                "before total_steps; lower warmup_steps or raise total_steps."
            )
        self.final = _check_fraction("Cosine", "final", final)

    def __call__(self, step, lr_ratio=1.0):
        if step < self.warmup_steps:
            return step / self.warmup_steps
        p = min(max((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0), 1.0)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * p))


class Step(Schedule):
    """Multiply λ by ``gamma`` every ``step_size`` steps (torch ``StepLR``'s rule).

    .. math::  m(t) = \\gamma^{\\lfloor t / S \\rfloor}

    >>> [Step(step_size=10, gamma=0.5)(t) for t in (0, 9, 10, 25)]
    [1.0, 1.0, 0.5, 0.25]
    """

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        self.step_size = _check_steps("Step", "step_size", step_size)
        self.gamma = _check_fraction("Step", "gamma", gamma)

    def __call__(self, step, lr_ratio=1.0):
        return self.gamma ** (step // self.step_size)


class FollowLR(Schedule):
    """λ follows the learning-rate schedule: m(t) = lr_t / lr_0 of the param group.

    With ``coupled`` L2 this makes λ_t ∝ lr_t, like the effective decay η·λ of AdamW;
    with ``decoupled`` mode (step ``lr``) the shrink becomes ∝ lr_t². ``lr_0`` is the
    group's ``initial_lr`` (set by torch lr schedulers, restored on resume) or its lr at fit
    start. The logged ``train/strength/<term>`` uses the term's first param group.
    """

    def __call__(self, step, lr_ratio=1.0):
        return float(lr_ratio)
