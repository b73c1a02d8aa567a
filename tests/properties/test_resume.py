"""Resume: fit N epochs ≡ fit N/2, stop, resume from the checkpoint for N/2, bit for bit."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from regfit import Regularization
from regfit.modes import Decoupled
from regfit.penalties import L1, L2
from tests.helpers import Batches, TinyNet, batches

EPOCHS = 4


class Scheduled(TinyNet):
    """SGD(momentum) with a per-step LR that rises above the initial lr, then falls (before
    the checkpoint at step 8): the 'corrected' decoupled step divides by the largest lr
    seen, which must survive resume."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)
        factor = lambda step: [1.0, 3.0, 2.0, 1.5, 1.2][min(step // 2, 4)]  # noqa: E731  peak 3× at steps 2–3
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}}


def trainer(max_epochs, callbacks, **kw):
    return L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, accelerator="cpu", devices=1, deterministic=True, **kw)


TERMS = {
    "coupled": lambda: Regularization(L2(), strength=1e-2),
    "decoupled-corrected": lambda: Regularization(L2(), strength=0.5, mode=Decoupled(step="corrected")),
    "proximal": lambda: Regularization(L1(), strength=1e-2, mode="proximal", exclude=["bias"]),
}


def fit_straight_and_resumed(make_term, tmp_path):
    data = Batches(batches(4))
    straight, first = Scheduled(), Scheduled()
    trainer(EPOCHS, [make_term()]).fit(straight, data)

    t1 = trainer(EPOCHS // 2, [make_term()])
    t1.fit(first, data)
    ckpt = tmp_path / "half.ckpt"
    t1.save_checkpoint(ckpt)
    resumed = Scheduled(seed=123)  # different init: everything must come from the checkpoint
    term = make_term()
    trainer(EPOCHS, [term]).fit(resumed, data, ckpt_path=ckpt)
    return straight, resumed, term, torch.load(ckpt, weights_only=False)


@pytest.mark.parametrize("which", list(TERMS))
def test_resume_is_bit_identical_to_an_uninterrupted_fit(which, tmp_path):
    straight, resumed, term, ckpt = fit_straight_and_resumed(TERMS[which], tmp_path)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    state = ckpt["callbacks"][term.state_key]
    assert state["config"]["strength"] == repr(term.term.strength)
    if which == "decoupled-corrected":
        assert state["max_lr"] == [pytest.approx(0.06)]  # 3 × 0.02, reached before the checkpoint


def test_resume_without_the_saved_max_lr_would_differ(tmp_path):
    """The test above is sensitive: dropping the term's state changes the resumed weights."""
    straight, _, _, _ = fit_straight_and_resumed(TERMS["decoupled-corrected"], tmp_path)
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=False)
    for state in ckpt["callbacks"].values():
        state["max_lr"] = []
    torch.save(ckpt, tmp_path / "stateless.ckpt")
    resumed = Scheduled()
    trainer(EPOCHS, [TERMS["decoupled-corrected"]()]).fit(resumed, Batches(batches(4)), ckpt_path=tmp_path / "stateless.ckpt")
    assert not torch.equal(straight.head.weight, resumed.head.weight)


def test_resumed_term_is_still_applied_after_the_optimizer_is_restored(tmp_path):
    """Optimizer.load_state_dict replaces the param-group dicts; the term must follow them."""
    data = Batches(batches(4))
    t1 = trainer(1, [Regularization(L2(), strength=0.5, mode="decoupled")])
    model = Scheduled()
    t1.fit(model, data)
    t1.save_checkpoint(tmp_path / "a.ckpt")
    with_term, without = copy.deepcopy(model), copy.deepcopy(model)
    trainer(2, [Regularization(L2(), strength=0.5, mode="decoupled")]).fit(with_term, data, ckpt_path=tmp_path / "a.ckpt")
    trainer(2, [Regularization(L2(), strength=0.0, mode="decoupled")]).fit(without, data, ckpt_path=tmp_path / "a.ckpt")
    assert with_term.head.weight.norm() < 0.99 * without.head.weight.norm()


def test_changed_config_warns_naming_the_difference(tmp_path):
    data = Batches(batches(2))
    t1 = trainer(1, [Regularization(L2(), strength=1e-4, exclude=["bias"])])
    t1.fit(TinyNet(), data)
    t1.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.warns(UserWarning) as record:
        trainer(2, [Regularization(L2(), strength=1e-3, exclude=["bias", "norm"])]).fit(TinyNet(), data, ckpt_path=tmp_path / "a.ckpt")
    messages = [str(w.message) for w in record if "regularization config" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in record]
    assert "strength: 0.0001 → 0.001" in messages[0]
    assert "exclude: ['bias'] → ['bias', 'norm']" in messages[0]
    assert "penalty" not in messages[0]  # unchanged fields are not listed


def test_same_config_resumes_without_a_config_warning(tmp_path, recwarn):
    data = Batches(batches(2))
    t1 = trainer(1, [Regularization(L2(), strength=1e-4)])
    t1.fit(TinyNet(), data)
    t1.save_checkpoint(tmp_path / "a.ckpt")
    trainer(2, [Regularization(L2(), strength=1e-4)]).fit(TinyNet(), data, ckpt_path=tmp_path / "a.ckpt")
    assert not [w for w in recwarn if "regularization config" in str(w.message)]


def test_a_term_renamed_or_with_another_penalty_is_said_not_dropped_silently(tmp_path):
    """Changing the penalty changes the default name, so the term's state key: the state
    is not taken, and a warning says which term's state is left and how to keep it."""
    data = Batches(batches(2))
    t1 = trainer(1, [Regularization(L2(), strength=1e-4)])
    t1.fit(TinyNet(), data)
    t1.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.warns(UserWarning, match=r"state of a term named 'l2' \(L2\(\).*no term of this run has .*'l1'.*name='l2'"):
        trainer(2, [Regularization(L1(), strength=1e-4)]).fit(TinyNet(), data, ckpt_path=tmp_path / "a.ckpt")


def test_a_checkpoint_from_before_on_nonfinite_was_saved_resumes_quietly(tmp_path, recwarn):
    data = Batches(batches(2))
    t1 = trainer(1, [Regularization(L2(), strength=1e-4)])
    t1.fit(TinyNet(), data)
    t1.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    for state in ckpt["callbacks"].values():
        if "config" in state:
            del state["config"]["on_nonfinite"]
            del state["strength"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    trainer(2, [Regularization(L2(), strength=1e-4)]).fit(TinyNet(), data, ckpt_path=tmp_path / "old.ckpt")
    assert not [w for w in recwarn if "regularization config" in str(w.message)]


# ---- mid-epoch: a checkpoint every k steps (ModelCheckpoint(every_n_train_steps=k)) -----------


class DigitsNet(TinyNet):
    """TinyNet on flattened 28×28 digits, in float64 (MNISTDataModule's batches are float32)."""

    def __init__(self, seed: int = 0):
        super().__init__(d_in=28 * 28, width=16, n_out=10, seed=seed,
                         optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))

    def forward(self, x):
        return super().forward(x.flatten(1).to(torch.float64))


STEPS, EVERY = 40, 11  # 6,667 training digits / 256 = 27 batches an epoch: checkpoints at 11, 22 (epoch 0), 33 (epoch 1)


def digits_trainer(tmp_path, callbacks=(), **kw):
    return L.Trainer(max_steps=STEPS, callbacks=[Regularization(L2(), strength=1e-3, exclude=["bias"]), *callbacks],
                     logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, accelerator="cpu", devices=1, deterministic=True, default_root_dir=tmp_path,
                     **kw)


@pytest.fixture(scope="module")
def straight_with_checkpoints(mnist_dir, tmp_path_factory):
    """An uninterrupted fit of STEPS steps that saves a checkpoint every EVERY steps on the way."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from regfit.data import MNISTDataModule

    folder = tmp_path_factory.mktemp("mid_epoch")
    every = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=EVERY, save_top_k=-1)
    model = DigitsNet()
    digits_trainer(folder, [every]).fit(model, datamodule=MNISTDataModule(str(mnist_dir), batch_size=256, seed=1))
    return model, folder


@pytest.mark.parametrize("step", [11, 33], ids=["epoch0-batch11", "epoch1-batch6"])
def test_mid_epoch_checkpoint_resumes_bit_identically(step, straight_with_checkpoints, mnist_dir, tmp_path, recwarn):
    """The batch order is part of the checkpoint (TensorBatches.state_dict): the resumed fit sees
    the rest of the interrupted epoch, not its first batches again."""
    from regfit.data import MNISTDataModule

    straight, folder = straight_with_checkpoints
    ckpt = folder / f"step={step}.ckpt"
    assert torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": step // 27, "batches": step % 27, "batch_size": 256, "samples": 6667, "world_size": 1}]
    resumed = DigitsNet(seed=123)  # different init: everything must come from the checkpoint
    trainer = digits_trainer(tmp_path, enable_checkpointing=False)
    trainer.fit(resumed, datamodule=MNISTDataModule(str(mnist_dir), batch_size=256, seed=1), ckpt_path=ckpt)
    assert trainer.global_step == STEPS
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: max |Δw| = {(a - b).abs().max():.3g}"
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
