"""``regfit groups``' table: a row per tensor (aliases shown), totals that count what the rows
show, the optimizer's own weight decay per tensor and a note when it doubles a term."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from regfit import Regularization
from regfit.groups import decay_notes, parameter_table, render


class Tied(nn.Module):
    """An embedding tied to the output head (GPT-2 / T5 / nanoGPT), a body and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight


def test_a_tied_tensor_is_one_row_with_its_alias_and_the_totals_match_the_rows():
    model = Tied()
    terms = [Regularization("l2", strength=0.1, exclude=["bias", "norm"])]
    rows, totals = parameter_table(model, terms)
    assert [r.label for r in rows] == ["wte.weight (= lm_head.weight)", "body.weight", "body.bias", "ln.weight", "ln.bias"]
    assert totals[0].tensors == 2 and totals[0].numel == 40 + 16
    out = io.StringIO()
    render(rows, totals, out, plain=True)
    assert "56 of 68 weights regularized (2 of 5 tensors)." in out.getvalue()
    distinct = {id(p): p for p in model.parameters()}
    assert totals[0].value == pytest.approx(0.1 * sum(0.5 * float(p.pow(2).sum()) for p in distinct.values() if p.dim() == 2), rel=1e-6)


def test_the_optimizers_own_weight_decay_is_a_column_and_a_note():
    model = Tied()
    terms = [Regularization("l2", strength=0.1, exclude=["bias", "norm"])]
    opt = torch.optim.AdamW([{"params": [model.wte.weight, model.body.weight, model.body.bias]},
                             {"params": list(model.ln.parameters()), "weight_decay": 0.0}])
    rows, totals = parameter_table(model, terms, [opt])
    assert {r.name: r.weight_decay for r in rows} == {"wte.weight": 0.01, "body.weight": 0.01, "body.bias": 0.01,
                                                    "ln.weight": 0.0, "ln.bias": 0.0}
    (note,) = decay_notes(terms, [opt])
    assert "AdamW's own weight_decay=0.01 also decays the 2 tensors this term regularizes" in note
    assert "decays 1 tensor this term excludes (body.bias)" in note
    out = io.StringIO()
    render(rows, totals, out, plain=True, notes=[note])
    text = out.getvalue()
    assert "opt wd" in text and "Note: Term 'l2': AdamW's own" in text
    rows, _ = parameter_table(model, terms)  # no optimizer: no column values
    assert all(r.weight_decay is None for r in rows)
