"""Pure tensor functions behind the penalties: values, gradients and proximal operators.

Everything here takes tensors and numbers and returns tensors; nothing knows about
optimizers, modules or logging. The classes in :mod:`regfit.penalties` only bind
hyperparameters and call these functions.

The proximal operator of ``t·R`` at ``w`` is

.. math:: \\operatorname{prox}_{tR}(w) = \\arg\\min_x \\tfrac12 \\lVert x - w \\rVert^2 + t R(x).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "soft_threshold",
    "soft_threshold_",
    "half_threshold",
    "half_threshold_factor",
    "lp_prox",
    "lp_value",
    "lp_grad",
    "lp_grad_scales",
    "row_norms",
    "group_lasso_value",
    "group_lasso_grad",
    "block_soft_threshold",
]


def soft_threshold(w: Tensor, t: float | Tensor) -> Tensor:
    """Proximal operator of ``t·‖w‖₁``: ``sign(w)·max(|w| − t, 0)``.

    For a number ``t ≥ 0`` this is torch's one-pass ``softshrink`` kernel (the same bits
    as the textbook form); a tensor ``t`` uses ``w − clamp(w, −t, t)``.

    >>> soft_threshold(torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5]), 1.0)
    tensor([-1.0000,  0.0000,  0.0000,  0.0000,  0.5000])
    """
    if not isinstance(t, Tensor) and t >= 0:
        return torch.nn.functional.softshrink(w, t)
    return w - w.clamp(-t, t)


def soft_threshold_(w: Tensor, t: float) -> Tensor:
    """In-place :func:`soft_threshold`: one read and one write of ``w``, no temporary."""
    if t < 0:
        raise ValueError(f"soft_threshold_(t={t!r}): the threshold must be >= 0.")
    # softshrink's out= variant writes in place (input and output are the same memory,
    # which elementwise kernels allow); torch.nn.functional.softshrink has no out=.
    return torch._C._nn.softshrink(w, t, out=w)


def half_threshold(w: Tensor, t: float | Tensor) -> Tensor:
    """Closed-form proximal operator of ``t·Σ|w|^½`` (half-thresholding, Xu et al. 2012).

    With the problem written as ``½(x − w)² + t·|x|^½`` the global minimizer is 0 for
    ``|w| ≤ (3/2)·t^(2/3)`` and otherwise

    .. math:: x = \\tfrac23 w \\Big(1 + \\cos\\big(\\tfrac{2\\pi}{3} - \\tfrac23 \\varphi\\big)\\Big),
              \\quad \\varphi = \\arccos\\Big(\\tfrac{t}{4}\\big(\\tfrac{|w|}{3}\\big)^{-3/2}\\Big).

    Xu, Chang, Xu, Zhang (2012), "L1/2 regularization: a thresholding representation
    theory and a fast solver", IEEE TNNLS 23(7). (Their λ is ``2t`` here because their
    data term has no ½.)

    >>> half_threshold(torch.tensor([0.5, 1.0, 4.0]), 1.0)
    tensor([0.0000, 0.0000, 3.7415])
    """
    if not isinstance(t, Tensor) and t == 0:
        return w.clone()  # the trigonometric form is exact only up to rounding at t = 0
    return half_threshold_factor(w, t).mul_(w)


def half_threshold_factor(w: Tensor, t: float | Tensor) -> Tensor:
    """The factor ``f`` with ``half_threshold(w, t) = f·w``: 0 where ``|w|`` is at most the
    threshold, else ``⅔(1 + cos(2π/3 − ⅔φ))``.

    Computed in place on one temporary (plus a boolean mask), so the in-place prox
    ``w.mul_(f)`` holds little more than one copy of ``w``; ``(|w|/3)^{−3/2}`` is taken as
    ``rsqrt(|w|/3)³``, far faster on CPU than the generic ``pow``.
    """
    # A float t stays a Python number: a device tensor made from it would be a host-to-GPU
    # copy, i.e. a synchronization, at every proximal step.
    threshold = 1.5 * (t.pow(2.0 / 3.0) if isinstance(t, Tensor) else t ** (2.0 / 3.0))
    f = w.abs()
    keep = f > threshold
    # The clamps keep arccos's argument in [-1, 1] and avoid 0^(-3/2) for entries that the
    # threshold zeroes anyway; `keep` discards those lanes.
    f.clamp_(min=torch.finfo(w.dtype).tiny).clamp_(min=threshold)
    f.div_(3.0).rsqrt_().pow_(3).mul_(t / 4.0).clamp_(-1.0, 1.0).arccos_()  # φ
    f.mul_(-2.0 / 3.0).add_(2.0 * math.pi / 3.0).cos_().add_(1.0).mul_(2.0 / 3.0)
    return f.mul_(keep)


def lp_prox(w: Tensor, t: float, p: float, iters: int = 30) -> Tensor:
    """Proximal operator of ``t·Σ|w|^p`` for ``0 < p < 1`` (exact up to Newton tolerance).

    The global minimizer is 0 for ``|w| ≤ τ`` with
    ``τ = (2 − p)/(2 − 2p) · (2t(1 − p))^{1/(2−p)}``; above τ it is the largest root of
    ``x + t·p·x^{p−1} = |w|``, found by Newton's method from ``x = |w|`` (the function is
    convex for x > 0, so the iterates decrease monotonically to that root).
    For ``p = ½`` prefer :func:`half_threshold` (closed form).
    """
    if t == 0:
        return w.clone()
    a = w.abs()
    beta = (2.0 * t * (1.0 - p)) ** (1.0 / (2.0 - p))
    tau = (2.0 - p) / (2.0 - 2.0 * p) * beta
    x = torch.clamp(a, min=beta)
    for _ in range(iters):
        f = x + t * p * x.pow(p - 1.0) - a
        df = 1.0 + t * p * (p - 1.0) * x.pow(p - 2.0)
        x = torch.clamp(x - f / df, min=beta)
    return torch.where(a > tau, torch.copysign(x, w), torch.zeros_like(w))


class _LpValue(torch.autograd.Function):
    """``Σ|w|^p`` whose backward is the smoothed, finite gradient of :func:`lp_grad`.

    So adding ``Lp().value(w)`` to a loss never produces NaN, unlike
    ``torch.sqrt(w.abs()).sum()`` whose backward is ``inf × 0 = NaN`` at exact zeros.
    """

    @staticmethod
    def forward(ctx, w: Tensor, p: float, eps: float) -> Tensor:
        ctx.save_for_backward(w)
        ctx.p, ctx.eps = p, eps
        return w.abs().pow(p).sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (w,) = ctx.saved_tensors
        return grad_out * lp_grad(w, ctx.p, ctx.eps), None, None


def lp_value(w: Tensor, p: float, eps: float) -> Tensor:
    """``Σ|w|^p`` (exact), differentiable with the smoothed gradient of :func:`lp_grad`."""
    return _LpValue.apply(w, p, eps)


def lp_grad(w: Tensor, p: float, eps: float) -> Tensor:
    """Finite gradient of ``Σ|w|^p``, smoothed inside ``|w| < eps``.

    Outside the band it is the exact ``p·sign(w)·|w|^{p−1}``. Inside, ``|w|^p`` is
    replaced by the quadratic ``(p/2)·eps^{p−2}·w² + (1 − p/2)·eps^p`` that matches value
    and slope at ``±eps``, whose gradient ``p·eps^{p−2}·w`` is linear, 0 at 0 and bounded
    by ``p·eps^{p−1}``. Both pieces are one formula,

    .. math:: \\nabla R(w) = p\\, w \\max(|w|, \\varepsilon)^{p-2},

    which is how it is computed (see :func:`lp_grad_scales`).
    """
    (s,) = lp_grad_scales([w], p, eps)
    return s.mul_(w).mul_(p)


def lp_grad_scales(ws: list[Tensor], p: float, eps: float) -> list[Tensor]:
    """``max(|w|, eps)^{p−2}`` for each tensor, so that :func:`lp_grad` is ``p·w·scale``.

    The batched form behind the in-place penalty kernels: one temporary per tensor and
    three in-place passes over it (four for p = ½); the kernels then fold ``p·w·scale``
    into the gradient (or weight) with one ``addcmul``. For p = ½ the power ``x^{−3/2}``
    is taken as ``rsqrt(x)³``, about 50× faster on CPU than the generic ``pow``, which
    goes through ``exp``/``log``.
    """
    a = torch._foreach_abs(ws)
    torch._foreach_clamp_min_(a, eps)
    if p == 0.5:
        torch._foreach_rsqrt_(a)
        torch._foreach_pow_(a, 3)
    else:
        torch._foreach_pow_(a, p - 2.0)
    return a


def row_norms(w: Tensor) -> Tensor:
    """Euclidean norm of each slice along dim 0 (rows of a Linear, filters of a Conv)."""
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1) if w.ndim else w.abs()


def _group_weight(w: Tensor) -> float:
    # √|g|: the group size is the number of entries in one slice along dim 0.
    return math.sqrt(w[0].numel()) if w.ndim else 1.0


def group_lasso_value(w: Tensor) -> Tensor:
    """``Σ_g √|g|·‖w_g‖₂`` over the slices along dim 0 (Yuan & Lin 2006)."""
    return _group_weight(w) * row_norms(w).sum()


def group_lasso_grad(w: Tensor) -> Tensor:
    """Gradient ``√|g|·w_g/‖w_g‖₂``; the subgradient 0 is used for a group that is all 0."""
    norms = row_norms(w)
    inv = torch.where(norms > 0, 1.0 / torch.clamp(norms, min=torch.finfo(w.dtype).tiny), 0.0)
    return _group_weight(w) * w * inv.reshape((-1,) + (1,) * (w.ndim - 1))


def block_soft_threshold(w: Tensor, t: float | Tensor) -> Tensor:
    """Proximal operator of ``t·Σ_g √|g|·‖w_g‖₂``: each slice shrinks towards 0 by
    ``t√|g|`` in norm, and becomes exactly 0 when its norm is at most that.
    """
    norms = row_norms(w)
    tg = t * _group_weight(w)
    factor = torch.clamp(1.0 - tg / torch.clamp(norms, min=torch.finfo(w.dtype).tiny), min=0.0)
    return w * factor.reshape((-1,) + (1,) * (w.ndim - 1))
