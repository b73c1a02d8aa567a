r"""Sharded parameters (FSDP2 ``fully_shard``, Lightning's ``ModelParallelStrategy``): the
one module that knows about ``DTensor``.

A sharded parameter is a DTensor whose ``.shape`` is the global shape and whose
``to_local()`` is a view of this rank's shard. regfit runs a term on sharded parameters
shard by shard:

* **updates** (coupled gradient, decoupled decay, prox) act on ``to_local()`` of the
  weight and of its gradient, in place, so they land in the parameter. This is exact
  when the penalty is a sum over pieces that a shard never cuts: over entries (``L2``,
  ``L1``, ``ElasticNet``, ``Lp``, ``LHalf``) for any sharding, over rows for
  ``GroupLasso`` when dim 0 is what is sharded (FSDP2's ``Shard(0)``). A penalty says
  which through :attr:`~regfit.penalties.Penalty.shard_dims`; the matrix penalties
  (``Orthogonal``, ``Nuclear``, ``SpectralNorm``) couple whole rows and columns and are
  refused on sharded parameters.
* **values** (the logged penalty, weight norm and sparsity) are sums over the local
  shards, then one all-reduce (SUM) over the mesh dimensions the parameters are sharded
  on, :math:`R(w) = \sum_{\text{ranks } r} R(w^{(r)})`. They are computed only on
  logging steps, so the other steps add no collective. Replicated parameters (DDP, or
  a ``Replicate`` mesh dimension) are not summed over ranks: every rank holds all of them.
* **coefficients** (``scale: numel`` / ``fan``) read the global shape, and selection
  reads ``named_parameters()``, whose names FSDP2 leaves unchanged.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_sharded", "local", "check_shardable", "shard_sum", "all_ranks_agree"]

try:  # DTensor exists in every torch regfit supports, but not in builds without distributed
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (a sharded parameter or its gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The plain tensor the kernels work on: a DTensor's local shard (a view, so in-place
    updates reach the parameter), any other tensor itself."""
    return t.to_local() if is_sharded(t) else t


def _shard_mesh_dims(t: Tensor) -> tuple[int, ...]:
    return tuple(i for i, p in enumerate(t.placements) if p.is_shard())


def check_shardable(term: str, penalty, assignments) -> None:
    """Refuse, before any step, sharded parameters the penalty is not exact on."""
    for a in assignments:
        if not is_sharded(a.param):
            continue
        kinds = {type(p).__name__ for p in a.param.placements} - {"Shard", "Replicate"}
        if kinds:
            raise NotImplementedError(
                f"Term {term!r}: {a.name} has placements {a.param.placements}; regfit supports sharded "
                "parameters placed as Shard(d) or Replicate() only (what fully_shard / ModelParallelStrategy "
                "give). Exclude it with exclude=[...]."
            )
        dims = {p.dim for p in a.param.placements if p.is_shard()}
        allowed = penalty.shard_dims
        if getattr(a, "out_dim", 0) and allowed != "any":
            raise NotImplementedError(
                f"Term {term!r}: {a.name} is sharded and stores its output units along dim 1 (HF Conv1D or a "
                f"transposed conv); {type(penalty).__name__} acts on output units, which regfit does not do shard "
                "by shard for such a layout. Exclude it (exclude=[...]) or train with --trainer.strategy=ddp."
            )
        if allowed != "any" and not dims <= set(allowed):
            why = ("is not a sum over entries or rows: its value and updates need the whole tensor"
                   if not allowed else f"is exact on shards of dims {tuple(allowed)} only")
            raise NotImplementedError(
                f"Term {term!r}: {a.name} is sharded along dim {sorted(dims)} (DTensor placements "
                f"{a.param.placements}) and {type(penalty).__name__} {why}. Exclude the sharded "
                "parameters from this term (exclude=[...]), or train with --trainer.strategy=ddp "
                "(replicated parameters)."
            )


def shard_sum(fn: Callable[[list[Tensor], list[float]], Tensor], ws: Sequence[Tensor],
              coeffs: Sequence[float]) -> Tensor:
    """``fn(ws, coeffs)`` for an ``fn`` additive over tensors and over the entries
    (rows) of each, on whole tensors: plain tensors as they are, sharded ones on their
    local shards, summed over the ranks holding the shards (one all-reduce per mesh).

    Without sharded tensors this is exactly ``fn(ws, coeffs)``, with no communication."""
    if not any(is_sharded(w) for w in ws):
        return fn(list(ws), list(coeffs))
    plain = [(w, c) for w, c in zip(ws, coeffs) if not is_sharded(w)]
    groups: dict[tuple, list[tuple[Tensor, float]]] = {}
    for w, c in zip(ws, coeffs):
        if is_sharded(w):
            groups.setdefault((id(w.device_mesh), _shard_mesh_dims(w)), []).append((w, c))
    total = fn(*map(list, zip(*plain))) if plain else None
    for members in groups.values():
        mesh, dims = members[0][0].device_mesh, _shard_mesh_dims(members[0][0])
        part = fn([local(w) for w, _ in members], [c for _, c in members])
        for d in dims:  # shard sums → whole-tensor sums; Replicate dims hold copies, not parts
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        total = part if total is None else total + part.to(total.device)
    return total


def all_ranks_agree(ok: bool, tensors: Sequence[Tensor]) -> bool:
    """``ok`` on every rank, when ``tensors`` include sharded ones (each rank checked only
    its own shards, and all must take the same branch); ``ok`` itself otherwise."""
    if not any(is_sharded(t) for t in tensors) or not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=local(tensors[0]).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
