"""A term: one penalty with its strength, selection, scale and mode.

The term's contribution to the objective is ``λ · Σ_i c(w_i) · R(w_i)`` over the
selected tensors ``w_i`` (each tensor once, whatever its number of names). Resolving a
term against a model and its optimizers (:class:`~regfit.binding.Bound`) yields
:class:`~regfit.modes.Bucket` s, one per (param group, coefficient), which the mode
updates with one vectorized call each; :mod:`regfit.engine` runs them in each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from regfit.binding import Assignment, Bound, Bundle, bucket_bundles
from regfit.hyperparams import is_number
from regfit.modes import Bucket, CautiousDecoupled, Mode, Proximal
from regfit.penalties import Penalty
from regfit.scaling import ScaleRule, scale_fn
from regfit.schedules import Schedule
from regfit.selection import ParamInfo, Selector
from regfit.sharding import check_shardable, is_sharded, shard_sum
from regfit.timescale import check_timescale, check_timescale_term, decay_gain, timescale_strength

__all__ = ["Term", "Assignment", "Override", "OnNonFinite", "validate_strength"]

#: what a term does when its update would write NaN/inf (see :mod:`regfit.guard`)
OnNonFinite = Literal["raise", "skip", "off"]


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


@dataclass(eq=False)
class Term(Bound):
    """(penalty, strength λ, selector, scale, mode, name), plus an optional strength
    schedule, per-selector overrides and what to do with a non-finite update.

    ``strength`` is checked whenever it is set (also mid-run: ``term.strength = 5e-4``).
    ``step`` is the number of optimizer steps taken so far, which the schedule reads: the
    Lightning callback sets it from ``trainer.global_step`` at every batch, and
    :func:`regfit.attach` counts real steps.

    ``timescale`` (``{"epochs": τ}`` or ``{"steps": τ}``, with ``strength=None``) makes λ
    the decay whose time constant is τ (:mod:`regfit.timescale`); it is resolved when the
    term is bound to its optimizers, an epoch timescale once ``steps_per_epoch`` is set
    (the Lightning callback sets it at train start). Until then ``strength`` is NaN and
    the term refuses to act.
    """

    kind = "Term"

    penalty: Penalty
    strength: float
    selector: Selector
    scale: ScaleRule
    mode: Mode
    name: str
    schedule: Schedule | None = None
    overrides: Sequence[Override] = ()
    on_nonfinite: OnNonFinite = "raise"
    step: int = 0
    timescale: Mapping[str, float] | None = None

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "strength":
            initializing = "timescale" not in vars(self)  # __post_init__ checks None then
            if value is None and (initializing or self.timescale is not None):
                value = math.nan  # λ comes from the timescale and is not resolved yet
            else:
                value = validate_strength(value)
        object.__setattr__(self, key, value)

    def __post_init__(self) -> None:
        self._init_binding()
        #: optimizer steps per epoch, for a timescale in epochs (set by the Lightning callback)
        self.steps_per_epoch: int | None = None
        if self.timescale is not None:
            self.timescale = check_timescale(self.timescale)
            check_timescale_term(self.name, self.penalty, self.mode)
            if not math.isnan(self.strength):
                raise ValueError(
                    f"Term {self.name!r}: give strength or timescale, not both (strength={self.strength!r}, "
                    f"timescale={self.timescale!r}): the timescale sets λ. Drop the strength (in a config: delete "
                    "`strength:` or write `strength: null`; on the command line --regularization.strength=null)."
                )
        elif math.isnan(self.strength):
            raise ValueError(f"Term {self.name!r}: strength=None without a timescale; give strength=λ ≥ 0 "
                             "(e.g. 1e-4) or timescale={'epochs': τ}.")
        if self.on_nonfinite not in ("raise", "skip", "off"):
            raise ValueError(f"on_nonfinite={self.on_nonfinite!r}: use 'raise', 'skip' or 'off'.")
        if isinstance(self.mode, Proximal) and type(self.penalty).prox is Penalty.prox:
            raise ValueError(
                f"Term {self.name!r}: {type(self.penalty).__name__} defines no prox(w, t), so "
                "mode='proximal' cannot apply it. Use mode='coupled' or 'decoupled', or implement prox()."
            )
        if self.penalty.units and isinstance(self.mode, CautiousDecoupled):
            raise ValueError(
                f"Term {self.name!r}: {self.penalty!r} acts on whole unit groups, and mode='cautious' masks "
                "entry by entry; use mode='proximal' (exact zeros) or 'coupled'/'decoupled'."
            )
        #: with a unit-wise penalty, the unit groups it acts on (:mod:`regfit.units`)
        self.bundles: list[Bundle] = []
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

    def settings(self) -> dict[str, Any]:
        """The term's user-facing settings, in constructor order: what ``Regularization``
        prints, saves in checkpoints and compares on resume."""
        settings = {"penalty": self.penalty, "strength": None if self.timescale else self.strength}
        if self.timescale:  # λ is derived from it (absent otherwise: older checkpoints compare equal)
            settings["timescale"] = dict(self.timescale)
        return settings | {"mode": self.mode, "include": list(self.selector.include),
                           "exclude": list(self.selector.exclude), "scale": self.scale, "name": self.name,
                           "schedule": self.schedule, "overrides": list(self.overrides),
                           "on_nonfinite": self.on_nonfinite}

    @property
    def oriented(self) -> bool:  # type: ignore[override]
        # A penalty that is not a sum over entries (group lasso, matrix penalties) sees each
        # tensor with its output units first: rows of HF Conv1D are its columns.
        return self.penalty.shard_dims != "any"

    # ---- resolution ---------------------------------------------------------------------
    def assign(self, model: nn.Module) -> list[Assignment]:
        assignments = super().assign(model)
        check_shardable(self.name, self.penalty, assignments)
        if self.penalty.units:
            self._assign_units(model)
        return self.assignments

    def _assign_units(self, model: nn.Module) -> None:
        """Group the selected tensors by unit (a filter with its bias and norm channel, from
        the model's dependency graph); each tensor of a group takes the group's coefficient."""
        from regfit.units import unit_bundles

        try:
            self.bundles = unit_bundles(model, self.assignments, f"Term {self.name!r}")
        except ImportError as exc:  # the export extra is missing: a setup mistake, named as one
            raise ValueError(f"Term {self.name!r} ({self.penalty!r}): {exc}") from None
        coeff = {}
        for b in self.bundles:
            for p in b.params:
                coeff.setdefault(id(p), b.coeff)
        self.assignments = [replace(a, coeff=coeff.get(id(a.param), a.coeff)) for a in self.assignments]

    def bind(self, model: nn.Module | None, optimizers: Sequence[torch.optim.Optimizer]) -> list[str]:
        orphans = super().bind(model, optimizers)
        if self.penalty.units:  # one bucket per unit group: its kernels see the group's tensors at once
            self.buckets, self.orphans = bucket_bundles(self.bundles, self._optimizers)
            orphans = self.orphans
        if self.timescale is not None:  # λ from the bound groups' base lr
            self.resolve_timescale()
        return orphans

    def coefficients(self, model: nn.Module, selected: list[ParamInfo]) -> list[float]:
        """c(w) per tensor: the scale rule (on the tensor with its output units first), times
        every override that selects it."""
        bind = getattr(self._scale, "bind", None)
        if callable(bind):  # a scale that needs the whole model (e.g. DepthDecay)
            bind(model)
        check = getattr(self.penalty, "check_param", None)
        mults: dict[int, float] = {}
        for o in self.overrides:
            for info in o.selector.select(model):
                mults[id(info.param)] = mults.get(id(info.param), 1.0) * o.strength_mult
        coeffs = []
        for info in selected:
            w = info.param.transpose(0, 1) if info.out_dim else info.param
            if callable(check):
                check(info.name, w)
            coeff = self._scale(info.name, w)
            if isinstance(coeff, Tensor) and coeff.numel() == 1:
                coeff = coeff.item()
            if not (is_number(coeff) and 0 <= coeff < math.inf):
                raise ValueError(
                    f"Term {self.name!r}: scale gave c={coeff!r} for {info.name}; it must return a finite number ≥ 0."
                )
            coeffs.append(float(coeff) * mults.get(id(info.param), 1.0))
        return coeffs

    def resolve_timescale(self) -> float | None:
        """Set λ from the timescale (see :mod:`regfit.timescale`) for the bound param groups
        and :attr:`steps_per_epoch`; returns it, or None while an epoch timescale waits for
        the steps per epoch. Raises for a timescale the optimizer or groups cannot give."""
        if self.timescale is None or not self.buckets:
            return None
        if "epochs" in self.timescale and self.steps_per_epoch is None:
            return None
        base = {b.initial_lr for b in self.buckets}
        if len(base) > 1:
            lrs = ", ".join(f"{b.names[0]}: {b.initial_lr:g}" for b in self.buckets)
            raise ValueError(
                f"Term {self.name!r}: timescale={self.timescale!r} spans param groups with different base learning "
                f"rates ({lrs}), and one λ cannot give one timescale for both. Split the term: one Regularization "
                "per param group (include=[...]), each with the timescale."
            )
        bucket = self.buckets[0]
        optimizer = next((o for o in self._optimizers if any(g is bucket.group for g in o.param_groups)), None)
        gain = decay_gain(optimizer, bucket.group, self.mode, bucket.initial_lr, self.name)
        self.strength = timescale_strength(self.timescale, gain, self.steps_per_epoch, self.name)
        return self.strength

    # ---- per-step work ------------------------------------------------------------------
    def strength_now(self, bucket: Bucket | None = None) -> float:
        """λ_t = λ·m(step) at the current step; :class:`~regfit.schedules.FollowLR` reads the
        lr ratio of ``bucket``'s param group (default: the first bucket's)."""
        if math.isnan(self.strength):  # a timescale not resolved yet: never act with NaN
            raise ValueError(
                f"Term {self.name!r}: λ comes from timescale={self.timescale!r}, which is not resolved: "
                + ("an epoch timescale needs the steps per epoch, which only a Lightning Trainer knows. Outside "
                   "Lightning give timescale={'steps': epochs × steps_per_epoch}."
                   if self.timescale and "epochs" in self.timescale else
                   "the term is not bound to an optimizer yet.")
            )
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

    def apply(self, group_ids: set[int] | None = None, grad_scale: float = 1.0) -> None:
        """Run the mode on every bucket (or those of the given param groups).

        ``grad_scale``: the factor the gradients still carry (a GradScaler's scale, when a
        fused optimizer unscales them itself); a coupled gradient is added at that scale."""
        scale = grad_scale if self.mode.phase == "gradient" else 1.0
        with torch.no_grad():
            for bucket in self.buckets:
                if group_ids is None or id(bucket.group) in group_ids:
                    self.mode.apply(self.penalty, bucket, self.strength_now(bucket) * scale)

    def value(self) -> Tensor:
        """λ·Σ c·R(w) over the term's tensors, without building a graph. Sharded tensors
        are summed shard by shard, then over the ranks (one all-reduce, see
        :mod:`regfit.sharding`)."""
        with torch.no_grad():
            if not self.assignments:
                return torch.zeros(())
            if self.penalty.units:
                return self.strength_now() * torch.stack([self.penalty.total(b.tensors(), [b.coeff])
                                                          for b in self.bundles]).sum()
            ws = [a.oriented if self.oriented else a.param for a in self.assignments]
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
