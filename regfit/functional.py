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
    "half_threshold_",
    "lp_prox",
    "lp_value",
    "lp_grad",
    "lp_grad_scales",
    "row_norms",
    "group_lasso_value",
    "group_lasso_grad",
    "block_soft_threshold",
    "bundle_norms",
    "bundle_group_size",
    "group_lasso_bundle_value",
    "group_lasso_bundle_grad",
    "block_soft_threshold_bundle_",
]


def soft_threshold(w: Tensor, t: float | Tensor) -> Tensor:
    """Proximal operator of ``t·‖w‖₁``: ``sign(w)·max(|w| − t, 0)``.

    For a number ``t ≥ 0`` this is torch's one-pass ``softshrink`` kernel (the same bits
    as the textbook form); a tensor ``t`` uses ``w − clamp(w, −t, t)``.

    >>> soft_threshold(torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5]), 1.0)
    tensor([-1.0000, -0.0000,  0.0000,  0.0000,  0.5000])
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


_16_BIT = frozenset({torch.float16, torch.bfloat16})


def half_threshold(w: Tensor, t: float) -> Tensor:
    """Closed-form proximal operator of ``t·Σ|w|^½`` (half-thresholding, Xu et al. 2012).

    With the problem written as ``½(x − w)² + t·|x|^½`` the global minimizer is 0 for
    ``|w| ≤ (3/2)·t^(2/3)`` and otherwise

    .. math:: x = \\tfrac23 w \\Big(1 + \\cos\\big(\\tfrac{2\\pi}{3} - \\tfrac23 \\varphi\\big)\\Big),
              \\quad \\varphi = \\arccos\\Big(\\tfrac{t}{4}\\big(\\tfrac{|w|}{3}\\big)^{-3/2}\\Big).

    Xu, Chang, Xu, Zhang (2012), "L1/2 regularization: a thresholding representation
    theory and a fast solver", IEEE TNNLS 23(7). (Their λ is ``2t`` here because their
    data term has no ½.) Computed as :func:`half_threshold_` on a copy.

    >>> half_threshold(torch.tensor([0.5, 1.0, 4.0]), 1.0)
    tensor([0.0000, 0.0000, 3.7415])
    """
    (x,) = half_threshold_([w.clone()], t)
    return x


def half_threshold_(ws: list[Tensor], t: float) -> list[Tensor]:
    """:func:`half_threshold` of every tensor of ``ws``, in place, as batched ``_foreach``
    passes over one temporary per tensor (a caller bounds the list's size to bound it).

    The entries at or below the threshold are zeroed by ``hardshrink`` (in place); the
    others are multiplied by ``⅔(1 + cos(2π/3 − ⅔φ))``, which lies in (⅔, 1]. φ's argument
    ``(t/4)(|w|/3)^{−3/2}`` is taken as ``(s·|w|)^{−3/2}`` with ``s = (4/t)^{2/3}/3``, and
    ``s·|w|`` is clamped at 2^{1/3}, its value at the threshold: the argument then stays in
    (0, 1/√2] and no intermediate overflows, in float16 too (``(|w|/3)^{−3/2}`` itself
    exceeds float16's range below |w| ≈ 2e-3). ``x^{−3/2}`` is ``rsqrt(x)³``, far faster on
    CPU than the generic ``pow``.
    """
    if isinstance(t, Tensor):
        raise TypeError(f"half_threshold_(t={t!r}): pass the threshold parameter as a number.")
    if t < 0:
        raise ValueError(f"half_threshold_(t={t!r}): t must be >= 0.")
    if t == 0 or not ws:
        return ws
    dtypes = {w.dtype for w in ws}
    # s overflows float32 (the compute type of float32/16 tensors) only for t below ~1e-57;
    # capped there, entries below ~1e-38 are taken as lying at the threshold.
    cap = math.inf if dtypes == {torch.float64} else torch.finfo(torch.float32).max
    f = torch._foreach_abs(ws)
    scale = min((4.0 / t) ** (2.0 / 3.0) / 3.0, cap)
    if not dtypes.isdisjoint(_16_BIT):
        for x in f:  # a _foreach scalar is rounded to the tensor's dtype first (inf in float16)
            x.mul_(scale)  # Tensor.mul_ multiplies in float32
    else:
        torch._foreach_mul_(f, scale)
    torch._foreach_clamp_min_(f, 2.0 ** (1.0 / 3.0))
    torch._foreach_rsqrt_(f)
    torch._foreach_pow_(f, 3)  # (t/4)(|w|/3)^(−3/2), in (0, 1/√2]
    torch._foreach_acos_(f)  # φ
    torch._foreach_mul_(f, -2.0 / 3.0)
    torch._foreach_add_(f, 2.0 * math.pi / 3.0)
    torch._foreach_cos_(f)
    torch._foreach_add_(f, 1.0)
    torch._foreach_mul_(f, 2.0 / 3.0)
    threshold = 1.5 * t ** (2.0 / 3.0)
    for w in ws:
        torch.hardshrink(w, threshold, out=w)  # zero |w| <= threshold, one pass, in place
    torch._foreach_mul_(ws, f)
    return ws


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
    (s,), c = lp_grad_scales([w], p, eps)
    return s.mul_(w).mul_(p * c)


def lp_grad_scales(ws: list[Tensor], p: float, eps: float) -> tuple[list[Tensor], float]:
    """``(scales, c)`` with ``c·scale = max(|w|, eps)^{p−2}`` for each tensor, so that
    :func:`lp_grad` is ``p·c·w·scale``.

    The batched form behind the in-place penalty kernels: one temporary per tensor and
    three in-place passes over it (four for p = ½); the kernels then fold ``p·c·w·scale``
    into the gradient (or weight) with one ``addcmul``. For p = ½ the power ``x^{−3/2}``
    is taken as ``rsqrt(x)³``, about 50× faster on CPU than the generic ``pow``, which
    goes through ``exp``/``log``.

    ``c`` is 1 unless ``eps^{p−2}``, the largest scale, would overflow the weights' dtype
    (float16: ``Lp(p=0.3)`` at the default eps, or ``LHalf(eps < 7e-4)``). Then the scales
    are ``max(|w|, eps)/m0`` to the power ``p−2``, with ``m0`` chosen so that the largest is
    a quarter of the dtype's maximum (small scales, of large weights, stay out of its
    subnormal range as far as possible), and ``c = m0^{p−2}`` is applied as a number.
    """
    a = torch._foreach_abs(ws)
    torch._foreach_clamp_min_(a, eps)
    c = 1.0
    largest = min(torch.finfo(d).max for d in {w.dtype for w in ws}) / 4
    if eps ** (p - 2.0) > largest:
        m0 = eps * largest ** (1.0 / (2.0 - p))
        c = m0 ** (p - 2.0)
        for x in a:  # Tensor.mul_ multiplies in float32; a _foreach scalar is rounded to float16 first
            x.mul_(1.0 / m0)
    if p == 0.5:
        torch._foreach_rsqrt_(a)
        torch._foreach_pow_(a, 3)
    else:
        torch._foreach_pow_(a, p - 2.0)
    return a, c


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


# ---- a group spread over several tensors ----------------------------------------------------
#
# A *bundle* is a list of tensors whose slices along dim 0 belong together: slice u of every
# tensor is one group g_u (a Conv filter u with bias u and BatchNorm scale/shift u). All
# tensors of a bundle have the same size along dim 0; a bundle of one tensor is the plain
# row-wise group lasso above.


def bundle_group_size(ws: list[Tensor]) -> int:
    """|g|, the entries of one group: the sum over the bundle of one slice's size."""
    return sum(w[0].numel() if w.ndim else 1 for w in ws)


def bundle_norms(ws: list[Tensor]) -> Tensor:
    """‖g_u‖₂ for each group u of a bundle: √(Σ_t ‖w_t[u]‖²) over its tensors w_t."""
    if len(ws) == 1:
        return row_norms(ws[0])
    return torch.stack([row_norms(w) for w in ws]).square().sum(0).sqrt()


def group_lasso_bundle_value(ws: list[Tensor]) -> Tensor:
    """``Σ_u √|g|·‖g_u‖₂`` over the groups of a bundle (Yuan & Lin 2006).

    >>> group_lasso_bundle_value([torch.tensor([[3.0], [0.0]]), torch.tensor([4.0, 0.0])])  # √2·5
    tensor(7.0711)
    """
    return math.sqrt(bundle_group_size(ws)) * bundle_norms(ws).sum()


def _per_row(factor: Tensor, w: Tensor) -> Tensor:
    return factor.to(w.dtype).reshape((-1,) + (1,) * (w.ndim - 1))


def group_lasso_bundle_grad(ws: list[Tensor]) -> list[Tensor]:
    """``√|g|·w_t[u]/‖g_u‖₂`` for each tensor w_t; the subgradient 0 for a group that is all 0."""
    norms = bundle_norms(ws)
    inv = torch.where(norms > 0, 1.0 / torch.clamp(norms, min=torch.finfo(norms.dtype).tiny), 0.0)
    inv = inv * math.sqrt(bundle_group_size(ws))
    return [w * _per_row(inv, w) for w in ws]


def block_soft_threshold_bundle_(ws: list[Tensor], t: float) -> list[Tensor]:
    """In place: the proximal operator of ``t·Σ_u √|g|·‖g_u‖₂`` on a bundle.

    .. math:: g_u \\leftarrow g_u \\cdot \\max\\Big(0,\\; 1 - \\frac{t\\sqrt{|g|}}{\\lVert g_u \\rVert_2}\\Big)

    Every slice of group u is scaled by the same factor, so a group whose norm is at most
    t√|g| becomes exactly zero in every tensor at once — a filter with its bias and
    BatchNorm scale and shift. One norm and one multiply per tensor (``ws`` may be views).

    >>> w, b = torch.tensor([[3.0], [0.1]]), torch.tensor([4.0, 0.1])
    >>> block_soft_threshold_bundle_([w, b], 0.5)[1]  # group 0 shrinks by t√2 in norm; group 1 goes
    tensor([3.4343, 0.0000])
    """
    norms = bundle_norms(ws)
    tg = t * math.sqrt(bundle_group_size(ws))
    factor = torch.clamp(1.0 - tg / torch.clamp(norms, min=torch.finfo(norms.dtype).tiny), min=0.0)
    for w in ws:
        w.mul_(_per_row(factor, w))
    return ws
