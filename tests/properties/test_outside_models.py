"""regfit on models its authors did not write: Hugging Face GPT-2 (tied embeddings), Llama
(RMSNorm), T5 (tied, T5LayerNorm, relative-attention bias table), BERT, a peft LoRA
adapter, torch's MultiheadAttention, LSTM and GRU — built from configs, no download.

For each, regfit's selection is compared with a rule written independently of it (Hugging
Face Trainer's ``get_decay_parameter_names``; torch's own bias names; nanoGPT's
``dim >= 2``), tensor by tensor, and a 20-step decoupled L2 + Adam trajectory with
``torch.optim.AdamW`` on hand-built param groups, in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from regfit import RegModule, Regularization, attach
from regfit.selection import Selector
from tests.helpers import fit, max_param_diff
from tests.outside_models import OUTSIDE, hf_decay_names, tensors, torch_decay_names

STEPS, LR, LAM = 20, 1e-2, 0.1
MODELS = sorted(OUTSIDE)


def _reference(model: nn.Module, hf: bool) -> set[int]:
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return tensors(model, hf_decay_names(model) if hf else torch_decay_names(model)) & trainable


def _names(model: nn.Module, ids: set[int]) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


@pytest.mark.parametrize("key", MODELS)
def test_selection_equals_an_independent_rule(key):
    """``exclude=[bias, norm]`` ≡ HF Trainer's decay rule (torch's bias names for torch
    modules); ``exclude=["ndim<2"]`` ≡ nanoGPT's ``p.dim() >= 2``. Compared as sets of
    tensors, so a tied tensor counts once and under any of its names."""
    o = OUTSIDE[key]
    model = o.build()
    ours = {id(i.param) for i in Selector(exclude=["bias", "norm"]).select(model)}
    ref = _reference(model, o.hf)
    assert ours == ref, f"only regfit: {_names(model, ours - ref)}; only the reference: {_names(model, ref - ours)}"
    nano = {id(p) for p in model.parameters() if p.requires_grad and p.dim() >= 2}
    assert {id(i.param) for i in Selector(exclude=["ndim<2"]).select(model)} == nano


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, o, steps: int = STEPS) -> None:
    for step in range(steps):
        optimizer.zero_grad()
        o.loss(model, o.batch(step)).backward()
        optimizer.step()


@pytest.mark.parametrize("key", MODELS)
def test_decoupled_l2_with_adam_equals_adamw_on_hand_built_groups(key):
    """A plain loop with :func:`regfit.attach`: Adam + decoupled L2 (exclude bias and norm)
    ≡ ``AdamW`` with a decay group built from the reference rule and a no-decay group."""
    o = OUTSIDE[key]
    model = o.build()
    ref = copy.deepcopy(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=LR)
    hooks = attach(model, opt, Regularization("l2", strength=LAM, mode="decoupled", exclude=["bias", "norm"]))
    _train(model, opt, o)
    hooks.remove()
    decay = _reference(ref, o.hf)
    groups = [{"params": [p for p in ref.parameters() if p.requires_grad and id(p) in decay], "weight_decay": LAM},
              {"params": [p for p in ref.parameters() if p.requires_grad and id(p) not in decay], "weight_decay": 0.0}]
    _train(ref, torch.optim.AdamW(groups, lr=LR), o)
    diff = max_param_diff(model, ref)
    print(f"{key}: max |Δw| = {diff:.3g} after {STEPS} steps")
    assert diff <= 1e-12


def test_tied_weights_are_one_tensor_regularized_once():
    """GPT-2's ``lm_head.weight is transformer.wte.weight``: one assignment with an alias,
    counted once in the penalty, decayed once per step, and excluded by either name."""
    model = OUTSIDE["gpt2"].build()
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    reg = Regularization("l2", strength=LAM, mode="decoupled", exclude=["bias", "norm"])
    tied = [a for a in reg.term.assign(model) if a.param is wte]
    assert [(a.name, a.aliases) for a in tied] == [("transformer.wte.weight", ("lm_head.weight",))]
    distinct = {id(p): p for p in model.parameters()}  # named_parameters() dedups tied tensors
    expected = LAM * sum(0.5 * p.pow(2).sum() for p in distinct.values() if p.dim() >= 2)
    assert float(reg.term.value()) == pytest.approx(float(expected), rel=1e-12)

    # one SGD step with a zero data gradient: w ← w·(1 − ηλ), not (1 − ηλ)²
    before = wte.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    hooks = attach(model, opt, Regularization("l2", strength=LAM, mode="decoupled"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    hooks.remove()
    assert torch.equal(wte.detach(), before * (1 - LR * LAM))

    for rule in (["embedding"], ["last_layer"], ["lm_head.*"], ["transformer.wte.*"]):
        names = [a.name for a in Regularization("l2", exclude=rule).term.assign(model)]
        assert "transformer.wte.weight" not in names, rule


class LM(RegModule):
    """An outside model as a RegModule: the wrapper a researcher writes."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.o = OUTSIDE[key]
        self.model = self.o.build()

    def data_loss(self, batch):
        return self.o.loss(self.model, batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=LR)


class _Batches:
    def __init__(self, o, n):
        self.data = [o.batch(i) for i in range(n)]

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)


@pytest.mark.parametrize("key", ["gpt2", "t5"])
def test_lightning_path_on_a_tied_model_equals_adamw(key):
    """The same equivalence through ``Trainer.fit`` (the callback and the step engine)."""
    lm = LM(key)
    ref = copy.deepcopy(lm.model)
    o = lm.o
    fit(lm, _Batches(o, STEPS).data, [Regularization("l2", strength=LAM, mode="decoupled", exclude=["bias", "norm"])])
    decay = _reference(ref, o.hf)
    groups = [{"params": [p for p in ref.parameters() if id(p) in decay], "weight_decay": LAM},
              {"params": [p for p in ref.parameters() if id(p) not in decay], "weight_decay": 0.0}]
    _train(ref, torch.optim.AdamW(groups, lr=LR), o)
    assert max_param_diff(lm.model, ref) <= 1e-12


@pytest.mark.parametrize("key", ["gpt2", "lstm", "multihead-attention"])
def test_coupled_l2_with_sgd_equals_sgd_weight_decay_on_hand_built_groups(key):
    o = OUTSIDE[key]
    model = o.build()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    hooks = attach(model, opt, Regularization("l2", strength=LAM, exclude=["bias", "norm"]))
    _train(model, opt, o)
    hooks.remove()
    decay = _reference(ref, o.hf)
    groups = [{"params": [p for p in ref.parameters() if id(p) in decay], "weight_decay": LAM},
              {"params": [p for p in ref.parameters() if id(p) not in decay], "weight_decay": 0.0}]
    _train(ref, torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True), o)
    assert max_param_diff(model, ref) == 0.0


def test_hugging_face_trainer_with_an_attached_term_equals_its_own_weight_decay(tmp_path):
    """The README's recipe: attach to the optimizer Hugging Face ``Trainer`` creates, from a
    TrainerCallback. Decoupled L2 on ``exclude=[bias, norm]`` with the Trainer's own
    ``weight_decay=0`` ≡ the Trainer's ``weight_decay=λ`` (its AdamW on its own decay groups)."""
    import logging

    from transformers import Trainer, TrainerCallback, TrainingArguments

    logging.getLogger("transformers").setLevel(logging.ERROR)

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.items = [OUTSIDE["gpt2"].batch(i) for i in range(4)]

        def __len__(self):
            return 4 * 4

        def __getitem__(self, i):
            return {k: v[i % 4] for k, v in self.items[i // 4].items()}

    class AttachRegfit(TrainerCallback):
        def __init__(self, *regularizations):
            self.regularizations, self.hooks = regularizations, None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.hooks = attach(model, optimizer, *self.regularizations)

        def on_train_end(self, args, state, control, **kwargs):
            self.hooks.remove()

    def run(weight_decay, callbacks=()):
        model = OUTSIDE["gpt2"].build()
        args = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=LR,
                                 weight_decay=weight_decay, lr_scheduler_type="constant", use_cpu=True, report_to="none",
                                 save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks)).train()
        return model

    theirs = run(LAM)
    ours = run(0.0, [AttachRegfit(Regularization("l2", strength=LAM, mode="decoupled", exclude=["bias", "norm"]))])
    neither = run(0.0)
    assert max_param_diff(ours, theirs) == 0.0
    assert max_param_diff(neither, theirs) > 1e-6  # the decay acted
