"""The coupled L1/2 kernel against the other ways of writing it, in the step and alone.

``step_overhead.py`` measures the kernel regfit ships. This script puts it beside the
alternatives one would try next, each run in the same training step as the shipped one
(variants interleaved, medians of per-round ratios), so a claim that one is faster or
slower can be checked:

* ``regfit`` — what ``LHalf().add_grad_`` does: ``abs``, ``clamp``, ``rsqrt``, cube, and
  one ``addcmul`` into the gradient (five batched passes, one temporary per run);
* ``mul_add`` — the same with ``mul`` + ``add`` instead of the ``addcmul`` (six passes);
* ``chunked`` — every tensor in chunks of 256K elements, so that the five passes over a
  chunk stay in the cache (thirty ops per 1M weights instead of five);
* ``compiled`` (``--compile``) — a ``torch.compile``d single-pass kernel for tensors of
  ≥ 256K elements (one read of w and g, one write of g), the shipped kernel for the rest.
  Needs a C++ compiler on CPU and compiles for a few seconds before timing starts.

Each alternative replaces ``add_grad_`` on an ``LHalf`` *instance*: its type stays
``LHalf``, so the non-finite guard treats it as the built-in penalty it is. (A subclass
that redefines ``add_grad_`` is guarded per step — a copy of every gradient and a check —
which costs more than the kernel and would swamp the comparison.)

Usage::

    python benchmarks/lhalf_kernels.py                  # CPU, 2 threads, MLP and many-small
    python benchmarks/lhalf_kernels.py --compile
    python benchmarks/lhalf_kernels.py --device cuda --compile
"""

from __future__ import annotations

import copy
import statistics
import types
from typing import Callable

from _common import bench_parser, check, ratio_stats, start, table, time_per_call
from step_overhead import MODELS, Variant, model_and_batch, sgd, time_steps

import torch
import torch.nn.functional as F

from regfit.modes import Coupled
from regfit.penalties import LHalf, _in_runs

CHUNK = 1 << 18  # elements: 1 MiB of float32


def mul_add(self: LHalf, gs, ws, alpha: float) -> None:
    for w_run, g_run in _in_runs(ws, gs):
        a = torch._foreach_abs(w_run)
        torch._foreach_clamp_min_(a, self.eps)
        torch._foreach_rsqrt_(a)
        torch._foreach_pow_(a, 3)
        torch._foreach_mul_(a, w_run)
        torch._foreach_add_(g_run, a, alpha=alpha * self.p)


def chunked(self: LHalf, gs, ws, alpha: float) -> None:
    for w, g in zip(ws, gs):
        for wc, gc in zip(w.view(-1).split(CHUNK), g.view(-1).split(CHUNK)):
            a = wc.abs().clamp_min_(self.eps).rsqrt_().pow_(3)
            gc.addcmul_(wc, a, value=alpha * self.p)


def compiled_kernel() -> Callable[..., None]:
    @torch.compile(dynamic=True, fullgraph=True)
    def single_pass(g: torch.Tensor, w: torch.Tensor, c: float, eps: float) -> None:
        g.add_(w * w.abs().clamp_min(eps).rsqrt().pow(3), alpha=c)

    def add_grad_(self: LHalf, gs, ws, alpha: float) -> None:
        large = [i for i, w in enumerate(ws) if w.numel() >= CHUNK]
        for i in large:
            single_pass(gs[i].view(-1), ws[i].view(-1), alpha * self.p, self.eps)
        rest = [i for i in range(len(ws)) if i not in large]
        if rest:
            LHalf.add_grad_(self, [gs[i] for i in rest], [ws[i] for i in rest], alpha)

    return add_grad_


def with_kernel(add_grad_) -> LHalf:
    penalty = LHalf()
    if add_grad_ is not None:
        penalty.add_grad_ = types.MethodType(add_grad_, penalty)
    return penalty


def kernels(compile_: bool) -> dict[str, Callable | None]:
    out = {"regfit": None, "mul_add": mul_add, "chunked": chunked}
    if compile_:
        out["compiled"] = compiled_kernel()
    return out


def check_equal(kerns: dict, device: torch.device) -> None:
    """Every alternative computes the shipped kernel's gradient (up to rounding)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    ws = [(torch.randn(s, generator=g) * 0.05).to(device) for s in [(CHUNK + 7,), (300, 40), (64,)]]
    ws[1][0, :3] = 0.0
    expected = [torch.zeros_like(w) for w in ws]
    LHalf().add_grad_(expected, ws, 0.1)
    for name, k in kerns.items():
        got = [torch.zeros_like(w) for w in ws]
        with_kernel(k).add_grad_(got, ws, 0.1)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def bench(args, device: torch.device, sync) -> None:
    kerns = kernels(args.compile)
    check_equal(kerns, device)
    for model_name in args.models:
        proto, x, y = model_and_batch(model_name, args.batch, device)
        vs = [Variant("sgd", sgd())] + [Variant(n, sgd(), with_kernel(k), Coupled()) for n, k in kerns.items()]
        times = time_steps(vs, proto, x, y, args, sync)
        rows = []
        for name in kerns:
            med, q1, q3 = ratio_stats(times[name], times["sgd"])
            vs_regfit = "%.3f [%.3f–%.3f]" % ratio_stats(times[name], times["regfit"])
            rows.append([name, f"{statistics.median(times[name]) * 1e3:.2f}", f"{med:.3f} [{q1:.3f}–{q3:.3f}]",
                         check(med, "<=", 1.05, q1, q3), vs_regfit, f"{alone(kerns[name], proto, x, y, args, sync) * 1e3:.3f}"])
        print(f"\n### coupled L1/2 kernels: {model_name} (batch {args.batch}; {args.rounds} rounds × {args.steps} steps; "
              f"unregularized step {statistics.median(times['sgd']) * 1e3:.2f} ms)\n")
        print(table(["kernel", "ms/step", "vs unregularized", "target", "vs regfit", "alone ms/call"], rows))


def alone(kernel, proto, x, y, args, sync) -> float:
    """The kernel by itself on the model's weights and real gradients."""
    model = copy.deepcopy(proto)
    F.cross_entropy(model(x), y).backward()
    ws = [p.detach() for p in model.parameters()]
    gs = [p.grad for p in model.parameters()]
    penalty = with_kernel(kernel)
    fn = lambda: penalty.add_grad_(gs, ws, 1e-4)  # noqa: E731
    time_per_call(fn, args.steps, sync)
    return statistics.median(time_per_call(fn, args.steps * 5, sync) for _ in range(args.rounds))


def main(argv=None) -> None:
    parser = bench_parser(__doc__, rounds=20, quick="2 rounds of 1 step, small batch")
    parser.add_argument("--steps", type=int, default=6, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["mlp", "many_small"], choices=list(MODELS))
    parser.add_argument("--compile", action="store_true", help="add the torch.compile'd single-pass kernel")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch = 2, 1, 1, 16
    bench(args, *start(parser, args))


if __name__ == "__main__":
    main()
