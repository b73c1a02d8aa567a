"""RegModule and the Regularization callback inside a real Trainer: logging, names, errors."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from regfit import RegModule, Regularization
from regfit.penalties import L1, L2, LHalf
from tests.helpers import Batches, column, read_metrics, TinyNet, batches, fit, max_param_diff, reference_loop


def test_issue_example_logs_every_metric_separately(tmp_path):
    logger = CSVLogger(tmp_path)
    model = TinyNet(dtype=torch.float32)
    data = batches(20, dtype=torch.float32)
    fit(model, data, [
        Regularization(L2(), strength=1e-2, exclude=["bias", "norm", "last_layer"], scale="fan"),
        Regularization(L1(), strength=1e-3, mode="proximal", include=["body.0.*"]),
    ], logger=logger, log_every_n_steps=5, limit_val_batches=None)
    rows = read_metrics(logger)
    keys = set().union(*rows)
    for key in ("train/data_loss", "train/data_loss_epoch", "train/penalty", "train/loss", "train/penalty/l2",
                "train/penalty/l1", "weights/norm/l2", "weights/norm/l1", "weights/sparsity/l2", "weights/sparsity/l1"):
        assert key in keys, key
    assert len(column(rows, "train/penalty")) == 4  # steps 5, 10, 15, 20 only
    for r in rows:
        if r.get("train/loss"):
            total = float(r["train/penalty/l2"]) + float(r["train/penalty/l1"])
            assert float(r["train/penalty"]) == pytest.approx(total, rel=1e-6)
            assert float(r["train/loss"]) == pytest.approx(float(r["train/data_loss"]) + total, rel=1e-6)
    assert all(0 <= s <= 1 for s in column(rows, "weights/sparsity/l1"))


def test_logged_penalty_is_lambda_times_scaled_sum(tmp_path):
    logger = CSVLogger(tmp_path)
    model = TinyNet(dtype=torch.float32)
    snapshot = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshot[batch_idx] = copy.deepcopy(pl_module.state_dict())

    fit(model, batches(4, dtype=torch.float32), [Regularization(L2(), strength=0.5, scale="numel", exclude=["bias"]), Spy()],
        logger=logger, log_every_n_steps=1)
    rows = [r for r in read_metrics(logger) if r.get("train/penalty")]
    for step, r in enumerate(rows):
        weights = {k: v for k, v in snapshot[step].items() if not k.endswith("bias")}
        expected = 0.5 * sum(0.5 * w.pow(2).sum().item() / w.numel() for w in weights.values())
        assert float(r["train/penalty/l2"]) == pytest.approx(expected, rel=1e-5)


def test_penalty_value_is_computed_only_on_logging_steps(tmp_path):
    reg = Regularization(L2(), strength=1e-3)
    calls = []
    original = reg.term.value
    reg.term.value = lambda: calls.append(1) or original()
    fit(TinyNet(dtype=torch.float32), batches(30, dtype=torch.float32), [reg], logger=CSVLogger(tmp_path), log_every_n_steps=10)
    assert len(calls) == 3


def test_no_logger_means_no_penalty_computation():
    reg = Regularization(L2(), strength=1e-3)
    reg.term.value = lambda: pytest.fail("penalty computed without a logger")
    fit(TinyNet(dtype=torch.float32), batches(5, dtype=torch.float32), [reg])


def test_validation_logs_val_data_loss(tmp_path):
    logger = CSVLogger(tmp_path)
    data = batches(6, dtype=torch.float32)
    trainer = L.Trainer(max_epochs=2, logger=logger, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[Regularization("l2", strength=1e-3)])
    trainer.fit(TinyNet(dtype=torch.float32), Batches(data), Batches(data[:2]))
    assert len(column(read_metrics(logger), "val/data_loss")) == 2


def test_two_terms_with_one_name_is_an_error():
    """Two terms left at the default name, from Python: an error naming ``name=`` (not
    Lightning's "more than one stateful callback" at Trainer(...))."""
    with pytest.raises(ValueError, match=r"Two terms are named 'l2'.*name='l2_2'"):
        fit(TinyNet(), batches(2), [Regularization(L2()), Regularization(L2(), strength=1e-3)])
    fit(TinyNet(), batches(2), [Regularization(L2()), Regularization(L2(), strength=1e-3, name="l2_head", include=["head.*"])])


def test_selection_error_stops_before_training():
    model = TinyNet()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        fit(model, batches(2), [Regularization(L2(), include=["bodyy.*"])])
    assert max_param_diff(model, before) == 0.0


def test_proximal_l1_produces_exact_zeros():
    model = TinyNet(dtype=torch.float32)
    fit(model, batches(100, dtype=torch.float32), [Regularization(L1(), strength=0.05, mode="proximal", include=["body.0.weight"])])
    assert (model.body[0].weight == 0).float().mean() > 0.3
    assert (model.body[3].weight != 0).all()  # not selected, untouched by the prox


def test_frozen_and_unused_parameters_are_left_alone():
    model = TinyNet()
    model.body[0].requires_grad_(False)
    frozen = model.body[0].weight.detach().clone()
    model.unused = nn.Linear(3, 3).double()
    unused = model.unused.weight.detach().clone()
    fit(model, batches(10), [Regularization(L2(), strength=0.5, mode="decoupled")])
    assert torch.equal(model.body[0].weight, frozen)
    assert torch.equal(model.unused.weight, unused)  # no gradient, no step — like torch's AdamW


def test_data_loss_must_be_implemented():
    class Bare(RegModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(NotImplementedError, match="Bare must implement data_loss"):
        Bare().data_loss(None)


@pytest.mark.parametrize("wrong, got", [
    (lambda loss: loss.item(), "got float "),
    (lambda loss: loss.repeat(4), r"got a tensor of shape \(4,\)"),
    (lambda loss: None, "got NoneType None"),
])
def test_data_loss_that_is_not_one_number_is_named(wrong, got):
    class Wrong(TinyNet):
        def data_loss(self, batch):
            return wrong(super().data_loss(batch))

    with pytest.raises(ValueError, match=rf"Wrong.data_loss\(batch\) must return a 0-d tensor .*{got}.*not loss.item\(\)"):
        fit(Wrong(), batches(2))


def test_lhalf_in_a_trainer_with_a_user_penalty_term():
    from regfit.penalties import Penalty

    class LogCosh(Penalty):
        name = "logcosh"

        def value(self, w):
            return torch.log(torch.cosh(w)).sum()

    data = batches(30)
    model = TinyNet()
    ref = copy.deepcopy(model)
    fit(model, data, [Regularization(LogCosh(), strength=0.01), Regularization(LHalf(eps=1e-2), strength=1e-3, name="lhalf")])
    extra = lambda m: 0.01 * sum(torch.log(torch.cosh(p)).sum() for p in m.parameters()) + 1e-3 * sum(LHalf(eps=1e-2).value(p) for p in m.parameters())  # noqa: E731
    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.1), data, extra_loss=extra)
    assert max_param_diff(model, ref) < 1e-10


def test_epoch_data_loss_is_the_sample_weighted_mean_of_the_steps(tmp_path):
    """train/data_loss_epoch = Σ n·loss / Σ n over the epoch's micro-batches (a short last
    batch weighs less), as Lightning's on_epoch means are, for two epochs."""
    logger = CSVLogger(tmp_path)
    data = batches(3, batch_size=8, dtype=torch.float64) + batches(1, batch_size=2, seed=5, dtype=torch.float64)
    fit(TinyNet(), data, [Regularization(L2(), strength=1e-2)], logger=logger, log_every_n_steps=1, max_epochs=2)
    rows = read_metrics(logger)
    steps = column(rows, "train/data_loss")
    epochs = column(rows, "train/data_loss_epoch")
    assert len(steps) == 8 and len(epochs) == 2
    sizes = [8, 8, 8, 2]
    for e in range(2):
        expected = sum(n * loss for n, loss in zip(sizes, steps[4 * e:4 * e + 4])) / sum(sizes)
        assert epochs[e] == pytest.approx(expected, rel=1e-6)
        assert epochs[e] != pytest.approx(sum(steps[4 * e:4 * e + 4]) / 4, rel=1e-6)  # not the step mean


def test_a_step_that_does_not_log_makes_one_self_log_call(tmp_path, monkeypatch):
    """Each ``self.log`` is ~0.1–0.3 ms of host time: on steps that do not reach the loggers
    RegModule (with a term) makes exactly the one call a plain LightningModule makes."""
    per_batch: list[list[str]] = []
    original = L.LightningModule.log
    monkeypatch.setattr(L.LightningModule, "log",
                        lambda self, name, *a, **k: per_batch[-1].append(name) or original(self, name, *a, **k))

    class Marker(L.Callback):
        def on_train_batch_start(self, *args):
            per_batch.append([])

    fit(TinyNet(), batches(10, dtype=torch.float64), [Marker(), Regularization(L2(), strength=1e-2)],
        logger=CSVLogger(tmp_path), log_every_n_steps=5)
    assert len(per_batch) == 10
    assert per_batch[-1].count("train/data_loss_epoch") == 1  # once, at the epoch end
    for i, names in enumerate(per_batch):
        if i in (4, 9):  # the metrics of these steps reach the logger
            assert {"train/penalty", "weights/norm/l2"} <= set(names), names
        else:
            assert names == ["train/data_loss"], (i, names)
