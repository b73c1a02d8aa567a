"""Faults: a non-finite penalty never corrupts weights; a failing logger never loses local files."""

from __future__ import annotations

import copy
import csv
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from regfit import Regularization
from regfit.guard import NonFinitePenaltyError, apply_guarded, finite_for_finite_input
from regfit.modes import Coupled
from regfit.penalties import L1, L2, LHalf, Orthogonal, Penalty
from regfit.selection import Selector
from regfit.term import Term
from tests.helpers import TinyNet, batches, fit

TRIP_STEP = 3


class Tripwire(Penalty):
    """½‖w‖² until ``armed``, then NaN for tensors with more than 20 entries — a stand-in
    for a user penalty that leaves its domain (log or sqrt of a negative weight)."""

    name = "tripwire"

    def __init__(self) -> None:
        self._armed = False

    def value(self, w):
        bad = self._armed and w.numel() > 20
        return 0.5 * w.pow(2).sum() * (float("nan") if bad else 1.0)

    def prox(self, w, t):
        return w / (1 + t) * (float("nan") if self._armed and w.numel() > 20 else 1.0)


class ArmAt(L.Callback):
    """Arms the tripwire (or zeroes the strength of a reference term) at one step and
    snapshots the weights at the start of every step."""

    def __init__(self, step, action):
        self.step, self.action, self.snapshots = step, action, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snapshots.append(copy.deepcopy(pl_module.state_dict()))
        if trainer.global_step == self.step:
            self.action()


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "proximal"])
def test_nan_penalty_stops_naming_term_and_parameter_and_weights_stay_finite(mode):
    penalty = Tripwire()
    arm = ArmAt(TRIP_STEP, lambda: setattr(penalty, "_armed", True))
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    with pytest.raises(NonFinitePenaltyError) as err:
        fit(model, batches(10), [Regularization(penalty, strength=1e-2, mode=mode, name="risky"), arm])
    msg = str(err.value)
    assert "'risky'" in msg and "body.0.weight" in msg and "head.weight" in msg and mode in msg
    assert "body.0.bias" not in msg  # 16 entries: its update stayed finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if mode != "proximal":  # raised before the optimizer update: the step never happened
        for k, v in model.state_dict().items():
            assert torch.equal(v, arm.snapshots[TRIP_STEP][k]), k


@pytest.mark.parametrize("mode", ["coupled", "decoupled", "proximal"])
def test_skip_drops_only_the_terms_update_and_warns(mode, caplog):
    """on_nonfinite='skip' ≡ the same run whose term strength drops to 0 at the trip step."""
    penalty = Tripwire()
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), norm=False)
    ref = copy.deepcopy(model)
    # Every parameter tensor but the biases trips; exclude biases so that the whole term is skipped.
    reg = Regularization(penalty, strength=1e-2, mode=mode, exclude=["bias"], on_nonfinite="skip")
    with caplog.at_level(logging.WARNING, logger="regfit.guard"):
        fit(model, batches(8), [reg, ArmAt(TRIP_STEP, lambda: setattr(penalty, "_armed", True))])
    ref_reg = Regularization(Tripwire(), strength=1e-2, mode=mode, exclude=["bias"])
    fit(ref, batches(8), [ref_reg, ArmAt(TRIP_STEP, lambda: setattr(ref_reg.term, "strength", 0.0))])
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    skipped = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(skipped) == 8 - TRIP_STEP and "body.2.weight" in skipped[0].getMessage()


def test_already_diverged_weights_are_reported_as_such(tmp_path):
    """Built-in penalties are not checked every step (no per-step host sync): diverged
    weights are reported on the next logging step, where the weight norm is computed."""
    model = TinyNet()

    class Diverge(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.body[0].weight[0, 0] = float("inf")

    with pytest.raises(NonFinitePenaltyError, match=r"body\.0\.weight were already non-finite.*data step diverged"):
        fit(model, batches(5), [Diverge(), Regularization(L2(), strength=1e-2, mode="decoupled")],
            logger=CSVLogger(tmp_path), log_every_n_steps=1)


def test_non_finite_data_gradient_is_left_to_the_grad_scaler():
    """An inf in the data gradient (a step AMP will skip) is not the term's fault: no error,
    and the gradient is left exactly as the data made it."""
    model = TinyNet()
    term = Term(L2(), 1e-2, Selector(), "none", Coupled(), "l2")
    term.bind(model, [torch.optim.SGD(model.parameters(), lr=0.1)])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.head.weight.grad[0, 0] = float("inf")
    apply_guarded(term, None, "raise")
    assert model.head.weight.grad[0, 0] == float("inf")


class RenamedLHalf(LHalf):
    """Only a new name: the built-in kernel runs."""

    name = "my_lhalf"


class NaNKernelL2(L2):
    """Redefines the gradient kernel: may do anything, so it is guarded."""

    def add_grad_(self, gs, ws, alpha):
        torch._foreach_add_(gs, [w * float("nan") if w.numel() > 20 else w for w in ws], alpha=alpha)


class L1WithInit(L1):
    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale


def test_only_builtin_kernels_skip_the_per_step_guard(monkeypatch):
    assert all(finite_for_finite_input(c) for c in (L2, L1, LHalf, RenamedLHalf))
    assert not any(finite_for_finite_input(c) for c in (NaNKernelL2, L1WithInit, Tripwire, Orthogonal))

    def bind(penalty):
        model = TinyNet()
        term = Term(penalty, 1e-2, Selector(), "none", Coupled(), penalty.name)
        term.bind(model, [torch.optim.SGD(model.parameters(), lr=0.1)])
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        return model, term

    # a renamed built-in: no copy, no check (the check would fail this test)
    with monkeypatch.context() as m:
        m.setattr("regfit.guard.all_finite", lambda tensors: pytest.fail("a renamed LHalf was checked"))
        apply_guarded(bind(RenamedLHalf())[1], None, "raise")
    # a subclass that redefines a kernel is checked, and its NaN is undone
    model, term = bind(NaNKernelL2())
    with pytest.raises(NonFinitePenaltyError, match="Term 'l2'.*non-finite"):
        apply_guarded(term, None, "raise")
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_guard_off_is_bit_identical_and_bad_value_is_rejected():
    with pytest.raises(ValueError, match="on_nonfinite='never'.*'raise', 'skip' or 'off'"):
        Regularization(L2(), on_nonfinite="never")
    data = batches(20)
    a = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    b = copy.deepcopy(a)
    fit(a, data, [Regularization(L2(), strength=1e-2)])
    fit(b, data, [Regularization(L2(), strength=1e-2, on_nonfinite="off")])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


class FlakyRemoteLogger(Logger):
    """A remote logger (think W&B) whose network drops after ``fail_at`` metric writes."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    @property
    def name(self):
        return "flaky"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls += 1
        if self.calls > self.fail_at:
            raise ConnectionError("network unreachable")


def test_remote_logger_failure_keeps_local_checkpoints_and_csv(tmp_path):
    csv_logger = CSVLogger(tmp_path / "logs")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
    model = TinyNet(dtype=torch.float32)
    with pytest.raises(ConnectionError):
        fit(model, batches(20, dtype=torch.float32), [Regularization(L2(), strength=1e-2), ckpt,
                                                      OnExceptionCheckpoint(tmp_path / "ckpt")],
            logger=[csv_logger, FlakyRemoteLogger(fail_at=5)], log_every_n_steps=1, enable_checkpointing=True)
    # The CSV logger wrote first and was finalized on the way out: every step up to the failure.
    with open(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/penalty")]
    assert [int(r["step"]) for r in rows] == list(range(6))
    # Periodic checkpoints on disk are intact and loadable; the failure itself was saved too.
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    on_exc = torch.load(tmp_path / "ckpt" / "on_exception.ckpt", weights_only=False)
    assert on_exc["global_step"] == 6 and any("Regularization" in k for k in on_exc["callbacks"])


class LogBarrier(Penalty):
    """R(w) = −Σ log w, written as a user would: NaN for w < 0. Its gradient
    −1/w is finite wherever w ≠ 0, so the updates pass the per-step check; only the value
    (what the logs show) leaves the domain."""

    name = "logbarrier"

    def value(self, w):
        return -torch.log(w).sum()

    def grad(self, w):
        return -1.0 / w


def test_a_penalty_value_that_is_not_a_number_stops_the_run_on_a_logging_step(tmp_path):
    """It used to log NaN as train/penalty every step and exit 0."""
    with pytest.raises(NonFinitePenaltyError, match=r"Term 'logbarrier' .*penalty value is nan at finite weights"):
        fit(TinyNet(), batches(4), [Regularization(LogBarrier(), strength=1e-6, include=["body.0.weight"])],
            logger=CSVLogger(tmp_path), log_every_n_steps=1)
    # skip: a warning, and the run goes on
    fit(TinyNet(), batches(2), [Regularization(LogBarrier(), strength=1e-6, include=["body.0.weight"], on_nonfinite="skip")],
        logger=CSVLogger(tmp_path), log_every_n_steps=1)


def test_a_divergence_the_terms_own_step_causes_is_named_so():
    """SGD with lr·λ > 2: w ← w(1 − lr·λ) grows whatever the data; the message says the term
    does it (it used to blame the data step). Refused at fit start; a λ raised mid-run that
    gets there is named on the logging step that finds the weights non-finite."""
    from regfit.guard import check_weights

    model = TinyNet()
    reg = Regularization(L2(), strength=1e-2)
    fit(model, batches(2), [reg])
    reg.term.strength = 50.0  # lr 0.1 · 50 = 5 > 2
    with torch.no_grad():
        model.body[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFinitePenaltyError, match=r"the term itself is the cause: with lr = 0.1, λ·c = 50 .*"
                                                    r"\|1 − lr·λ·c\| = 4 > 1"):
        check_weights(reg.term, reg.term.weight_stats()[0])


def test_a_strength_set_mid_run_that_would_blow_the_weights_up_is_refused():
    model = TinyNet()
    reg = Regularization(L2(), strength=1e-2, mode="decoupled")
    fit(model, batches(2), [reg])
    with pytest.raises(ValueError, match=r"decoupled step η·λ·c = 2 ≥ 1"):
        reg.strength = 20.0  # lr 0.1
    assert reg.strength == 1e-2  # unchanged


def test_a_strength_that_freezes_adam_is_refused_at_fit_start():
    """λ = 1e30 with Adam (coupled): g² overflows float32 in Adam's second moment and the
    weights stop moving, silently."""
    model = TinyNet(dtype=torch.float32, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    with pytest.raises(ValueError, match=r"whose square overflows torch.float32 in the optimizer's second moment"):
        fit(model, batches(2, dtype=torch.float32), [Regularization(L2(), strength=1e30)])


def test_divergence_is_found_without_a_logger_and_named_when_only_the_norm_overflows():
    """--trainer.logger=false used to exit 0 with NaN weights (no logging step ever checked
    them); weights that are finite but huge (their norm overflows) were reported with an
    empty list of names."""

    class Explode(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:  # the last step of the epoch: finite, but ‖w‖² > float32's max
                with torch.no_grad():
                    pl_module.head.weight.fill_(1e20)

    model = TinyNet(dtype=torch.float32)
    with pytest.raises(NonFinitePenaltyError, match=r"the weights of head\.weight grew to \|w\| = 1e\+20.*norm overflows.*"
                                                    r"data step diverged"):
        fit(model, batches(3, dtype=torch.float32), [Explode(), Regularization(L2(), strength=1e-4)])

    class NaNs(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                pl_module.head.weight[0, 0] = float("nan")

    with pytest.raises(NonFinitePenaltyError, match=r"were already non-finite .*data step diverged"):
        fit(TinyNet(), batches(3), [NaNs(), Regularization(L2(), strength=1e-4)])
