"""A term: one penalty with its strength, selection, scale and mode.

The term's contribution to the objective is ``λ · Σ_i c(w_i) · R(w_i)`` over the
selected tensors ``w_i``. Resolving a term against a model and its optimizers yields
:class:`~regfit.modes.Bucket` s, one per (param group, coefficient), which the mode
updates with one vectorized call each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from regfit.modes import Bucket, Mode, Proximal
from regfit.penalties import Penalty
from regfit.scaling import ScaleRule, scale_fn
from regfit.selection import ParamInfo, Selector

__all__ = ["Term", "Assignment", "validate_strength"]


def validate_strength(strength: float, where: str = "strength") -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={strength!r} is not a number; give λ ≥ 0, e.g. {where}=1e-4.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}={strength!r} must be a finite number ≥ 0, e.g. {where}=1e-4.")
    return value


@dataclass(frozen=True)
class Assignment:
    """One selected parameter of a term, as ``regfit groups`` shows it."""

    name: str
    param: Tensor
    coeff: float  # c(w): multiply by the strength λ for the effective coefficient


@dataclass
class Term:
    """(penalty, strength λ, selector, scale, mode, name)."""

    penalty: Penalty
    strength: float
    selector: Selector
    scale: ScaleRule
    mode: Mode
    name: str
    buckets: list[Bucket] = field(default_factory=list, repr=False)
    assignments: list[Assignment] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.strength = validate_strength(self.strength)
        if isinstance(self.mode, Proximal) and type(self.penalty).prox is Penalty.prox:
            raise ValueError(
                f"Term {self.name!r}: {type(self.penalty).__name__} defines no prox(w, t), so "
                "mode='proximal' cannot apply it. Use mode='coupled' or 'decoupled', or implement prox()."
            )
        self._scale = scale_fn(self.scale)

    # ---- resolution ---------------------------------------------------------------------
    def assign(self, model: nn.Module) -> list[Assignment]:
        """Select parameters and compute their coefficients (no optimizer needed)."""
        selected: list[ParamInfo] = self.selector.select(model)
        assignments = []
        for info in selected:
            coeff = float(self._scale(info.name, info.param))
            if not math.isfinite(coeff) or coeff < 0:
                raise ValueError(f"Term {self.name!r}: scale gave c={coeff!r} for {info.name}; it must be finite and ≥ 0.")
            assignments.append(Assignment(info.name, info.param, coeff))
        self.assignments = assignments
        return assignments

    def bind(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[str]:
        """Resolve to buckets of (param group, coefficient). Returns the names of selected
        parameters that no optimizer updates (they are left alone)."""
        self.assign(model)
        where: dict[int, dict] = {}
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    where[id(p)] = group
        buckets: dict[tuple[int, float], Bucket] = {}
        orphans = []
        for a in self.assignments:
            group = where.get(id(a.param))
            if group is None:
                orphans.append(a.name)
                continue
            key = (id(group), a.coeff)
            if key not in buckets:
                lr0 = float(group.get("initial_lr", group.get("lr", 0.0)))
                buckets[key] = Bucket([], a.coeff, group, initial_lr=lr0, max_lr=lr0)
            buckets[key].params.append(a.param)
            buckets[key].names.append(a.name)
        self.buckets = list(buckets.values())
        return orphans

    # ---- per-step work ------------------------------------------------------------------
    def strength_now(self) -> float:
        return self.strength

    def apply(self, group_ids: set[int] | None = None) -> None:
        """Run the mode on every bucket (or those of the given param groups)."""
        strength = self.strength_now()
        with torch.no_grad():
            for bucket in self.buckets:
                if group_ids is None or id(bucket.group) in group_ids:
                    self.mode.apply(self.penalty, bucket, strength)

    def value(self) -> Tensor:
        """λ·Σ c·R(w) over the term's tensors, without building a graph."""
        with torch.no_grad():
            if not self.assignments:
                return torch.zeros(())
            ws = [a.param for a in self.assignments]
            return self.strength_now() * self.penalty.total(ws, [a.coeff for a in self.assignments])

    def weight_stats(self) -> tuple[Tensor, Tensor]:
        """(‖w‖₂ over all tensors of the term, fraction of entries exactly 0)."""
        with torch.no_grad():
            ws = [a.param for a in self.assignments]
            if not ws:
                return torch.zeros(()), torch.zeros(())
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ws)).float())
            # The 0-"norm" counts nonzeros: one batched call instead of a comparison per tensor.
            nonzero = torch.stack(torch._foreach_norm(ws, 0)).float().sum()
            n = sum(w.numel() for w in ws)
            return norm, (n - nonzero) / n
