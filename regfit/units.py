"""The units of a model — output channels of a Conv, output features of a Linear — and the
tensors that make each one, read from Torch-Pruning's dependency graph.

A *unit group* is a set of channels that can only be removed together, with every tensor
slice they touch: removing output channel *u* of a Conv removes filter *u* of its weight,
entry *u* of its bias and of the BatchNorm after it, input column *u* of every layer that
reads the channel, and — when the channel is added to others (a residual connection) —
channel *u* of every layer on the other side of the addition. Torch-Pruning's
``DependencyGraph`` (Fang et al., "DepGraph", CVPR 2023) finds these couplings by tracing
the model once on example inputs; nothing here knows layer types beyond the table of
which parameters of a layer hold its units (:data:`PRODUCERS`).

The slices of a group fall on two sides of the channel:

* **incoming** — what *makes* the channel: weight rows (filters) and biases of the layers
  that write it, the scale and shift of per-channel norm layers (BatchNorm,
  InstanceNorm) on it. When all of them are exactly zero for unit *u*, the channel is
  exactly zero for every input: Wx + b = 0·x + 0, and γ·x̂ + β = 0 for any x̂;
* **outgoing** — what *reads* it: the input columns of the next layers. When all of them
  are exactly zero, the channel's value never reaches the output.

Either way unit *u* can be removed without changing the output (up to the order of a
floating-point sum), which :func:`regfit.export.thin` does. ``GroupLasso(units=True)``
penalizes the incoming side of each unit as one group, so its proximal step zeroes a
filter together with its bias and its BatchNorm scale and shift.

Tracing runs the model once, in eval mode, under autograd, and leaves it as it was (its
train/eval flags restored, no BatchNorm statistics updated). The inputs come from the
model's ``example_input_array`` — Lightning's convention, also used by its model summary
— which :class:`regfit.models.MLP` and :class:`regfit.models.CNN` set.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from regfit.binding import Assignment, Bundle
from regfit.selection import output_dim

__all__ = ["EXTRA", "Slice", "UnitGroup", "unit_groups", "unit_bundles", "example_inputs", "torch_pruning", "PRODUCERS"]

#: How to install the dependency graph's library, as every message names it.
EXTRA = "pip install -c constraints.txt 'regfit[export]'"


def torch_pruning() -> Any:
    """The ``torch_pruning`` module, or an ImportError naming the extra that installs it."""
    try:
        import torch_pruning as tp
    except ModuleNotFoundError as exc:
        if exc.name != "torch_pruning":
            raise
        raise ImportError(
            "Unit groups and thinning read the model's structure from Torch-Pruning's dependency graph, which is "
            f"not installed: {EXTRA} (or pip install -c constraints.txt torch-pruning)."
        ) from None
    return tp


def example_inputs(model: nn.Module) -> Any:
    """The inputs to trace ``model`` with: its ``example_input_array`` (Lightning's convention),
    moved to the model's device; an error naming the fix when it has none."""
    x = getattr(model, "example_input_array", None)
    if x is None:
        raise ValueError(
            f"{type(model).__name__} has no example_input_array, which regfit traces to find its units (a filter "
            "with its bias and BatchNorm channel). Set one in __init__, e.g. self.example_input_array = "
            "torch.zeros(1, 1, 28, 28) (any batch of the shape forward takes), or pass example inputs to "
            "regfit.export.thin(model, example_inputs)."
        )
    device = next((p.device for p in model.parameters()), None)
    return _to(x, device) if device is not None else x


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@dataclass(frozen=True, eq=False)
class Slice:
    """The part of one parameter that belongs to the units of a group.

    ``param.movedim(dim, 0)[index[k]]`` is the slice of position k; ``units[k]`` the unit
    it belongs to. Incoming slices hold one position per unit, in unit order
    (``units`` = 0…n−1); an outgoing slice may hold several per unit (a Conv channel read
    by a Linear after ``flatten`` is H·W columns)."""

    name: str
    param: Tensor
    dim: int
    index: Tensor
    units: Tensor

    @property
    def layer(self) -> str:
        return self.name.rpartition(".")[0] or self.name

    def nonzero_units(self, size: int) -> Tensor:
        """A bool per unit: whether any entry of this slice for that unit is nonzero."""
        rows = self.param.detach().movedim(self.dim, 0).index_select(0, self.index.to(self.param.device))
        nonzero = rows.reshape(rows.shape[0], -1).ne(0).any(1).float()
        return torch.zeros(size, device=nonzero.device).index_add_(0, self.units.to(nonzero.device), nonzero).cpu() > 0

    def contiguous(self) -> tuple[int, int] | None:
        """(start, length) when the positions are start, start+1, … in unit order (a view
        can hold them), else None."""
        n = self.index.numel()
        if n and torch.equal(self.units, torch.arange(n)) and torch.equal(self.index, torch.arange(n) + self.index[0]):
            return int(self.index[0]), n
        return None


@dataclass(eq=False)
class UnitGroup:
    """Units that are removed together, with the slices of every tensor they touch.

    ``name`` is the layer that roots the group (whose output units they are);
    ``incoming``/``outgoing`` the slices that make / read the units (module docstring);
    ``passive`` other per-unit parameters removed with them whose values do not matter
    for exactness (a PReLU slope: PReLU(0) = 0); ``layers`` every module the group
    touches. ``output`` says the units are outputs of the model (never removed: they are
    its interface); ``unsupported`` says why they cannot be removed exactly, naming the
    layer (a LayerNorm over the channels, a layer Torch-Pruning has no rule for, …)."""

    name: str
    size: int
    incoming: list[Slice] = field(default_factory=list)
    outgoing: list[Slice] = field(default_factory=list)
    passive: list[Slice] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    output: bool = False
    unsupported: str | None = None
    tp_group: Any = field(default=None, repr=False)

    def zero_units(self) -> Tensor:
        """A bool per unit: all its incoming slices are exactly zero (the channel is zero
        for every input), or all its outgoing slices are (nothing reads it)."""
        dead_in = torch.zeros(self.size, dtype=torch.bool)
        if self.incoming:
            dead_in = ~_any_nonzero(self.incoming, self.size)
        dead_out = torch.zeros(self.size, dtype=torch.bool)
        if self.outgoing:
            dead_out = ~_any_nonzero(self.outgoing, self.size)
        return dead_in | dead_out

    def zero_incoming(self) -> Tensor:
        """A bool per unit: all its incoming slices are exactly zero."""
        return ~_any_nonzero(self.incoming, self.size) if self.incoming else torch.zeros(self.size, dtype=torch.bool)

    def numel(self, units: Tensor | None = None) -> int:
        """Parameters the given units (a bool mask; default all) hold over every slice (an
        entry in a slice of two groups — a kernel between two thinned layers — counts in both)."""
        count = 0
        for s in (*self.incoming, *self.outgoing, *self.passive):
            per_position = s.param[0].numel() if s.dim == 0 else s.param.numel() // s.param.shape[s.dim]
            keep = torch.ones(s.units.numel(), dtype=torch.bool) if units is None else units[s.units]
            count += int(keep.sum()) * per_position
        return count


def _any_nonzero(slices: list[Slice], size: int) -> Tensor:
    out = torch.zeros(size, dtype=torch.bool)
    for s in slices:
        out |= s.nonzero_units(size)
    return out


# ---- which parameters hold a layer's units ----------------------------------------------------

#: Torch-Pruning's pruner class name → how its out-channel handler cuts the layer:
#: "producer" (weight rows and bias make the channel), "norm" (per-channel scale and shift
#: make it: BatchNorm, InstanceNorm), "passive" (per-channel parameters that map 0 to 0:
#: PReLU), "op" (no parameters: activations, pooling, additions, reshapes, concatenation).
#: Any other pruner (LayerNorm, GroupNorm, MultiheadAttention, LSTM, bare nn.Parameters,
#: customized ones) is unsupported for exact removal.
PRODUCERS: dict[str, str] = {
    "ConvPruner": "producer", "DepthwiseConvPruner": "producer", "LinearPruner": "producer",
    "EmbeddingPruner": "producer",
    "BatchnormPruner": "norm", "InstanceNormPruner": "norm",
    "PReLUPruner": "passive",
    "ElementWisePruner": "op", "ReshapePruner": "op", "ConcatPruner": "op", "SplitPruner": "op", "SlicePruner": "op",
    "UnbindPruner": "op", "ExpandPruner": "op", "OutputPruner": "op",
}

#: Why a layer of these kinds cannot lose a channel exactly, for the error message.
_WHY = {
    "LayernormPruner": "normalizes over the channels, so removing a zero channel changes the mean and variance "
                       "of the others",
    "GroupNormPruner": "normalizes over groups of channels, so removing a zero channel changes the statistics of "
                       "its group",
    "MultiheadAttentionPruner": "mixes its channels across heads in ways regfit does not remove exactly",
    "LSTMPruner": "couples each hidden unit across four gates and time steps, which regfit does not remove exactly",
    "ParameterPruner": "is a bare nn.Parameter used outside a layer Torch-Pruning knows, so which of its dims holds "
                       "the channel is a guess",
}


def _unit_dim(module: nn.Module, leaf: str, param: Tensor, side: str) -> int:
    """The dim of ``param`` that holds the units, for the out-channel (``side="out"``) or
    in-channel side of ``module``."""
    if isinstance(module, nn.Embedding):
        return 1
    if param.ndim < 2:
        return 0
    out = output_dim(module, leaf, param)
    return out if side == "out" else 1 - out


@contextlib.contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Tracing runs a forward pass in eval mode with autograd on (Torch-Pruning reads the
    autograd graph and sets eval mode itself, which would also stop BatchNorm from
    updating its statistics); the train/eval flags are restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning's notes on unwrapped parameters: named below instead
            yield
    finally:
        for m, training in flags:
            m.training = training


def trace(model: nn.Module, inputs: Any, ignored: list[nn.Module] = ()) -> Any:
    """Torch-Pruning's ``DependencyGraph`` of ``model`` on ``inputs`` (no side effects)."""
    tp = torch_pruning()
    with _traceable(model):
        try:
            return tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False,
                                                         ignored_layers=list(ignored))
        except Exception as exc:  # noqa: BLE001 - any failure of the tracer is reported with its cause
            raise ValueError(
                f"Torch-Pruning could not trace {type(model).__name__} on its example inputs "
                f"({type(exc).__name__}: {exc}). Check that model(example_input_array) runs, and that forward "
                "has no torch.no_grad() (tracing reads the autograd graph)."
            ) from exc


def unit_groups(model: nn.Module, inputs: Any = None, graph: Any = None) -> list[UnitGroup]:
    """The unit groups of ``model``, rooted at each Conv and Linear (each group once: a
    residual block's coupled layers are one group). ``inputs`` default to
    :func:`example_inputs`; ``graph`` reuses a traced dependency graph."""
    tp = torch_pruning()
    if graph is None:
        graph = trace(model, example_inputs(model) if inputs is None else inputs)
    modules = {m: n for n, m in model.named_modules()}
    params = {id(p): n for n, p in model.named_parameters()}
    order = {n: i for i, n in enumerate(modules.values())}
    groups = []
    with _traceable(model):
        for tp_group in graph.get_all_groups(root_module_types=(tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
            group = _unit_group(tp_group, modules, params, graph)
            # Named after its first layer in the model's order (Torch-Pruning roots a residual
            # group at whichever coupled layer it met first).
            producers = [s.layer for s in group.incoming if s.layer in order] or [group.name]
            group.name = min(producers, key=lambda n: order.get(n, len(order)))
            group.layers.sort(key=lambda n: order.get(n, len(order)))
            groups.append(group)
    return sorted(groups, key=lambda g: order.get(g.name, len(order)))


def _unit_group(tp_group: Any, modules: dict[nn.Module, str], params: dict[int, str], graph: Any) -> UnitGroup:
    root = tp_group[0].dep.target.module
    size = len(tp_group[0].idxs)
    group = UnitGroup(name=modules.get(root, type(root).__name__), size=size, tp_group=tp_group)
    for item in tp_group.items:
        dep, node = item.dep, item.dep.target
        module, pruner = node.module, type(dep.handler.__self__).__name__
        idxs = torch.as_tensor(item.idxs, dtype=torch.long)
        units = torch.as_tensor(item.root_idxs, dtype=torch.long)
        kind = PRODUCERS.get(pruner)
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, nn.Parameter):
            label = f"{params.get(id(module), 'a parameter')} ({type(module).__name__})"
        else:
            label = f"{modules.get(module, '?')} ({type(module).__name__})"
        if kind == "op":
            if is_out and not node.outputs:  # the channels leave the model through this op
                group.output = True
            continue
        if module in modules and modules[module] not in group.layers:
            group.layers.append(modules[module])
        if kind is None:
            why = _WHY.get(pruner, "is a layer Torch-Pruning has no pruning rule for")
            group.unsupported = group.unsupported or (
                f"{label} reads or writes the channels of {group.name} and {why}")
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.out_channels:
            group.unsupported = group.unsupported or (
                f"{label} is a grouped convolution (groups={module.groups}), whose channels regfit does not remove "
                "exactly")
            continue
        if kind == "producer" and is_out and not node.outputs:
            group.output = True  # a layer whose output is the model's: its units are the interface
        order = torch.argsort(units, stable=True)
        idxs, units = idxs[order], units[order]
        side = "out" if is_out else "in"
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) not in params or (kind == "passive" and p.numel() == 1):
                continue  # frozen-out names, or one PReLU slope shared by every channel
            if side == "in" and p.ndim < 2:
                continue  # a consumer's bias does not depend on its input channels
            s = Slice(params[id(p)], p, _unit_dim(module, leaf, p, side), idxs, units)
            if side == "in":
                group.outgoing.append(s)
            elif kind == "passive":
                group.passive.append(s)
            else:
                if not torch.equal(units, torch.arange(size)):
                    group.unsupported = group.unsupported or (
                        f"{label} maps the channels of {group.name} to its own other than one to one")
                group.incoming.append(s)
    order = {name: i for i, name in enumerate(params.values())}
    group.incoming.sort(key=lambda s: order[s.name])  # the model's order: the first layer's weight first
    return group


# ---- the groups of GroupLasso(units=True) -------------------------------------------------------


def unit_bundles(model: nn.Module, assignments: list[Assignment], owner: str = "the term") -> list[Bundle]:
    """The bundles a unit-wise penalty acts on: for every unit group, the incoming slices of
    the selected tensors (one bundle per group; its coefficient that of its first tensor,
    in the model's order), and for a selected tensor outside every unit's incoming side (a
    layer whose units are the model's outputs, a tensor of an unsupported group) its own
    rows. ``owner`` names the term in errors."""
    chosen = {id(a.param): a for a in assignments}
    bundles, covered = [], set()
    for group in unit_groups(model):
        if group.output or group.unsupported:
            continue
        members = [s for s in group.incoming if id(s.param) in chosen]
        if not members:
            continue
        views = []
        for s in members:
            span = s.contiguous()
            if span is None:  # Torch-Pruning found a mapping no view can hold
                raise ValueError(f"{owner}: the units of {group.name} sit in {s.name} at positions no slice holds; "
                                 f"exclude {s.name} from the term.")
            views.append((s.dim, *span))
        covered |= {id(s.param) for s in members}
        first = chosen[id(members[0].param)]
        bundles.append(Bundle(group.name, tuple(s.name for s in members), tuple(s.param for s in members),
                              tuple(views), first.coeff))
    for a in assignments:
        if id(a.param) not in covered:
            bundles.append(Bundle(a.name, (a.name,), (a.param,), ((a.out_dim, 0, a.param.shape[a.out_dim]
                                                                    if a.param.ndim else 1),), a.coeff))
    return bundles
