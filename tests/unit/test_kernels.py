"""The batched in-place kernels the modes call equal the per-tensor definitions, and their
temporaries stay within one copy of the largest tensor."""

from __future__ import annotations

import pytest
import torch

from regfit import functional as F
from regfit.penalties import L1, L2, ElasticNet, LHalf, Lp, _runs


def tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(40, 30), (30,), (7,), (50, 40), (5, 3, 3), (40,), (2, 2)]
    ws = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ws[1][:5] = 0.0  # exact zeros: the subgradient / smoothing band
    ws[3][0, :4] = torch.tensor([1e-4, -1e-4, 1e-3, -2e-3], dtype=torch.float64)
    return ws


def peak_temporaries(fn) -> int:
    """Peak bytes of live temporaries while ``fn`` runs, from the CPU profiler's allocation
    events of the thread that ran it (other threads of the test process may allocate
    meanwhile): the thread with the most recorded events."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    thread = Counter(e.thread for e in events).most_common(1)[0][0]
    live = peak = 0
    for e in sorted((e for e in events if e.thread == thread), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


# A few 0-dim scalars may be live beside the temporaries (e.g. a wrapped exponent).
SCALARS = 1024
LARGEST = 256 * 256 * 4 + SCALARS

PENALTIES = [L2(), L1(), ElasticNet(0.3), LHalf(), Lp(p=0.3, eps=1e-2)]


@pytest.mark.parametrize("penalty", PENALTIES, ids=lambda p: type(p).__name__)
def test_add_grad_and_decay_equal_per_tensor_grad(penalty):
    ws = tensors()
    gs = [torch.randn_like(w) for w in ws]
    expected_g = [g + 0.3 * penalty.grad(w) for g, w in zip(gs, ws)]
    expected_w = [w - 0.3 * penalty.grad(w) for w in ws]
    penalty.add_grad_(gs, ws, 0.3)
    penalty.decay_(ws, 0.3)
    for got, exp in zip(gs + ws, expected_g + expected_w):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("penalty", [L2(), L1(), ElasticNet(0.3), LHalf()], ids=lambda p: type(p).__name__)
def test_prox_equals_per_tensor_prox(penalty):
    ws = tensors()
    expected = [penalty.prox(w, 0.4) for w in ws]
    penalty.prox_(ws, 0.4)
    for got, exp in zip(ws, expected):
        assert torch.equal(got, exp)  # same bits (L1: the clamp split in two is the same clamp)


def test_lp_grad_matches_the_two_piece_definition():
    w = torch.linspace(-0.01, 0.01, 2001, dtype=torch.float64)
    for p, eps in ((0.5, 1e-3), (0.3, 1e-2)):
        a = w.abs()
        two_piece = torch.where(a < eps, p * eps ** (p - 2) * w, p * torch.sign(w) * a.clamp(min=eps) ** (p - 1))
        torch.testing.assert_close(F.lp_grad(w, p, eps), two_piece, rtol=1e-12, atol=0)


def test_runs_hold_at_most_the_largest_tensor_on_cpu():
    ws = tensors()
    runs = _runs(ws)
    largest = max(w.numel() for w in ws)
    assert sorted(i for r in runs for i in r) == list(range(len(ws)))  # a partition
    assert all(list(r) == sorted(r) for r in runs)  # the original order inside a run
    assert all(sum(ws[i].numel() for i in r) <= largest for r in runs)
    assert len(runs) < len(ws)  # small tensors share a run
    assert _runs([]) == ()


def test_small_tensors_between_large_ones_share_a_run():
    """Biases and norms sit between large weights in a model; they still go in one run
    (each tensor of each _foreach op costs a dispatch, on CPU too)."""
    ws = []
    for _ in range(10):
        ws += [torch.randn(64, 64), torch.randn(64), torch.randn(3)]
    runs = _runs(ws)
    assert len(runs) == 11  # ten large tensors alone, the twenty small ones together
    assert sorted(len(r) for r in runs) == [1] * 10 + [20]


def test_l1_kernel_temporaries_stay_within_the_largest_tensor():
    """CPU profiler: the peak of live temporaries during add_grad_ is one largest tensor."""
    ws = [torch.randn(256, 256) for _ in range(6)] + [torch.randn(64) for _ in range(20)]
    gs = [torch.zeros_like(w) for w in ws]
    assert 0 < peak_temporaries(lambda: L1().add_grad_(gs, ws, 1e-3)) <= LARGEST


def test_soft_threshold_run_form_equals_softshrink_bits():
    """The accelerator path (_foreach clamps over runs) and the CPU path (softshrink per
    tensor) give the same bits, so the choice by device changes no result."""
    from regfit.penalties import _soft_threshold_runs_

    ws = [w.float() for w in tensors()] + [torch.randn(64) for _ in range(5)]
    expected = [torch.nn.functional.softshrink(w, 0.4) for w in ws]
    _soft_threshold_runs_(ws, 0.4)
    for got, exp in zip(ws, expected):
        assert torch.equal(got, exp)


def test_l1_prox_on_cpu_allocates_nothing():
    ws = [torch.randn(256, 256) for _ in range(3)] + [torch.randn(64) for _ in range(20)]
    assert peak_temporaries(lambda: L1().prox_(ws, 1e-3)) <= SCALARS  # no tensor-sized temporary


def test_soft_threshold_in_place_refuses_a_negative_threshold():
    with pytest.raises(ValueError, match="t=-0.1"):
        F.soft_threshold_(torch.randn(3), -0.1)


@pytest.mark.parametrize("penalty,method", [(L1(), "add_grad_"), (L1(), "decay_"), (LHalf(), "add_grad_"),
                                            (LHalf(), "decay_"), (LHalf(), "prox_"), (ElasticNet(0.5), "decay_")],
                         ids=["L1-coupled", "L1-decoupled", "LHalf-coupled", "LHalf-decoupled", "LHalf-proximal",
                              "ElasticNet-decoupled"])
def test_kernel_peak_memory_is_at_most_the_largest_tensor(penalty, method):
    # three runs: each run's temporary must be freed before the next one is made
    ws = [torch.randn(256, 256), torch.randn(200, 256), torch.randn(128, 256)] + [torch.randn(64) for _ in range(20)]
    args = ([torch.zeros_like(w) for w in ws], ws, 1e-3) if method == "add_grad_" else (ws, 1e-3)
    assert 0 < peak_temporaries(lambda: getattr(penalty, method)(*args)) <= LARGEST


def aten_calls(fn) -> list[str]:
    """The aten ops ``fn`` dispatches, in order (on a GPU each ``_foreach`` op is a launch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return calls


@pytest.mark.parametrize("method", ["add_grad_", "decay_"])
def test_lhalf_kernel_is_five_batched_passes_per_run(method):
    """abs, clamp, rsqrt, cube, and one addcmul that folds p·w·scale into the gradient (or
    weight): one op per pass, whatever the number of tensors in the run."""
    ws = [torch.randn(256, 256)] + [torch.randn(64) for _ in range(20)]  # two runs
    gs = [torch.zeros_like(w) for w in ws]
    args = (gs, ws, 1e-3) if method == "add_grad_" else (ws, 1e-3)
    calls = aten_calls(lambda: getattr(LHalf(), method)(*args))
    per_run = ["_foreach_abs", "_foreach_clamp_min_", "_foreach_rsqrt_", "_foreach_pow_", "_foreach_addcmul_"]
    assert calls == per_run * len(_runs(ws)) == per_run * 2


def test_lhalf_prox_is_batched_per_run():
    """Half-thresholding is the same dozen _foreach passes per run however many tensors
    the run holds, plus one in-place hardshrink per tensor (it used to be ~17 ops per
    tensor: a GPU launch each)."""
    ws = [torch.randn(256, 256)] + [torch.randn(64) for _ in range(20)]  # two runs
    calls = aten_calls(lambda: LHalf().prox_(ws, 1e-3))
    assert sum(c.startswith("_foreach_") for c in calls) == 12 * len(_runs(ws)) == 24
    assert calls.count("hardshrink") == len(ws)
    assert len(calls) == 24 + len(ws)


def test_bucket_hands_the_kernels_stepping_tensors_and_local_shards(monkeypatch):
    """What every mode gives the kernels: parameters with a gradient, in order, with their
    gradients; a sharded parameter (and its gradient) as its local shard. Whether a bucket
    holds shards is looked at once, not per tensor and step."""
    import regfit.modes as modes

    ps = [torch.nn.Parameter(torch.full((2,), float(i))) for i in range(4)]
    for i in (0, 2, 3):
        ps[i].grad = torch.full((2,), 10.0 + i)
    plain = modes.Bucket(ps, 1.0, {"lr": 0.1})
    assert plain.stepping() == [ps[0], ps[2], ps[3]] and plain.stepping_indices() == [0, 2, 3]
    params, grads = plain.stepping_with_grads()
    assert params == plain.stepping() and all(g is p.grad for g, p in zip(grads, params))
    assert all(g is p.grad for g, p in zip(plain.stepping_grads(), params))

    shards = {id(ps[2]): torch.zeros(1), id(ps[2].grad): torch.ones(1)}  # ps[2] stands for a DTensor
    looked = []

    def is_sharded(t):
        looked.append(t)
        return id(t) in shards

    monkeypatch.setattr(modes, "is_sharded", is_sharded)
    monkeypatch.setattr(modes, "local", lambda t: shards.get(id(t), t))
    sharded = modes.Bucket(ps, 1.0, {"lr": 0.1})
    for _ in range(3):
        params, grads = sharded.stepping_with_grads()
        assert params[1] is shards[id(ps[2])] and grads[1] is shards[id(ps[2].grad)]
        assert params[0] is ps[0] and grads[2] is ps[3].grad
        assert sharded.stepping() == params and sharded.stepping_grads() == grads
    assert len(looked) <= len(ps)  # once per bucket, not per step
