"""A term's dynamics, measured around one optimizer step: what the Lightning callback logs.

:class:`StepTelemetry` keeps what one measurement needs between the moment before the
optimizer step (:meth:`~StepTelemetry.before_step`, from ``on_before_optimizer_step``: the
gradients are the data gradients, accumulated over the micro-batches and unscaled, and the
weights are still w_t) and the moment after it (:meth:`~StepTelemetry.after_step`, from
``on_train_batch_end``). It is only called on logging steps, so other steps pay nothing.

What a measurement costs: a copy of the term's tensors (that have a gradient), one pass
over the data gradients and one ∇R per tensor before the step, three reductions per tensor
after it; host syncs only where the values are turned into numbers for the logger. The math
is :mod:`regfit.dynamics`; sharded tensors are summed over their shards (one all-reduce per
quantity, :func:`regfit.sharding.shard_sum`).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import Tensor

from regfit.dynamics import effective_lrs, equilibrium_angle, rms, rotation_angles, squared_norms, unit_difference_sums
from regfit.modes import Bucket
from regfit.penalties import L2, Penalty
from regfit.sharding import local, shard_sum
from regfit.term import Term

__all__ = ["StepTelemetry"]


def _per_tensor(fn: Callable[[list[Tensor], list[int]], Tensor], tensors: list[Tensor]) -> Tensor:
    """Rows ``fn(local shards, their indices)`` → (len(shards), k) sums, placed at the rows of
    their tensors, shape (n, k): each row summed over the shards of its tensor.

    :func:`~regfit.sharding.shard_sum` adds what its ``fn`` returns over groups of tensors
    and ranks; here that ``fn`` puts each tensor's sums in its own row (zeros elsewhere),
    told the row through the tensor's "coefficient"."""
    def rows(ws: list[Tensor], index: list[float]) -> Tensor:
        idx = [int(i) for i in index]
        part = fn(ws, idx)
        out = torch.zeros(len(tensors), part.shape[1], dtype=part.dtype, device=part.device)
        out[torch.tensor(idx, device=part.device)] = part
        return out

    return shard_sum(rows, tensors, [float(i) for i in range(len(tensors))])


def _wide(t: Tensor) -> Tensor:
    """At least float32: a penalty's gradient of a bf16/fp16 tensor, in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _plain_l2(penalty: Penalty) -> bool:
    """∇R(w) = w: its norm is the weight norm, no per-tensor gradient needed."""
    return isinstance(penalty, L2) and type(penalty).grad is L2.grad


class StepTelemetry:
    """Measures one optimizer step of a term: angular update, effective lr, equilibrium
    angle, and the penalty's share of the gradient. Metric names: see :meth:`after_step`."""

    def __init__(self, term: Term) -> None:
        self.term = term
        self.clear()

    @property
    def pending(self) -> bool:
        """Whether a snapshot waits for its step to be measured."""
        return bool(self._params)

    def clear(self) -> None:
        self._params: list[Tensor] = []
        self._before: list[Tensor] = []
        self._buckets: list[Bucket] = []
        self._sq_before = torch.zeros(0, dtype=torch.float64)
        self._grad_sums: tuple[float, float] | None = None

    def holds(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` steps any of the term's tensors."""
        groups = {id(g) for g in optimizer.param_groups}
        return any(id(b.group) in groups for b in self.term.buckets)

    # ---- before the step ------------------------------------------------------------------
    def before_step(self) -> None:
        """Keep w_t of the tensors that take this step (those with a gradient), and the
        sums of the gradient ratio: call before any term acts on the gradients or weights."""
        params, buckets = [], []
        for bucket in self.term.buckets:
            for i in bucket.stepping_indices():
                params.append(bucket.params[i])
                buckets.append(bucket)
        if not params:
            return
        term = self.term
        with torch.no_grad():
            self._before = torch._foreach_clone([local(p).detach() for p in params])
            l2 = _plain_l2(term.penalty)
            oriented = {id(a.param): a.out_dim for a in term.assignments} if term.oriented else {}

            def sums(ws: list[Tensor], idx: list[int]) -> Tensor:
                grads = [local(params[i].grad) for i in idx]
                sq_w = squared_norms(ws)
                if l2:  # ∇R = w
                    reg = sq_w
                else:
                    views = [w.transpose(0, 1) if oriented.get(id(params[i])) else w for w, i in zip(ws, idx)]
                    reg = squared_norms([term.penalty.grad(_wide(v)) for v in views])
                return torch.stack([sq_w, squared_norms(grads), reg.to(sq_w.dtype)], dim=1)

            rows = _per_tensor(sums, params).cpu()
        lams = torch.tensor([term.strength_now(b) * b.coeff for b in buckets], dtype=torch.float64)
        self._sq_before = rows[:, 0]
        self._grad_sums = (float((lams.square() * rows[:, 2]).sum()), float(rows[:, 1].sum()))
        self._params, self._buckets = params, buckets

    # ---- after the step -------------------------------------------------------------------
    def after_step(self) -> dict[str, float]:
        """The step's measurements, keyed by metric name (without ``/<term>``):

        * ``weights/angular_update``: RMS over the tensors of the angle (radians) between
          w_t and w_{t+1};
        * ``weights/effective_lr``: RMS over the tensors of η/‖w_{t+1}‖²;
        * ``weights/equilibrium_angle``: RMS over the tensors of the predicted θ_eq
          (absent where :func:`~regfit.dynamics.equilibrium_angle` has none);
        * ``weights/grad_ratio``: ‖λ·c·∇R(w)‖ / ‖∇L_data(w)‖ over the term's tensors.
        """
        if not self.pending:
            return {}
        params, before, buckets, sq_before = self._params, self._before, self._buckets, self._sq_before
        reg, data = self._grad_sums
        self.clear()
        with torch.no_grad():
            # ‖w_{t+1}‖², then ‖w_t·κ⁻¹ − w_{t+1}‖² with κ = ‖w_t‖/‖w_{t+1}‖ of the whole tensors,
            # written into the snapshot (no second copy); each sum adds up over shards.
            sq_after = _per_tensor(lambda ws, idx: squared_norms(ws)[:, None], params).cpu()[:, 0]
            ratios = torch.where(sq_after > 0, (sq_before / sq_after).sqrt(), 1.0).tolist()
            sq_diff = _per_tensor(lambda ws, idx: unit_difference_sums(
                [before[i] for i in idx], ws, [ratios[i] for i in idx], inplace=True)[:, None], params).cpu()[:, 0]
        angles = rotation_angles(sq_before, sq_after, sq_diff)
        out = {"weights/angular_update": float(rms(angles)),
               "weights/effective_lr": float(rms(effective_lrs([b.lr for b in buckets], sq_after)))}
        predicted = self._equilibrium(buckets)
        if predicted is not None:
            out["weights/equilibrium_angle"] = predicted
        out["weights/grad_ratio"] = math.sqrt(reg / data) if data > 0 else (0.0 if reg == 0 else math.inf)
        return out

    def _equilibrium(self, buckets: list[Bucket]) -> float | None:
        """RMS over the stepping tensors of θ_eq for each one's bucket (those that have one)."""
        term = self.term
        per_bucket: dict[int, float | None] = {}
        squares = []
        for bucket in buckets:
            if id(bucket) not in per_bucket:
                optimizer = next((o for o in term._optimizers if any(g is bucket.group for g in o.param_groups)), None)
                # step_size of a copy: Decoupled(step="corrected") updates the bucket's max_lr
                step = term.mode.step_size(copy.copy(bucket))
                per_bucket[id(bucket)] = None if optimizer is None else equilibrium_angle(
                    optimizer, bucket.group, term.mode, term.penalty, term.strength_now(bucket) * bucket.coeff, step)
            theta = per_bucket[id(bucket)]
            if theta is not None:
                squares.append(theta * theta)
        return math.sqrt(sum(squares) / len(squares)) if squares else None
