"""Orthogonal, Nuclear and SpectralNorm penalties, and a user-defined penalty with value only."""

from __future__ import annotations

import copy

import pytest
import torch

from regfit import Regularization
from regfit.penalties import Nuclear, Orthogonal, Penalty, SpectralNorm, resolve_penalty
from tests.helpers import TinyNet, batches, finite_differences, fit, max_param_diff, reference_loop


def rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MATRIX = {
    "orth-rows": Orthogonal("rows"),
    "orth-columns": Orthogonal("columns"),
    "orth-normalized": Orthogonal("rows", normalized=True),
    "nuclear": Nuclear(),
    "spectral": SpectralNorm(n_iter=200),
}


@pytest.mark.parametrize("name", list(MATRIX))
@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 2, 2)], ids=str)
def test_grad_matches_finite_differences(name, shape):
    pen = MATRIX[name]
    w = rand(shape)
    assert torch.allclose(pen.grad(w), finite_differences(pen, w), atol=1e-6, rtol=1e-6)


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
