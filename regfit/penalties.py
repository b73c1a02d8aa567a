"""Penalties R(w) on one tensor: value, gradient and proximal operator.

A penalty is a tiny object that binds hyperparameters and calls :mod:`regfit.functional`.
It knows nothing of optimizers, modules, strengths or logging: the strength λ and the
per-tensor scale c live in a :class:`~regfit.term.Term`, and *how* the penalty touches
training lives in a :mod:`~regfit.modes` object.

Conventions (the ones torch, AdamW, scikit-learn and Keras users need to convert):

======================  ==============================================  =====================
penalty                 R(w)                                            equivalence
======================  ==============================================  =====================
``L2()``                ½‖w‖²                                           strength λ ≡ torch ``weight_decay=λ``; Keras ``l2(k)`` ≡ λ = 2k
``L1()``                ‖w‖₁                                            Keras ``l1(k)`` ≡ λ = k
``ElasticNet(α)``       α‖w‖₁ + (1−α)·½‖w‖²                              scikit-learn ``l1_ratio``
``Lp(p)``, ``LHalf()``  Σ|w|^p, 0 < p < 1                               —
``GroupLasso()``        Σ_g √|g|·‖w_g‖₂ over slices along dim 0          —
======================  ==============================================  =====================

Writing your own penalty takes one method; the gradient then comes from autograd and the
penalty works in ``coupled`` and ``decoupled`` mode (``proximal`` needs :meth:`prox`)::

    class LogCosh(Penalty):
        def value(self, w):
            return torch.log(torch.cosh(w)).sum()
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from regfit import functional as F

__all__ = ["Penalty", "L2", "L1", "ElasticNet", "Lp", "LHalf", "GroupLasso", "resolve_penalty"]


class Penalty:
    """Base class: ``value(w)`` is required; ``grad`` defaults to autograd of ``value``.

    The batched in-place methods (``total``, ``add_grad_``, ``decay_``, ``prox_``) are
    what the modes call once per optimizer step on all tensors of a term that share one
    coefficient. Their defaults loop over tensors; built-ins override them with
    ``torch._foreach_*`` kernels.
    """

    #: Short name used for the default term name and in tables.
    name: str = "penalty"

    def value(self, w: Tensor) -> Tensor:
        """R(w) as a 0-dim tensor."""
        raise NotImplementedError(f"{type(self).__name__} must implement value(w).")

    def grad(self, w: Tensor) -> Tensor:
        """∇R(w), by autograd through :meth:`value` (override with a closed form)."""
        with torch.enable_grad():
            leaf = w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.value(leaf), leaf)
        return g

    def prox(self, w: Tensor, t: float) -> Tensor:
        """argmin_x ½‖x − w‖² + t·R(x)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no prox(w, t), so it cannot be used with mode='proximal'. "
            "Use mode='coupled' or 'decoupled', or implement prox()."
        )

    # ---- batched kernels used by the modes (all under torch.no_grad) -------------------
    def total(self, ws: Sequence[Tensor], coeffs: Sequence[float]) -> Tensor:
        """Σ_i coeffs[i]·R(ws[i]) as a float32-or-wider 0-dim tensor."""
        return torch.stack([c * self.value(_upcast(w)) for w, c in zip(ws, coeffs)]).sum()

    def add_grad_(self, gs: list[Tensor], ws: list[Tensor], alpha: float) -> None:
        """gs[i] += alpha·∇R(ws[i])."""
        for g, w in zip(gs, ws):
            g.add_(self.grad(w), alpha=alpha)

    def decay_(self, ws: list[Tensor], alpha: float) -> None:
        """ws[i] −= alpha·∇R(ws[i]) (a decoupled step)."""
        for w in ws:
            w.sub_(self.grad(w), alpha=alpha)

    def prox_(self, ws: list[Tensor], t: float) -> None:
        """ws[i] ← prox_{t·R}(ws[i])."""
        for w in ws:
            w.copy_(self.prox(w, t))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


def _upcast(w: Tensor) -> Tensor:
    # Penalties are summed in float32 at least, also for bf16/fp16 parameters.
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


# Temporaries of the batched kernels are bounded by one copy of the largest tensor: the
# tensors are cut into runs whose total size is at most that, one ``_foreach`` call per run
# (a single ``_foreach_sign`` over all parameters would hold a full copy of the model). On
# CPU a ``_foreach`` op is a loop over its tensors anyway, so the runs cost nothing; on an
# accelerator every run is a kernel launch, so runs there may reach 4 Mi elements (16 MiB in
# float32) even when every tensor is smaller.
_MIN_RUN = {"cpu": 0}
_DEFAULT_MIN_RUN = 1 << 22


def _runs(ws: Sequence[Tensor]) -> list[slice]:
    """Consecutive index ranges of ``ws`` holding at most max(largest numel, device floor)."""
    sizes = [w.numel() for w in ws]
    if not sizes:
        return []
    budget = max(max(sizes), _MIN_RUN.get(ws[0].device.type, _DEFAULT_MIN_RUN))
    runs, start, filled = [], 0, 0
    for i, n in enumerate(sizes):
        if filled + n > budget:
            runs.append(slice(start, i))
            start, filled = i, 0
        filled += n
    runs.append(slice(start, len(sizes)))
    return runs


class L2(Penalty):
    """Squared Euclidean norm, halved: :math:`R(w) = \\tfrac12 \\lVert w \\rVert_2^2`.

    The ½ makes ``∇R = w``, so coupled ``L2`` with strength λ is exactly
    ``torch.optim.SGD(weight_decay=λ)`` and decoupled ``L2`` with Adam is exactly
    ``torch.optim.AdamW(weight_decay=λ)``.

    >>> L2().value(torch.tensor([3.0, 4.0]))
    tensor(12.5000)
    >>> L2().prox(torch.tensor([3.0, 4.0]), 1.0)
    tensor([1.5000, 2.0000])
    """

    name = "l2"

    def value(self, w: Tensor) -> Tensor:
        return 0.5 * w.pow(2).sum()

    def grad(self, w: Tensor) -> Tensor:
        return w.clone()

    def prox(self, w: Tensor, t: float) -> Tensor:
        return w / (1.0 + t)

    def total(self, ws, coeffs):
        norms = torch.stack(torch._foreach_norm([_upcast(w) for w in ws]))
        return 0.5 * (norms.square() * _as_tensor(coeffs, norms)).sum()

    def add_grad_(self, gs, ws, alpha):
        torch._foreach_add_(gs, ws, alpha=alpha)  # bit-identical to SGD(weight_decay=alpha)

    def decay_(self, ws, alpha):
        torch._foreach_mul_(ws, 1.0 - alpha)  # bit-identical to AdamW's p.mul_(1 - lr*wd)

    def prox_(self, ws, t):
        torch._foreach_div_(ws, 1.0 + t)


class L1(Penalty):
    """Sum of absolute values: :math:`R(w) = \\lVert w \\rVert_1`.

    ``grad`` is ``sign(w)`` with the subgradient 0 at 0; ``prox`` is soft-thresholding,
    which sets entries with ``|w| ≤ t`` exactly to 0.

    >>> L1().prox(torch.tensor([-2.0, 0.5, 3.0]), 1.0)
    tensor([-1.,  0.,  2.])
    """

    name = "l1"

    def value(self, w: Tensor) -> Tensor:
        return w.abs().sum()

    def grad(self, w: Tensor) -> Tensor:
        return torch.sign(w)

    def prox(self, w: Tensor, t: float) -> Tensor:
        return F.soft_threshold(w, t)

    def total(self, ws, coeffs):
        norms = torch.stack(torch._foreach_norm([_upcast(w) for w in ws], 1))
        return (norms * _as_tensor(coeffs, norms)).sum()

    def add_grad_(self, gs, ws, alpha):
        for r in _runs(ws):
            torch._foreach_add_(gs[r], torch._foreach_sign(ws[r]), alpha=alpha)

    def decay_(self, ws, alpha):
        for r in _runs(ws):
            torch._foreach_add_(ws[r], torch._foreach_sign(ws[r]), alpha=-alpha)

    def prox_(self, ws, t):
        for r in _runs(ws):
            run = ws[r]
            if len(run) == 1:
                F.soft_threshold_(run[0], t)  # two passes instead of three
            else:
                # w − clamp(w, −t, t), with the clamp split in two for _foreach
                clipped = torch._foreach_clamp_min(run, -t)
                torch._foreach_clamp_max_(clipped, t)
                torch._foreach_sub_(run, clipped)
                del clipped  # before the next run allocates its own


class ElasticNet(Penalty):
    """:math:`R(w) = \\alpha \\lVert w \\rVert_1 + (1-\\alpha)\\tfrac12 \\lVert w \\rVert_2^2`
    (scikit-learn's ``l1_ratio`` convention).

    Prox: ``soft_threshold(w, tα) / (1 + t(1 − α))``. The same objective can be built by
    composition as two terms, ``L1`` with strength αλ and ``L2`` with strength (1−α)λ.

    Args:
        l1_ratio: α in [0, 1]; 1 is L1, 0 is L2.
    """

    name = "elasticnet"

    def __init__(self, l1_ratio: float = 0.5) -> None:
        if not 0.0 <= l1_ratio <= 1.0:
            raise ValueError(f"ElasticNet(l1_ratio={l1_ratio!r}): l1_ratio must be in [0, 1] (1 = L1, 0 = L2).")
        self.l1_ratio = float(l1_ratio)

    def value(self, w: Tensor) -> Tensor:
        a = self.l1_ratio
        return a * w.abs().sum() + (1.0 - a) * 0.5 * w.pow(2).sum()

    def grad(self, w: Tensor) -> Tensor:
        a = self.l1_ratio
        return a * torch.sign(w) + (1.0 - a) * w

    def prox(self, w: Tensor, t: float) -> Tensor:
        a = self.l1_ratio
        return F.soft_threshold(w, t * a) / (1.0 + t * (1.0 - a))


class Lp(Penalty):
    """Non-convex bridge penalty :math:`R(w) = \\sum_i |w_i|^p`, ``0 < p < 1``.

    The true gradient ``p·|w|^{p−1}`` is infinite at 0 (and a naive
    ``torch.sqrt(w.abs())`` gives NaN there). ``grad`` — and the backward of ``value`` —
    use a quadratic smoothing inside ``|w| < eps`` so they are finite everywhere (see
    :func:`regfit.functional.lp_grad`); ``value`` itself is exact. ``prox`` is the exact
    thresholding operator: closed form for p = ½, Newton for other p.

    Args:
        p: exponent in (0, 1).
        eps: half-width of the smoothing band of the gradient.
    """

    name = "lp"

    def __init__(self, p: float = 0.5, eps: float = 1e-3) -> None:
        if not 0.0 < p < 1.0:
            raise ValueError(f"Lp(p={p!r}): p must be in (0, 1); use L1 for p=1 and L2 for p=2.")
        if not eps > 0.0:
            raise ValueError(f"Lp(eps={eps!r}): eps must be > 0 (it bounds the gradient by p·eps^(p-1)).")
        self.p = float(p)
        self.eps = float(eps)

    def value(self, w: Tensor) -> Tensor:
        return F.lp_value(w, self.p, self.eps)

    def grad(self, w: Tensor) -> Tensor:
        return F.lp_grad(w, self.p, self.eps)

    def prox(self, w: Tensor, t: float) -> Tensor:
        if self.p == 0.5:
            return F.half_threshold(w, t)
        return F.lp_prox(w, t, self.p)

    def prox_(self, ws, t):
        if self.p != 0.5:
            return super().prox_(ws, t)
        if t:
            for w in ws:
                w.mul_(F.half_threshold_factor(w, t))

    def add_grad_(self, gs, ws, alpha):
        for r in _runs(ws):
            torch._foreach_add_(gs[r], F.lp_grads(ws[r], self.p, self.eps), alpha=alpha * self.p)

    def decay_(self, ws, alpha):
        for r in _runs(ws):
            torch._foreach_add_(ws[r], F.lp_grads(ws[r], self.p, self.eps), alpha=-alpha * self.p)


class LHalf(Lp):
    """The L1/2 penalty :math:`\\sum_i |w_i|^{1/2}` = ``Lp(p=0.5)``, with half-thresholding
    as its prox (Xu et al. 2012).

    >>> LHalf().value(torch.tensor([4.0, 0.0, 9.0]))
    tensor(5.)
    """

    name = "lhalf"

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__(p=0.5, eps=eps)


class GroupLasso(Penalty):
    """Group lasso :math:`R(w) = \\sum_g \\sqrt{|g|}\\,\\lVert w_g \\rVert_2`, one group per
    slice along dim 0: a row (output unit) of a Linear weight, an output filter of a Conv.

    Its prox is block soft-thresholding, which removes whole units/filters. A 1-d tensor
    (a bias) has groups of size 1, so there it acts as L1. Yuan & Lin (2006).
    """

    name = "grouplasso"

    def value(self, w: Tensor) -> Tensor:
        return F.group_lasso_value(w)

    def grad(self, w: Tensor) -> Tensor:
        return F.group_lasso_grad(w)

    def prox(self, w: Tensor, t: float) -> Tensor:
        return F.block_soft_threshold(w, t)


def _as_tensor(coeffs: Sequence[float], like: Tensor) -> Tensor:
    return torch.as_tensor(coeffs, dtype=like.dtype, device=like.device)


_BY_NAME: dict[str, type[Penalty]] = {
    cls.name: cls for cls in (L2, L1, ElasticNet, Lp, LHalf, GroupLasso)
}


def resolve_penalty(penalty: Penalty | str) -> Penalty:
    """A Penalty instance from an instance or a short name (``l2``, ``l1``, ``lhalf``, …)."""
    if isinstance(penalty, Penalty):
        return penalty
    if isinstance(penalty, str) and penalty.lower() in _BY_NAME:
        return _BY_NAME[penalty.lower()]()
    raise ValueError(
        f"Unknown penalty {penalty!r}. Use one of {sorted(_BY_NAME)} or a Penalty instance "
        "(in YAML: class_path: regfit.penalties.ElasticNet, init_args: {l1_ratio: 0.5})."
    )
