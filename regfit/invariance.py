"""Which tensors are scale-invariant: a probe that rescales each one and compares outputs.

A tensor w is scale-invariant when the model's output does not change if w alone is
multiplied by α > 0: a Linear or Conv without bias followed by BatchNorm, LayerNorm or
RMSNorm (their ``eps`` breaks it slightly, by about ⅜·eps/var of the normalized
features: ``rtol`` allows for that). For such tensors weight decay sets the effective learning rate η/‖w‖² and
training reaches a rotational equilibrium (:mod:`regfit.dynamics`); for the others the
equilibrium angle of SGD is not a prediction.

The probe multiplies tensors by powers of 2 (exact in binary floating point), runs the
model on a few samples and compares with the unscaled output: equal within ``rtol`` of the
output's largest entry means invariant. It tests the tensors 8 at a time first, each
scaled by its own factor (2, 4, 8 in turn, so that a weight and the bias beside it, which
are only invariant together, never share one): one forward pass clears a group of
invariant tensors (the conv weights of a BatchNorm network), and a group that changes the
output is tested tensor by tensor. Cost, once per fit: between n/8 and 9n/8 forward passes
for n tensors, on at most 8 samples. The model's state is left as it was: its buffers
(BatchNorm's running statistics) are restored, the random generators forked and reseeded
identically for every pass (so dropout draws the same mask), and each tensor copied back.

Not probed (``None``): a tensor that is all zeros (no direction to scale), a sharded
(DTensor) model (a forward pass there is a collective of all ranks; the probe does not
run it), and any model the probe has no input for.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from regfit.sharding import is_sharded

__all__ = ["probe_scale_invariance", "probe_run", "head_of_batch", "PROBE_SAMPLES", "GROUP"]

#: samples of a batch the probe runs on
PROBE_SAMPLES = 8
#: tensors tested together before one by one
GROUP = 8
_FACTORS = (2.0, 4.0, 8.0)


def head_of_batch(batch: Any, n: int = PROBE_SAMPLES) -> Any:
    """The first ``n`` samples of a batch: every tensor whose first dim is the batch size
    (that of the first tensor found) is sliced; anything else is kept as it is."""
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0]) if t.ndim else None)
    if not sizes or sizes[0] <= n:
        return batch
    size = sizes[0]
    return apply_to_collection(batch, Tensor, lambda t: t[:n] if t.ndim and t.shape[0] == size else t)


def probe_run(module: nn.Module, batch: Any = None) -> Callable[[], Any] | None:
    """What the probe compares: the module on its ``example_input_array`` if it has one,
    else its ``data_loss`` on the head of ``batch`` (a :class:`~regfit.RegModule`) together
    with the outputs of the module's own forward calls inside it; else None."""
    example = getattr(module, "example_input_array", None)
    if example is not None:
        if isinstance(example, dict):
            return lambda: module(**example)
        if isinstance(example, tuple):
            return lambda: module(*example)
        return lambda: module(example)
    data_loss = getattr(module, "data_loss", None)
    if batch is None or not callable(data_loss):
        return None
    head = head_of_batch(batch)

    def run() -> tuple[Any, list[Any]]:
        # The outputs (logits), not only the loss: a mean loss can hide a changed output.
        outputs: list[Any] = []
        handle = module.register_forward_hook(lambda m, args, out: outputs.append(out))
        try:
            return data_loss(head), outputs
        finally:
            handle.remove()

    return run


def _flat(out: Any) -> Tensor:
    parts: list[Tensor] = []
    apply_to_collection(out, Tensor, lambda t: parts.append(t.detach().reshape(-1).double()))
    if not parts:
        raise TypeError(f"the probed call returned {type(out).__name__}, which holds no tensor")
    return torch.cat([p.cpu() for p in parts])


@contextlib.contextmanager
def _state_kept(module: nn.Module) -> Iterator[Callable[[Callable[[], Any]], Tensor]]:
    """Restores the module's buffers afterwards; yields a runner that calls ``fn`` with the
    random generators forked and reseeded (the same dropout masks on every call)."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})

    def run(fn: Callable[[], Any]) -> Tensor:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            return _flat(fn())

    try:
        with torch.no_grad():
            yield run
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def probe_scale_invariance(module: nn.Module, params: Sequence[tuple[str, Tensor]], run: Callable[[], Any],
                           rtol: float = 1e-3) -> dict[str, bool | None]:
    """For each named tensor: True if scaling it leaves ``run()`` unchanged (within ``rtol``
    times the output's largest entry), False if not, None if not probed.

    >>> net = nn.Sequential(nn.Linear(8, 16, bias=False), nn.LayerNorm(16), nn.Linear(16, 2))
    >>> x = torch.randn(8, 8)
    >>> probe_scale_invariance(net, list(net.named_parameters())[:1] + [("2.weight", net[2].weight)], lambda: net(x))
    {'0.weight': True, '2.weight': False}
    """
    if any(is_sharded(p) for p in module.parameters()):
        return {name: None for name, _ in params}
    found: dict[str, bool | None] = {name: None for name, _ in params}  # zeros: no direction to scale
    probed = [(name, p) for name, p in params if p.is_floating_point() and bool(p.detach().any())]
    with _state_kept(module) as call:
        base = call(run)
        limit = rtol * (float(base.abs().max()) if base.numel() else 0.0)

        def unchanged(group: Sequence[tuple[str, Tensor]]) -> bool:
            saved = [p.detach().clone() for _, p in group]
            try:
                for k, (_, p) in enumerate(group):
                    p.detach().mul_(_FACTORS[k % len(_FACTORS)])
                out = call(run)
            finally:
                for (_, p), copy in zip(group, saved):
                    p.detach().copy_(copy)
            diff = (out - base).abs().max() if out.shape == base.shape else torch.tensor(float("inf"))
            return bool(torch.isfinite(diff)) and float(diff) <= limit

        for start in range(0, len(probed), GROUP):
            group = probed[start:start + GROUP]
            if len(group) > 1 and unchanged(group):
                found.update((name, True) for name, _ in group)
            else:
                found.update((name, unchanged([(name, p)])) for name, p in group)
    return found
