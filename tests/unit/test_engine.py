"""The step engine: phases in order, one engine per optimizer, hooks that come and go, and
the cases where it must not act."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regfit.engine import StepEngine
from regfit.modes import Coupled, Decoupled, Proximal
from regfit.penalties import L1, L2, Penalty
from regfit.projection import Projection
from regfit.constraints import NonNeg
from regfit.selection import Selector
from regfit.term import Term
from tests.helpers import TinyNet, batches


class Recording(Penalty):
    """An L2 whose kernels write down when they run (and the weights they see)."""

    name = "rec"
    shard_dims = "any"

    def __init__(self, log, tag):
        self.log, self.tag = log, tag

    def value(self, w):
        return 0.5 * w.pow(2).sum()

    def add_grad_(self, gs, ws, alpha):
        self.log.append((self.tag, "gradient", float(ws[0].view(-1)[0])))
        torch._foreach_add_(gs, ws, alpha=alpha)

    def decay_(self, ws, alpha):
        self.log.append((self.tag, "pre_update", float(ws[0].view(-1)[0])))
        torch._foreach_mul_(ws, 1 - alpha)

    def prox_(self, ws, t):
        self.log.append((self.tag, "post_update", float(ws[0].view(-1)[0])))
        torch._foreach_div_(ws, 1 + t)

    def prox(self, w, t):
        return w / (1 + t)


def term(penalty, mode, name, include=("body.0.weight",)):
    return Term(penalty, 0.1, Selector(include=include), "none", mode, name, on_nonfinite="off")


def bound(model, opt, *members):
    engine = StepEngine.of(opt)
    for m in members:
        m.bind(model, [opt])
        engine.add(m)
    return engine


def one_step(model, opt, closure=False):
    x, y = batches(1)[0]

    def loss_and_grad():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if closure:
        opt.step(loss_and_grad)
    else:
        loss_and_grad()
        opt.step()


@pytest.mark.parametrize("closure", [False, True], ids=["step()", "step(closure)"])
def test_phases_run_in_order_whatever_order_the_terms_were_added(closure):
    """gradient (coupled) → pre_update (decoupled) → update → post_update (proximal): a
    coupled term reads w_t, not the decayed weights, though added after the decoupled one."""
    log = []
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = bound(model, opt, term(Recording(log, "prox"), Proximal(), "p"), term(Recording(log, "dec"), Decoupled(), "d"),
                   term(Recording(log, "cpl"), Coupled(), "c"))
    w0 = float(model.body[0].weight.view(-1)[0])
    one_step(model, opt, closure)
    assert [(tag, phase) for tag, phase, _ in log] == [("cpl", "gradient"), ("dec", "pre_update"), ("prox", "post_update")]
    assert log[0][2] == w0 and log[1][2] == w0 and log[2][2] != w0
    for m in list(engine.members):
        engine.remove(m)


def test_one_engine_per_optimizer_and_the_last_member_out_removes_the_hooks():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    a, b = term(L2(), Coupled(), "a"), term(L1(), Proximal(), "b")
    engine = bound(model, opt, a)
    assert StepEngine.of(opt) is engine
    bound(model, opt, b)
    assert engine.members == [a, b]
    engine.remove(a)
    assert opt._optimizer_step_pre_hooks
    engine.remove(b)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert StepEngine.of(opt) is not engine  # a fresh one next time
    with pytest.raises(TypeError, match="runs Terms and Projections"):
        StepEngine.of(opt).add(object())
    StepEngine.of(opt).remove(None)


def test_an_optimizer_that_never_calls_its_closure_is_an_error():
    class Lazy(torch.optim.SGD):
        def step(self, closure=None):
            return super().step()  # drops the closure: backward never ran inside step

    model = TinyNet()
    opt = Lazy(model.parameters(), lr=0.1)
    bound(model, opt, term(L2(), Coupled(), "c"))
    with pytest.raises(RuntimeError, match="returned without calling the closure"):
        opt.step(lambda: None)


def test_a_step_the_front_end_calls_no_training_step_runs_nothing():
    """``skip_step`` (Lightning's SWA batch-norm epoch: backward skipped, stale gradients)."""
    log = []
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = bound(model, opt, term(Recording(log, "cpl"), Coupled(), "c"), term(Recording(log, "prox"), Proximal(), "p"))
    engine.skip_step = lambda: True
    one_step(model, opt)
    assert log == []
    engine.skip_step = None
    one_step(model, opt)
    assert [phase for _, phase, _ in log] == ["gradient", "post_update"]


def test_only_the_stepping_optimizers_groups_are_touched():
    """Two optimizers over two halves of a model (a GAN's generator and critic): a term that
    spans both acts in each optimizer's step on that optimizer's tensors only."""
    model = TinyNet()
    body, head = list(model.body.parameters()), list(model.head.parameters())
    o1, o2 = torch.optim.SGD(body, lr=0.1), torch.optim.SGD(head, lr=0.1)
    t = Term(L2(), 0.5, Selector(), "none", Decoupled(), "d")
    t.bind(model, [o1, o2])
    StepEngine.of(o1).add(t)
    StepEngine.of(o2).add(t)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before_head = model.head.weight.detach().clone()
    o1.step()
    assert torch.equal(model.head.weight, before_head)
    o2.step()
    assert torch.allclose(model.head.weight, before_head * (1 - 0.1 * 0.5))
    StepEngine.of(o1).remove(t)
    StepEngine.of(o2).remove(t)


def test_projections_run_after_the_proximal_terms_in_the_order_added():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nonneg = Projection(NonNeg(), Selector(include=["body.0.weight"]), "nonneg")
    engine = bound(model, opt, term(L2(), Proximal(), "p"), nonneg)
    one_step(model, opt)
    assert (model.body[0].weight >= 0).all()
    for m in list(engine.members):
        engine.remove(m)


def test_groups_replaced_by_load_state_dict_are_followed():
    """A resume replaces the param-group dicts: the engine binds to the new ones before the
    next step (the decay reads the restored lr)."""
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = term(L2(), Decoupled(), "d", include=())
    engine = bound(model, opt, t)
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 0.01
    opt.load_state_dict(state)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = model.head.weight.detach().clone()
    opt.step()
    assert t.buckets[0].group is opt.param_groups[0]
    assert torch.allclose(model.head.weight, before * (1 - 0.01 * 0.1))
    engine.remove(t)
