"""Cost of the non-finite guard (regfit.guard) per optimizer step on a 1.9M-weight MLP.

    python benchmarks/guard_overhead.py [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from regfit.guard import apply_guarded
from regfit.modes import Coupled, Decoupled, Proximal
from regfit.penalties import L1, L2
from regfit.selection import Selector
from regfit.term import Term


class CustomL2(L2):
    """Same math as L2, but it defines its own kernel, so the guard checks it every step
    (with an undo copy); a subclass that only renamed L2 would run unguarded."""

    def add_grad_(self, gs, ws, alpha):
        super().add_grad_(gs, ws, alpha)


def timed(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    print(f"{sum(p.numel() for p in model.parameters())} weights; training step {timed(step, 30):.2f} ms")
    for label, penalty, mode in (("L2 coupled", L2(), Coupled()), ("L2 decoupled", L2(), Decoupled()),
                                 ("L1 proximal", L1(), Proximal()), ("custom coupled", CustomL2(), Coupled())):
        term = Term(penalty, 1e-4, Selector(), "none", mode, "t")
        term.bind(model, [opt])
        plain = timed(lambda: term.apply(None), 200)
        guarded = timed(lambda: apply_guarded(term, None, "raise"), 200)
        print(f"{label:15s} apply {plain:.3f} ms, guarded {guarded:.3f} ms, overhead {guarded - plain:.3f} ms")


if __name__ == "__main__":
    main()
