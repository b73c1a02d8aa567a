"""Per-tensor multipliers c(w) of the strength: λ_eff = λ·c(w).

* ``none``  — c = 1: one λ for every tensor (torch's ``weight_decay``).
* ``numel`` — c = 1/n: the penalty becomes a *mean* over the tensor's entries instead of
  a sum, so a 1M-entry layer is not penalized 1000× more than a 1k-entry one.
* ``fan``   — c = (n_in + n_out)/(n_in·n_out), with fans as ``torch.nn.init`` computes
  them (a Conv's receptive field counted in); a 1-d tensor has n_in = n_out = numel.
* a callable ``f(name, param) -> float``.
* :class:`DepthDecay` — c = decay^(L−1−depth), λ shrinking towards the input like timm's
  layer-wise lr decay (a callable that first looks at the whole model).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Literal, Union

from torch import Tensor, nn
from torch.nn.init import _calculate_fan_in_and_fan_out

from regfit.hyperparams import check_int, check_number

__all__ = ["ScaleRule", "scale_fn", "fan_scale", "numel_scale", "no_scale", "DepthDecay"]

ScaleFn = Callable[[str, Tensor], float]
ScaleRule = Union[Literal["none", "numel", "fan"], ScaleFn]


def no_scale(name: str, param: Tensor) -> float:
    """:math:`c(w) = 1`: the term is :math:`λ \\sum_i R(w_i)`, torch's ``weight_decay`` convention."""
    return 1.0


def numel_scale(name: str, param: Tensor) -> float:
    """:math:`c(w) = 1/n`, n = ``param.numel()``: for ``L2`` the term becomes
    :math:`λ \\cdot \\tfrac{1}{2n}\\lVert w \\rVert^2`, a mean over the tensor instead of a sum.

    >>> import torch
    >>> numel_scale("w", torch.zeros(10, 20))
    0.005
    """
    return 1.0 / param.numel()


def fan_scale(name: str, param: Tensor) -> float:
    """:math:`c(w) = \\frac{n_{in} + n_{out}}{n_{in} \\, n_{out}} = \\frac{1}{n_{out}} + \\frac{1}{n_{in}}`,
    fans as ``torch.nn.init`` computes them (a Conv kernel's receptive field counted in);
    a 1-d tensor has :math:`n_{in} = n_{out} = n`.

    >>> import torch
    >>> fan_scale("w", torch.zeros(10, 40))  # (40 + 10) / (40 · 10)
    0.125
    """
    if param.ndim < 2:
        fan_in = fan_out = param.numel()
    else:
        fan_in, fan_out = _calculate_fan_in_and_fan_out(param)
    return (fan_in + fan_out) / (fan_in * fan_out)


_RULES: dict[str, ScaleFn] = {"none": no_scale, "numel": numel_scale, "fan": fan_scale}


def scale_fn(rule: ScaleRule) -> ScaleFn:
    """The function for a rule name or callable; an unknown name is a clear error."""
    if callable(rule):
        try:
            inspect.signature(rule).bind("name", None)
        except TypeError:
            raise ValueError(
                f"scale={getattr(rule, '__name__', rule)!r} must take two arguments, f(name, param) -> float "
                "(name: the parameter's name; param: the tensor), e.g. lambda name, p: 1 / p.numel()."
            ) from None
        except ValueError:  # no signature to look at (some builtins): called as it is
            pass
        return rule
    if isinstance(rule, str) and rule in _RULES:
        return _RULES[rule]
    raise ValueError(f"Unknown scale {rule!r}. Use one of {sorted(_RULES)} or a callable f(name, param) -> float.")


class DepthDecay:
    """Depth-wise λ: c(w) = base(w) · decay^(L − 1 − depth(w)).

    The last block (depth L − 1, usually the head) gets the full λ, each block before it
    ``decay`` times the next one's — the strength analogue of timm's layer-wise lr decay.
    With ``decay > 1`` the early layers are regularized more.

    How depth is counted: the model's trainable parameters are grouped into *blocks* in
    registration order (``named_parameters`` order), and depth is a block's index, L the
    number of blocks of the whole model (parameters a term excludes still count, so
    excluding the head does not shift the depths).

    * ``level=None`` (default): a block is one module owning parameters directly — each
      Linear, Conv, norm layer, embedding is its own layer.
    * ``level=k``: a block is the first k components of the owning module's dotted name:
      ``level=1`` groups by top-level child (``body``, ``head``), ``level=2`` by
      ``blocks.0``, ``blocks.1``, …

    For another rule, subclass and override :meth:`block_of`. ``regfit groups`` shows the
    resulting λ·c per parameter.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
    >>> d = DepthDecay(0.5); d.bind(m)
    >>> [d(n, p) for n, p in m.named_parameters()]
    [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]

    Args:
        decay: factor per block, > 0.
        level: name components that form a block (None: each parametrized module).
        base: a scale rule multiplied in (``none``, ``numel``, ``fan`` or a callable).
    """

    def __init__(self, decay: float = 0.8, level: int | None = None, base: ScaleRule = "none") -> None:
        self.decay = check_number("DepthDecay", "decay", decay, lambda v: 0 < v < math.inf, "a finite number > 0, e.g. 0.8")
        self.level = None if level is None else check_int("DepthDecay", "level", level, 1, " or None (one block per layer)")
        self.base = base
        self._base = scale_fn(base)
        self._depth: dict[str, int] = {}
        self.n_blocks = 0

    def block_of(self, param_name: str) -> str:
        """The block a parameter belongs to (its owning module's name, cut to ``level``)."""
        module = param_name.rpartition(".")[0]
        return module if self.level is None else ".".join(module.split(".")[: self.level])

    def bind(self, model: nn.Module) -> None:
        """Number the blocks of ``model`` (called by the term before scaling)."""
        blocks: dict[str, int] = {}
        self._depth = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                self._depth[name] = blocks.setdefault(self.block_of(name), len(blocks))
        self.n_blocks = len(blocks)

    def depth(self, name: str) -> int:
        if name not in self._depth:
            raise ValueError(f"DepthDecay: no depth for parameter {name!r}; call bind(model) with the model first.")
        return self._depth[name]

    def __call__(self, name: str, param: Tensor) -> float:
        return float(self._base(name, param)) * self.decay ** (self.n_blocks - 1 - self.depth(name))

    def __repr__(self) -> str:
        return f"DepthDecay(decay={self.decay!r}, level={self.level!r}, base={self.base!r})"
