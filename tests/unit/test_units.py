"""regfit.units: unit groups from Torch-Pruning's dependency graph — which slices make a
unit and which read it, residual couplings, outputs, unsupported layers, no side effects."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from regfit.binding import Assignment
from regfit.units import example_inputs, unit_bundles, unit_groups
from tests.helpers import ResidualCNN


def by_name(model):
    return {g.name: g for g in unit_groups(model)}


def test_groups_of_a_residual_cnn_couple_the_stem_with_the_block_output():
    groups = by_name(ResidualCNN())
    assert list(groups) == ["stem.0", "conv1", "fc", "head"]  # the model's order
    res = groups["stem.0"]
    assert res.size == 8 and not res.output and res.unsupported is None
    assert [s.name for s in res.incoming] == ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias",
                                              "conv2.weight", "bn2.weight", "bn2.bias"]
    assert {s.name: s.index.numel() for s in res.outgoing} == {"conv1.weight": 8, "fc.weight": 8 * 49}
    fc_cols = next(s for s in res.outgoing if s.name == "fc.weight")
    assert fc_cols.dim == 1 and torch.equal(torch.bincount(fc_cols.units), torch.full((8,), 49))
    assert [s.name for s in groups["conv1"].incoming] == ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"]
    assert groups["head"].output and groups["head"].incoming[0].name == "head.weight"


def test_numel_counts_every_slice_of_the_units():
    g = by_name(ResidualCNN())["conv1"]  # conv1 filters 8·9 + bias + bn1 γ, β + conv2 columns 8·9
    assert g.numel() == 6 * (8 * 9 + 1 + 2 + 8 * 9)
    mask = torch.tensor([True, False, False, True, False, False])
    assert g.numel(mask) == 2 * (8 * 9 + 1 + 2 + 8 * 9)


def test_zero_units_need_every_incoming_slice_zero_or_every_outgoing_one():
    model = ResidualCNN()
    with torch.no_grad():
        for t in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias):
            t[2] = 0.0  # unit 2: filter, bias, BN scale and shift
        model.conv1.weight[4] = 0.0
        model.bn1.weight[4] = 0.0
        model.bn1.bias[4] = 0.0  # unit 4: the conv bias is left: the channel is the constant BN(bias) ≠ 0
        model.conv2.weight[:, 5] = 0.0  # unit 5: nothing reads it
    g = by_name(model)["conv1"]
    assert g.zero_units().tolist() == [False, False, True, False, False, True]
    assert g.zero_incoming().tolist() == [False, False, True, False, False, False]


def test_tracing_leaves_modes_and_batchnorm_statistics_as_they_were():
    model = ResidualCNN().train()
    model.bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unit_groups(model)
    assert model.training and model.stem[1].training and not model.bn1.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_layernorm_over_the_channels_makes_the_group_unsupported():
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 3))
    groups = unit_groups(model, torch.zeros(2, 6))
    first = groups[0]
    assert first.name == "0" and "1 (LayerNorm)" in first.unsupported and "mean and variance" in first.unsupported


def test_a_bare_parameter_reading_the_channels_is_unsupported():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Parameter(torch.randn(5, 3))

        def forward(self, x):
            return x @ self.mix

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), Mixer())
    (first, *_) = unit_groups(model, torch.zeros(2, 6))
    assert "2.mix (Parameter)" in first.unsupported and "nn.Parameter" in first.unsupported


def test_example_inputs_come_from_example_input_array_or_the_error_names_it():
    model = ResidualCNN()
    assert example_inputs(model).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"Sequential has no example_input_array.*self.example_input_array = "):
        example_inputs(nn.Sequential(nn.Linear(2, 2)))


def test_bundles_hold_the_selected_incoming_slices_and_rows_of_the_rest():
    model = ResidualCNN()
    chosen = [Assignment(n, p, 1.0 if n.startswith("conv1") else 2.0) for n, p in model.named_parameters()
              if not n.startswith("fc.")]
    bundles = {b.name: b for b in unit_bundles(model, chosen)}
    assert set(bundles) == {"stem.0", "conv1", "head.weight", "head.bias"}  # the head's units are outputs
    assert bundles["conv1"].names == ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias")
    assert bundles["conv1"].coeff == 1.0 and bundles["stem.0"].coeff == 2.0
    assert all(v == (0, 0, 8) for v in bundles["stem.0"].views)


def test_without_torch_pruning_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(ImportError, match=r"pip install -c constraints.txt 'regfit\[export\]'"):
        unit_groups(ResidualCNN())


def test_a_unit_term_without_torch_pruning_is_a_value_error_naming_the_extra(monkeypatch):
    from regfit import Regularization
    from regfit.penalties import GroupLasso

    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    reg = Regularization(GroupLasso(units=True), mode="proximal")
    with pytest.raises(ValueError, match=r"Term 'grouplasso' \(GroupLasso\(units=True\)\): .*regfit\[export\]"):
        reg.term.assign(ResidualCNN())
