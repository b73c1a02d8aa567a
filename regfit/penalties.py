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
``Orthogonal()``        ‖WWᵀ − I‖²_F (rows) or ‖WᵀW − I‖²_F (columns)    Keras 3 ``OrthogonalRegularizer`` ≡ ``normalized=True``, dims swapped
``Nuclear()``           Σ σ_i(W)                                        —
``SpectralNorm()``      σ_max(W), by power iteration                    —
======================  ==============================================  =====================

``GroupLasso(units=True)`` takes as a group a whole unit of the model — a filter with its
bias and BatchNorm channel — so that its prox zeroes what :func:`regfit.export.thin` removes.

Matrix penalties (``Orthogonal``, ``Nuclear``, ``SpectralNorm``) see a tensor of shape
(out, …) as the matrix W = w.reshape(out, −1): a Linear weight as is, a Conv weight with
one row per output filter. They refuse 1-d tensors (add ``exclude: ["ndim<2"]``).

Writing your own penalty takes one method; the gradient then comes from autograd and the
penalty works in ``coupled`` and ``decoupled`` mode (``proximal`` needs :meth:`prox`)::

    class LogCosh(Penalty):
        def value(self, w):
            return torch.log(torch.cosh(w)).sum()
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from regfit import functional as F
from regfit.hyperparams import Hyperparams, check_int, check_number

__all__ = ["Penalty", "L2", "L1", "ElasticNet", "Lp", "LHalf", "GroupLasso", "Orthogonal", "Nuclear", "SpectralNorm",
           "Builtin", "BUILTINS", "resolve_penalty"]


class Penalty(Hyperparams):
    """Base class: ``value(w)`` is required; ``grad`` defaults to autograd of ``value``.

    The batched in-place methods (``total``, ``add_grad_``, ``decay_``, ``prox_``) are
    what the modes call once per optimizer step on all tensors of a term that share one
    coefficient. Their defaults loop over tensors; built-ins override them with
    ``torch._foreach_*`` kernels.
    """

    #: Short name used for the default term name and in tables.
    name: str = "penalty"
    #: The tensor dims along which a sharded (DTensor) parameter may be cut with the
    #: kernels still exact shard by shard (see :mod:`regfit.sharding`): ``"any"`` for a sum
    #: over entries, ``(0,)`` for a sum over rows, ``()`` (the default) for none — such a
    #: penalty is refused on sharded parameters. Set ``"any"`` on your own penalty when
    #: R(w) = Σ_i r(w_i) and its grad/prox act entry by entry.
    shard_dims: str | tuple[int, ...] = ()
    #: Whether the groups are whole units of the model spread over several tensors (a
    #: filter with its bias and norm channel, see :mod:`regfit.units`): the term then hands
    #: each batched kernel the tensors of one unit group, units along dim 0
    #: (``GroupLasso(units=True)``).
    units: bool = False

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

    def __hash__(self) -> int:  # penalties are immutable once made
        return hash((type(self), tuple(sorted(vars(self).items()))))


def _upcast(w: Tensor) -> Tensor:
    # Penalties are summed in float32 at least, also for bf16/fp16 parameters.
    return w.float() if w.dtype in (torch.float16, torch.bfloat16) else w


# Temporaries of the batched kernels are bounded by one copy of the largest tensor: the
# tensors are packed into runs whose total size is at most that, one ``_foreach`` call per
# run (a single ``_foreach_sign`` over all parameters would hold a full copy of the model).
# On an accelerator every run is a kernel launch, so runs there may reach 4 Mi elements
# (16 MiB in float32) even when every tensor is smaller.
_MIN_RUN = {"cpu": 0}
_DEFAULT_MIN_RUN = 1 << 22


def _runs(ws: Sequence[Tensor]) -> tuple[tuple[int, ...], ...]:
    """Groups of indices into ``ws`` (a partition), each holding at most max(largest numel,
    device floor) elements. Small tensors share groups wherever they sit in ``ws``: a model
    whose biases and norms lie between large weights still needs few groups, which matters
    on CPU too, where every tensor of every ``_foreach`` op costs a dispatch."""
    if not ws:
        return ()
    sizes = tuple(w.numel() for w in ws)
    return _pack(sizes, max(max(sizes), _MIN_RUN.get(ws[0].device.type, _DEFAULT_MIN_RUN)))


@functools.lru_cache(maxsize=256)
def _pack(sizes: tuple[int, ...], budget: int) -> tuple[tuple[int, ...], ...]:
    """Next-fit over the tensors in increasing size (the same sizes give the same runs, so
    this is computed once per model); each group keeps the original order."""
    runs: list[list[int]] = []
    filled = budget + 1
    for i in sorted(range(len(sizes)), key=sizes.__getitem__):
        if filled + sizes[i] > budget:
            runs.append([])
            filled = 0
        runs[-1].append(i)
        filled += sizes[i]
    return tuple(tuple(sorted(r)) for r in runs)


def _in_runs(*lists: Sequence[Tensor]):
    """For each run of ``lists[0]``, the sub-lists of every list at that run's indices."""
    for run in _runs(lists[0]):
        yield tuple([xs[i] for i in run] for xs in lists)


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
    shard_dims = "any"

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
    shard_dims = "any"

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
        for w_run, g_run in _in_runs(ws, gs):
            torch._foreach_add_(g_run, torch._foreach_sign(w_run), alpha=alpha)

    def decay_(self, ws, alpha):
        for (w_run,) in _in_runs(ws):
            torch._foreach_add_(w_run, torch._foreach_sign(w_run), alpha=-alpha)

    def prox_(self, ws, t):
        _soft_threshold_all_(ws, t)


def _soft_threshold_all_(ws: list[Tensor], t: float) -> None:
    """ws[i] ← soft_threshold(ws[i], t), in place and without temporaries where possible."""
    if ws and ws[0].device.type == "cpu":
        # On CPU a _foreach op is a loop over tensors anyway: one softshrink pass each.
        for w in ws:
            F.soft_threshold_(w, t)
    else:
        _soft_threshold_runs_(ws, t)


def _soft_threshold_runs_(ws: list[Tensor], t: float) -> None:
    """The accelerator form: a run of many small tensors is three ``_foreach`` launches,
    ``w − clamp(w, −t, t)`` with the clamp split in two, instead of a launch per tensor."""
    for (run,) in _in_runs(ws):
        if len(run) <= 2:
            for w in run:
                F.soft_threshold_(w, t)
            continue
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
    shard_dims = "any"

    def __init__(self, l1_ratio: float = 0.5) -> None:
        self.l1_ratio = check_number("ElasticNet", "l1_ratio", l1_ratio, lambda v: 0.0 <= v <= 1.0, "in [0, 1] (1 = L1, 0 = L2)")

    def value(self, w: Tensor) -> Tensor:
        a = self.l1_ratio
        return a * w.abs().sum() + (1.0 - a) * 0.5 * w.pow(2).sum()

    def grad(self, w: Tensor) -> Tensor:
        a = self.l1_ratio
        return a * torch.sign(w) + (1.0 - a) * w

    def prox(self, w: Tensor, t: float) -> Tensor:
        a = self.l1_ratio
        return F.soft_threshold(w, t * a) / (1.0 + t * (1.0 - a))

    def add_grad_(self, gs, ws, alpha):
        a = self.l1_ratio
        L1().add_grad_(gs, ws, alpha * a)
        torch._foreach_add_(gs, ws, alpha=alpha * (1.0 - a))

    def decay_(self, ws, alpha):
        a = self.l1_ratio
        for (w_run,) in _in_runs(ws):
            signs = torch._foreach_sign(w_run)  # of the weights before the step
            torch._foreach_mul_(w_run, 1.0 - alpha * (1.0 - a))
            torch._foreach_add_(w_run, signs, alpha=-alpha * a)
            del signs

    def prox_(self, ws, t):
        a = self.l1_ratio
        _soft_threshold_all_(ws, t * a)
        torch._foreach_div_(ws, 1.0 + t * (1.0 - a))


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
    shard_dims = "any"

    def __init__(self, p: float = 0.5, eps: float = 1e-3) -> None:
        call = type(self).__name__
        self.p = check_number(call, "p", p, lambda v: 0.0 < v < 1.0, "in (0, 1); use L1 for p=1 and L2 for p=2")
        self.eps = check_number(
            call, "eps", eps, lambda v: 0.0 < v < math.inf, "a finite number > 0 (it bounds the gradient by p·eps^(p-1))"
        )

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
        for (run,) in _in_runs(ws):  # one temporary per run: within one copy of the largest tensor
            F.half_threshold_(run, t)

    def add_grad_(self, gs, ws, alpha):
        for w_run, g_run in _in_runs(ws, gs):
            scales, c = F.lp_grad_scales(w_run, self.p, self.eps)
            torch._foreach_addcmul_(g_run, w_run, scales, value=alpha * self.p * c)
            del scales  # before the next run makes its own

    def decay_(self, ws, alpha):
        for (w_run,) in _in_runs(ws):
            scales, c = F.lp_grad_scales(w_run, self.p, self.eps)
            torch._foreach_addcmul_(w_run, w_run, scales, value=-alpha * self.p * c)
            del scales


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
    output unit (``dim=0``: a row of a Linear weight, an output filter of a Conv) or per
    input feature (``dim=1``: a column of a Linear weight, an input channel of a Conv — the
    feature-selection / MultiTaskLasso case).

    Its prox is block soft-thresholding, which removes whole units (or inputs). A 1-d
    tensor (a bias) has groups of size 1, so there it acts as L1. Weights stored (in, out)
    — HF ``Conv1D``, transposed convs — are seen with their output units first, so
    ``dim=0`` means output units there too. Yuan & Lin (2006).

    ``units=True`` makes a group a whole unit of the model: filter u of a Conv *together
    with* entry u of its bias, the scale and shift of the BatchNorm channel after it and,
    across a residual addition, channel u of every layer added to it — the tensors that
    produce the channel, as the model's dependency graph says (:mod:`regfit.units`, needs
    ``pip install -c constraints.txt 'regfit[export]'`` and the model's
    ``example_input_array``). The prox then zeroes all of them at once, so the channel is
    exactly zero for every input and :func:`regfit.export.thin` removes it; with
    ``dim=0`` a unit whose weights are zero but whose bias is not still feeds that bias
    forward, and is kept. The term's selected tensors take part; a selected tensor that
    belongs to no unit (a layer whose units are the model's outputs) keeps row groups.
    The group's coefficient λ·c is that of its first tensor (the layer's weight).

    >>> w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    >>> GroupLasso().value(w), GroupLasso(dim=1).value(w)  # √2·(5 + 0), √2·(3 + 4)
    (tensor(7.0711), tensor(9.8995))
    >>> GroupLasso(dim=1).prox(torch.tensor([[3.0, 0.1], [4.0, 0.1]]), 0.2)  # the 2nd input goes
    tensor([[2.8303, 0.0000],
            [3.7737, 0.0000]])
    >>> u = GroupLasso(units=True)  # a unit's weight row [3] and bias 4: one group, √2·5
    >>> u.total([torch.tensor([[3.0], [0.0]]), torch.tensor([4.0, 0.0])], [1.0, 1.0])
    tensor(7.0711)

    Args:
        dim: 0 for a group per output unit, 1 for a group per input feature.
        units: a group per unit of the model, over every tensor that produces it (``dim=0``).
    """

    name = "grouplasso"

    def __init__(self, dim: int = 0, units: bool = False) -> None:
        if dim not in (0, 1) or isinstance(dim, bool):
            raise ValueError(f"GroupLasso(dim={dim!r}): use 0 (a group per output unit) or 1 (a group per input feature).")
        if not isinstance(units, bool):
            raise ValueError(f"GroupLasso(units={units!r}): use true or false.")
        if units and dim:
            raise ValueError("GroupLasso(dim=1, units=True): a unit's group is its output row with its bias and norm "
                             "channel; use GroupLasso(units=True) for units or GroupLasso(dim=1) for input features.")
        self.dim = dim
        if units:  # only set when used, so GroupLasso() keeps its attributes (checkpoints compare them)
            self.units = True

    @property
    def shard_dims(self) -> tuple[int, ...]:  # type: ignore[override]
        # A shard of whole groups holds whole groups; a unit spans several tensors, which
        # regfit does not follow across shards.
        return () if self.units else (self.dim,)

    def __repr__(self) -> str:  # GroupLasso() as before dim existed: checkpoints compare reprs
        args = [f"dim={self.dim}"] if self.dim else []
        args += ["units=True"] if self.units else []
        return f"GroupLasso({', '.join(args)})"

    def _groups_first(self, w: Tensor) -> Tensor:
        return w.transpose(0, 1) if self.dim and w.ndim >= 2 else w

    def value(self, w: Tensor) -> Tensor:
        return F.group_lasso_value(self._groups_first(w))

    def grad(self, w: Tensor) -> Tensor:
        return self._groups_first(F.group_lasso_grad(self._groups_first(w)))

    def prox(self, w: Tensor, t: float) -> Tensor:
        return self._groups_first(F.block_soft_threshold(self._groups_first(w), t))

    # ---- with units=True a call's tensors are one unit group, units along dim 0 ------------
    def total(self, ws, coeffs):
        if not self.units:
            return super().total(ws, coeffs)
        return coeffs[0] * F.group_lasso_bundle_value([_upcast(w) for w in ws])

    def add_grad_(self, gs, ws, alpha):
        if not self.units:
            return super().add_grad_(gs, ws, alpha)
        torch._foreach_add_(gs, F.group_lasso_bundle_grad(ws), alpha=alpha)

    def decay_(self, ws, alpha):
        if not self.units:
            return super().decay_(ws, alpha)
        torch._foreach_add_(ws, F.group_lasso_bundle_grad(ws), alpha=-alpha)

    def prox_(self, ws, t):
        if not self.units:
            return super().prox_(ws, t)
        F.block_soft_threshold_bundle_(ws, t)


def _matrix(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1)


class _MatrixPenalty(Penalty):
    """A penalty on W = w.reshape(out, −1); checks at fit start that tensors are ≥ 2-d."""

    def check_param(self, name: str, w: Tensor) -> None:
        if w.ndim < 2:
            raise ValueError(
                f"{type(self).__name__} is a matrix penalty, but {name} has shape {tuple(w.shape)}. "
                "Exclude vectors from the term: exclude: ['ndim<2'] (or ['bias', 'norm'])."
            )


class Orthogonal(_MatrixPenalty):
    r"""Soft orthogonality (Bansal et al. 2018): the rows (or columns) of W orthonormal.

    .. math::  R(W) = \lVert W W^\top - I \rVert_F^2 \;(\text{rows}),\qquad
               \nabla R = 4\,(W W^\top - I)\,W

    .. math::  R(W) = \lVert W^\top W - I \rVert_F^2 \;(\text{columns}),\qquad
               \nabla R = 4\,W\,(W^\top W - I)

    R = 0 exactly when the rows (columns) are orthonormal; it needs out ≤ in for rows
    (in ≤ out for columns) to be reachable. With W = w.reshape(out, −1), "rows" are the
    output units (filters of a Conv).

    ``normalized=True`` is Keras 3's ``OrthogonalRegularizer``: the rows are first scaled
    to unit norm, and R is the mean absolute cosine over pairs,

    .. math::  R(W) = \frac{1}{n(n-1)/2} \sum_{i<j} |\langle \hat w_i, \hat w_j \rangle|,

    which ignores the norms (only angles are penalized); its gradient comes from autograd.
    Keras kernels are (in, out), the transpose of torch's Linear weight, so Keras
    ``OrthogonalRegularizer(factor=f, mode="rows")`` ≡ regfit
    ``Orthogonal(dims="columns", normalized=True)`` with strength λ = f, and Keras
    ``mode="columns"`` ≡ ``dims="rows"``.

    >>> Orthogonal().value(torch.eye(3))
    tensor(0.)

    Args:
        dims: ``rows`` or ``columns`` of W.
        normalized: the Keras variant (angles only) instead of ‖G − I‖²_F.
    """

    name = "orthogonal"

    def __init__(self, dims: Literal["rows", "columns"] = "rows", normalized: bool = False) -> None:
        if dims not in ("rows", "columns"):
            raise ValueError(f"Orthogonal(dims={dims!r}): use 'rows' (output units) or 'columns' (input units).")
        self.dims = dims
        self.normalized = bool(normalized)

    def _vectors(self, w: Tensor) -> Tensor:
        """The vectors to orthogonalize, one per row."""
        m = _matrix(w)
        return m if self.dims == "rows" else m.T

    def value(self, w: Tensor) -> Tensor:
        v = self._vectors(w)
        n = v.shape[0]
        if self.normalized:
            if n < 2:
                return v.new_zeros(())
            # Keras's l2_normalize: v / sqrt(max(‖v‖², 1e-12))
            v = v * torch.rsqrt(v.pow(2).sum(1, keepdim=True).clamp_min(1e-12))
            gram = v @ v.T
            off = gram - torch.diag_embed(torch.diagonal(gram))
            return 0.5 * off.abs().sum() / (n * (n - 1) / 2.0)
        gram = v @ v.T
        return (gram - torch.eye(n, dtype=v.dtype, device=v.device)).pow(2).sum()

    def grad(self, w: Tensor) -> Tensor:
        if self.normalized:
            return super().grad(w)
        v = self._vectors(w)
        gram = v @ v.T
        gram.diagonal().sub_(1.0)
        g = 4.0 * gram @ v
        return (g if self.dims == "rows" else g.T).reshape(w.shape)


class Nuclear(_MatrixPenalty):
    r"""Nuclear (trace) norm :math:`R(W) = \sum_i \sigma_i(W)`, the convex surrogate of rank.

    ``grad`` is :math:`U_r V_r^\top` over the nonzero singular values (a subgradient);
    ``prox`` is singular-value soft-thresholding,
    :math:`U\,\mathrm{diag}(\max(\sigma - t, 0))\,V^\top`, which lowers the rank
    exactly (Cai, Candès & Shen 2010). Each call takes an SVD: meant for small and medium
    matrices.

    >>> Nuclear().value(torch.diag(torch.tensor([3.0, -1.0])))
    tensor(4.)
    """

    name = "nuclear"

    def value(self, w: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(_matrix(w), ord="nuc")

    def grad(self, w: Tensor) -> Tensor:
        u, s, vh = torch.linalg.svd(_matrix(w), full_matrices=False)
        keep = (s > s.max() * max(w.shape) * torch.finfo(s.dtype).eps).to(u.dtype)
        return ((u * keep) @ vh).reshape(w.shape)

    def prox(self, w: Tensor, t: float) -> Tensor:
        u, s, vh = torch.linalg.svd(_matrix(w), full_matrices=False)
        return ((u * (s - t).clamp_min(0)) @ vh).reshape(w.shape)


class SpectralNorm(_MatrixPenalty):
    r"""Spectral norm :math:`R(W) = \sigma_{\max}(W)`, by power iteration (Yoshida &
    Miyato 2017), with :math:`\nabla R = u_1 v_1^\top`.

    Each call runs ``n_iter`` power iterations from a fixed start vector, so the result is
    deterministic and needs no state; raise ``n_iter`` when the top two singular values
    are close. ``value`` is differentiable (autograd gives the same u₁v₁ᵀ).

    Args:
        n_iter: power iterations per call (≥ 1).
    """

    name = "spectralnorm"

    def __init__(self, n_iter: int = 30) -> None:
        self.n_iter = check_int("SpectralNorm", "n_iter", n_iter, 1)

    def _singular_vectors(self, m: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            gen = torch.Generator(device="cpu").manual_seed(0)
            v = torch.randn(m.shape[1], generator=gen, dtype=torch.float64).to(m)
            v = v / v.norm().clamp_min(1e-30)
            for _ in range(self.n_iter):
                u = m @ v
                u = u / u.norm().clamp_min(1e-30)
                v = m.T @ u
                v = v / v.norm().clamp_min(1e-30)
        return u, v

    def value(self, w: Tensor) -> Tensor:
        m = _matrix(w)
        u, v = self._singular_vectors(m.detach())
        return u @ m @ v  # = σ_max at convergence; its gradient is u vᵀ

    def grad(self, w: Tensor) -> Tensor:
        u, v = self._singular_vectors(_matrix(w))
        return torch.outer(u, v).reshape(w.shape)


def _as_tensor(coeffs: Sequence[float], like: Tensor) -> Tensor:
    return torch.as_tensor(coeffs, dtype=like.dtype, device=like.device)


@dataclass(frozen=True)
class Builtin:
    """One built-in penalty, as the rest of regfit and its tests know it.

    ``examples`` are the instances the shared test harness checks (finite differences,
    prox optimality, behaviour at 0 and ±∞); ``finite`` says that the penalty's closed-form
    kernels map finite weights to finite results, so the non-finite guard trusts them
    (:mod:`regfit.guard`); ``separable`` that R is a sum over entries (the 1-d prox check
    applies); ``formula`` is R(w) as the docs write it.
    """

    cls: type[Penalty]
    examples: tuple[Penalty, ...]
    formula: str
    finite: bool = False
    separable: bool = False

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def has_prox(self) -> bool:
        return self.cls.prox is not Penalty.prox


#: The built-in penalties: the one table from which the short names (``resolve_penalty``),
#: the guard's trusted kernels, the docs' tables (checked by the test suite) and the shared
#: penalty test harness are derived.
BUILTINS: tuple[Builtin, ...] = (
    Builtin(L2, (L2(),), "½‖w‖²", finite=True, separable=True),
    Builtin(L1, (L1(),), "‖w‖₁", finite=True, separable=True),
    Builtin(ElasticNet, (ElasticNet(l1_ratio=0.3),), "α‖w‖₁ + (1−α)·½‖w‖²", finite=True, separable=True),
    Builtin(Lp, (Lp(p=0.3), Lp(p=0.7)), "Σ|w|^p, 0 < p < 1", finite=True, separable=True),
    Builtin(LHalf, (LHalf(),), "Σ|w|^½", finite=True, separable=True),
    Builtin(GroupLasso, (GroupLasso(), GroupLasso(dim=1)), "Σ_g √|g|·‖w_g‖₂", finite=True),
    Builtin(Orthogonal, (Orthogonal("rows"), Orthogonal("columns"), Orthogonal("rows", normalized=True)),
            "‖WWᵀ − I‖²_F"),
    Builtin(Nuclear, (Nuclear(),), "Σσᵢ(W)"),
    Builtin(SpectralNorm, (SpectralNorm(n_iter=200),), "σ_max(W)"),
)

_BY_NAME: dict[str, type[Penalty]] = {b.name: b.cls for b in BUILTINS}


def resolve_penalty(penalty: Penalty | str) -> Penalty:
    """A Penalty instance from an instance or a short name (``l2``, ``l1``, ``lhalf``, …)."""
    if isinstance(penalty, Penalty):
        return penalty
    if isinstance(penalty, str) and penalty.lower() in _BY_NAME:
        return _BY_NAME[penalty.lower()]()
    if isinstance(penalty, type) and issubclass(penalty, Penalty):
        raise ValueError(f"penalty={penalty.__name__} is a class; pass an instance, {penalty.__name__}().")
    raise ValueError(
        f"Unknown penalty {penalty!r}. Use one of {sorted(_BY_NAME)} or a Penalty instance "
        "(in YAML: class_path: regfit.penalties.ElasticNet, init_args: {l1_ratio: 0.5})."
    )
