"""Selected tensors bound to the param groups of the optimizers that update them.

A :class:`Bound` (a :class:`~regfit.term.Term`, a :class:`~regfit.projection.Projection`)
selects tensors of a model once (:meth:`Bound.assign`) and groups them by optimizer param
group (:meth:`Bound.bind`), so that each step reads the group's live learning rate and
acts only on the groups of the optimizer that is stepping.

What can change under a binding during a fit, and how it is followed (without a per-step
scan of every parameter):

* the param groups: a new group (``add_param_group``, Lightning's ``BackboneFinetuning``)
  or new group dicts (``Optimizer.load_state_dict`` on resume). :meth:`Bound.stale` reads
  one signature per optimizer — the group list, the number of groups and of parameters —
  which the step engine compares every step in O(number of groups);
* tensors that become trainable (``requires_grad_(True)``) while already in a group: the
  frozen tensors the rules would select are kept as :attr:`Bound.dormant`, and
  :meth:`Bound.woke` looks at just those — at every epoch start under Lightning, every
  few steps with :func:`regfit.attach`, and whenever the groups change.

Either one makes :meth:`Bound.refresh` select and bind again.

The optimizer's own ``weight_decay`` is looked at when binding (:func:`decay_report`): a
group that decays tensors a term also regularizes decays them twice, and one that decays
tensors the term excludes decays them all the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from regfit.modes import Bucket, unit_view
from regfit.selection import ParamInfo, Selector

__all__ = ["Assignment", "Bundle", "Bound", "bucket_by_group", "bucket_bundles", "optimizer_signature", "DecayReport",
           "decay_report"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assignment:
    """One selected tensor, as ``regfit groups`` shows it.

    ``name`` is the tensor's name in ``named_parameters()``; ``aliases`` its other names
    (tied weights); ``out_dim`` the dim of its output units (1 for HF ``Conv1D`` and
    transposed convs, see :func:`regfit.selection.output_dim`)."""

    name: str
    param: Tensor
    coeff: float  # c(w): multiply by the strength λ for the effective coefficient
    aliases: tuple[str, ...] = ()
    out_dim: int = 0

    @property
    def oriented(self) -> Tensor:
        """The tensor with its output units along dim 0 (a view: writes reach the parameter)."""
        return self.param.transpose(0, 1) if self.out_dim else self.param


@dataclass(frozen=True, eq=False)
class Bundle:
    """Slices of several selected tensors that hold one group per unit — a Conv filter with
    its bias and BatchNorm channel (:mod:`regfit.units`): what a penalty with ``units``
    acts on as one, in one bucket.

    ``views[i]`` is ``(dim, start, length)``: the rows of ``params[i]`` along ``dim`` that
    hold the units, in unit order; ``coeff`` is c(w) of the whole group."""

    name: str  # the layer whose units these are
    names: tuple[str, ...]
    params: tuple[Tensor, ...]
    views: tuple[tuple[int, int, int], ...]
    coeff: float

    def tensors(self) -> list[Tensor]:
        """The slices, units along dim 0 (views of the parameters)."""
        return [unit_view(p, v) for p, v in zip(self.params, self.views)]


def optimizer_signature(optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """What changes when an optimizer's param groups do: the list object (replaced by
    ``load_state_dict``), the number of groups (``add_param_group``), the number of
    parameters in them. O(number of groups)."""
    groups = optimizer.param_groups
    return id(groups), len(groups), sum(len(g["params"]) for g in groups)


def bucket_by_group(
    assignments: Sequence[Assignment], optimizers: Sequence[torch.optim.Optimizer], oriented: bool = False
) -> tuple[list[Bucket], list[str]]:
    """Group assignments into buckets of (optimizer param group, coefficient, layout).

    ``oriented``: the buckets hand the kernels each tensor with its output units first
    (for row-structured penalties); otherwise as stored. Returns the buckets and the names
    of assigned parameters that no optimizer updates."""
    where: dict[int, dict] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                where[id(p)] = group
    buckets: dict[tuple[int, float, int], Bucket] = {}
    orphans = []
    for a in assignments:
        group = where.get(id(a.param))
        if group is None:
            orphans.append(a.name)
            continue
        out_dim = a.out_dim if oriented else 0
        key = (id(group), a.coeff, out_dim)
        if key not in buckets:
            lr0 = float(group.get("initial_lr", group.get("lr", 0.0)))
            buckets[key] = Bucket([], a.coeff, group, initial_lr=lr0, max_lr=lr0, out_dim=out_dim)
        buckets[key].params.append(a.param)
        buckets[key].names.append(a.name)
    return list(buckets.values()), orphans


def bucket_bundles(bundles: Sequence[Bundle], optimizers: Sequence[torch.optim.Optimizer]) -> tuple[list[Bucket], list[str]]:
    """One bucket per bundle (its tensors are one group each unit: the kernels see them in
    one call). A bundle's tensors must share one optimizer param group — one step size η
    for the group's prox; tensors no optimizer updates are left out and returned."""
    where: dict[int, dict] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                where[id(p)] = group
    buckets, orphans = [], []
    for b in bundles:
        members = [(n, p, v) for n, p, v in zip(b.names, b.params, b.views) if id(p) in where]
        orphans += [n for n, p in zip(b.names, b.params) if id(p) not in where]
        if not members:
            continue
        groups = {id(where[id(p)]): where[id(p)] for _, p, _ in members}
        if len(groups) > 1:
            lrs = ", ".join(f"{n}: lr {where[id(p)].get('lr')}" for n, p, _ in members)
            raise ValueError(
                f"The unit group of {b.name} spans {len(groups)} optimizer param groups ({lrs}); its prox needs one "
                "step size for the whole group. Put a layer's weight, bias and norm parameters in one param group, "
                "or exclude the tensors of the other group from the term."
            )
        group = next(iter(groups.values()))
        lr0 = float(group.get("initial_lr", group.get("lr", 0.0)))
        buckets.append(Bucket([p for _, p, _ in members], b.coeff, group, initial_lr=lr0, max_lr=lr0,
                              names=[n for n, _, _ in members], views=[v for _, _, v in members]))
    return buckets, list(dict.fromkeys(orphans))


class Bound:
    """Base of what the step engine runs: tensors selected by ``selector`` and bound to the
    optimizers' param groups. Subclasses set ``name``, ``selector`` and implement
    :meth:`coefficients`; they read ``assignments`` and ``buckets``."""

    kind = "Bound"  # how messages name it: "Term", "Constraint"
    #: whether kernels see tensors with their output units first (row-structured updates)
    oriented: bool = False
    name: str
    selector: Selector

    def _init_binding(self) -> None:
        self.assignments: list[Assignment] = []
        self.buckets: list[Bucket] = []
        #: frozen tensors the rules would select; they join when they become trainable
        self.dormant: list[Tensor] = []
        self.orphans: list[str] = []
        self._model: nn.Module | None = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._signatures: list[tuple[int, int, int]] = []

    # ---- selection ------------------------------------------------------------------------
    def coefficients(self, model: nn.Module, selected: list[ParamInfo]) -> list[float]:
        """c(w) per selected tensor (1.0 for all by default)."""
        return [1.0] * len(selected)

    def assign(self, model: nn.Module) -> list[Assignment]:
        """Select tensors of ``model`` (each tensor once, with its aliases) and compute their
        coefficients; no optimizer needed. Selection errors surface here."""
        selected = self.selector.select_some(model, f"{self.kind} {self.name!r}")
        coeffs = self.coefficients(model, selected)
        self.assignments = [Assignment(i.name, i.param, c, tuple(a.name for a in i.aliases), i.out_dim)
                            for i, c in zip(selected, coeffs)]
        self.dormant = [i.param for i in self.selector.select(model, frozen=True)]
        self._model = model
        return self.assignments

    # ---- binding --------------------------------------------------------------------------
    def bind(self, model: nn.Module | None, optimizers: Sequence[torch.optim.Optimizer]) -> list[str]:
        """Resolve to buckets of (param group, coefficient). Returns the names of selected
        tensors that no optimizer updates (they are left alone).

        ``model=None`` reuses the assignment of the last :meth:`assign`."""
        if model is not None:
            self.assign(model)
        self._optimizers = list(optimizers)
        self._signatures = [optimizer_signature(o) for o in self._optimizers]
        self.buckets, self.orphans = bucket_by_group(self.assignments, self._optimizers, self.oriented)
        return self.orphans

    def stale(self) -> bool:
        """Whether an optimizer's param groups changed since :meth:`bind` (O(groups))."""
        return any(optimizer_signature(o) != s for o, s in zip(self._optimizers, self._signatures))

    def woke(self) -> bool:
        """Whether a frozen tensor the rules would select has become trainable."""
        return any(p.requires_grad for p in self.dormant)

    def refresh(self) -> bool:
        """Select and bind again when the groups changed or a dormant tensor woke; returns
        whether anything was redone. Cheap when nothing changed."""
        if self._model is None or not (self.stale() or self.woke()):
            return False
        before = {id(a.param) for a in self.assignments}
        self.assign(self._model)
        self.bind(None, self._optimizers)
        added = [a.name for a in self.assignments if id(a.param) not in before]
        if added:
            log.info("%s %r now also acts on %d tensors that became trainable: %s", self.kind, self.name,
                     len(added), ", ".join(added[:5]) + (" …" if len(added) > 5 else ""))
        return True


# ---- the optimizer's own weight decay ---------------------------------------------------------


@dataclass(frozen=True)
class DecayReport:
    """Tensors the optimizer's own ``weight_decay`` reaches, beside a term."""

    term: str
    doubled: dict[float, list[str]]  # weight_decay → names the term also regularizes
    excluded: dict[float, list[str]]  # weight_decay → names the term leaves out, decayed all the same

    def __bool__(self) -> bool:
        return bool(self.doubled or self.excluded)

    def message(self, optimizer: str = "the optimizer") -> str:
        """The warning, for the optimizer class(es) named ``optimizer``: AdamW's weight decay
        is decoupled, every other torch optimizer's adds λ·w to the gradient (coupled L2)."""
        decoupled = "AdamW" in optimizer
        parts = []
        for wd, names in self.doubled.items():
            parts.append(f"weight_decay={wd:g} also decays the {_count(names)} this term regularizes "
                         f"({_few(names)}): they are {'decayed' if decoupled else 'regularized'} twice")
        for wd, names in self.excluded.items():
            parts.append(f"weight_decay={wd:g} decays {_count(names)} this term excludes ({_few(names)}): "
                         "excluding them here does not stop it")
        wd = next(iter({**self.doubled, **self.excluded}))
        same = (f"Regularization('l2', mode='decoupled', strength={wd:g}, exclude=['bias', 'norm']) is AdamW's "
                "(torch.optim.AdamW defaults to weight_decay=0.01)" if decoupled else
                f"Regularization('l2', mode='coupled', strength={wd:g}, exclude=['bias', 'norm']) is "
                f"{optimizer}'s weight_decay={wd:g}")
        return (f"Term {self.term!r}: {optimizer}'s own " + "; its ".join(parts) + ". Set weight_decay=0 in the "
                f"optimizer and let regfit's terms do the decay: {same}, on the tensors you choose.")


def _count(names: Sequence[str]) -> str:
    return f"{len(names)} tensor{'' if len(names) == 1 else 's'}"


def _few(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def decay_report(bound: Bound, optimizers: Sequence[torch.optim.Optimizer]) -> DecayReport:
    """Which tensors the optimizers' own ``weight_decay`` reaches beside a bound term: those
    it regularizes too, and those its exclude rules leave out."""
    selected = {id(a.param) for a in bound.assignments}
    model = bound._model
    if model is None:
        return DecayReport(bound.name, {}, {})
    left_out = {id(i.param): i.name for i in bound.selector.excluded(model)}
    names = {id(a.param): a.name for a in bound.assignments} | left_out
    doubled: dict[float, list[str]] = {}
    excluded: dict[float, list[str]] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            wd = group.get("weight_decay", 0.0)
            if not isinstance(wd, (int, float)) or not wd:
                continue
            for p in group["params"]:
                if id(p) in names:
                    (doubled if id(p) in selected else excluded).setdefault(float(wd), []).append(names[id(p)])
    return DecayReport(bound.name, doubled, excluded)
