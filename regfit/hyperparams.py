"""Values defined by their hyperparameters: penalties, modes, schedules and constraints.

Two such objects are equal when they are of the same type with the same attributes, and
they print as the call that makes them, e.g. ``LHalf(p=0.5, eps=0.001)`` — what a resumed
run compares against its checkpoint and what logs and error messages show.
"""

from __future__ import annotations

import numbers
from typing import Callable


__all__ = ["Hyperparams", "is_number", "check_number", "check_int"]


class Hyperparams:
    """``repr`` and ``==`` from the instance's attributes (private ``_`` ones are not printed)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


def is_number(value: object) -> bool:
    """A real number (int, float, numpy scalar), not a bool, a string or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(call: str, arg: str, value: object, ok: Callable[[float], bool], requirement: str) -> float:
    """``value`` as a float when it is a real number (not a bool) for which ``ok`` holds;
    otherwise ``ValueError("call(arg=value): arg must be <requirement>.")``.

    One place for the constructors' argument checks, so that ``MaxNorm(max_value="2")`` or
    ``LHalf(eps=None)`` name the argument instead of failing inside ``float()`` or ``<``.

    >>> check_number("LHalf", "eps", 1e-3, lambda v: v > 0, "a number > 0")
    0.001
    >>> check_number("LHalf", "eps", "1e-3", lambda v: v > 0, "a number > 0")
    Traceback (most recent call last):
    ...
    ValueError: LHalf(eps='1e-3'): eps must be a number > 0.
    """
    if is_number(value):
        number = float(value)
        if ok(number):  # NaN fails every comparison, so it lands below with the rest
            return number
    raise ValueError(f"{call}({arg}={value!r}): {arg} must be {requirement}.")


def check_int(call: str, arg: str, value: object, low: int, note: str = "") -> int:
    """``value`` when it is an integer (not a bool) ≥ ``low``; otherwise
    ``ValueError("call(arg=value): arg must be an integer ≥ low<note>.")``.

    >>> check_int("Step", "step_size", 10, 1)
    10
    >>> check_int("MLP", "in_features", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: MLP(in_features=0): in_features must be an integer ≥ 1.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low:
        return int(value)
    raise ValueError(f"{call}({arg}={value!r}): {arg} must be an integer ≥ {low}{note}.")
