"""Penalties: one harness over every built-in (``regfit.penalties.BUILTINS``) — gradients
against finite differences and autograd, prox optimality, behaviour at 0 and ±∞ and in low
precision, the batched kernels against the per-tensor definitions — then what each
penalty promises of its own (conventions, Keras equivalences, ranks), and the kernels'
memory and dispatch."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from regfit import Regularization
from regfit import functional as F
from regfit.penalties import (BUILTINS, L1, L2, ElasticNet, GroupLasso, LHalf, Lp, Nuclear, Orthogonal, Penalty,
                              SpectralNorm, _runs, resolve_penalty)
from tests.helpers import TinyNet, batches, finite_differences, fit, max_param_diff, reference_loop

EXAMPLES = {f"{b.name}-{i}" if len(b.examples) > 1 else b.name: (b, pen) for b in BUILTINS for i, pen in enumerate(b.examples)}
ALL = list(EXAMPLES)
WITH_PROX = [k for k, (b, _) in EXAMPLES.items() if b.has_prox]
SEPARABLE = [k for k, (b, _) in EXAMPLES.items() if b.separable]
FINITE = [k for k, (b, _) in EXAMPLES.items() if b.finite]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def away_from_kinks(shape=(5, 4), seed=0) -> torch.Tensor:
    """Entries with |w| in [0.2, 2], random signs: no penalty has a kink or smoothing band there."""
    g = torch.Generator().manual_seed(seed)
    mag = 0.2 + 1.8 * torch.rand(shape, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return mag * sign


def rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- the harness: every built-in penalty --------------------------------------------------


def test_every_builtin_is_in_the_harness_and_has_its_short_name():
    assert {type(pen) for _, pen in EXAMPLES.values()} == {b.cls for b in BUILTINS}
    for b in BUILTINS:
        assert resolve_penalty(b.name) == b.cls() if b.cls not in (Lp,) else resolve_penalty(b.name) == Lp()


@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 2, 2)], ids=str)
@pytest.mark.parametrize("name", ALL)
def test_grad_matches_finite_differences(name, shape):
    _, pen = EXAMPLES[name]
    w = away_from_kinks(shape)
    g = pen.grad(w)
    fd = finite_differences(pen, w)
    assert torch.allclose(g, fd, atol=1e-6, rtol=1e-6), (g - fd).abs().max()


@pytest.mark.parametrize("name", ALL)
def test_autograd_of_value_equals_grad(name):
    """So 'penalty in the loss' and 'gradient injection' are the same update, also near 0."""
    _, pen = EXAMPLES[name]
    w = torch.cat([away_from_kinks((4, 4)), torch.tensor([[0.0, 1e-5, -1e-4, 0.0]])]).requires_grad_(True)
    (auto,) = torch.autograd.grad(pen.value(w), w)
    assert torch.isfinite(auto).all()
    assert torch.allclose(auto, pen.grad(w.detach()), atol=1e-10)


@pytest.mark.parametrize("name", WITH_PROX)
def test_prox_with_zero_step_is_identity(name):
    b, pen = EXAMPLES[name]
    w = torch.cat([away_from_kinks((3, 4)), torch.zeros(1, 4)])
    if b.separable or b.cls is GroupLasso:
        assert torch.equal(pen.prox(w, 0.0), w)
    else:  # through an SVD
        assert torch.allclose(pen.prox(w, 0.0), w, atol=1e-12)


def objective(pen: Penalty, x: torch.Tensor, w: torch.Tensor, t: float) -> torch.Tensor:
    return 0.5 * (x - w).pow(2).sum() + t * pen.value(x)


@pytest.mark.parametrize("t", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("name", SEPARABLE)
def test_prox_is_the_grid_minimizer(name, t):
    """prox(w, t) attains the minimum of ½(x−w)² + t·R(x) found on a dense 1-D grid."""
    _, pen = EXAMPLES[name]
    grid = torch.linspace(-6, 6, 240_001)
    values = torch.stack([pen.value(x.reshape(1)) for x in grid[::4000]])  # R is a sum over entries:
    assert torch.allclose(values, _elementwise_value(pen, grid[::4000]))  # the 1-d values are its terms
    penalty = t * _elementwise_value(pen, grid)
    for w in torch.linspace(-4, 4, 41).tolist():
        x = pen.prox(torch.tensor([w]), t)
        vals = 0.5 * (grid - w) ** 2 + penalty
        f_grid = vals.min()
        f_prox = objective(pen, x, torch.tensor([w]), t)
        assert f_prox <= f_grid + 1e-7, (w, x, grid[vals.argmin()])


def _elementwise_value(pen: Penalty, grid: torch.Tensor) -> torch.Tensor:
    if isinstance(pen, L2):
        return 0.5 * grid**2
    if isinstance(pen, L1):
        return grid.abs()
    if isinstance(pen, ElasticNet):
        a = pen.l1_ratio
        return a * grid.abs() + (1 - a) * 0.5 * grid**2
    if isinstance(pen, Lp):
        return grid.abs().pow(pen.p)
    raise AssertionError(pen)


@pytest.mark.parametrize("name", WITH_PROX)
def test_prox_beats_random_perturbations(name):
    """prox is a minimizer in every direction, also for the non-separable group lasso and
    nuclear norm."""
    _, pen = EXAMPLES[name]
    g = torch.Generator().manual_seed(3)
    for t in (0.1, 1.0):
        w = torch.randn(6, 5, generator=g)
        w[0] *= 0.05  # a row that block soft-thresholding removes
        x = pen.prox(w, t)
        f = objective(pen, x, w, t)
        for scale in (1e-4, 1e-2, 1.0):
            for _ in range(50):
                y = x + scale * torch.randn(x.shape, generator=g)
                assert f <= objective(pen, y, w, t) + 1e-10
        assert f <= objective(pen, torch.zeros_like(w), w, t) + 1e-10


@pytest.mark.parametrize("name", FINITE)
@pytest.mark.parametrize("value", [0.0, 1e-30, -1e-30, 1e6, -1e6])
def test_finite_at_zero_tiny_and_huge(name, value):
    """What the guard trusts (``Builtin.finite``): finite weights give finite results."""
    _, pen = EXAMPLES[name]
    w = torch.full((3, 2), value)
    assert torch.isfinite(pen.value(w))
    assert torch.isfinite(pen.grad(w)).all()
    for t in (0.0, 1e-3, 1.0, 10.0):
        assert torch.isfinite(pen.prox(w, t)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", FINITE)
def test_finite_in_low_precision(name, dtype):
    _, pen = EXAMPLES[name]
    w = torch.tensor([[0.0, 1e-30, 1e-4, -5e-4, -3.0, 1e4]], dtype=dtype)
    assert torch.isfinite(pen.grad(w)).all()
    for ws in ([w.clone()], [torch.zeros_like(w), w.clone()]):  # the batched kernels too
        pen.add_grad_(ws[-1:], ws[:1], 0.1) if len(ws) == 2 else pen.decay_(ws, 0.1)
        assert all(torch.isfinite(x).all() for x in ws)
    for t in (1e-7, 0.5):
        assert torch.isfinite(pen.prox(w, t)).all()
    assert pen.total([w], [1.0]).dtype in (torch.float32, torch.float64)


def kernel_tensors(seed: int = 0, matrices: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(40, 30), (30, 2), (7, 3), (50, 40), (5, 3, 3), (4, 10), (2, 2)] if matrices else \
        [(40, 30), (30,), (7,), (50, 40), (5, 3, 3), (40,), (2, 2)]
    ws = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ws[1][:5] = 0.0  # exact zeros: the subgradient / smoothing band
    ws[3][0, :4] = torch.tensor([1e-4, -1e-4, 1e-3, -2e-3], dtype=torch.float64)
    return ws


@pytest.mark.parametrize("name", ALL)
def test_batched_kernels_equal_the_per_tensor_definitions(name):
    """total, add_grad_, decay_ and prox_ (what the modes call once per step on many
    tensors) equal Σc·value, grad and prox applied tensor by tensor."""
    b, pen = EXAMPLES[name]
    ws = kernel_tensors(matrices=not (b.separable or b.cls is GroupLasso))
    coeffs = [0.5 + i for i in range(len(ws))]
    assert torch.allclose(pen.total(ws, coeffs), sum(c * pen.value(w) for w, c in zip(ws, coeffs)), rtol=1e-12)
    gs = [torch.randn_like(w) for w in ws]
    got = [g.clone() for g in gs]
    pen.add_grad_(got, ws, 0.3)
    for g0, g1, w in zip(gs, got, ws):
        assert torch.allclose(g1, g0 + 0.3 * pen.grad(w), atol=1e-12)
    decayed = [w.clone() for w in ws]
    pen.decay_(decayed, 0.3)
    for w, d in zip(ws, decayed):
        assert torch.allclose(d, w - 0.3 * pen.grad(w), atol=1e-12)
    if b.has_prox:
        proxed = [w.clone() for w in ws]
        pen.prox_(proxed, 0.2)
        for w, p in zip(ws, proxed):
            assert torch.allclose(p, pen.prox(w, 0.2), atol=1e-12)


# ---- each penalty's own promises ----------------------------------------------------------


@pytest.mark.parametrize("pen", [Lp(p=0.3), LHalf(eps=1e-4), LHalf()], ids=["lp0.3", "lhalf-eps1e-4", "lhalf"])
def test_lp_gradient_in_float16_matches_float64(pen):
    """eps^(p-2), the largest gradient scale, exceeds float16's range for these two (1.3e5,
    1e6): the kernels then scale by a number instead of an inf that turned small weights'
    gradients into ±inf and zeros' into NaN."""
    w = torch.tensor([0.0, 1e-5, -1e-4, 5e-4, -2e-3, 0.1, -3.0], dtype=torch.float16)
    exact = pen.grad(w.double())
    torch.testing.assert_close(pen.grad(w).double(), exact, rtol=4e-3, atol=0)
    g = torch.zeros_like(w)
    pen.add_grad_([g], [w], 1.0)
    torch.testing.assert_close(g.double(), exact, rtol=4e-3, atol=0)


def test_subgradients_at_zero_are_documented_values():
    z = torch.zeros(3)
    assert torch.equal(L1().grad(z), z)
    assert torch.equal(ElasticNet(0.5).grad(z), z)
    assert torch.equal(LHalf().grad(z), z)
    assert torch.equal(GroupLasso().grad(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_lp_gradient_is_bounded_by_the_smoothing_band():
    pen = Lp(p=0.5, eps=1e-3)
    w = torch.logspace(-30, 1, 500)
    bound = 0.5 * 1e-3 ** -0.5
    assert pen.grad(w).abs().max() <= bound * (1 + 1e-12)


def test_conventions():
    w = torch.tensor([3.0, -4.0])
    assert L2().value(w) == 12.5  # ½‖w‖², so strength ≡ torch weight_decay
    assert L1().value(w) == 7.0
    assert ElasticNet(0.25).value(w) == pytest.approx(0.25 * 7 + 0.75 * 12.5)
    assert LHalf().value(torch.tensor([4.0, 9.0])) == 5.0
    gl = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert GroupLasso().value(gl) == pytest.approx(math.sqrt(2) * 5)
    assert torch.equal(GroupLasso().prox(gl, 1.0)[1], torch.zeros(2))


def test_user_penalty_with_value_only_gets_autograd_gradient():
    class LogCosh(Penalty):
        def value(self, w):
            return torch.log(torch.cosh(w)).sum()

    w = away_from_kinks()
    assert torch.allclose(LogCosh().grad(w), torch.tanh(w))
    with pytest.raises(NotImplementedError, match="mode='proximal'"):
        LogCosh().prox(w, 0.1)


def test_bad_hyperparameters_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"p=1.5.*use L1"):
        Lp(p=1.5)
    with pytest.raises(ValueError, match=r"l1_ratio=2"):
        ElasticNet(l1_ratio=2)
    with pytest.raises(ValueError, match=r"Unknown penalty 'l3'.*'l2'"):
        resolve_penalty("l3")
    assert resolve_penalty("LHalf") == LHalf()


def test_group_lasso_by_input_features():
    """dim=1: a group per column of a Linear weight (an input channel of a conv), the
    feature-selection case; its prox removes whole inputs."""
    w = away_from_kinks((4, 6))
    w[:, 2] *= 1e-3
    cols = GroupLasso(dim=1)
    assert cols.value(w) == pytest.approx(float(math.sqrt(4) * w.norm(dim=0).sum()))
    x = cols.prox(w, 0.5)
    assert (x[:, 2] == 0).all() and (x[:, [0, 1, 3, 4, 5]] != 0).all()
    assert torch.allclose(cols.prox(w, 0.5), GroupLasso().prox(w.t(), 0.5).t())
    assert repr(GroupLasso()) == "GroupLasso()" and repr(cols) == "GroupLasso(dim=1)"
    with pytest.raises(ValueError, match=r"GroupLasso\(dim=2\): use 0 .* or 1"):
        GroupLasso(dim=2)


def test_orthogonal_closed_form_gradient():
    w = rand((4, 6))
    assert torch.allclose(Orthogonal("rows").grad(w), 4 * (w @ w.T - torch.eye(4, dtype=w.dtype)) @ w)
    assert torch.allclose(Orthogonal("columns").grad(w), 4 * w @ (w.T @ w - torch.eye(6, dtype=w.dtype)))


def test_orthogonal_is_zero_exactly_on_orthogonal_matrices():
    q, _ = torch.linalg.qr(rand((7, 7)))
    rows = q[:4]  # 4 orthonormal rows in R^7
    cols = q[:, :3]  # 3 orthonormal columns in R^7
    conv = q[:4].reshape(4, 7, 1, 1)
    assert Orthogonal("rows").value(rows) == pytest.approx(0, abs=1e-24)
    assert Orthogonal("columns").value(cols) == pytest.approx(0, abs=1e-24)
    assert Orthogonal("rows").value(conv) == pytest.approx(0, abs=1e-24)
    assert Orthogonal("rows").grad(rows).abs().max() < 1e-13
    # normalized: only angles count, so orthogonal rows of any lengths give 0
    assert Orthogonal("rows", normalized=True).value(rows * torch.tensor([[1.0], [3.0], [0.2], [5.0]], dtype=rows.dtype)) < 1e-15
    assert Orthogonal("rows").value(2 * rows) == pytest.approx(4 * 3.0**2)  # ‖4I − I‖² = 4·9
    assert Orthogonal("columns").value(rows) > 1  # 7 columns in R^4 cannot be orthonormal


def test_normalized_orthogonal_equals_keras_orthogonal_regularizer():
    """Keras 3 OrthogonalRegularizer(factor, mode) on a kernel K = Wᵀ (in, out), re-implemented."""

    def keras(kernel, factor, mode):
        def normalize(x, axis):
            return x / x.pow(2).sum(axis, keepdim=True).clamp_min(1e-12).sqrt()
        if mode == "rows":
            x = normalize(kernel, 1)
            product, size = x @ x.T, kernel.shape[0]
        else:
            x = normalize(kernel, 0)
            product, size = x.T @ x, kernel.shape[1]
        off = product * (1.0 - torch.eye(size, dtype=kernel.dtype))
        return factor * 0.5 * off.abs().sum() / (size * (size - 1.0) / 2.0)

    w = rand((5, 8))  # torch Linear weight (out=5, in=8)
    assert Orthogonal("columns", normalized=True).value(w) * 0.01 == pytest.approx(keras(w.T, 0.01, "rows").item())
    assert Orthogonal("rows", normalized=True).value(w) * 0.01 == pytest.approx(keras(w.T, 0.01, "columns").item())


def test_nuclear_value_and_prox_lower_the_rank():
    w = rand((5, 4))
    s = torch.linalg.svdvals(w)
    assert Nuclear().value(w) == pytest.approx(s.sum().item())
    t = float(s[1] + s[2]) / 2  # between the 2nd and 3rd singular values
    p = Nuclear().prox(w, t)
    assert torch.linalg.matrix_rank(p) == 2
    assert torch.allclose(torch.linalg.svdvals(p)[:2], s[:2] - t)
    # prox optimality: ½‖x − w‖² + t·R(x) is smallest at x = p
    obj = lambda x: 0.5 * (x - w).pow(2).sum() + t * Nuclear().value(x)  # noqa: E731
    for seed in range(20):
        assert obj(p) <= obj(p + 1e-3 * rand((5, 4), seed=seed)) + 1e-12
    assert torch.allclose(Nuclear().prox(w, 0.0), w)


def test_spectral_norm_matches_the_svd():
    w = rand((6, 4))
    u, s, vh = torch.linalg.svd(w)
    assert SpectralNorm(n_iter=100).value(w) == pytest.approx(s[0].item(), rel=1e-10)
    g = SpectralNorm(n_iter=100).grad(w)
    assert torch.allclose(g, torch.outer(u[:, 0], vh[0]) * torch.sign(g[0, 0] / (u[0, 0] * vh[0, 0])), atol=1e-8)
    with pytest.raises(ValueError, match="n_iter"):
        SpectralNorm(n_iter=0)


@pytest.mark.parametrize("pen", [Orthogonal(), Nuclear(), SpectralNorm()], ids=lambda p: type(p).__name__)
def test_matrix_penalty_on_a_bias_fails_at_fit_start_naming_the_fix(pen):
    model = TinyNet()
    with pytest.raises(ValueError, match=r"ndim<2"):
        fit(model, batches(2), [Regularization(pen, strength=1e-3)])


def test_bad_orthogonal_dims_and_short_names():
    with pytest.raises(ValueError, match="'rows'"):
        Orthogonal(dims="row")
    assert resolve_penalty("orthogonal") == Orthogonal() and resolve_penalty("nuclear") == Nuclear()


class LogCosh(Penalty):
    """A user-defined penalty: value only; the gradient comes from autograd."""

    name = "logcosh"

    def value(self, w):
        return torch.log(torch.cosh(w)).sum()


@pytest.mark.parametrize("pen", [LogCosh(), Orthogonal()], ids=lambda p: type(p).__name__)
def test_penalty_in_a_term_equals_the_penalty_in_the_loss(pen):
    data = batches(12)
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    ref = copy.deepcopy(model)
    fit(model, data, [Regularization(pen, strength=1e-2, exclude=["ndim<2"])])
    weights = [p for p in ref.parameters() if p.ndim >= 2]
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data,
                   extra_loss=lambda m: 1e-2 * sum(pen.value(w) for w in weights))
    assert max_param_diff(model, ref) <= 1e-10


def test_orthogonal_penalty_makes_rows_orthonormal():
    """Decoupled Orthogonal alone (zero data gradient) drives WWᵀ towards I."""
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    model.data_loss = lambda batch, m=model: 0.0 * m(batch[0]).sum()
    before = Orthogonal().value(model.head.weight.detach()).item()
    fit(model, batches(40), [Regularization(Orthogonal(), strength=1.0, mode="decoupled", include=["head.weight"])])
    after = Orthogonal().value(model.head.weight.detach()).item()
    assert before > 0.5 and after < 1e-8


# ---- the kernels: memory and dispatch --------------------------------------------------------


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


class TestKernelMemoryAndDispatch:
    """In float32, as the budgets below count bytes of float32 tensors."""

    @pytest.fixture(autouse=True)
    def _float32(self):
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        yield
        torch.set_default_dtype(old)

    def test_lp_grad_matches_the_two_piece_definition(self):
        w = torch.linspace(-0.01, 0.01, 2001, dtype=torch.float64)
        for p, eps in ((0.5, 1e-3), (0.3, 1e-2)):
            a = w.abs()
            two_piece = torch.where(a < eps, p * eps ** (p - 2) * w, p * torch.sign(w) * a.clamp(min=eps) ** (p - 1))
            torch.testing.assert_close(F.lp_grad(w, p, eps), two_piece, rtol=1e-12, atol=0)

    def test_runs_hold_at_most_the_largest_tensor_on_cpu(self):
        ws = tensors()
        runs = _runs(ws)
        largest = max(w.numel() for w in ws)
        assert sorted(i for r in runs for i in r) == list(range(len(ws)))  # a partition
        assert all(list(r) == sorted(r) for r in runs)  # the original order inside a run
        assert all(sum(ws[i].numel() for i in r) <= largest for r in runs)
        assert len(runs) < len(ws)  # small tensors share a run
        assert _runs([]) == ()

    def test_small_tensors_between_large_ones_share_a_run(self):
        """Biases and norms sit between large weights in a model; they still go in one run
        (each tensor of each _foreach op costs a dispatch, on CPU too)."""
        ws = []
        for _ in range(10):
            ws += [torch.randn(64, 64), torch.randn(64), torch.randn(3)]
        runs = _runs(ws)
        assert len(runs) == 11  # ten large tensors alone, the twenty small ones together
        assert sorted(len(r) for r in runs) == [1] * 10 + [20]

    def test_l1_kernel_temporaries_stay_within_the_largest_tensor(self):
        """CPU profiler: the peak of live temporaries during add_grad_ is one largest tensor."""
        ws = [torch.randn(256, 256) for _ in range(6)] + [torch.randn(64) for _ in range(20)]
        gs = [torch.zeros_like(w) for w in ws]
        assert 0 < peak_temporaries(lambda: L1().add_grad_(gs, ws, 1e-3)) <= LARGEST

    def test_soft_threshold_run_form_equals_softshrink_bits(self):
        """The accelerator path (_foreach clamps over runs) and the CPU path (softshrink per
        tensor) give the same bits, so the choice by device changes no result."""
        from regfit.penalties import _soft_threshold_runs_

        ws = [w.float() for w in tensors()] + [torch.randn(64) for _ in range(5)]
        expected = [torch.nn.functional.softshrink(w, 0.4) for w in ws]
        _soft_threshold_runs_(ws, 0.4)
        for got, exp in zip(ws, expected):
            assert torch.equal(got, exp)

    def test_l1_prox_on_cpu_allocates_nothing(self):
        ws = [torch.randn(256, 256) for _ in range(3)] + [torch.randn(64) for _ in range(20)]
        assert peak_temporaries(lambda: L1().prox_(ws, 1e-3)) <= SCALARS  # no tensor-sized temporary

    @pytest.mark.parametrize("penalty,method", [(L1(), "add_grad_"), (L1(), "decay_"), (LHalf(), "add_grad_"),
                                                (LHalf(), "decay_"), (LHalf(), "prox_"), (ElasticNet(0.5), "decay_")],
                             ids=["L1-coupled", "L1-decoupled", "LHalf-coupled", "LHalf-decoupled", "LHalf-proximal",
                                  "ElasticNet-decoupled"])
    def test_kernel_peak_memory_is_at_most_the_largest_tensor(self, penalty, method):
        # three runs: each run's temporary must be freed before the next one is made
        ws = [torch.randn(256, 256), torch.randn(200, 256), torch.randn(128, 256)] + [torch.randn(64) for _ in range(20)]
        args = ([torch.zeros_like(w) for w in ws], ws, 1e-3) if method == "add_grad_" else (ws, 1e-3)
        assert 0 < peak_temporaries(lambda: getattr(penalty, method)(*args)) <= LARGEST

    @pytest.mark.parametrize("method", ["add_grad_", "decay_"])
    def test_lhalf_kernel_is_five_batched_passes_per_run(self, method):
        """abs, clamp, rsqrt, cube, and one addcmul that folds p·w·scale into the gradient (or
        weight): one op per pass, whatever the number of tensors in the run."""
        ws = [torch.randn(256, 256)] + [torch.randn(64) for _ in range(20)]  # two runs
        gs = [torch.zeros_like(w) for w in ws]
        args = (gs, ws, 1e-3) if method == "add_grad_" else (ws, 1e-3)
        calls = aten_calls(lambda: getattr(LHalf(), method)(*args))
        per_run = ["_foreach_abs", "_foreach_clamp_min_", "_foreach_rsqrt_", "_foreach_pow_", "_foreach_addcmul_"]
        assert calls == per_run * len(_runs(ws)) == per_run * 2

    def test_lhalf_prox_is_batched_per_run(self):
        """Half-thresholding is the same dozen _foreach passes per run however many tensors
        the run holds, plus one in-place hardshrink per tensor (it used to be ~17 ops per
        tensor: a GPU launch each)."""
        ws = [torch.randn(256, 256)] + [torch.randn(64) for _ in range(20)]  # two runs
        calls = aten_calls(lambda: LHalf().prox_(ws, 1e-3))
        assert sum(c.startswith("_foreach_") for c in calls) == 12 * len(_runs(ws)) == 24
        assert calls.count("hardshrink") == len(ws)
        assert len(calls) == 24 + len(ws)


# ---- GroupLasso(units=True): one group over several tensors ------------------------------------


def _bundle():
    torch.manual_seed(0)
    return [torch.randn(5, 3, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64),
            torch.randn(5, dtype=torch.float64)]


def _concat(ws):
    return torch.cat([w.reshape(w.shape[0], -1) for w in ws], 1)


def test_unit_group_lasso_is_group_lasso_on_the_concatenated_rows():
    ws, pen = _bundle(), GroupLasso(units=True)
    assert pen.total(ws, [2.0] * 3) == pytest.approx(2.0 * float(GroupLasso().value(_concat(ws))), rel=1e-12)
    shrunk = [w.clone() for w in ws]
    pen.prox_(shrunk, 0.3)
    torch.testing.assert_close(_concat(shrunk), GroupLasso().prox(_concat(ws), 0.3), rtol=1e-12, atol=0)
    gs = [torch.zeros_like(w) for w in ws]
    pen.add_grad_(gs, ws, 0.5)
    torch.testing.assert_close(_concat(gs), 0.5 * GroupLasso().grad(_concat(ws)), rtol=1e-12, atol=0)
    decayed = [w.clone() for w in ws]
    pen.decay_(decayed, 0.5)
    torch.testing.assert_close(_concat(decayed), _concat(ws) - 0.5 * GroupLasso().grad(_concat(ws)))


def test_unit_prox_zeroes_a_whole_unit_in_every_tensor_at_once():
    ws = _bundle()
    for w in ws:
        w[1] *= 1e-3  # a small unit: its norm is under t·√|g|
    GroupLasso(units=True).prox_(ws, 0.1)
    assert all(torch.equal(w[1], torch.zeros_like(w[1])) for w in ws)
    assert all(bool(w[0].ne(0).all()) for w in ws)


def test_unit_group_lasso_of_one_tensor_is_group_lasso():
    w = torch.randn(4, 6)
    pen = GroupLasso(units=True)
    assert torch.equal(pen.prox(w, 0.2), GroupLasso().prox(w, 0.2)) and pen.value(w) == GroupLasso().value(w)
    assert repr(pen) == "GroupLasso(units=True)" and repr(GroupLasso()) == "GroupLasso()"
    assert pen.shard_dims == () and GroupLasso().shard_dims == (0,) and pen != GroupLasso()


def test_unit_group_lasso_refuses_columns_and_non_booleans():
    with pytest.raises(ValueError, match=r"GroupLasso\(dim=1, units=True\).*GroupLasso\(dim=1\) for input features"):
        GroupLasso(dim=1, units=True)
    with pytest.raises(ValueError, match="units='yes'"):
        GroupLasso(units="yes")
