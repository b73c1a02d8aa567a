"""Values defined by their hyperparameters: penalties, modes, schedules and constraints.

Two such objects are equal when they are of the same type with the same attributes, and
they print as the call that makes them, e.g. ``LHalf(p=0.5, eps=0.001)`` — what a resumed
run compares against its checkpoint and what logs and error messages show.
"""

from __future__ import annotations


__all__ = ["Hyperparams"]


class Hyperparams:
    """``repr`` and ``==`` from the instance's attributes (private ``_`` ones are not printed)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)
