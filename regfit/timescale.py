r"""Weight decay given as a timescale: λ from the number of steps (or epochs) it takes.

An L2 decay shrinks the weights by a fraction q = s·λ per step (s: the step size the decay
is multiplied by, η for AdamW), so the weights are an exponential moving average of the
updates with a time constant of τ_iter = 1/(s·λ) steps. Measured in epochs, τ transfers
across dataset size and model size where λ does not (Wang & Aitchison, ICML 2025, "How to
set AdamW's weight decay as you scale model and dataset size"). Giving τ instead of λ::

    Regularization("l2", mode="decoupled", timescale={"epochs": 5})    # or {"steps": 2000}

resolves λ at fit start, from the trainer's steps per epoch
(⌈``num_training_batches`` / ``accumulate_grad_batches``⌉) and the base learning rate η₀ of
the term's param group (its ``initial_lr``, else its lr when the fit starts):

==========================================  =====================================  ==========================
mode (penalty ``L2``)                       decay per step at η₀                   λ
==========================================  =====================================  ==========================
``decoupled`` (``Decoupled()``, or           η₀·λ                                   1/(η₀·τ_steps)
``step="corrected"``)
``Decoupled(step="independent")``           λ (its step is lr_t/lr₀ = 1 at η₀)     1/τ_steps
``coupled`` with ``SGD(momentum=β,           η₀·λ·(1 − δ)/(1 − β): the decay         (1 − β)/((1 − δ)·η₀·τ_steps);
dampening=δ)``                              passes through the momentum buffer      plain SGD: 1/(η₀·τ_steps)
``coupled`` with ``SGD(nesterov=True)``     g·λ, g = η₀·(1 + β(1 − δ)/(1 − β))      1/(g·τ_steps)
==========================================  =====================================  ==========================

with τ_steps = τ for ``{"steps": τ}`` and τ·steps_per_epoch for ``{"epochs": τ}``. So for
``mode="decoupled"``, λ·η₀·steps_per_epoch = 1/τ_epochs at any batch size.

Refused, with the reason: penalties other than ``L2`` (they do not shrink w in proportion
to w, so they have no single time constant), ``coupled`` with Adam or any optimizer but
SGD (Adam divides the decay by the gradient's running RMS), and the ``proximal`` and
``cautious`` modes (use ``decoupled``: for L2 the proximal step is the same shrink to first
order). A term spread over param groups with different base learning rates is refused too
(give each group its own term): one strength cannot make one timescale for both.

A schedule still multiplies the resolved λ. The resolution is a deterministic function of
(τ, η₀, steps per epoch), so a resumed fit resolves the same λ — or, if the batch size or
the base lr changed, the λ of the same τ, and says so.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from regfit.hyperparams import is_number
from regfit.modes import Coupled, Decoupled, Mode
from regfit.penalties import L2, Penalty

__all__ = ["UNITS", "check_timescale", "check_timescale_term", "decay_gain", "timescale_steps", "timescale_strength"]

#: the keys a timescale may have (exactly one of them)
UNITS = ("epochs", "steps")


def check_timescale(timescale: Any, where: str = "timescale") -> dict[str, float]:
    """The timescale as ``{unit: τ}``, one unit of :data:`UNITS` and τ a finite number > 0.

    >>> check_timescale({"epochs": 5})
    {'epochs': 5.0}
    >>> check_timescale({"epoch": 5})
    Traceback (most recent call last):
    ...
    ValueError: timescale={'epoch': 5}: give one of {'epochs': τ} or {'steps': τ}, e.g. timescale={'epochs': 5}.
    """
    if not isinstance(timescale, Mapping) or len(timescale) != 1 or next(iter(timescale)) not in UNITS:
        raise ValueError(f"{where}={timescale!r}: give one of {{'epochs': τ}} or {{'steps': τ}}, e.g. "
                         f"{where}={{'epochs': 5}}.")
    (unit, value), = timescale.items()
    if not (is_number(value) and math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{where}={dict(timescale)!r}: τ must be a finite number > 0 (the {unit} the decay "
                         f"takes to shrink the weights by e), e.g. {where}={{'{unit}': 5}}.")
    return {unit: float(value)}


def check_timescale_term(name: str, penalty: Penalty, mode: Mode) -> None:
    """Refuse a timescale for a penalty or mode where it means nothing (see the module docstring)."""
    if not isinstance(penalty, L2):
        raise ValueError(
            f"Term {name!r}: a timescale is the time constant of L2's shrink w ← (1 − η·λ)·w; "
            f"{type(penalty).__name__} does not shrink w in proportion to w, so it has none. Give strength=λ instead."
        )
    if type(mode) not in (Coupled, Decoupled):
        raise ValueError(
            f"Term {name!r}: a timescale is defined for mode='decoupled' (any optimizer) and mode='coupled' with "
            f"SGD, not for {mode!r}. Use mode='decoupled' (for L2 the proximal step is the same shrink to first "
            "order), or give strength=λ."
        )


def decay_gain(optimizer: torch.optim.Optimizer, group: dict, mode: Mode, base_lr: float, name: str = "l2") -> float:
    """The long-run fraction of w that one step's decay removes, per unit of λ, at the
    base learning rate: λ = 1/(gain·τ_steps).

    >>> w = torch.zeros(1, requires_grad=True)
    >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    >>> round(decay_gain(opt, opt.param_groups[0], Coupled(), 0.1), 12)  # 0.1/(1 − 0.9)
    1.0
    """
    if type(mode) is Decoupled:
        return 1.0 if mode.step == "independent" else base_lr  # lr_t²/lr_max = η₀ at η₀ = lr_max
    if type(mode) is Coupled and isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0) or 0.0)
        dampening = float(group.get("dampening", 0.0) or 0.0)
        if group.get("nesterov"):
            return base_lr * (1 + beta * (1 - dampening) / (1 - beta))
        return base_lr * (1 - dampening) / (1 - beta)
    raise ValueError(
        f"Term {name!r}: a timescale with mode='coupled' needs torch.optim.SGD, whose step shrinks w by a known "
        f"fraction; {type(optimizer).__name__} rescales the decay's gradient (Adam divides it by the gradient's "
        "running RMS). Use mode='decoupled' (AdamW's decay), or give strength=λ."
    )


def timescale_steps(timescale: Mapping[str, float], steps_per_epoch: int | None, name: str = "l2") -> float:
    """τ in optimizer steps: τ itself, or τ·steps_per_epoch for a timescale in epochs."""
    if "steps" in timescale:
        return float(timescale["steps"])
    if steps_per_epoch is None:
        raise ValueError(
            f"Term {name!r}: timescale={dict(timescale)!r} is in epochs, and the steps per epoch are only known to "
            "a Lightning Trainer (at fit start). Outside Lightning, give it in steps: "
            "timescale={'steps': epochs × steps_per_epoch}."
        )
    if not (isinstance(steps_per_epoch, int) and steps_per_epoch > 0):
        raise ValueError(
            f"Term {name!r}: timescale={dict(timescale)!r} is in epochs, but the training loader has "
            f"{steps_per_epoch} steps per epoch (a loader without a length?). Give timescale={{'steps': τ}} instead."
        )
    return float(timescale["epochs"]) * steps_per_epoch


def timescale_strength(timescale: Mapping[str, float], gain: float, steps_per_epoch: int | None,
                       name: str = "l2") -> float:
    """λ = 1/(gain·τ_steps).

    >>> timescale_strength({"epochs": 5.0}, gain=0.1, steps_per_epoch=200)  # 1/(0.1·5·200)
    0.01
    """
    if not gain > 0:
        raise ValueError(f"Term {name!r}: a timescale needs a base learning rate > 0 to divide by; its param "
                         "group's lr is 0. Give strength=λ instead.")
    return 1.0 / (gain * timescale_steps(timescale, steps_per_epoch, name))
