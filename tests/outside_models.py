"""Models regfit's authors did not write, built from library configs (no download), with a
batch maker and a loss for each, and the reference decay rules other libraries use.

Every model is float64, in eval mode (no dropout: trajectories compare bit for bit), tiny.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, BATCH = 48, 8, 4


@dataclass
class Outside:
    """An outside model: ``loss(model, batch)`` and ``batch(seed)`` for training it."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    hf: bool = False  # a transformers model: Trainer's get_decay_parameter_names applies


def _tokens(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _causal_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy in the model's dtype (HF's own loss upcasts logits to float32)."""
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))


def _seq2seq_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(**batch).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def _logits_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])


def _prepare(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every build
    return model.double().eval()


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    return _prepare(GPT2LMHeadModel(cfg))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=SEQ, attention_bias=True,
                      mlp_bias=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _prepare(LlamaForCausalLM(cfg))


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=VOCAB,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    return _prepare(T5ForConditionalGeneration(cfg))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     vocab_size=VOCAB, max_position_embeddings=SEQ, num_labels=3, pad_token_id=0)
    return _prepare(BertForSequenceClassification(cfg))


def _bert_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, VOCAB, (BATCH, SEQ), generator=g), "labels": torch.randint(0, 3, (BATCH,), generator=g)}


def lora_llama() -> nn.Module:
    """A peft LoRA adapter on the tiny Llama: base weights frozen, A/B trainable."""
    from peft import LoraConfig, get_peft_model

    base = llama()
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            init_lora_weights="gaussian"))
    return model.double().eval()


class Attention(nn.Module):
    """torch's MultiheadAttention (with bias_k/bias_v) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.attn = nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


class Recurrent(nn.Module):
    """A 2-layer bidirectional LSTM or GRU and a head."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = cell(8, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


def _classify_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["input_ids"]), batch["labels"])


OUTSIDE = {
    "gpt2": Outside("gpt2", gpt2, _tokens, _causal_loss, hf=True),
    "llama": Outside("llama", llama, _tokens, _causal_loss, hf=True),
    "t5": Outside("t5", t5, _tokens, _seq2seq_loss, hf=True),
    "bert": Outside("bert", bert, _bert_batch, _logits_loss, hf=True),
    "lora-llama": Outside("lora-llama", lora_llama, _tokens, _causal_loss, hf=True),
    "multihead-attention": Outside("multihead-attention", lambda: _prepare(Attention()), _bert_batch, _classify_loss),
    "lstm": Outside("lstm", lambda: _prepare(Recurrent(nn.LSTM)), _bert_batch, _classify_loss),
    "gru": Outside("gru", lambda: _prepare(Recurrent(nn.GRU)), _bert_batch, _classify_loss),
}


# ---- reference rules, written independently of regfit.selection ------------------------------


def hf_decay_names(model: nn.Module) -> list[str]:
    """Hugging Face Trainer's own rule (``Trainer.get_decay_parameter_names``)."""
    from transformers.trainer_pt_utils import get_parameter_names

    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return get_parameter_names(model, [nn.LayerNorm], forbidden)


# torch's own bias-like parameter names, by module: nn.MultiheadAttention's in_proj_bias,
# out_proj.bias, bias_k, bias_v; RNNs' bias_ih_l{k}[_reverse], bias_hh_l{k}[_reverse].
_TORCH_BIASES = re.compile(r"(^|\.)(in_proj_bias|bias_k|bias_v|bias|bias_(ih|hh)_l\d+(_reverse)?)$")
_TORCH_NORMS = (nn.LayerNorm,)


def torch_decay_names(model: nn.Module) -> list[str]:
    """Every parameter but biases (by torch's own names) and LayerNorm parameters."""
    norms = {id(p) for m in model.modules() if isinstance(m, _TORCH_NORMS) for p in m.parameters()}
    return [n for n, p in model.named_parameters() if not _TORCH_BIASES.search(n) and id(p) not in norms]


def tensors(model: nn.Module, names: list[str]) -> set[int]:
    """The distinct tensors (ids) that some names reach, tied names counted once."""
    by_name = dict(model.named_parameters(remove_duplicate=False))
    return {id(by_name[n]) for n in names}
