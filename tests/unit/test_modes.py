"""Cautious weight decay: decay only where the optimizer's update and the weight agree in sign."""

from __future__ import annotations

import copy

import pytest
import torch

from regfit import Regularization
from regfit.modes import Bucket, CautiousDecoupled, resolve_mode
from regfit.penalties import L1, L2
from tests.helpers import TinyNet, batches, fit, max_param_diff


def one_step(penalty, lam, lr, w0, grad):
    """prepare → SGD step (u = grad) → apply, on one tensor, as the callback runs them."""
    w = torch.nn.Parameter(w0.clone())
    w.grad = grad.clone()
    opt = torch.optim.SGD([w], lr=lr)
    bucket = Bucket([w], 1.0, opt.param_groups[0], initial_lr=lr, max_lr=lr)
    mode = CautiousDecoupled()
    with torch.no_grad():
        mode.prepare(penalty, bucket)
        opt.step()
        mode.apply(penalty, bucket, lam)
    return w.detach()


def test_cautious_decay_touches_only_sign_agreeing_entries():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(40, 30, generator=g, dtype=torch.float64)
    grad = torch.randn(40, 30, generator=g, dtype=torch.float64)
    lr, lam = 0.1, 0.3
    w = one_step(L2(), lam, lr, w0, grad)
    plain = w0.clone().add_(grad, alpha=-lr)  # torch SGD's own update, no decay
    agree = grad * w0 >= 0
    assert 0.3 < agree.double().mean() < 0.7
    assert torch.equal(w[~agree], plain[~agree])  # untouched: bit for bit the plain step
    assert torch.allclose(w[agree], plain[agree] - lr * lam * w0[agree], rtol=1e-14, atol=0)


def test_cautious_l1_uses_the_same_mask():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(50, generator=g, dtype=torch.float64)
    grad = torch.randn(50, generator=g, dtype=torch.float64)
    w = one_step(L1(), 0.2, 0.1, w0, grad)
    agree = grad * w0 >= 0
    plain = w0.clone().add_(grad, alpha=-0.1)
    assert torch.equal(w[~agree], plain[~agree])
    assert torch.allclose(w[agree], plain[agree] - 0.1 * 0.2 * torch.sign(w0[agree]), rtol=1e-14, atol=0)


def test_cautious_is_a_mode_name():
    assert resolve_mode("cautious") == CautiousDecoupled()
    assert CautiousDecoupled(step="independent").step_size(Bucket([], 1.0, {"lr": 0.01}, initial_lr=0.1)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'lr', 'independent' or 'corrected'"):
        CautiousDecoupled(step="constant")


def test_cautious_adam_equals_the_papers_update():
    """Lightning + Adam + cautious L2 ≡ x ← x − η(û + λ·𝕀(û⊙x ≥ 0)⊙x), û Adam's direction, by hand."""
    lr, lam, betas, eps = 1e-2, 0.5, (0.9, 0.999), 1e-8
    data = batches(15)
    model = TinyNet(optimizer=lambda p: torch.optim.Adam(p, lr=lr, betas=betas, eps=eps))
    ref = copy.deepcopy(model)
    adamw = copy.deepcopy(model)
    fit(model, data, [Regularization(L2(), strength=lam, mode="cautious")])
    fit(adamw, data, [Regularization(L2(), strength=lam, mode="decoupled")])

    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    decayed = total = 0
    for t, (x, y) in enumerate(data, start=1):
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for p, mi, vi in zip(params, m, v):
                mi.mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
                vi.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
                u = (mi / (1 - betas[0] ** t)) / ((vi / (1 - betas[1] ** t)).sqrt() + eps)
                mask = (u * p >= 0).to(p.dtype)
                decayed, total = decayed + int(mask.sum()), total + p.numel()
                p.sub_(lr * (u + lam * mask * p))
    assert max_param_diff(model, ref) <= 1e-10
    assert 0.2 < decayed / total < 0.8  # the mask really selects
    assert max_param_diff(model, adamw) > 1e-3  # and differs from plain decoupled decay


def test_cautious_decays_once_per_optimizer_step_under_accumulation():
    """accumulate_grad_batches=2 over 2N micro-batches: one decay per real step, with the
    weights as they were before that step."""
    micro = batches(20, batch_size=8)
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    model.data_loss = lambda batch, m=model: 0.0 * m(batch[0]).sum()  # u = 0 → 𝕀(0 ≥ 0): decay all
    before = model.head.weight.detach().clone()
    fit(model, micro, [Regularization(L2(), strength=0.2, mode="cautious")], accumulate_grad_batches=2)
    assert torch.allclose(model.head.weight, before * (1 - 0.1 * 0.2) ** 10, rtol=1e-12, atol=0)


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
