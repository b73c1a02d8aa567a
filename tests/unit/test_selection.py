"""Selection: include/exclude rules over a model's tensors — keywords, globs, types, last
layer, tied weights and the layouts of other libraries' layers."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from regfit.modes import Proximal
from regfit.selection import SelectionError, Selector, last_layer
from regfit.term import Term


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 3, kernel_size=3)
        self.bn = nn.BatchNorm2d(3)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.temperature = nn.Parameter(torch.ones(()))
        self.head = nn.Linear(8, 2)


def names(selector, model=None):
    return [i.name for i in selector.select(model or Model())]


def test_default_selects_every_trainable_parameter_in_order():
    got = names(Selector())
    assert got == [n for n, p in Model().named_parameters() if p.requires_grad]
    assert "frozen.weight" not in got


def test_keywords():
    assert names(Selector(include=["bias"])) == ["conv.bias", "bn.bias", "body.0.bias", "body.1.bias", "body.2.bias", "head.bias"]
    assert names(Selector(include=["norm"])) == ["bn.weight", "bn.bias", "body.1.weight", "body.1.bias"]
    assert names(Selector(include=["embedding"])) == ["embed.weight"]
    assert names(Selector(include=["last_layer"])) == ["head.weight", "head.bias"]
    assert "temperature" in names(Selector(include=["ndim<2"]))
    assert names(Selector(exclude=["bias", "norm", "embedding", "last_layer", "ndim<2"])) == [
        "conv.weight", "body.0.weight", "body.2.weight"]


def test_globs_and_types():
    assert names(Selector(include=["body.*"], exclude=["*.bias"])) == ["body.0.weight", "body.1.weight", "body.2.weight"]
    assert names(Selector(include=["type:Linear"])) == ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "head.weight", "head.bias"]
    assert names(Selector(include=["type:torch.nn.Conv2d"])) == ["conv.weight", "conv.bias"]
    assert names(Selector(include=["temperature"])) == ["temperature"]


def test_last_layer_can_be_named_by_the_model():
    class Custom(Model):
        def last_layer(self):
            return self.body[2]

    assert last_layer(Custom()) is not None
    assert names(Selector(include=["last_layer"]), Custom()) == ["body.2.weight", "body.2.bias"]


@pytest.mark.parametrize("wrong", ["head", ["body.2"], "parameter"])
def test_last_layer_returning_something_else_than_a_module_is_named(wrong):
    class Custom(Model):
        def last_layer(self):
            return self.head.weight if wrong == "parameter" else wrong

    with pytest.raises(SelectionError, match=r"Custom.last_layer\(\) returned .*it must return the head module itself"):
        Selector().select(Custom())


def test_glob_matching_nothing_is_an_error_with_close_names():
    with pytest.raises(SelectionError, match=r"'bodyy\.\*' matches no trainable parameter.*body\."):
        Selector(include=["bodyy.*"]).select(Model())
    with pytest.raises(SelectionError, match=r"type:Conv3d.*type:Conv2d"):
        Selector(exclude=["type:Conv3d"]).select(Model())
    with pytest.raises(SelectionError, match="frozen.weight.*matches no trainable"):
        Selector(include=["frozen.weight"]).select(Model())


def test_misspelled_keyword_fails_at_construction():
    with pytest.raises(SelectionError, match=r"Unknown selector keyword 'biases'.*'bias'"):
        Selector(exclude=["biases"])
    with pytest.raises(SelectionError, match=r"'last-layer'.*'last_layer'"):
        Selector(exclude=["last-layer"])
    with pytest.raises(SelectionError, match="must be a list"):
        Selector(exclude="bias")
    with pytest.raises(SelectionError, match="cannot import"):
        Selector(include=["type:torch.nn.Nope"])


def test_keyword_matching_nothing_only_warns(caplog):
    mlp = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with caplog.at_level(logging.WARNING):
        got = names(Selector(exclude=["norm"]), mlp)
    assert len(got) == 4
    assert "matches no trainable parameter of Sequential." in caplog.text


def test_selection_has_no_side_effects():
    m = Model()
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    Selector(exclude=["bias"]).select(m)
    assert before == {n: p.requires_grad for n, p in m.named_parameters()}


# ---- real models: tied weights, structural keywords, stored layouts -------------------------


def test_a_tied_tensor_is_one_parameter_with_aliases_and_any_alias_excludes_it():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight

    model = Tied()
    infos = Selector().select(model)
    assert [(i.name, i.names) for i in infos] == [
        ("wte.weight", ("wte.weight", "lm_head.weight")), ("body.weight", ("body.weight",)), ("body.bias", ("body.bias",))]
    for rule in ("embedding", "lm_head.*", "type:Linear", "last_layer"):
        assert "wte.weight" not in names(Selector(exclude=[rule]), model), rule
    assert names(Selector(include=["lm_head.*"]), model) == ["wte.weight"]


def test_norm_and_bias_follow_structure_not_only_torch_classes():
    class LlamaRMSNorm(nn.Module):  # what Hugging Face, apex and timm norms look like
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

    class FusedLayerNormGated(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))

    class NormHead(nn.Module):  # a "Norm" name on a weight matrix is not a norm layer
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, add_bias_kv=True)
            self.rnn = nn.GRU(4, 4, bidirectional=True)
            self.ln = LlamaRMSNorm(4)
            self.fused = FusedLayerNormGated(4)
            self.head = NormHead()

    model = Net()
    assert names(Selector(include=["norm"]), model) == ["ln.weight", "fused.weight", "fused.bias"]
    assert set(names(Selector(include=["bias"]), model)) == {
        "attn.in_proj_bias", "attn.bias_k", "attn.bias_v", "attn.out_proj.bias",
        "rnn.bias_ih_l0", "rnn.bias_hh_l0", "rnn.bias_ih_l0_reverse", "rnn.bias_hh_l0_reverse", "fused.bias"}

    import regfit.selection as selection

    class ScaleNormish(nn.Module):  # a norm whose name does not say so: extend NORM_TYPES
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(()))

    m = nn.Sequential(nn.Linear(2, 2), ScaleNormish())
    assert names(Selector(include=["norm"]), m) == []
    original = selection.NORM_TYPES
    try:
        selection.NORM_TYPES = original + (ScaleNormish,)
        assert names(Selector(include=["norm"]), m) == ["1.g"]
    finally:
        selection.NORM_TYPES = original


def test_hf_conv1d_is_linear_and_row_penalties_see_its_output_units_first():
    """GPT-2's Conv1D stores (in, out): `linear` selects it, GroupLasso groups its output
    units (columns of the stored weight) and a scale callable sees (out, in)."""
    from transformers.pytorch_utils import Conv1D

    from regfit.penalties import GroupLasso

    model = nn.Sequential(Conv1D(6, 4), nn.Linear(6, 2))  # Conv1D(nf=out, nx=in): weight (4, 6)
    assert names(Selector(include=["linear"]), model) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    shapes = {}
    term = Term(GroupLasso(), 0.1, Selector(include=["0.weight"]), lambda n, p: shapes.setdefault(n, p.shape) and 1.0,
                Proximal(), "gl")
    (a,) = term.assign(model)
    assert a.out_dim == 1 and shapes["0.weight"] == (6, 4)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(4, 6))
        model[0].weight[:, 2] = 1e-3  # output unit 2: a small column of the stored weight
    expected = 0.1 * GroupLasso().value(model[0].weight.detach().t())
    assert float(term.value()) == pytest.approx(float(expected))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    term.bind(None, [opt])
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    term.apply()
    zero_units = (model[0].weight == 0).all(dim=0)
    assert zero_units.tolist() == [False, False, True, False, False, False]


def test_a_keyword_that_matches_only_frozen_tensors_says_so(caplog):
    """The frozen base of a LoRA model: its norms exist, they are just not trainable."""
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 1))
    for p in [*model[0].parameters(), *model[1].parameters()]:
        p.requires_grad_(False)
    with caplog.at_level(logging.WARNING):
        got = names(Selector(exclude=["norm"]), model)
    assert got == ["2.weight", "2.bias"]
    assert "'norm' matches no trainable parameter of Sequential; 2 frozen tensors match it (1.weight, 1.bias)" in caplog.text
