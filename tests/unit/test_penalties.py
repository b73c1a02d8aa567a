"""One harness over every built-in penalty: gradients, proxes, and behaviour at 0 and ±∞."""

from __future__ import annotations

import math

import pytest
import torch

from regfit.functional import half_threshold, lp_prox, soft_threshold
from regfit.penalties import L1, L2, ElasticNet, GroupLasso, LHalf, Lp, Penalty, resolve_penalty
from tests.helpers import finite_differences

PENALTIES = {
    "l2": L2(),
    "l1": L1(),
    "elasticnet": ElasticNet(l1_ratio=0.3),
    "lhalf": LHalf(),
    "lp0.3": Lp(p=0.3),
    "lp0.7": Lp(p=0.7),
    "grouplasso": GroupLasso(),
}
ELEMENTWISE = {k: v for k, v in PENALTIES.items() if k != "grouplasso"}
ids = list(PENALTIES)


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


@pytest.mark.parametrize("name", ids)
def test_grad_matches_finite_differences(name):
    pen = PENALTIES[name]
    w = away_from_kinks()
    g = pen.grad(w)
    fd = finite_differences(pen, w)
    assert torch.allclose(g, fd, atol=1e-6, rtol=1e-6), (g - fd).abs().max()


@pytest.mark.parametrize("name", ids)
def test_autograd_of_value_equals_grad(name):
    """So 'penalty in the loss' and 'gradient injection' are the same update, also near 0."""
    pen = PENALTIES[name]
    w = torch.cat([away_from_kinks((4, 4)), torch.tensor([[0.0, 1e-5, -1e-4, 0.0]])]).requires_grad_(True)
    (auto,) = torch.autograd.grad(pen.value(w), w)
    assert torch.isfinite(auto).all()
    assert torch.allclose(auto, pen.grad(w.detach()), atol=1e-12)


@pytest.mark.parametrize("name", ids)
def test_prox_with_zero_step_is_identity(name):
    w = torch.cat([away_from_kinks((3, 4)), torch.zeros(1, 4)])
    assert torch.equal(PENALTIES[name].prox(w, 0.0), w)


def objective(pen: Penalty, x: torch.Tensor, w: torch.Tensor, t: float) -> torch.Tensor:
    return 0.5 * (x - w).pow(2).sum() + t * pen.value(x)


@pytest.mark.parametrize("t", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_prox_is_the_grid_minimizer(name, t):
    """prox(w, t) attains the minimum of ½(x−w)² + t·R(x) found on a dense 1-D grid."""
    pen = PENALTIES[name]
    grid = torch.linspace(-6, 6, 240_001)
    for w in torch.linspace(-4, 4, 41).tolist():
        x = pen.prox(torch.tensor([w]), t)
        vals = 0.5 * (grid - w) ** 2 + t * _elementwise_value(pen, grid)
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


@pytest.mark.parametrize("name", ids)
def test_prox_beats_random_perturbations(name):
    """prox is a minimizer in every direction, also for the non-separable group lasso."""
    pen = PENALTIES[name]
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


@pytest.mark.parametrize("name", ids)
@pytest.mark.parametrize("value", [0.0, 1e-30, -1e-30, 1e6, -1e6])
def test_finite_at_zero_tiny_and_huge(name, value):
    pen = PENALTIES[name]
    w = torch.full((3, 2), value)
    assert torch.isfinite(pen.value(w))
    assert torch.isfinite(pen.grad(w)).all()
    for t in (0.0, 1e-3, 1.0, 10.0):
        assert torch.isfinite(pen.prox(w, t)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ids)
def test_finite_in_low_precision(name, dtype):
    pen = PENALTIES[name]
    w = torch.tensor([[0.0, 1e-30, 1e-4, -5e-4, -3.0, 1e4]], dtype=dtype)
    assert torch.isfinite(pen.grad(w)).all()
    for ws in ([w.clone()], [torch.zeros_like(w), w.clone()]):  # the batched kernels too
        pen.add_grad_(ws[-1:], ws[:1], 0.1) if len(ws) == 2 else pen.decay_(ws, 0.1)
        assert all(torch.isfinite(x).all() for x in ws)
    for t in (1e-7, 0.5):
        assert torch.isfinite(pen.prox(w, t)).all()
    assert pen.total([w], [1.0]).dtype in (torch.float32, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_threshold_in_low_precision_matches_float64(dtype):
    """The prox of L1/2 in the weights' own dtype agrees with the float64 closed form of the
    same (rounded) weights, small weights at a small t included: (|w|/3)^(-3/2) alone
    overflows float16 below |w| ≈ 2e-3, which shrank such weights 3× instead of barely."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4000, generator=g) * torch.logspace(-4, 0, 4000)).to(dtype)
    for t in (1e-9, 1e-7, 1e-4, 1e-2):
        exact = half_threshold(w.double(), t)
        got = LHalf().prox(w, t)
        assert got.dtype == dtype and torch.isfinite(got).all()
        # the threshold itself is rounded to the dtype: leave out the weights next to it
        away = (w.double().abs() - 1.5 * t ** (2 / 3)).abs() > 0.01 * 1.5 * t ** (2 / 3)
        info = torch.finfo(dtype)
        torch.testing.assert_close(got.double()[away], exact[away], rtol=4 * info.eps,
                                   atol=2 * info.eps * info.smallest_normal)  # subnormal steps
        ws = [w.clone()]
        LHalf().prox_(ws, t)
        assert torch.equal(ws[0], got)


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


def test_half_threshold_closed_form_matches_newton_and_threshold():
    w = torch.linspace(-5, 5, 1001)
    for t in (0.1, 1.0, 2.5):
        assert torch.allclose(half_threshold(w, t), lp_prox(w, t, 0.5), atol=1e-9)
        thr = 1.5 * t ** (2 / 3)
        assert (half_threshold(w, t)[w.abs() <= thr] == 0).all()
        assert (half_threshold(w, t)[w.abs() > thr + 1e-9] != 0).all()


def test_soft_threshold_fast_form_equals_textbook_bits():
    w = torch.randn(10_000, dtype=torch.float32)
    textbook = torch.sign(w) * torch.clamp(w.abs() - 0.3, min=0)
    assert torch.equal(soft_threshold(w, 0.3), textbook)


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
