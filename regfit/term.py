"""A term: one penalty with its strength, selection, scale and mode.

The term's contribution to the objective is ``λ · Σ_i c(w_i) · R(w_i)`` over the
selected tensors ``w_i``. Resolving a term against a model and its optimizers yields
:class:`~regfit.modes.Bucket` s, one per (param group, coefficient), which the mode
updates with one vectorized call each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from regfit.hyperparams import is_number
from regfit.modes import Bucket, Mode, Proximal
from regfit.penalties import Penalty
from regfit.scaling import ScaleRule, scale_fn
from regfit.schedules import Schedule
from regfit.selection import ParamInfo, Selector
from regfit.sharding import check_shardable, is_sharded, shard_sum

__all__ = ["Term", "Assignment", "Override", "validate_strength", "bucket_by_group"]


def validate_strength(strength: float, where: str = "strength") -> float:
    if not is_number(strength):
        raise ValueError(f"{where}={strength!r} is not a number; give λ ≥ 0, e.g. {where}=1e-4.")
    value = float(strength)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}={strength!r} must be a finite number ≥ 0, e.g. {where}=1e-4.")
    return value


@dataclass
class Override:
    """A strength multiplier for the term's parameters matching ``include``/``exclude``.

    The coefficient of a parameter becomes ``c(w) · Π strength_mult`` over every override
    that selects it (overrides compose by product; order does not matter). In YAML::

        overrides:
          - {include: ["head.*"], strength_mult: 0.1}
          - {include: ["type:Conv2d"], exclude: ["bias"], strength_mult: 2.0}

    Args:
        include: selector rules (keywords, ``type:…``, globs); empty means every parameter
            of the term.
        exclude: rules removing parameters from this override.
        strength_mult: multiplier ≥ 0 of λ for the matched parameters (0 switches the
            term off for them).
    """

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    strength_mult: float = 1.0

    def __post_init__(self) -> None:
        self.strength_mult = validate_strength(self.strength_mult, "strength_mult")
        self.selector = Selector(include=self.include, exclude=self.exclude)


def bucket_by_group(
    assignments: Sequence["Assignment"], optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[list[Bucket], list[str]]:
    """Group assignments into buckets of (optimizer param group, coefficient).

    Returns the buckets and the names of assigned parameters that no optimizer updates.
    """
    where: dict[int, dict] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                where[id(p)] = group
    buckets: dict[tuple[int, float], Bucket] = {}
    orphans = []
    for a in assignments:
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
    return list(buckets.values()), orphans


@dataclass(frozen=True)
class Assignment:
    """One selected parameter of a term, as ``regfit groups`` shows it."""

    name: str
    param: Tensor
    coeff: float  # c(w): multiply by the strength λ for the effective coefficient


@dataclass
class Term:
    """(penalty, strength λ, selector, scale, mode, name), plus an optional strength
    schedule and per-selector overrides.

    ``step`` is the number of optimizer steps taken so far; the callback sets it at the
    start of every batch from ``trainer.global_step``, and the schedule reads it.
    """

    penalty: Penalty
    strength: float
    selector: Selector
    scale: ScaleRule
    mode: Mode
    name: str
    schedule: Schedule | None = None
    overrides: Sequence[Override] = ()
    step: int = 0
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
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise ValueError(
                f"Term {self.name!r}: schedule={self.schedule!r} is not a regfit.schedules.Schedule; "
                "use e.g. regfit.schedules.Cosine(total_steps=1000)."
            )
        if isinstance(self.overrides, (Override, dict, str)):
            raise ValueError(
                f"Term {self.name!r}: overrides={self.overrides!r} must be a list of overrides, e.g. "
                "overrides=[{include: ['bias'], strength_mult: 0.1}]."
            )
        self.overrides = tuple(Override(**o) if isinstance(o, dict) else o for o in self.overrides)
        for o in self.overrides:
            if not isinstance(o, Override):
                raise ValueError(
                    f"Term {self.name!r}: override {o!r} is not an Override; write "
                    "{include: [...], exclude: [...], strength_mult: 0.1}."
                )

    # ---- resolution ---------------------------------------------------------------------
    def assign(self, model: nn.Module) -> list[Assignment]:
        """Select parameters and compute their coefficients (no optimizer needed)."""
        selected: list[ParamInfo] = self.selector.select_some(model, f"Term {self.name!r}")
        bind = getattr(self._scale, "bind", None)
        if callable(bind):  # a scale that needs the whole model (e.g. DepthDecay)
            bind(model)
        check = getattr(self.penalty, "check_param", None)
        mults = {}
        for o in self.overrides:
            for info in o.selector.select(model):
                mults[info.name] = mults.get(info.name, 1.0) * o.strength_mult
        assignments = []
        for info in selected:
            if callable(check):
                check(info.name, info.param)
            coeff = self._scale(info.name, info.param)
            if isinstance(coeff, Tensor) and coeff.numel() == 1:
                coeff = coeff.item()
            if not (is_number(coeff) and 0 <= coeff < math.inf):
                raise ValueError(
                    f"Term {self.name!r}: scale gave c={coeff!r} for {info.name}; it must return a finite number ≥ 0."
                )
            coeff = float(coeff)
            if info.name in mults:
                coeff *= mults[info.name]
            assignments.append(Assignment(info.name, info.param, coeff))
        check_shardable(self.name, self.penalty, assignments)
        self.assignments = assignments
        return assignments

    def bind(self, model: nn.Module | None, optimizers: list[torch.optim.Optimizer]) -> list[str]:
        """Resolve to buckets of (param group, coefficient). Returns the names of selected
        parameters that no optimizer updates (they are left alone).

        ``model=None`` reuses the assignment of the last :meth:`assign` (the callback
        selects once, at setup, and binds when the optimizers exist)."""
        if model is not None:
            self.assign(model)
        self.buckets, orphans = bucket_by_group(self.assignments, optimizers)
        return orphans

    # ---- per-step work ------------------------------------------------------------------
    def strength_now(self, bucket: Bucket | None = None) -> float:
        """λ_t = λ·m(step) at the current step; :class:`~regfit.schedules.FollowLR` reads the
        lr ratio of ``bucket``'s param group (default: the first bucket's)."""
        if self.schedule is None:
            return self.strength
        if bucket is None and self.buckets:
            bucket = self.buckets[0]
        ratio = bucket.lr / bucket.initial_lr if bucket is not None and bucket.initial_lr else 1.0
        return self.strength * float(self.schedule(self.step, ratio))

    def prepare(self, group_ids: set[int] | None = None) -> None:
        """Let the mode look at the weights before the update (see ``Mode.prepare``)."""
        with torch.no_grad():
            for bucket in self.buckets:
                if group_ids is None or id(bucket.group) in group_ids:
                    self.mode.prepare(self.penalty, bucket)

    def apply(self, group_ids: set[int] | None = None) -> None:
        """Run the mode on every bucket (or those of the given param groups)."""
        with torch.no_grad():
            for bucket in self.buckets:
                if group_ids is None or id(bucket.group) in group_ids:
                    self.mode.apply(self.penalty, bucket, self.strength_now(bucket))

    def value(self) -> Tensor:
        """λ·Σ c·R(w) over the term's tensors, without building a graph. Sharded tensors
        are summed shard by shard, then over the ranks (one all-reduce, see
        :mod:`regfit.sharding`)."""
        with torch.no_grad():
            if not self.assignments:
                return torch.zeros(())
            ws = [a.param for a in self.assignments]
            return self.strength_now() * shard_sum(self.penalty.total, ws, [a.coeff for a in self.assignments])

    def weight_stats(self) -> tuple[Tensor, Tensor]:
        """(‖w‖₂ over all tensors of the term, fraction of entries exactly 0)."""
        with torch.no_grad():
            ws = [a.param for a in self.assignments]
            if not ws:
                return torch.zeros(()), torch.zeros(())
            n = sum(w.numel() for w in ws)  # a DTensor's numel is the global one
            if any(is_sharded(w) for w in ws):
                # ‖w‖² and the nonzero count add up over shards: one all-reduce of both.
                sq, nonzero = shard_sum(_square_and_nonzero, ws, [1.0] * len(ws))
                return sq.sqrt().float(), ((n - nonzero) / n).float()  # float32 as below
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ws)).float())
            # The 0-"norm" counts nonzeros: one batched call instead of a comparison per tensor.
            nonzero = torch.stack(torch._foreach_norm(ws, 0)).float().sum()
            return norm, (n - nonzero) / n


def _square_and_nonzero(ws: list[Tensor], coeffs: list[float]) -> Tensor:
    """[Σ‖w‖², number of nonzero entries] of plain tensors, in float64 (exact counts)."""
    return torch.stack([torch.stack(torch._foreach_norm(ws)).double().square().sum(),
                        torch.stack(torch._foreach_norm(ws, 0)).double().sum()])
