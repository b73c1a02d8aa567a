"""One rank of tests/distributed/test_fsdp.py: train with FSDP2 ``fully_shard`` on 2 CPU processes (gloo).

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node=2
tests/distributed/fsdp_worker.py OUT_DIR``. For every case of :data:`CASES` each rank shards a
float64 TinyNet (each Linear / LayerNorm, then the root), attaches a regfit term to a torch
optimizer (:func:`regfit.attach`: the step engine runs it from the optimizer's hooks) and
trains on its half of each global batch; it writes
``<case>_rank<r>.pt`` with the gathered full parameters, the penalty value, weight norm
and sparsity after every step, the term's (name, coefficient) list and the number of
all-reduces the term issued while updating and while computing values, and the
dynamics telemetry of every step (:class:`~regfit.telemetry.StepTelemetry`). Then, with
``--lightning``, the same through ``Trainer(strategy=ModelParallelStrategy(...))``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from regfit import Regularization, attach
from regfit.modes import CautiousDecoupled, Coupled, Decoupled, Proximal
from regfit.penalties import L1, L2, GroupLasso, LHalf, Penalty
from regfit.telemetry import StepTelemetry
from regfit.term import Term
from tests.helpers import TinyNet, batches

WORLD, STEPS, BATCH = 2, 6, 16  # BATCH: the global batch, split in halves over the ranks


class LogCosh(Penalty):
    """A user penalty (autograd gradient): guarded every step; a sum over entries."""

    name = "logcosh"
    shard_dims = "any"

    def value(self, w):
        return torch.log(torch.cosh(w)).sum()


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


# case → (optimizer, penalty, strength, mode, include, exclude, scale)
CASES = {
    "coupled-l2-sgd": (sgd, L2(), 1e-2, Coupled(), (), ("bias",), "fan"),
    "decoupled-l2-adam": (adam, L2(), 1e-1, Decoupled(), (), (), "numel"),
    "proximal-l1-sgd": (sgd, L1(), 1e-2, Proximal(), ("body.*",), ("norm",), "none"),
    "coupled-lhalf-sgd": (sgd, LHalf(), 1e-3, Coupled(), (), ("bias",), "none"),
    "proximal-grouplasso-sgd": (sgd, GroupLasso(), 0.2, Proximal(), ("type:Linear",), ("bias",), "none"),
    "coupled-logcosh-sgd": (sgd, LogCosh(), 1e-2, Coupled(), (), (), "none"),
    # prepare (a copy of w_t before the update) and apply after it, on the shards
    "cautious-l2-adam": (adam, L2(), 1e-1, CautiousDecoupled(), (), ("bias",), "none"),
}


def model() -> TinyNet:
    # width 15: every weight splits unevenly over 2 ranks (8 + 7 rows; the head 2 + 1)
    return TinyNet(width=15)


def regularization(case: str) -> Regularization:
    _, penalty, strength, mode, include, exclude, scale = CASES[case]
    return Regularization(penalty, strength=strength, mode=mode, include=include, exclude=exclude, scale=scale,
                          name=case)


def train(net, reg: Regularization, opt, data, rank: int | None, counts: dict | None = None,
          dynamics: list | None = None) -> list[tuple[float, float, float]]:
    """STEPS steps; ``rank`` None trains on the whole batch, else on this rank's half.
    Returns (penalty value, weight norm, sparsity) after every step; appends each step's
    telemetry to ``dynamics``."""
    hooks = attach(net, opt, reg)
    t: Term = reg.term
    telemetry = StepTelemetry(t)
    logged = []
    for x, y in data:
        if rank is not None:
            half = BATCH // WORLD
            x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        with _counting(counts, "telemetry"):
            telemetry.before_step()
        with _counting(counts, "update"):  # the optimizer's update and the term's, in its phases
            opt.step()
        with _counting(counts, "telemetry"):
            measured = telemetry.after_step()
        if dynamics is not None:
            dynamics.append(measured)
        with _counting(counts, "log"):
            value = float(t.value())
            norm, sparsity = t.weight_stats()
        logged.append((value, float(norm), float(sparsity)))
    hooks.remove()
    return logged


class _counting:
    """Counts dist.all_reduce calls inside the block into counts[key]."""

    def __init__(self, counts: dict | None, key: str) -> None:
        self.counts, self.key = counts, key

    def __enter__(self):
        if self.counts is not None:
            self.original = dist.all_reduce

            def wrapper(*args, **kwargs):
                self.counts[self.key] = self.counts.get(self.key, 0) + 1
                return self.original(*args, **kwargs)

            dist.all_reduce = wrapper

    def __exit__(self, *exc):
        if self.counts is not None:
            dist.all_reduce = self.original


def shard(net: TinyNet, mesh) -> TinyNet:
    for m in net.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(m, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (WORLD,))
    for case in CASES:
        net = shard(model(), mesh)
        assert all(isinstance(p, DTensor) for p in net.parameters())
        reg, counts, dynamics = regularization(case), {}, []
        t = reg.term
        logged = train(net, reg, CASES[case][0](net.parameters()), batches(STEPS, BATCH), rank, counts, dynamics)
        params = {n: p.full_tensor().detach().clone() for n, p in net.named_parameters()}
        local_rows = {n: p.to_local().shape[0] for n, p in net.named_parameters()}
        torch.save({"params": params, "logged": logged, "counts": counts, "local_rows": local_rows, "dynamics": dynamics,
                    "names": [n for n, _ in net.named_parameters()],
                    "coeffs": [(a.name, a.coeff) for a in t.assignments]}, out / f"{case}_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
