"""regfit.attach: terms in a plain PyTorch loop, equal to torch's own optimizers."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from regfit import Regularization, attach
from regfit.constrain import Constrain
from regfit.constraints import MaxNorm
from regfit.modes import Decoupled
from regfit.penalties import L1, L2
from regfit.schedules import Step
from tests.helpers import TinyNet, batches, max_param_diff, reference_loop

STEPS, LAM = 40, 1e-2


def loop(model, opt, data, clip=None, scaler=None):
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def test_coupled_l2_with_clipping_and_nesterov_equals_sgd_weight_decay():
    data = batches(STEPS)
    model = TinyNet()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    hooks = attach(model, opt, Regularization(L2(), strength=0.05))
    loop(model, opt, data, clip=0.1)
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.05), data,
                   clip=0.1)
    assert max_param_diff(model, ref) == 0.0  # added after clipping, as torch's weight_decay
    hooks.remove()


def test_decoupled_l2_with_adam_equals_adamw():
    data = batches(STEPS)
    model = TinyNet()
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with attach(model, opt, Regularization(L2(), strength=LAM, mode="decoupled")):
        loop(model, opt, data)
    reference_loop(ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=LAM), data)
    assert max_param_diff(model, ref) == 0.0


def test_proximal_l1_gives_exact_zeros_and_equals_the_hand_written_step():
    data = batches(STEPS)
    model = TinyNet()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(model, opt, Regularization(L1(), strength=0.05, mode="proximal"))
    loop(model, opt, data)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in data:
        ropt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ropt.step()
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.sign(p) * torch.clamp(p.abs() - 0.1 * 0.05, min=0))
    assert max_param_diff(model, ref) <= 1e-12
    assert (model.body[0].weight == 0).any()


def test_remove_restores_the_optimizer_and_penalty_has_no_graph():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = attach(model, opt, Regularization(L2(), strength=LAM), Regularization(L1(), strength=LAM, name="l1"))
    values = hooks.penalty()
    assert set(values) == {"l2", "l1"} and not any(v.requires_grad for v in values.values())
    expected = LAM * sum(0.5 * p.pow(2).sum() for p in model.parameters())
    assert float(values["l2"]) == pytest.approx(float(expected), rel=1e-12)
    assert opt._optimizer_step_pre_hooks and opt._optimizer_step_post_hooks
    hooks.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    ref = copy.deepcopy(model)
    data = batches(5)
    loop(model, opt, data)
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.1), data)
    assert max_param_diff(model, ref) == 0.0  # as if never attached


def test_a_step_the_grad_scaler_skips_runs_no_term():
    """A GradScaler calls optimizer.step() only when the gradients are finite: a skipped
    step gets no decay, no prox, no coupled gradient."""
    model = TinyNet(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    attach(model, opt, Regularization(L2(), strength=0.1, mode="decoupled"), Regularization(L1(), strength=0.1,
                                                                                            mode="proximal", name="l1"))
    before = copy.deepcopy(model)
    x, y = batches(1, dtype=torch.float32)[0]
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y) * float("inf")  # every gradient inf/NaN
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert max_param_diff(model, before) == 0.0
    loop(model, opt, batches(2, dtype=torch.float32), scaler=scaler)  # finite steps do act
    assert max_param_diff(model, before) > 0


def test_fused_adam_under_a_grad_scaler_equals_its_own_weight_decay():
    """A fused optimizer unscales the gradients itself (the scaler hands it grad_scale and
    found_inf): the coupled gradient is added at the gradients' scale, and a step with
    inf is skipped by the terms as by the optimizer."""
    data = batches(10, dtype=torch.float32)
    model = TinyNet(dtype=torch.float32)
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    attach(model, opt, Regularization(L2(), strength=LAM))
    ropt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True, weight_decay=LAM)
    for m, o in ((model, opt), (ref, ropt)):
        loop(m, o, data, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert max_param_diff(model, ref) <= 1e-6  # (g·s + λ·s·w)/s vs g + λ·w in float32


def test_closure_optimizers_that_search_a_line_are_refused():
    model = TinyNet()
    with pytest.raises(ValueError, match="LBFGS evaluates its closure several times"):
        attach(model, torch.optim.LBFGS(model.parameters()), Regularization(L2()))


def test_a_closure_passed_to_step_is_run_before_the_terms():
    """optimizer.step(closure): the coupled gradient is added to the closure's gradient."""
    data = batches(10)
    model = TinyNet()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attach(model, opt, Regularization(L2(), strength=LAM))
    for x, y in data:
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=LAM), data)
    assert max_param_diff(model, ref) == 0.0


def test_a_strength_schedule_counts_the_real_steps():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = Regularization(L2(), strength=0.1, schedule=Step(step_size=2, gamma=0.5))
    attach(model, opt, reg)
    loop(model, opt, batches(5))
    assert reg.term.step == 5 and reg.term.strength_now() == pytest.approx(0.1 * 0.25)


def test_new_param_groups_and_unfrozen_tensors_are_followed(caplog):
    """add_param_group is seen at the next step; a tensor unfrozen while already in the
    optimizer within DORMANT_EVERY steps, or at once with hooks.rebind()."""
    model = TinyNet()
    model.head.requires_grad_(False)
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.SGD(body, lr=0.1)
    reg = Regularization(L2(), strength=LAM, mode="decoupled")
    hooks = attach(model, opt, reg)
    assert "head.weight" not in [a.name for a in reg.term.assignments]
    model.head.requires_grad_(True)
    opt.add_param_group({"params": list(model.head.parameters()), "lr": 0.01})
    with caplog.at_level(logging.INFO, logger="regfit"):
        loop(model, opt, batches(1))
    assert "head.weight" in [a.name for a in reg.term.assignments]
    assert any("became trainable" in r.message for r in caplog.records)
    # the head's decay uses its own group's lr
    head_bucket = next(b for b in reg.term.buckets if "head.weight" in b.names)
    assert head_bucket.lr == 0.01

    # unfrozen while already in the optimizer: seen by rebind() at once
    model2 = TinyNet()
    model2.body[0].requires_grad_(False)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    reg2 = Regularization(L2(), strength=LAM)
    hooks2 = attach(model2, opt2, reg2)
    assert "body.0.weight" not in [a.name for a in reg2.term.assignments]
    model2.body[0].requires_grad_(True)
    hooks2.rebind()
    assert "body.0.weight" in [a.name for a in reg2.term.assignments]
    hooks.remove()
    hooks2.remove()


def test_constraints_attach_too_and_run_after_the_prox():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    attach(model, opt, Regularization(L2(), strength=LAM), Constrain(MaxNorm(0.5), include=["body.0.weight"]))
    loop(model, opt, batches(3))
    assert model.body[0].weight.norm(dim=1).max() <= 0.5 + 1e-12


def test_bad_arguments_are_named():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs at least one Regularization"):
        attach(model, opt)
    with pytest.raises(ValueError, match="takes Regularization and Constrain objects, got L2"):
        attach(model, opt, L2())
    with pytest.raises(ValueError, match="must be a torch.optim.Optimizer"):
        attach(model, [opt], Regularization(L2()))
    with pytest.raises(ValueError, match=r"Two terms are named 'l2'.*name="):
        attach(model, opt, Regularization(L2()), Regularization(L2(), mode="decoupled"))
    with pytest.raises(ValueError, match=r"decoupled step η·λ·c = 2 ≥ 1"):
        attach(model, torch.optim.SGD(model.parameters(), lr=2.0), Regularization(L2(), strength=1.0, mode=Decoupled()))
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        attach(model, opt, Regularization(L2(), include=["bodyy.*"]))


def test_the_optimizers_own_weight_decay_is_reported(caplog):
    model = TinyNet()
    with caplog.at_level(logging.WARNING):
        attach(model, torch.optim.AdamW(model.parameters()), Regularization(L2(), exclude=["bias", "norm"])).remove()
    text = " ".join(r.message for r in caplog.records)
    assert "AdamW's own weight_decay=0.01 also decays the 3 tensors this term regularizes" in text
    assert "decays 5 tensors this term excludes (body.0.bias" in text and "weight_decay=0" in text


def test_adams_own_weight_decay_is_named_as_coupled_l2(caplog):
    model = TinyNet()
    with caplog.at_level(logging.WARNING):
        attach(model, torch.optim.Adam(model.parameters(), weight_decay=0.1), Regularization(L2(), exclude=["bias", "norm"])).remove()
    text = " ".join(r.message for r in caplog.records)
    assert "Adam's own weight_decay=0.1 also decays the 3 tensors this term regularizes" in text
    assert "regularized twice" in text and "Regularization('l2', mode='coupled', strength=0.1" in text
    assert "AdamW" not in text


def test_attaching_again_is_refused_and_the_decay_acts_once():
    """A notebook cell run twice: the second attach must not make the term act twice per step."""
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = Regularization(L2(), strength=0.5, mode="decoupled", include=["head.weight"])
    hooks = attach(model, opt, reg)
    with pytest.raises(ValueError, match=r"Term 'l2' is attached to this optimizer already.*\.remove\(\)"):
        attach(model, opt, reg)
    with pytest.raises(ValueError, match=r"a term of that name is attached to this SGD already.*name="):
        attach(model, opt, Regularization(L2(), strength=0.5, mode="decoupled", include=["head.weight"]))
    with pytest.raises(ValueError, match=r"attached to another optimizer \(SGD\) already"):
        attach(model, torch.optim.SGD(model.parameters(), lr=0.1), reg)
    w0 = model.head.weight.detach().clone()
    model.head.weight.grad = None
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.head.weight, w0 * (1 - 0.1 * 0.5), rtol=0, atol=1e-15)  # once: (1 − ηλ)
    hooks.remove()
    attach(model, opt, reg).remove()  # after remove() it attaches again
    attach(model, opt, Regularization(L2(), include=["head.weight"])).remove()
