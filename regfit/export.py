"""From structured sparsity to a smaller model: remove the units that are exactly zero.

:func:`thin` returns a copy of a model without every unit — output channel of a Conv,
output feature of a Linear — that provably contributes nothing to the output, together
with everything that depends on it: the next layers' input columns, the BatchNorm
channel, the partners of a residual addition. The couplings come from Torch-Pruning's
dependency graph (:mod:`regfit.units`); the surgery is Torch-Pruning's own.

**Which units go.** Unit *u* of a group is removed when

* every *incoming* slice of it is exactly zero — its weight rows (filters), its biases,
  the scale γ and shift β of a BatchNorm/InstanceNorm on the channel: then the channel is
  0·x + 0 = 0 (or γ·x̂ + β = 0) for every input, which activations with f(0) = 0, pooling,
  additions and reshapes carry as zeros; or
* every *outgoing* slice is exactly zero — the input columns of all layers that read it:
  then its value never reaches the output.

A unit whose weights are zero but whose bias (or BatchNorm shift) is not is **kept**: it
feeds a constant forward. For a Linear that constant could be folded into the next
layer's bias, but for a Conv channel it cannot in general — the next convolution's zero
padding makes a constant map non-constant at the borders — so regfit keeps one rule for
every layer and removes only units that are exactly zero. ``GroupLasso(units=True)`` puts
a unit's weights, bias and norm parameters in one group, so its proximal step zeroes them
together and leaves nothing to keep.

**Exactness is checked, not assumed.** Before the surgery, forward hooks on the example
inputs confirm that each layer reading a removed unit sees exactly 0 there (an operation
with f(0) ≠ 0 in between, such as a sigmoid, is an error naming both layers); after it,
the thinned model's outputs must equal the original's to within float rounding
(1000·ε·(1 + max|y|), ≈ 1.2e-4·(1 + max|y|) in float32). Units the model outputs are
never removed (they are its interface), and a group that reaches a layer whose channels
cannot be removed exactly — a LayerNorm or GroupNorm over them (removing a zero channel
changes the others' mean and variance), a grouped convolution, attention, an LSTM, a bare
``nn.Parameter`` — is an error naming that layer when any of its units is zero; pass
``ignore=[layer name]`` to keep such units.

Removing a channel changes the order of the next layer's floating-point sums, so outputs
agree to rounding (≈ 1e-6 in float32 on MNIST logits), not bit for bit.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from regfit.units import UnitGroup, example_inputs as model_example_inputs, trace, unit_groups

__all__ = ["thin", "thinning", "Thinning", "GroupReport", "ThinError"]

log = logging.getLogger(__name__)


class ThinError(ValueError):
    """Units that are zero but cannot be removed exactly; the message names the layer."""


@dataclass(frozen=True)
class GroupReport:
    """One unit group of the model: ``units`` in all, ``zero`` of them exactly zero,
    ``removed`` of those taken out, and why zero units were kept (``kept``)."""

    name: str
    layers: tuple[str, ...]
    units: int
    zero: int
    removed: int
    kept: str = ""


@dataclass
class Thinning:
    """What :func:`thinning` did: the thinned copy, a report per unit group, the parameter
    counts before and after, and the largest difference of the outputs on the example
    inputs."""

    model: nn.Module
    groups: list[GroupReport]
    params_before: int
    params_after: int
    max_abs_diff: float

    @property
    def removed_units(self) -> int:
        return sum(g.removed for g in self.groups)

    @property
    def ratio(self) -> float:
        """params_after / params_before."""
        return self.params_after / self.params_before if self.params_before else 1.0


def thin(model: nn.Module, example_inputs: Any = None, ignore: Sequence[str] = ()) -> nn.Module:
    """A copy of ``model`` without its exactly-zero units (see the module docstring).

    Args:
        model: any ``nn.Module`` Torch-Pruning can trace; it is not changed.
        example_inputs: inputs to trace and check it with (a tensor, a tuple of positional
            inputs, or a dict of keyword inputs); default: ``model.example_input_array``.
        ignore: names of layers whose unit groups are kept whole.

    Returns:
        The thinned copy (the same class, smaller layers), in the original's train/eval
        mode. With nothing zero it equals the original.

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> with torch.no_grad():
    ...     _ = net[0].weight[1].zero_(), net[0].bias[1].zero_()  # unit 1: weights and bias 0
    >>> small = thin(net, torch.randn(5, 4))
    >>> small[0].out_features, small[2].in_features
    (2, 2)
    """
    return thinning(model, example_inputs, ignore).model


def thinning(model: nn.Module, example_inputs: Any = None, ignore: Sequence[str] = ()) -> Thinning:
    """:func:`thin` with its report (:class:`Thinning`)."""
    inputs = model_example_inputs(model) if example_inputs is None else example_inputs
    small = _copy(model)
    graph = trace(small, inputs)
    groups = unit_groups(small, inputs, graph)
    plan = [(g, *_removable(g, ignore)) for g in groups]
    _check_reads_zero(small, inputs, [(g, mask) for g, mask, _ in plan if mask.any()])
    reports = []
    for g, mask, kept in plan:
        if mask.any():
            g.tp_group.prune(idxs=torch.nonzero(mask).flatten().tolist())
        reports.append(GroupReport(g.name, tuple(g.layers), g.size, int(g.zero_units().sum()), int(mask.sum()), kept))
    _restore_modes(model, small)
    pruned = [g.name for g, mask, _ in plan if mask.any()]
    diff, tol = _output_difference(model, small, inputs)
    if diff > tol:
        # Name the group: the first that changes the output when thinned alone.
        alone = [n for n in pruned if len(pruned) > 1 and _changes_output(model, inputs, [*ignore, *(m for m in pruned if m != n)])]
        culprit = (alone or pruned)[0]
        raise ThinError(
            f"After removing the zero units of {culprit} the outputs differ by up to {diff:.3g} (float rounding "
            f"allows {tol:.3g}): an operation the dependency graph does not see mixes its channels with others (a "
            f"softmax, mean or norm over the channels). Keep them: ignore=[{culprit!r}] (regfit thin … --ignore "
            f"{culprit})."
        )
    before, after = _numel(model), _numel(small)
    log.debug("Thinned %s: %d units removed, %d → %d parameters.", type(model).__name__,
             sum(r.removed for r in reports), before, after)
    return Thinning(small, reports, before, after, diff)


def _removable(g: UnitGroup, ignore: Sequence[str]) -> tuple[Tensor, str]:
    """The units of ``g`` to remove (a bool mask) and why zero units stay."""
    zero = g.zero_units()
    none = torch.zeros_like(zero)
    if not zero.any():
        return none, ""
    if g.name in ignore or any(layer in ignore for layer in g.layers):
        return none, "ignored"
    if g.unsupported:
        n = int(zero.sum())
        raise ThinError(
            f"{n} unit{'s' if n > 1 else ''} of {g.name} {'are' if n > 1 else 'is'} exactly zero, but {g.unsupported}. "
            f"Keep {'them' if n > 1 else 'it'}: regfit.export.thin(model, x, ignore=[{g.name!r}]) "
            f"(regfit thin … --ignore {g.name}), or leave {g.name} out of the GroupLasso term."
        )
    if g.output:
        return none, "outputs of the model"
    if zero.all():  # a layer of width 0 cannot run: one zero unit stays (it changes nothing)
        zero = zero.clone()
        zero[0] = False
        return zero, "one unit stays: a layer needs one"
    return zero, ""


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy that leaves out a Lightning trainer the module may point to."""
    memo: dict[int, Any] = {}
    trainer = getattr(model, "_trainer", None)
    if trainer is not None:
        memo[id(trainer)] = None
    return copy.deepcopy(model, memo)


def _restore_modes(original: nn.Module, small: nn.Module) -> None:
    for a, b in zip(original.modules(), small.modules()):
        b.training = a.training


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _eval_forward(model: nn.Module, inputs: Any, hooks: Sequence[tuple[nn.Module, Any]] = ()) -> list[Tensor]:
    """The model's output tensors in eval mode (its flags restored after), with forward
    pre-hooks registered for the call."""
    flags = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(h) for m, h in hooks]
    try:
        model.eval()
        with torch.no_grad():
            return _tensors(_forward(model, inputs))
    finally:
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training


def _check_reads_zero(model: nn.Module, inputs: Any, plan: list[tuple[UnitGroup, Tensor]]) -> None:
    """Every layer that reads a unit removed for its zero *incoming* slices sees exactly 0
    there on the example inputs: nothing between maps 0 to a nonzero value."""
    modules = dict(model.named_modules())
    found: list[str] = []
    hooks = []
    for g, mask in plan:
        dead_in = mask & g.zero_incoming()
        if not dead_in.any():
            continue
        for s in g.outgoing:
            positions = s.index[dead_in[s.units]]
            layer = modules.get(s.layer)
            if layer is None or not positions.numel():
                continue
            channel_dim = 1 if isinstance(layer, nn.modules.conv._ConvNd) else -1

            def check(module, args, g=g, s=s, positions=positions, channel_dim=channel_dim):
                x = args[0] if args else None
                if isinstance(x, Tensor):
                    seen = x.index_select(channel_dim, positions.to(x.device))
                    if seen.ne(0).any():
                        found.append(f"{s.layer} reads units of {g.name} whose weights, biases and norm parameters "
                                     f"are all zero as {float(seen.abs().max()):.3g}, not 0")

            hooks.append((layer, check))
    if hooks:
        _eval_forward(model, inputs, hooks)
    if found:
        raise ThinError(
            f"{found[0]}: an operation between them maps 0 to a nonzero value (a sigmoid, an added constant), so "
            "removing these units would change the output. Keep them with ignore=[the first layer's name] "
            "(regfit thin … --ignore NAME)."
        )


def _output_difference(model: nn.Module, small: nn.Module, inputs: Any) -> tuple[float, float]:
    """(largest |Δ| between the two models' outputs on ``inputs``, what float rounding allows)."""
    want, got = _eval_forward(model, inputs), _eval_forward(small, inputs)
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        return math.inf, 0.0
    diff, tol = 0.0, 0.0
    for a, b in zip(want, got):
        if not a.is_floating_point():
            diff = diff if torch.equal(a, b) else math.inf
            continue
        scale = float(a.abs().max()) if a.numel() else 0.0
        tol = max(tol, 1000 * torch.finfo(a.dtype).eps * (1 + scale))
        diff = max(diff, float((a - b).abs().max()) if a.numel() else 0.0)
    return diff, tol


def _changes_output(model: nn.Module, inputs: Any, ignore: list[str]) -> bool:
    try:
        thinning(model, inputs, ignore)
    except ThinError:
        return True
    return False
