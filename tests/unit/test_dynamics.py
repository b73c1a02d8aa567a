"""regfit.dynamics: angles, effective lr, and the predicted rotational equilibrium, each
formula checked against a simulation of the random-walk model it is derived from."""

from __future__ import annotations

import math

import pytest
import torch

from regfit.dynamics import (
    angle,
    angles,
    decay_fraction,
    effective_lrs,
    equilibrium_angle,
    rms,
    rotation_angles,
    squared_norms,
    step_ratio,
    unit_difference_sums,
)
from regfit.modes import CautiousDecoupled, Coupled, Decoupled, Proximal
from regfit.penalties import L1, L2


def direct_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """The textbook angle, in float64 (the reference)."""
    a, b = a.double().flatten(), b.double().flatten()
    cos = (a @ b) / (a.norm() * b.norm())
    return math.acos(max(-1.0, min(1.0, float(cos))))


# ---- angles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [1e-4, 1e-3, 0.03, 0.5, 2.0, 3.0])
def test_angle_matches_the_textbook_angle_down_to_tiny_rotations(theta):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 200, generator=g, dtype=torch.float64)
    u = torch.randn(300, 200, generator=g, dtype=torch.float64)
    u -= (u * a).sum() / (a * a).sum() * a  # ⟂ a
    b = math.cos(theta) * a / a.norm() + math.sin(theta) * u / u.norm()
    b = b * 1.3 * a.norm()  # and a different length: the angle ignores it
    assert float(angle(a, b)) == pytest.approx(theta, rel=1e-9)
    # float32 weights: still accurate for the angles of one step (arccos of the float32
    # cosine cannot tell 1e-4 rad from 0)
    assert float(angle(a.float(), b.float())) == pytest.approx(theta, rel=2e-3)


def test_a_pure_shrink_turns_nothing_and_a_reversal_is_pi():
    w = torch.randn(1000)
    assert float(angle(w, 0.99 * w)) < 1e-6  # decay alone: radial, no rotation
    assert float(angle(w, -w)) == pytest.approx(math.pi)
    assert math.isnan(float(angle(torch.zeros(5), torch.ones(5))))  # no direction to turn


def test_the_sums_add_up_over_pieces_of_a_tensor():
    """The property sharded tensors rely on: given the whole tensors' length ratio, the sums
    of two halves add up to the whole's, and so give the same angle."""
    a, b = torch.randn(64, 8, dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64)
    sq_a, sq_b = squared_norms([a]), squared_norms([b])
    ratio = float((sq_a / sq_b).sqrt())
    halves = unit_difference_sums([a[:32], a[32:]], [b[:32], b[32:]], [ratio, ratio]).sum(0, keepdim=True)
    assert torch.allclose(squared_norms([a[:32], a[32:]]).sum(), sq_a[0], rtol=1e-12)
    assert float(rotation_angles(sq_a, sq_b, halves)[0]) == pytest.approx(direct_angle(a, b), rel=1e-10)
    before = [a.clone()]
    unit_difference_sums(before, [b], [ratio], inplace=True)
    assert torch.allclose(before[0], a / ratio - b, rtol=1e-12)


def test_low_precision_tensors_are_accumulated_wide():
    w = torch.randn(4096).bfloat16()
    assert squared_norms([w]).dtype == torch.float64
    assert float(squared_norms([w])[0]) == pytest.approx(float(w.double().square().sum()), rel=1e-5)
    turned = (w.float() + 0.05 * torch.randn(4096)).bfloat16()
    assert float(angle(w, turned)) == pytest.approx(direct_angle(w, turned), rel=1e-3)


def test_rms_and_effective_lr_skip_what_has_no_value():
    assert float(rms(torch.tensor([3.0, 4.0, float("nan"), float("inf")]))) == pytest.approx(math.sqrt(12.5))
    assert math.isnan(float(rms(torch.tensor([float("nan")]))))
    lrs = effective_lrs([0.1, 0.2], torch.tensor([4.0, 0.0], dtype=torch.float64))
    assert float(lrs[0]) == pytest.approx(0.025) and math.isnan(float(lrs[1]))
    assert angles([torch.ones(3), torch.ones(3)], [2 * torch.ones(3), -torch.ones(3)]).tolist() == [0.0, math.pi]


# ---- the predicted equilibrium: the table ----------------------------------------------------


def _opt(cls, **kw):
    w = torch.zeros(3, requires_grad=True)
    opt = cls([w], **kw)
    return opt, opt.param_groups[0]


def test_equilibrium_angles_of_the_table():
    lr, lam = 0.1, 0.05
    opt, group = _opt(torch.optim.SGD, lr=lr)
    assert equilibrium_angle(opt, group, Coupled(), L2(), lam, 1.0) == pytest.approx(math.sqrt(2 * lr * lam))
    assert equilibrium_angle(opt, group, Decoupled(), L2(), lam, lr) == pytest.approx(math.sqrt(2 * lr * lam))
    opt, group = _opt(torch.optim.SGD, lr=lr, momentum=0.9, dampening=0.5)
    assert equilibrium_angle(opt, group, Coupled(), L2(), lam, 1.0) == pytest.approx(math.sqrt(2 * lr * lam * 0.5 / 1.9))
    assert equilibrium_angle(opt, group, Proximal(), L2(), lam, lr) == pytest.approx(math.sqrt(2 * lr * lam * 0.1 / 1.9))
    opt, group = _opt(torch.optim.AdamW, lr=1e-3, betas=(0.8, 0.999))
    # the decoupled step size is what the mode says: 1 for step="independent" at lr = lr0
    assert equilibrium_angle(opt, group, Decoupled(step="independent"), L2(), lam, 1.0) == pytest.approx(
        math.sqrt(2 * lam * 0.2 / 1.8))
    assert step_ratio(opt, group) == pytest.approx(0.2 / 1.8)


@pytest.mark.parametrize("case", ["adam coupled", "nesterov", "l1", "cautious", "rmsprop"])
def test_no_prediction_where_none_is_derived(case):
    opt, group = _opt(torch.optim.Adam if case == "adam coupled" else torch.optim.RMSprop if case == "rmsprop"
                      else torch.optim.SGD, lr=0.1, **({"momentum": 0.9, "nesterov": True} if case == "nesterov" else {}))
    mode = CautiousDecoupled() if case == "cautious" else Coupled()
    penalty = L1() if case == "l1" else L2()
    assert equilibrium_angle(opt, group, mode, penalty, 0.01, 0.1) is None
    if case == "adam coupled":
        assert decay_fraction(opt, group, mode, 0.01, 0.1) is None  # Adam rescales the decay's gradient


# ---- the derivation, checked: a simulation of the model it assumes ----------------------------


def simulate(make_opt, mode: str, lr: float, lam: float, steps: int, n: int = 256, seed: int = 0) -> float:
    """A scale-invariant tensor under random gradients: g ⟂ w, ‖g‖ ∝ 1/‖w‖ (what a norm layer
    makes of any gradient). Returns the RMS angle per step over the second half."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
    opt = make_opt([w])
    squares = []
    for t in range(steps):
        with torch.no_grad():
            grad = torch.randn(n, generator=g, dtype=torch.float64)
            grad -= (grad @ w) / (w @ w) * w
            grad /= w.norm()
            if mode == "coupled":
                grad += lam * w
            w.grad = grad
            before = w.detach().clone()
            if mode == "decoupled":
                w.mul_(1 - lr * lam)
        opt.step()
        if t >= steps // 2:
            squares.append(float(angle(before, w)) ** 2)
    return math.sqrt(sum(squares) / len(squares))


@pytest.mark.parametrize(("name", "make_opt", "mode", "lr", "lam"), [
    ("sgd coupled", lambda p: torch.optim.SGD(p, lr=0.1), "coupled", 0.1, 0.05),
    ("sgd momentum coupled", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "coupled", 0.1, 0.05),
    ("sgd momentum, dampening", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), "coupled", 0.1, 0.05),
    ("sgd momentum decoupled", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "decoupled", 0.1, 0.05),
    ("adamw", lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.999)), "decoupled", 0.01, 0.2),
])
def test_predicted_equilibrium_matches_a_simulation_of_its_model(name, make_opt, mode, lr, lam):
    measured = simulate(make_opt, mode, lr, lam, steps=3000)
    probe = make_opt([torch.zeros(1, requires_grad=True)])
    predicted = equilibrium_angle(probe, probe.param_groups[0], Coupled() if mode == "coupled" else Decoupled(), L2(),
                                  lam, lr)
    assert measured == pytest.approx(predicted, rel=0.05), name
