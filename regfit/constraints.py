"""Constraints: projections onto a set, applied to the weights after every real step.

A constraint is a tiny pure object with ``project(w)``, the (Euclidean) projection of one
tensor onto the constraint set C — the weights after the step are the nearest point of C
to what the optimizer produced. Add one to a run with the
:class:`~regfit.constrain.Constrain` callback, which selects parameters exactly as
``Regularization`` does::

    Constrain(MaxNorm(3.0), include=["type:Linear"], exclude=["bias", "last_layer"])

Norms are taken per **output unit**: over every dim except dim 0 — a row of a torch
``Linear`` weight (out, in), one output filter of a ``Conv`` weight (out, in, kh, kw), or
the entries one by one for a 1-d tensor. ``dim`` chooses other dims.

Keras mapping. A Keras ``Dense`` kernel is (in, out), the transpose of torch's (out, in);
a Keras ``Conv2D`` kernel is (kh, kw, in, out). Keras's ``axis`` names the dims that are
*reduced*, as regfit's ``dim`` does, so:

================================================  =========================================
Keras                                             regfit
================================================  =========================================
``MaxNorm(m, axis=0)`` on ``Dense`` (default)     ``MaxNorm(m)`` = ``MaxNorm(m, dim=1)``
                                                  (per output unit: the rows of torch's W)
``MaxNorm(m, axis=1)`` on ``Dense``               ``MaxNorm(m, dim=0)`` (per input unit)
``MaxNorm(m, axis=[0, 1, 2])`` on ``Conv2D``      ``MaxNorm(m)`` = ``MaxNorm(m, dim=(1, 2, 3))``
``UnitNorm``, ``MinMaxNorm``                      the same mapping of ``axis`` → ``dim``
``NonNeg()``                                      ``NonNeg()``
================================================  =========================================

Keras scales by ``desired / (ε + ‖w‖)`` with ε = 1e-7, which also shrinks rows already
inside the set by a factor 1 − ε/‖w‖; regfit leaves those rows untouched, so ``project``
is an exact, idempotent projection (``project(project(w)) == project(w)``).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

from regfit.hyperparams import Hyperparams, check_number

__all__ = ["Constraint", "MaxNorm", "UnitNorm", "NonNeg", "MinMaxNorm"]

Dims = Union[int, Sequence[int], None]

# Norms below this are treated as 0: a zero row has no direction to rescale.
_TINY = 1e-30


class Constraint(Hyperparams):
    """Base class: ``project(w)`` returns the projection of ``w`` onto the set (pure);
    ``project_(ws)`` projects a list of tensors in place (what the callback calls)."""

    #: Short name used for the default callback name.
    name: str = "constraint"

    def project(self, w: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement project(w).")

    def project_(self, ws: list[Tensor]) -> None:
        """ws[i] ← project(ws[i]), in place (under ``torch.no_grad``)."""
        for w in ws:
            w.copy_(self.project(w))


def _check_dim(cls: str, dim: Dims) -> tuple[int, ...] | None:
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"{cls}(dim={dim!r}): dim must be an int or a list of ints (the dims reduced by the norm), or None for per output unit.")
    return dims


def _norms(w: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    """‖w‖₂ over ``dims`` (default: every dim but 0), kept broadcastable to ``w``."""
    if dims is None:
        dims = tuple(range(1, w.ndim))
    if not dims:  # 1-d tensor, per output unit: each entry is its own unit
        return w.abs()
    bad = [d for d in dims if not -w.ndim <= d < w.ndim]
    if bad:
        raise ValueError(f"dim={list(dims)} is out of range for a tensor of shape {tuple(w.shape)}; exclude such tensors or pick another dim.")
    return torch.linalg.vector_norm(w, dim=dims, keepdim=True)


def _check_bound(cls: str, arg: str, value: float) -> float:
    return check_number(cls, arg, value, lambda v: math.isfinite(v) and v >= 0, "a finite number ≥ 0")


class MaxNorm(Constraint):
    """Each unit's weight vector has norm at most ``max_value`` (Srivastava et al. 2014,
    used with dropout).

    .. math::  w_u \\leftarrow w_u \\cdot \\min\\bigl(1, m / \\lVert w_u \\rVert_2\\bigr)

    >>> MaxNorm(1.0).project(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
    tensor([[0.6000, 0.8000],
            [0.3000, 0.4000]])

    Args:
        max_value: m > 0.
        dim: dims the norm reduces over (default: all but dim 0 — per output unit).
    """

    name = "maxnorm"

    def __init__(self, max_value: float = 2.0, dim: Dims = None) -> None:
        self.max_value = _check_bound("MaxNorm", "max_value", max_value)
        if self.max_value == 0:
            raise ValueError("MaxNorm(max_value=0) would zero every weight; give max_value > 0 (Keras's default is 2).")
        self.dim = _check_dim("MaxNorm", dim)

    def project(self, w):
        n = _norms(w, self.dim)
        return w * (self.max_value / n.clamp_min(self.max_value)).to(w.dtype)


class UnitNorm(Constraint):
    """Each unit's weight vector has norm 1: :math:`w_u \\leftarrow w_u / \\lVert w_u \\rVert_2`.

    A zero vector has no direction and is left at 0.

    >>> UnitNorm().project(torch.tensor([[3.0, 4.0]]))
    tensor([[0.6000, 0.8000]])
    """

    name = "unitnorm"

    def __init__(self, dim: Dims = None) -> None:
        self.dim = _check_dim("UnitNorm", dim)

    def project(self, w):
        n = _norms(w, self.dim)
        return torch.where(n > _TINY, w / n.clamp_min(_TINY), w)


class NonNeg(Constraint):
    """Every entry is ≥ 0: :math:`w \\leftarrow \\max(w, 0)`.

    >>> NonNeg().project(torch.tensor([-1.0, 0.0, 2.0]))
    tensor([0., 0., 2.])
    """

    name = "nonneg"

    def project(self, w):
        return w.clamp_min(0)

    def project_(self, ws):
        torch._foreach_clamp_min_(ws, 0.0)


class MinMaxNorm(Constraint):
    """Each unit's norm lies in [``min_value``, ``max_value``] (Keras ``MinMaxNorm``).

    .. math::  w_u \\leftarrow w_u \\cdot \\frac{r\\,\\mathrm{clip}(n_u, a, b) + (1 - r)\\,n_u}{n_u},
               \\quad n_u = \\lVert w_u \\rVert_2

    ``rate`` r = 1 is the projection onto the shell a ≤ ‖w_u‖ ≤ b; r < 1 moves only a
    fraction r of the way each step, as in Keras. A zero vector is left at 0.

    Args:
        min_value: a ≥ 0.
        max_value: b ≥ a.
        rate: r in (0, 1].
        dim: dims the norm reduces over (default: all but dim 0 — per output unit).
    """

    name = "minmaxnorm"

    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, dim: Dims = None) -> None:
        self.min_value = _check_bound("MinMaxNorm", "min_value", min_value)
        self.max_value = _check_bound("MinMaxNorm", "max_value", max_value)
        if self.max_value < self.min_value:
            raise ValueError(f"MinMaxNorm(min_value={min_value!r}, max_value={max_value!r}): need min_value ≤ max_value.")
        self.rate = check_number("MinMaxNorm", "rate", rate, lambda v: 0.0 < v <= 1.0, "in (0, 1]; 1 is the exact projection")
        self.dim = _check_dim("MinMaxNorm", dim)

    def project(self, w):
        n = _norms(w, self.dim)
        desired = self.rate * n.clamp(self.min_value, self.max_value) + (1.0 - self.rate) * n
        return torch.where(n > _TINY, w * (desired / n.clamp_min(_TINY)), w)
