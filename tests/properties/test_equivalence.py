"""Where regfit's modes equal torch's own optimizers, and the penalty-in-the-loss objective.

All in float64 over ≥ 50 steps; the tolerance is 1e-6 and most cases are bit-identical.
"""

from __future__ import annotations

import copy

import pytest
import torch

from regfit import Regularization
from regfit.modes import Decoupled
from regfit.penalties import L1, L2, ElasticNet, GroupLasso, LHalf, Lp
from tests.helpers import TinyNet, batches, fit, max_param_diff, reference_loop

STEPS = 60
LAM = 1e-2


def test_coupled_l2_with_sgd_momentum_equals_sgd_weight_decay():
    data = batches(STEPS)
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True))
    ref = copy.deepcopy(model)
    fit(model, data, [Regularization(L2(), strength=LAM)])
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=LAM), data)
    assert max_param_diff(model, ref) == 0.0  # bit-identical


def test_decoupled_l2_with_adam_equals_adamw():
    data = batches(STEPS)
    model = TinyNet(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    ref = copy.deepcopy(model)
    fit(model, data, [Regularization(L2(), strength=LAM, mode="decoupled")])
    reference_loop(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=LAM), data)
    assert max_param_diff(model, ref) == 0.0  # bit-identical


def test_coupled_l2_with_adam_is_not_adamw():
    """The point of AdamW: with Adam, coupled L2 (= Adam(weight_decay)) and decoupled differ."""
    data = batches(STEPS)
    coupled = TinyNet(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    decoupled = copy.deepcopy(coupled)
    ref = copy.deepcopy(coupled)
    fit(coupled, data, [Regularization(L2(), strength=0.1)])
    fit(decoupled, data, [Regularization(L2(), strength=0.1, mode="decoupled")])
    reference_loop(ref, torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=0.1), data)
    assert max_param_diff(coupled, ref) < 1e-12  # coupled ≡ Adam(weight_decay=λ)
    assert max_param_diff(coupled, decoupled) > 1e-3


@pytest.mark.parametrize(
    "penalty",
    # Lp with eps=1e-2: inside the smoothing band the penalty's curvature is p·eps^(p−2);
    # with lr·λ·curvature > 2 (eps=1e-3 here gives ≈ 8) gradient descent oscillates
    # unstably across 0 and amplifies 1e-17 rounding differences (fused vs unfused
    # multiply-add) into O(1) ones — chaos, not a different update.
    [L2(), L1(), ElasticNet(0.4), LHalf(eps=1e-2), Lp(p=0.3, eps=1e-2), GroupLasso()],
    ids=lambda p: type(p).__name__,
)
def test_coupled_injection_equals_penalty_in_the_loss(penalty):
    """Closed-form gradient injection ≡ loss + λ·Σ R(w) through autograd, every penalty."""
    data = batches(STEPS)
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    ref = copy.deepcopy(model)
    fit(model, data, [Regularization(penalty, strength=LAM, exclude=["bias"])])
    weights = [p for n, p in ref.named_parameters() if not n.endswith("bias")]
    extra = lambda m: LAM * sum(penalty.value(w) for w in weights)  # noqa: E731
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data, extra_loss=extra)
    assert max_param_diff(model, ref) <= 1e-6


def test_scaled_terms_equal_their_scaled_loss():
    data = batches(STEPS)
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    ref = copy.deepcopy(model)
    fit(model, data, [Regularization(L2(), strength=LAM, scale="numel"), Regularization(L1(), strength=LAM, scale="fan", include=["head.*"])])
    from regfit.scaling import fan_scale

    def extra(m):
        l2 = sum(0.5 * p.pow(2).sum() / p.numel() for p in m.parameters())
        l1 = sum(fan_scale(n, p) * p.abs().sum() for n, p in m.named_parameters() if n.startswith("head."))
        return LAM * (l2 + l1)

    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05), data, extra_loss=extra)
    assert max_param_diff(model, ref) <= 1e-6


def test_gradient_accumulation_applies_decay_once_per_optimizer_step():
    """accumulate_grad_batches=2 over 2N micro-batches ≡ N full batches with AdamW."""
    micro = batches(2 * STEPS, batch_size=8)
    model = TinyNet(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    ref = copy.deepcopy(model)
    model_c = copy.deepcopy(model)
    ref_c = copy.deepcopy(model)
    fit(model, micro, [Regularization(L2(), strength=LAM, mode="decoupled")], accumulate_grad_batches=2)
    fit(model_c, micro, [Regularization(L2(), strength=LAM)], accumulate_grad_batches=2)
    # Lightning divides each micro-batch loss by 2; the same, by hand:
    for r, opt in ((ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=LAM)),
                   (ref_c, torch.optim.Adam(ref_c.parameters(), lr=1e-2, weight_decay=LAM))):
        for i in range(0, len(micro), 2):
            opt.zero_grad()
            for x, y in micro[i : i + 2]:
                (torch.nn.functional.cross_entropy(r(x), y) / 2).backward()
            opt.step()
    assert max_param_diff(model, ref) <= 1e-12
    assert max_param_diff(model_c, ref_c) <= 1e-12


def test_coupled_gradient_is_added_after_clipping_like_torch_weight_decay():
    data = batches(STEPS)
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9))
    ref = copy.deepcopy(model)
    fit(model, data, [Regularization(L2(), strength=0.05)], gradient_clip_val=0.1)
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05), data, clip=0.1)
    assert max_param_diff(model, ref) <= 1e-12


def test_decoupled_step_variants():
    """independent: η = lr/lr0 (a constant-lr run decays by 1 − λ per step); corrected: lr²/lr_max."""
    data = batches(10)
    lr = 1e-2
    # zero gradients isolate the decay: SGD with lr ~ 0 changes nothing else
    for step, expected_per_step in (("lr", 1 - lr * 0.1), ("independent", 1 - 0.1), ("corrected", 1 - lr * 0.1)):
        model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=lr))
        before = model.head.weight.detach().clone()
        model.data_loss = lambda batch, m=model: 0.0 * m(batch[0]).sum()
        fit(model, data, [Regularization(L2(), strength=0.1, mode=Decoupled(step=step))])
        assert torch.allclose(model.head.weight, before * expected_per_step**10, rtol=1e-12), step


def test_proximal_l1_with_sgd_equals_hand_written_proximal_gradient():
    data = batches(STEPS)
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    ref = copy.deepcopy(model)
    fit(model, data, [Regularization(L1(), strength=0.05, mode="proximal")])
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.sign(p) * torch.clamp(p.abs() - 0.1 * 0.05, min=0))
    assert max_param_diff(model, ref) <= 1e-12


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_clipping_with_accumulation_order(mode):
    """accumulate 2 micro-batches → clip the summed data gradient → add the coupled
    gradient (or decay, for decoupled) → step: torch's weight_decay order, once per step."""
    micro = batches(2 * 30, batch_size=8)
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9))
    ref = copy.deepcopy(model)
    fit(model, micro, [Regularization(L2(), strength=0.05, mode=mode)], accumulate_grad_batches=2, gradient_clip_val=0.1)
    opt = (torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05) if mode == "coupled"
           else torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9))
    for i in range(0, len(micro), 2):
        opt.zero_grad()
        for x, y in micro[i : i + 2]:
            (torch.nn.functional.cross_entropy(ref(x), y) / 2).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        if mode == "decoupled":  # w ← w − lr·λ·w before the update
            with torch.no_grad():
                torch._foreach_mul_(list(ref.parameters()), 1 - 0.5 * 0.05)
        opt.step()
    assert max_param_diff(model, ref) <= 1e-12
