"""Train, then thin: a proximal ``GroupLasso(units=True)`` term zeroes whole units (a filter
with its bias and BatchNorm channel, the residual partners together), and
``regfit.export.thin`` removes exactly those — the outputs on real digits unchanged within
1e-5 in float32, the parameter count that of the smaller architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regfit import Regularization, attach
from regfit.export import thinning
from regfit.penalties import GroupLasso
from tests.helpers import ResidualCNN, mnist_digits


def zero_units(*tensors):
    """Units whose slices are zero in every tensor."""
    return torch.stack([t.detach().reshape(t.shape[0], -1).eq(0).all(1) for t in tensors]).all(0)


def residual_cnn_params(res: int, inner: int, hidden: int) -> int:
    """Parameters of ResidualCNN with these widths, from its architecture alone."""
    stem = res * 9 + res + 2 * res
    block = inner * res * 9 + inner + 2 * inner + res * inner * 9 + 2 * res
    return stem + block + hidden * res * 49 + hidden + 10 * hidden + 10


@pytest.fixture(scope="module")
def trained(mnist_source):
    torch.manual_seed(0)
    x, y = mnist_digits(mnist_source, 2000)
    model = ResidualCNN(width=8, inner=6, hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # The fc rows are large groups (√|g| ≈ 20): a tenth of λ there keeps some of them.
    hooks = attach(model, opt, Regularization(GroupLasso(units=True), strength=0.1, mode="proximal",
                                              exclude=["last_layer"],
                                              overrides=[{"include": ["fc.*"], "strength_mult": 0.1}]))
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    hooks.remove()
    return model.eval(), x


def test_training_zeroes_whole_units_and_thinning_removes_exactly_them(trained):
    model, x = trained
    res = zero_units(model.stem[0].weight, model.stem[0].bias, model.stem[1].weight, model.stem[1].bias,
                     model.conv2.weight, model.bn2.weight, model.bn2.bias)
    inner = zero_units(model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias)
    hidden = zero_units(model.fc.weight, model.fc.bias)
    assert 0 < int(res.sum()) < 8 and 0 < int(inner.sum()) < 6 and 0 < int(hidden.sum()) < 16
    # the prox zeroes a unit in all its tensors or in none of them
    assert torch.equal(zero_units(model.conv1.weight), inner) and torch.equal(zero_units(model.bn2.bias), res)

    result = thinning(model, x[:8])
    small = result.model
    kept = (8 - int(res.sum()), 6 - int(inner.sum()), 16 - int(hidden.sum()))
    assert (small.stem[0].out_channels, small.conv1.out_channels, small.fc.out_features) == kept
    assert result.params_before == residual_cnn_params(8, 6, 16)
    assert sum(p.numel() for p in small.parameters()) == result.params_after == residual_cnn_params(*kept)
    with torch.no_grad():
        want, got = model(x), small(x)
    assert float((want - got).abs().max()) <= 1e-5
    assert torch.equal(want.argmax(1), got.argmax(1))
