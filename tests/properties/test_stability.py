"""The L1/2 case from real users: "my loss went to 5000, then NaN".

The naive penalty ``lam * torch.sqrt(p.abs()).sum()`` has gradient ``1/(2√|w|)``: infinite
at an exact 0, and autograd computes it as ``inf × 0 = NaN`` through ``abs``'s backward.
LayerNorm biases start at exactly 0 and an L1/2 penalty drives weights to 0, so the
naive version is NaN at once. regfit's ``LHalf`` smooths the gradient inside |w| < eps
(coupled) or uses the exact half-thresholding prox (proximal): never NaN.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from regfit import Regularization
from regfit.penalties import LHalf
from tests.helpers import TinyNet, batches, fit

STEPS = 300


def all_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def naive_run(model, data, lam):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + lam * sum(torch.sqrt(p.abs()).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("lam", [1e-3, 1e-2, 1e-1, 1.0])
def test_lhalf_coupled_never_nan_while_naive_sqrt_does(lam):
    data = batches(STEPS, dtype=torch.float32)
    model = TinyNet(dtype=torch.float32, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    naive = naive_run(copy.deepcopy(model), data[:3], lam)
    assert not all_finite(naive), "the naive sqrt(|w|) penalty should be NaN (LayerNorm bias starts at 0)"

    fit(model, data, [Regularization(LHalf(), strength=lam)])
    assert all_finite(model)


@pytest.mark.parametrize("lam", [1e-3, 1e-2, 1e-1, 1.0])
def test_lhalf_proximal_makes_exact_zeros_and_stays_finite(lam):
    data = batches(STEPS, dtype=torch.float32)
    model = TinyNet(dtype=torch.float32, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    fit(model, data, [Regularization(LHalf(), strength=lam, mode="proximal", exclude=["norm"])])
    assert all_finite(model)
    zeros = sum((p == 0).sum().item() for p in (model.body[0].weight, model.body[3].weight, model.head.weight))
    assert zeros > 0
    if lam >= 1e-1:  # strong L1/2 removes most weights
        assert (model.body[0].weight == 0).float().mean() > 0.5


def test_lhalf_coupled_drives_weights_to_the_smoothing_band():
    data = batches(STEPS, dtype=torch.float32)
    model = TinyNet(dtype=torch.float32, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    before = model.body[0].weight.abs().mean().item()
    fit(model, data, [Regularization(LHalf(eps=1e-3), strength=0.1, exclude=["norm"])])
    w = model.body[0].weight
    assert all_finite(model)
    # Coupled gradients shrink weights towards 0 but (unlike the prox) do not land on it:
    # they hover near the smoothing band.
    assert w.abs().mean().item() < 0.25 * before
