"""Per-tensor multipliers c(w) of the strength: λ_eff = λ·c(w).

* ``none``  — c = 1: one λ for every tensor (torch's ``weight_decay``).
* ``numel`` — c = 1/n: the penalty becomes a *mean* over the tensor's entries instead of
  a sum, so a 1M-entry layer is not penalized 1000× more than a 1k-entry one.
* ``fan``   — c = (n_in + n_out)/(n_in·n_out), with fans as ``torch.nn.init`` computes
  them (a Conv's receptive field counted in); a 1-d tensor has n_in = n_out = numel.
* a callable ``f(name, param) -> float``.
"""

from __future__ import annotations

from typing import Callable, Literal, Union

from torch import Tensor
from torch.nn.init import _calculate_fan_in_and_fan_out

__all__ = ["ScaleRule", "scale_fn", "fan_scale", "numel_scale", "no_scale"]

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
        return rule
    if rule in _RULES:
        return _RULES[rule]
    raise ValueError(f"Unknown scale {rule!r}. Use one of {sorted(_RULES)} or a callable f(name, param) -> float.")
