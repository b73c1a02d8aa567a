r"""What a term does to the weights' motion: rotation per step, effective lr, who dominates
the update, and the equilibrium the theory predicts. Pure functions on tensors and
hyperparameters; :class:`~regfit.Regularization` calls them on logging steps.

Why rotation. A tensor w is *scale-invariant* when the loss does not change if w is
multiplied by any α > 0 — a layer followed by BatchNorm, LayerNorm or RMSNorm (without a
bias of its own). Then ∇L(w) ⟂ w and ‖∇L(αw)‖ = ‖∇L(w)‖/α, so only w's direction matters
and a gradient step turns w by an angle of about η‖∇L‖/‖w‖ ∝ η/‖w‖²: the *effective
learning rate* η/‖w‖² (van Laarhoven 2017; Zhang et al. 2019; Li & Arora 2020). Gradient
steps lengthen w (Pythagoras), weight decay shortens it; the two balance in a *rotational
equilibrium* where every step turns w by a fixed expected angle (Kosson et al. 2024,
"Rotational equilibrium: how weight decay balances learning across neural networks").

Derivation (random-walk model, first order in ηλ). Write a step as
w ← (1 − q)·w − η·u, with q the fraction the decay removes per step (in the long run) and
u the optimizer's update for the data gradient, tangential to w. Let S = E‖η·u_t‖² be the
squared length of one step and D = lim E‖η·Σ_{t<T} u_t‖²/T the squared distance the steps
travel per step in the long run (D > S when momentum makes successive steps agree).
Pythagoras makes ‖w‖² grow by D per step and the decay shrinks it by 2q‖w‖², so in
equilibrium ‖w‖² = D/(2q), and the angle of one step is

.. math::  \theta_{eq} = \sqrt{S/\lVert w\rVert^2} = \sqrt{2\,q\,S/D}.

For gradients uncorrelated from step to step, heavy-ball momentum β (torch ``SGD``
with ``dampening`` δ, or Adam's first moment with β = β₁, δ = β₁) gives
S/D = (1 − β)/(1 + β), whatever δ. The decay fraction q depends on the mode:

=====================================  =================================  =================================
optimizer, mode (penalty ``L2``)       q                                   θ_eq
=====================================  =================================  =================================
SGD(momentum=β, dampening=δ), coupled  η·λ·(1 − δ)/(1 − β) (the decay      √(2ηλ(1 − δ)/(1 + β));
                                       passes through the momentum)        plain SGD: **√(2ηλ)**
SGD(momentum=β), decoupled/proximal    s·λ (s: the decoupled step size)    √(2sλ(1 − β)/(1 + β))
Adam/AdamW (β₁), decoupled/proximal    s·λ                                 √(2sλ(1 − β₁)/(1 + β₁))
Adam, coupled                          none: Adam divides the decay by     —
                                       the gradient's running RMS
SGD(nesterov=True), other optimizers,  not derived here                    —
cautious mode, other penalties
=====================================  =================================  =================================

(λ is the term's strength times the tensor's coefficient c; s = η for ``Decoupled()``.)
Plain SGD with coupled L2 is exact beyond first order: cos θ = 1 − ηλ at equilibrium.
Adam normalizes each coordinate, so its steps are only approximately tangential; the
formula holds when the gradient's scale is similar across a tensor's entries. In
equilibrium with coupled SGD the penalty's share of the gradient, ‖λw‖/‖∇L‖, is √(q/2):
√(ηλ/2) = θ_eq/2 for plain SGD. Each formula is checked against a simulation of the model in ``tests/unit/test_dynamics.py``
and, for plain SGD, against a real Linear → LayerNorm layer in
``tests/properties/test_rotational_equilibrium.py``.

Angles are computed as θ = 2·asin(‖â − b̂‖/2) for the tensor before (a) and after (b) the
step, from sums that add up over the shards of a sharded tensor (‖a‖² and ‖b‖², then
‖a·‖b‖/‖a‖ − b‖²): accurate for the tiny angles of one step whatever the change of length
(arccos of the cosine is not: in float32 it cannot resolve angles below ~3e-4 rad).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from regfit.modes import Coupled, Decoupled, Mode, Proximal
from regfit.penalties import L2, Penalty

__all__ = ["squared_norms", "unit_difference_sums", "rotation_angles", "angles", "angle", "rms", "effective_lrs", "step_ratio", "decay_fraction",
           "equilibrium_angle"]


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _result_dtype(t: Tensor) -> torch.dtype:
    """float64 for the sums (so that they can be subtracted), except where the device has none."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """‖t‖² of each tensor (one batched call; bf16/fp16 accumulated in float32), as float64.

    >>> squared_norms([torch.tensor([3.0, 4.0]), torch.ones(2, 2, dtype=torch.bfloat16)])
    tensor([25.,  4.], dtype=torch.float64)
    """
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    low = tensors[0].dtype in _LOW_PRECISION
    # (an explicit dtype takes a slower path: only where the tensor's own would lose digits)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32) if low else torch._foreach_norm(tensors)
    return torch.stack(norms).to(_result_dtype(tensors[0])).square()


def unit_difference_sums(before: Sequence[Tensor], after: Sequence[Tensor], ratios: Sequence[float],
                         inplace: bool = False) -> Tensor:
    """‖a/κ − b‖² per tensor pair, κ = ``ratios[i]`` = ‖a‖/‖b‖ (so a/κ is a rescaled to b's
    length; sums over shards add up, given the whole tensors' κ). ``inplace=True`` writes
    a/κ − b into ``before`` instead of a copy.

    >>> a, b = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    >>> unit_difference_sums([a], [b], [2.0])  # ‖(1, −1)‖²
    tensor([2.0000], dtype=torch.float64)
    """
    before = [t.detach() for t in before]
    after = [t.detach() for t in after]
    if not before:
        return torch.zeros(0, dtype=torch.float64)
    diff = before if inplace else torch._foreach_clone(before)
    torch._foreach_div_(diff, [float(r) if r > 0 else 1.0 for r in ratios])
    torch._foreach_sub_(diff, after)
    return squared_norms(diff)


def rotation_angles(sq_before: Tensor, sq_after: Tensor, sq_unit_difference: Tensor) -> Tensor:
    """The angle (radians) between a and b from ‖a‖², ‖b‖² and ‖a/κ − b‖² (κ = ‖a‖/‖b‖,
    :func:`unit_difference_sums`): θ = 2·asin(‖â − b̂‖/2); NaN where a or b is 0.

    >>> rotation_angles(*torch.tensor([[4.0, 1.0], [1.0, 1.0], [2.0, 4.0]], dtype=torch.float64))
    tensor([1.5708, 3.1416], dtype=torch.float64)
    """
    chord = (sq_unit_difference / sq_after).sqrt()  # ‖â − b̂‖ ∈ [0, 2]
    chord = torch.where((sq_before > 0) & (sq_after > 0), chord, torch.nan)
    return 2 * torch.asin((chord / 2).clamp(max=1.0))


def angles(before: Sequence[Tensor], after: Sequence[Tensor]) -> Tensor:
    """The angle (radians) between each pair of tensors, accurate for tiny rotations: a is
    rescaled to b's length and subtracted entry by entry (exact for nearby values), so the
    error stays ~1e-7 rad in float32 whatever the change of length.

    >>> angles([torch.tensor([3.0, 0.0])], [torch.tensor([3.0, 3.0])])
    tensor([0.7854], dtype=torch.float64)
    """
    sq_a, sq_b = squared_norms(before), squared_norms(after)
    ratios = (sq_a / sq_b).sqrt().tolist()
    return rotation_angles(sq_a, sq_b, unit_difference_sums(before, after, ratios))


def angle(a: Tensor, b: Tensor) -> Tensor:
    """The angle (radians) between two tensors of one shape, accurate for tiny angles.

    >>> round(float(angle(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1e-6]))), 12)
    1e-06
    """
    return angles([a], [b])[0]


def rms(values: Tensor) -> Tensor:
    """Root mean square over the finite entries (NaN when none is finite).

    >>> rms(torch.tensor([3.0, 4.0, float("nan")]))
    tensor(3.5355)
    """
    values = torch.where(torch.isfinite(values), values, torch.nan)
    return values.square().nanmean().sqrt()


def effective_lrs(lrs: Sequence[float], sq_norms: Tensor) -> Tensor:
    """η/‖w‖² per tensor (NaN for a zero tensor), the rate at which SGD turns a
    scale-invariant w.

    >>> effective_lrs([0.1, 0.1], torch.tensor([4.0, 0.0]))
    tensor([0.0250,    nan])
    """
    lr = torch.tensor(list(lrs), dtype=sq_norms.dtype)
    return torch.where(sq_norms > 0, lr / sq_norms, torch.nan)


# ---- the predicted equilibrium ---------------------------------------------------------------


def _momentum(optimizer: torch.optim.Optimizer, group: dict) -> tuple[str, float, float] | None:
    """(kind, β, δ): the optimizer family and its heavy-ball momentum and dampening, or
    None for an optimizer the table of the module docstring does not cover."""
    if isinstance(optimizer, torch.optim.SGD):
        if group.get("nesterov"):
            return None
        return "sgd", float(group.get("momentum", 0.0) or 0.0), float(group.get("dampening", 0.0) or 0.0)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(group["betas"][0])
        return "adam", beta1, beta1
    return None


def step_ratio(optimizer: torch.optim.Optimizer, group: dict) -> float | None:
    """S/D = (1 − β)/(1 + β): one step's squared length over the long-run squared distance
    per step, for uncorrelated gradients (None when not derived for this optimizer).

    >>> w = torch.zeros(1, requires_grad=True)
    >>> round(step_ratio(torch.optim.SGD([w], lr=0.1, momentum=0.9), {"momentum": 0.9}), 6)  # 0.1/1.9
    0.052632
    """
    found = _momentum(optimizer, group)
    if found is None:
        return None
    _, beta, _ = found
    return (1 - beta) / (1 + beta)


def decay_fraction(optimizer: torch.optim.Optimizer, group: dict, mode: Mode, strength: float,
                   decay_step: float) -> float | None:
    """q: the fraction of w the term's L2 decay removes per step in the long run, or None.

    ``strength`` is λ·c of the tensor; ``decay_step`` the decoupled or proximal step size
    (η for ``Decoupled()``, see :meth:`regfit.modes.Mode.step_size`)."""
    found = _momentum(optimizer, group)
    if found is None:
        return None
    kind, beta, dampening = found
    if type(mode) is Coupled:
        if kind != "sgd":
            return None  # Adam divides the decay by the gradient's running RMS
        return float(group["lr"]) * strength * (1 - dampening) / (1 - beta)
    if type(mode) in (Decoupled, Proximal):
        return decay_step * strength
    return None  # cautious decay, your own modes: not derived


def equilibrium_angle(optimizer: torch.optim.Optimizer, group: dict, mode: Mode, penalty: Penalty,
                      strength: float, decay_step: float) -> float | None:
    """θ_eq = √(2·q·S/D), the angle per step of a scale-invariant tensor in rotational
    equilibrium (see the module docstring), or None where no prediction is derived.

    >>> w = torch.zeros(1, requires_grad=True)
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> round(equilibrium_angle(opt, opt.param_groups[0], Coupled(), L2(), 0.05, 0.1), 6)  # √(2·0.1·0.05)
    0.1
    """
    if not isinstance(penalty, L2):
        return None
    q = decay_fraction(optimizer, group, mode, strength, decay_step)
    ratio = step_ratio(optimizer, group)
    if q is None or ratio is None:
        return None
    return math.sqrt(2 * max(q, 0.0) * ratio)
