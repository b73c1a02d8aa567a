"""What the dynamics metrics cost: a logging step with them against one without, side by side.

    python benchmarks/dynamics_overhead.py [--models mlp many_small] [--rounds N] [--quick]

1. **alone** — :class:`regfit.telemetry.StepTelemetry`'s work for one logged step
   (``before_step`` + ``after_step``: a copy of the term's tensors, the gradient sums, the
   rotation sums and the equilibrium) timed by itself, as a share of one unregularized
   training step of the same model; and that share spread over the 50 steps of Lightning's
   default ``log_every_n_steps``. Also the bytes the snapshot holds during the step.
2. **trainer** — the model in a real ``Trainer`` with a CSVLogger and a coupled-L2
   ``Regularization``: ``dynamics=True`` against ``dynamics=False``, logging every step (the
   ratio is the cost of a logging step) and every 50 steps (the cost per step), in
   interleaved rounds; plus the one-off scale-invariance probe at the first batch.

Non-logging steps run no dynamics code at all (the hooks return after one check); the
smoke test ``tests/docs/test_benchmarks_smoke.py`` runs ``--quick``.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F
from _common import Repeat, bench_parser, interleaved, mean_step, ratio_stats, start, step_clock, table, time_per_call
from torch import nn

from regfit import RegModule, Regularization
from regfit.invariance import probe_run, probe_scale_invariance
from regfit.telemetry import StepTelemetry

LAM = 1e-4


class Block(nn.Module):
    """Pre-norm residual block: two LayerNorms, two Linear 128↔512 (8 small tensors)."""

    def __init__(self, d: int = 128, hidden: int = 512) -> None:
        super().__init__()
        self.norm1, self.up, self.down, self.norm2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm2(x + self.down(F.gelu(self.up(self.norm1(x)))))


def mlp() -> tuple[nn.Module, tuple[int, ...]]:
    """784-1024-1024-10 (6 tensors, 1.86M weights)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10)), (1, 28, 28)


def many_small() -> tuple[nn.Module, tuple[int, ...]]:
    """24 pre-norm blocks (194 tensors, 3.17M weights)."""
    return nn.Sequential(*[Block() for _ in range(24)], nn.Linear(128, 10)), (128,)


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {"mlp": mlp, "many_small": many_small}


class Net(RegModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net, _ = MODELS[name]()

    def forward(self, x):
        return self.net(x)

    def data_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def batch_of(name: str, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    _, shape = MODELS[name]()
    g = torch.Generator().manual_seed(0)
    return torch.randn(size, *shape, generator=g).to(device), torch.randint(0, 10, (size,), generator=g).to(device)


# ---- 1. the telemetry alone ------------------------------------------------------------------
def bench_alone(args, device, sync) -> None:
    rows = []
    for name in args.models:
        model = Net(name).to(device)
        opt = model.configure_optimizers()
        x, y = batch_of(name, args.batch, device)
        term = Regularization("l2", strength=LAM).term
        term.bind(model, [opt])

        def step():
            opt.zero_grad()
            model.data_loss((x, y)).backward()
            opt.step()

        telemetry = StepTelemetry(term)

        def measure():
            telemetry.before_step()
            telemetry.after_step()

        step(), measure()  # warm up (and leave gradients for the telemetry)
        # step and measurement alternate within each round: slow phases of a shared machine hit both
        times = interleaved({"step": lambda: time_per_call(step, args.steps, sync),
                             "dynamics": lambda: time_per_call(measure, args.steps, sync)}, args.rounds)
        med, q1, q3 = ratio_stats(times["dynamics"], times["step"])
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        rows.append([name, sum(1 for _ in model.parameters()), f"{statistics.median(times['step']) * 1e3:.2f}",
                     f"{statistics.median(times['dynamics']) * 1e3:.3f}", f"{med * 100:.1f} % [{q1 * 100:.1f}–{q3 * 100:.1f}]",
                     f"{med / 50 * 100:.2f} %", f"{held / 2**20:.1f} MiB"])
    print(f"\n### alone: one logged step's dynamics (before_step + after_step) vs one training step, "
          f"{args.rounds} rounds of {args.steps} calls\n")
    print(table(["model", "tensors", "step ms", "dynamics ms", "÷ step, median [q1–q3]", "÷ 50 steps",
                 "snapshot held"], rows))


# ---- 2. in a Trainer ---------------------------------------------------------------------------
def bench_trainer(args, device, sync) -> None:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("regfit").setLevel(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="regfit-bench-dynamics-")
    skip = 2  # the first steps (and the probe, at the first batch) are not timed
    n = args.trainer_steps + skip + 1
    for name in args.models:
        data = batch_of(name, args.batch, device)
        probes: list[float] = []

        def run(every: int, dynamics: bool) -> float:
            clock = step_clock(sync)
            reg = Regularization("l2", strength=LAM, dynamics=dynamics)
            trainer = L.Trainer(max_steps=n, logger=CSVLogger(tmp, name=name), log_every_n_steps=every,
                                callbacks=[reg, clock], enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                                accelerator=device.type, devices=1)
            trainer.fit(Net(name), Repeat(data, n))
            return mean_step(clock, skip)

        setups = {f"every_{every}_{'on' if on else 'off'}": (lambda every=every, on=on: run(every, on))
                  for every in (1, 50) for on in (True, False)}
        times = interleaved(setups, args.rounds)
        rows = []
        for every in (1, 50):
            on, off = times[f"every_{every}_on"], times[f"every_{every}_off"]
            med, q1, q3 = ratio_stats(on, off)
            rows.append([f"log_every_n_steps={every}", f"{statistics.median(on) * 1e3:.2f}",
                         f"{statistics.median(off) * 1e3:.2f}", f"{med:.3f} [{q1:.3f}–{q3:.3f}]"])
        model = Net(name).to(device)
        reg = Regularization("l2", strength=LAM)
        reg.term.assign(model)
        run_probe = probe_run(model, data)
        for _ in range(max(1, args.rounds // 2)):
            t0 = time.perf_counter()
            probe_scale_invariance(model, [(a.name, a.param) for a in reg.term.assignments], run_probe)
            sync()
            probes.append(time.perf_counter() - t0)
        print(f"\n### trainer: {name} in a Trainer (CSVLogger, SGD momentum, coupled L2), mean ms/step over "
              f"{args.trainer_steps} steps, {args.rounds} rounds\n")
        print(table(["logging", "dynamics on ms/step", "off ms/step", "on ÷ off, median [q1–q3]"], rows))
        print(f"\nscale-invariance probe at the first batch (once per fit): {statistics.median(probes) * 1e3:.1f} ms "
              f"for {len(reg.term.assignments)} tensors")


def main(argv=None) -> None:
    parser = bench_parser(__doc__, rounds=8, quick="1 round of a few steps")
    parser.add_argument("--steps", type=int, default=20, help="calls per timing (alone)")
    parser.add_argument("--trainer-steps", type=int, default=100, help="steps per Trainer run")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--parts", nargs="+", default=["alone", "trainer"], choices=["alone", "trainer"])
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.batch, args.trainer_steps = 1, 2, 16, 3
    device, sync = start(parser, args)
    if "alone" in args.parts:
        bench_alone(args, device, sync)
    if "trainer" in args.parts:
        bench_trainer(args, device, sync)


if __name__ == "__main__":
    main()
