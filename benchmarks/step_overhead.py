"""What regularization costs per training step, against what users write by hand.

Three parts, each printed as a table:

1. **step** — a full training step (forward, backward, regularization, optimizer step) in
   a tight torch loop, for an MLP 784-1024-1024-10, a small CNN and a model with ~200 small
   parameter tensors. regfit variants run regfit's own code: the term attached to the
   optimizer (:func:`regfit.attach`), so the step engine runs it from the optimizer's
   hooks, exactly as in a ``Trainer``. Variants are interleaved in a new random order every
   round; the table gives the median time per step and the median of the per-round ratios
   (with quartiles).
2. **memory** — the peak of the temporaries one ``term.apply`` allocates, against the size
   of the largest parameter tensor (CUDA: the allocator's peak; CPU: the profiler's
   allocation events).
3. **lightning** — the callback inside a real ``Trainer``: regfit's logging and weight
   statistics (every 50 steps, Lightning's default) against the same run with them
   switched off, and against plain Lightning with ``SGD(weight_decay)``.

Usage::

    python benchmarks/step_overhead.py                 # CPU, 2 threads
    python benchmarks/step_overhead.py --device cuda
    python benchmarks/step_overhead.py --quick         # a smoke run, numbers meaningless
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from dataclasses import dataclass
from typing import Callable

from _common import (
    Repeat,
    bench_parser,
    check,
    interleaved,
    mean_step,
    ratio_stats,
    start,
    step_clock,
    table,
    time_per_call,
)

import torch
import torch.nn.functional as F
from torch import nn

from regfit import Regularization, attach
from regfit.guard import apply_guarded
from regfit.modes import Coupled, Decoupled, Mode, Proximal
from regfit.penalties import L1, L2, LHalf, Penalty
from regfit.selection import Selector
from regfit.term import Term

LAM = 1e-4


# ---- models ---------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual MLP block: 8 small tensors (two LayerNorms, two Linear 128↔512)."""

    def __init__(self, d: int = 128, hidden: int = 512) -> None:
        super().__init__()
        self.norm1, self.up, self.down, self.norm2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm2(x + self.down(F.gelu(self.up(self.norm1(x)))))


def mlp() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)), (1, 28, 28)


def cnn() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    ), (1, 28, 28)


def many_small() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(*[Block() for _ in range(24)], nn.Linear(128, 10)), (128,)


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {"mlp": mlp, "cnn": cnn, "many_small": many_small}


# ---- variants -------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    optimizer: Callable[..., torch.optim.Optimizer]
    penalty: Penalty | None = None
    mode: Mode | None = None
    naive: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    guard: str = "raise"  # Regularization's default on_nonfinite


def sgd(**kw):
    return lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, **kw)


def adam(cls, **kw):
    return lambda params: cls(params, lr=1e-3, **kw)


def naive_l2(params):  # what users write by hand
    return LAM * sum(p.pow(2).sum() for p in params)


def naive_lhalf(params):
    return LAM * sum(torch.sqrt(p.abs()).sum() for p in params)


def variants(fused_ok: bool) -> list[Variant]:
    out = [
        Variant("sgd", sgd()),
        Variant("sgd_weight_decay", sgd(weight_decay=LAM)),
        Variant("regfit_coupled_l2", sgd(), L2(), Coupled()),
        Variant("regfit_coupled_l2_guard_off", sgd(), L2(), Coupled(), guard="off"),
        Variant("naive_l2_in_loss", sgd(), naive=naive_l2),
        Variant("regfit_proximal_l1", sgd(), L1(), Proximal()),
        Variant("regfit_coupled_lhalf", sgd(), LHalf(), Coupled()),
        Variant("naive_lhalf_in_loss", sgd(), naive=naive_lhalf),
    ]
    for impl in ("foreach", "fused") if fused_ok else ("foreach",):
        kw = {impl: True}
        out += [
            Variant(f"adam_{impl}", adam(torch.optim.Adam, **kw)),
            Variant(f"adamw_{impl}", adam(torch.optim.AdamW, weight_decay=LAM, **kw)),
            Variant(f"regfit_decoupled_l2_adam_{impl}", adam(torch.optim.Adam, **kw), L2(), Decoupled()),
        ]
    return out


# (numerator, denominator, op, target, which models the target names; None = all)
CHECKS = [
    ("regfit_coupled_l2", "sgd", "<=", 1.02, None),
    ("regfit_coupled_l2", "sgd_weight_decay", "<=", 1.00, None),
    ("regfit_coupled_l2_guard_off", "sgd", "<=", 1.02, None),
    ("regfit_coupled_l2", "regfit_coupled_l2_guard_off", None, None, None),
    ("naive_l2_in_loss", "regfit_coupled_l2", ">=", 1.08, {"mlp"}),
    ("regfit_proximal_l1", "sgd", "<=", 1.05, None),
    ("regfit_coupled_lhalf", "sgd", "<=", 1.05, None),
    ("naive_lhalf_in_loss", "regfit_coupled_lhalf", ">=", 1.0, None),
    ("regfit_decoupled_l2_adam_foreach", "adamw_foreach", "<=", 1.00, None),
    ("regfit_decoupled_l2_adam_fused", "adamw_fused", "<=", 1.00, None),
    ("sgd_weight_decay", "sgd", None, None, None),
    ("adamw_foreach", "adam_foreach", None, None, None),
]


def bind_term(variant: Variant, model: nn.Module, opt: torch.optim.Optimizer) -> Term:
    term = Term(variant.penalty, LAM, Selector(), "none", variant.mode, variant.penalty.name)
    term.bind(model, [opt])
    return term


def make_step(variant: Variant, proto: nn.Module, x, y) -> Callable[[], None]:
    """One training step of this variant on its own copy of the model: a plain loop, with
    the variant's term attached to the optimizer (regfit's step engine, as in training)."""
    model = copy.deepcopy(proto)
    params = list(model.parameters())
    opt = variant.optimizer(params)
    if variant.penalty is not None:
        attach(model, opt, Regularization(variant.penalty, strength=LAM, mode=variant.mode, on_nonfinite=variant.guard))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if variant.naive is not None:
            loss = loss + variant.naive(params)
        loss.backward()
        opt.step()

    return step


def fused_supported(device: torch.device) -> bool:
    try:
        p = nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def model_and_batch(model_name: str, batch: int, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (seeded) on ``device`` and one random batch for it."""
    torch.manual_seed(0)
    proto, shape = MODELS[model_name]()
    proto.to(device)
    return proto, torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device)


def time_steps(vs: list[Variant], proto: nn.Module, x, y, args, sync) -> dict[str, list[float]]:
    """Seconds per step of each variant, one entry per round (variants interleaved)."""
    steps = {v.name: make_step(v, proto, x, y) for v in vs}
    for fn in steps.values():  # warm up: allocator, optimizer state, lazy inits (and compilation)
        time_per_call(fn, args.warmup, sync)
    return interleaved({n: (lambda fn=fn: time_per_call(fn, args.steps, sync)) for n, fn in steps.items()}, args.rounds)


def bench_steps(args, device, sync) -> None:
    vs = variants(fused_supported(device))
    for model_name in args.models:
        proto, x, y = model_and_batch(model_name, args.batch, device)
        n_params = sum(p.numel() for p in proto.parameters())
        times = time_steps(vs, proto, x, y, args, sync)
        rows = []
        for num, den, op, target, only in CHECKS:
            if num not in times or den not in times:
                continue
            med, q1, q3 = ratio_stats(times[num], times[den])
            verdict = check(med, op, target, q1, q3) if op and (only is None or model_name in only) else "info"
            rows.append([num, f"{statistics.median(times[num]) * 1e3:.2f}", den, f"{statistics.median(times[den]) * 1e3:.2f}",
                         f"{med:.3f} [{q1:.3f}–{q3:.3f}]", verdict])
        print(f"\n### step: {model_name} ({len(list(proto.parameters()))} tensors, {n_params / 1e6:.2f}M parameters, "
              f"batch {args.batch}; {args.rounds} rounds × {args.steps} steps)\n")
        print(table(["variant", "ms/step", "vs", "ms/step", "ratio median [q1–q3]", "target"], rows))
        bench_kernels(args, vs, proto, x, y, statistics.median(times["sgd"]), sync)


# The targets on the ratio to the unregularized step, for the kernel-alone estimate.
KERNEL_TARGETS = {num: target for num, den, op, target, _ in CHECKS if den == "sgd" and op == "<="}


def bench_kernels(args, vs: list[Variant], proto: nn.Module, x, y, step_seconds: float, sync) -> None:
    """The regularization work alone, timed in isolation (many repetitions, so far less noisy
    than a difference of two step times): what it adds to the unregularized step."""
    rows = []
    reps = max(1, args.steps * 5)
    for v in vs:
        if v.penalty is None:
            continue
        model = copy.deepcopy(proto)
        opt = v.optimizer(list(model.parameters()))
        F.cross_entropy(model(x), y).backward()  # gradients and optimizer state exist, as in training
        opt.step()
        term = bind_term(v, model, opt)
        ids = {id(g) for g in opt.param_groups}
        fn = lambda: apply_guarded(term, ids, v.guard)  # noqa: E731
        time_per_call(fn, reps, sync)
        seconds = statistics.median(time_per_call(fn, reps, sync) for _ in range(args.rounds))
        term.penalty = without_kernels(term.penalty)
        host = statistics.median(time_per_call(fn, reps, sync) for _ in range(args.rounds))
        target = KERNEL_TARGETS.get(v.name)
        implied = 1.0 + seconds / step_seconds
        rows.append([v.name, f"{seconds * 1e3:.3f}", f"{host * 1e6:.1f}", f"{100 * seconds / step_seconds:.1f} %",
                     f"{implied:.3f}", check(implied, "<=", target) if target else "info"])
    print(f"\nregularization alone (term.apply as the callback calls it; {args.rounds} rounds × {reps} calls, "
          f"median) against the unregularized step ({step_seconds * 1e3:.2f} ms). *python µs*: the same call with "
          "the penalty's kernels made no-ops — regfit's own host work per step, what a host-bound GPU step pays:\n")
    print(table(["variant", "ms/call", "python µs", "of the step", "implied ratio", "target"], rows))


def without_kernels(penalty: Penalty) -> Penalty:
    """A copy of ``penalty`` whose in-place kernels do nothing (same type, so the guard and
    the mode take the same path)."""
    stub = copy.copy(penalty)
    for name in ("add_grad_", "decay_", "prox_"):
        setattr(stub, name, lambda *args, **kwargs: None)
    return stub


# ---- memory ---------------------------------------------------------------------------------
def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` beyond what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    # Allocation events in time order; an op's own net allocation counts at its start, so
    # a temporary allocated and freed inside one op is not seen (none of the kernels'
    # temporaries are: they are returned by one _foreach op and freed after the next).
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def host_syncs(fn: Callable[[], None], device: torch.device) -> str:
    """Whether ``fn`` waits for the GPU (CUDA's sync debug mode turns a sync into an error)."""
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as err:
        return f"SYNC: {str(err)[:40]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


MEMORY_CASES = [(L2(), Coupled()), (L1(), Coupled()), (LHalf(), Coupled()), (L2(), Decoupled()), (L1(), Decoupled()),
                (LHalf(), Decoupled()), (L2(), Proximal()), (L1(), Proximal()), (LHalf(), Proximal())]


def bench_memory(args, device) -> None:
    rows = []
    for model_name in args.models:
        torch.manual_seed(0)
        proto, shape = MODELS[model_name]()
        proto.to(device)
        largest = max(p.numel() * p.element_size() for p in proto.parameters())
        for penalty, mode in MEMORY_CASES:
            model = copy.deepcopy(proto)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            term = bind_term(Variant("", None, penalty, mode), model, opt)
            extra = peak_extra_bytes(lambda: term.apply(), device)
            ratio = extra / largest
            rows.append([model_name, f"{mode.name} {penalty.name}", f"{extra / 2**20:.2f}", f"{largest / 2**20:.2f}",
                         f"{ratio:.2f}", check(ratio, "<=", 1.0), host_syncs(term.apply, device),
                         host_syncs(lambda: apply_guarded(term, None, "raise"), device)])
    print(f"\n### memory: peak temporaries of one term.apply ({'CUDA allocator' if device.type == 'cuda' else 'CPU profiler'})\n")
    print(table(["model", "mode penalty", "peak extra MiB", "largest tensor MiB", "ratio", "target", "host sync: term.apply", "guarded (default)"], rows))


# ---- the callback inside Lightning ----------------------------------------------------------
def bench_lightning(args, device, sync) -> None:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from regfit import Regularization
    from regfit.models import MLP

    class Net(MLP):  # the benchmark's MLP 784-1024-1024-10, as regfit.models builds it
        def __init__(self, weight_decay: float = 0.0) -> None:
            torch.manual_seed(0)
            super().__init__(widths=(1024, 1024))
            self.weight_decay = weight_decay

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=self.weight_decay)

    class SilentNet(Net):
        def log_penalty(self, data_loss):  # no train/penalty, train/loss, train/penalty/<term>
            pass

    class SilentRegularization(Regularization):
        def on_train_batch_end(self, *args):  # no weight statistics
            pass

    x = torch.randn(args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    skip = 2
    n = args.lightning_steps + skip + 1
    tmp = tempfile.mkdtemp(prefix="regfit-bench-")
    setups = {
        "lightning_sgd_weight_decay": (lambda: Net(weight_decay=LAM), lambda: [], 50),
        "regfit_l2_no_logging": (SilentNet, lambda: [SilentRegularization(L2(), strength=LAM, dynamics=False)], 50),
        "regfit_l2_logging_every_50": (Net, lambda: [Regularization(L2(), strength=LAM)], 50),
        "regfit_l2_logging_every_step": (Net, lambda: [Regularization(L2(), strength=LAM)], 1),
    }

    def run(name):
        make_model, make_callbacks, every = setups[name]
        clock = step_clock(sync)
        trainer = L.Trainer(
            max_steps=n, logger=CSVLogger(tmp, name=name), log_every_n_steps=every, callbacks=[*make_callbacks(), clock],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=0, accelerator=device.type, devices=1,
        )
        trainer.fit(make_model(), Repeat((x, y), n))
        return mean_step(clock, skip)  # logging steps included

    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    times = interleaved({name: (lambda name=name: run(name)) for name in setups}, 1 if args.quick else max(3, args.rounds // 2))
    rows = []
    for num, den, op, target in [
        ("regfit_l2_logging_every_50", "regfit_l2_no_logging", "<=", 1.02),
        ("regfit_l2_no_logging", "lightning_sgd_weight_decay", None, None),
        ("regfit_l2_logging_every_50", "lightning_sgd_weight_decay", None, None),
        ("regfit_l2_logging_every_step", "regfit_l2_no_logging", None, None),
    ]:
        med, q1, q3 = ratio_stats(times[num], times[den])
        rows.append([num, f"{statistics.median(times[num]) * 1e3:.2f}", den, f"{statistics.median(times[den]) * 1e3:.2f}",
                     f"{med:.3f} [{q1:.3f}–{q3:.3f}]", check(med, op, target, q1, q3) if op else "info"])
    print(f"\n### lightning: MLP in a Trainer, mean ms/step over {args.lightning_steps} steps (CSVLogger), "
          f"{len(times[num])} rounds\n")
    print(table(["variant", "ms/step", "vs", "ms/step", "ratio median [q1–q3]", "target"], rows))


def main(argv=None) -> None:
    parser = bench_parser(__doc__, rounds=12, quick="2 rounds of 1 step, small batch")
    parser.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lightning-steps", type=int, default=200, help="steps per Trainer run (logging every 50)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--parts", nargs="+", default=["step", "memory", "lightning"], choices=["step", "memory", "lightning"])
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch, args.lightning_steps = 2, 1, 1, 16, 4
    device, sync = start(parser, args)
    if "step" in args.parts:
        bench_steps(args, device, sync)
    if "memory" in args.parts:
        bench_memory(args, device)
    if "lightning" in args.parts:
        bench_lightning(args, device, sync)


if __name__ == "__main__":
    main()
