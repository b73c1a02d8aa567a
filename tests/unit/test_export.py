"""regfit.export.thin: exactly-zero units removed with everything that depends on them —
outputs equal on real digits, parameters reduced by exactly the units' slices, nothing zero
gives an equal model, units with a live bias kept, unsupported patterns named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regfit.export import ThinError, thin, thinning
from regfit.models import MLP
from tests.helpers import ResidualCNN, mnist_digits


@pytest.fixture(scope="module")
def digits(mnist_source):
    return mnist_digits(mnist_source, 2000)[0]


def zero_(*tensors_and_units):
    with torch.no_grad():
        for t, units in tensors_and_units:
            t[units] = 0.0


def assert_same_outputs(a, b, x, atol=1e-5):
    a.eval(), b.eval()
    with torch.no_grad():
        want, got = a(x), b(x)
    assert got.shape == want.shape
    assert float((want - got).abs().max()) <= atol


def numel(model):
    return sum(p.numel() for p in model.parameters())


def test_mlp_units_with_zero_weights_and_bias_go_with_the_next_layers_columns(digits):
    model = MLP(widths=[64, 32])
    x = digits.flatten(1)
    dead0, dead1 = [1, 5, 9, 33], [0, 7]
    zero_((model.body[0].weight, dead0), (model.body[0].bias, dead0),
          (model.body[2].weight, dead1), (model.body[2].bias, dead1))
    small = thin(model, x)
    assert (small.body[0].out_features, small.body[2].in_features, small.body[2].out_features,
            small.head.in_features) == (60, 60, 30, 30)
    # exactly the zeroed units' weights: their rows and biases, and the columns that read them
    # (body.2's 4 columns and 2 rows share 4·2 entries)
    assert numel(model) - numel(small) == 4 * (784 + 1) + (4 * 32 + 2 * (64 + 1) - 4 * 2) + 2 * 10
    assert_same_outputs(model, small, x)
    assert model.body[0].out_features == 64  # the original is untouched


def test_cnn_with_batchnorm_and_a_residual_block(digits):
    model = ResidualCNN()
    model.train()
    with torch.no_grad():  # BatchNorm statistics of real digits, so that eval mode is not trivial
        model(digits[:500])
    res, inner = [2, 6], [1]
    zero_((model.stem[0].weight, res), (model.stem[0].bias, res), (model.stem[1].weight, res),
          (model.stem[1].bias, res), (model.conv2.weight, res), (model.bn2.weight, res), (model.bn2.bias, res),
          (model.conv1.weight, inner), (model.conv1.bias, inner), (model.bn1.weight, inner), (model.bn1.bias, inner))
    result = thinning(model, digits[:4])
    small = result.model
    assert small.training  # the original's mode
    assert (small.stem[0].out_channels, small.bn2.num_features, small.conv1.in_channels, small.conv1.out_channels,
            small.conv2.in_channels, small.fc.in_features) == (6, 6, 6, 5, 5, 6 * 49)
    assert small.stem[1].running_mean.shape == (6,)
    per_res_unit = 9 + 1 + 2 + 6 * 9 + 2 + 6 * 9 + 49 * 16  # stem conv+bias, BN, conv2 filter, bn2; conv1 and fc columns
    per_inner_unit = 8 * 9 + 1 + 2 + 8 * 9  # conv1 filter+bias, bn1; conv2 columns
    shared = 2 * 1 * 9 * 2  # conv1's (res, inner) and conv2's (inner, res) kernels are in both counts
    removed = 2 * per_res_unit + per_inner_unit - shared
    assert numel(model) - numel(small) == removed
    assert result.params_before - result.params_after == removed
    assert {g.name: (g.units, g.zero, g.removed) for g in result.groups} == {
        "stem.0": (8, 2, 2), "conv1": (6, 1, 1), "fc": (16, 0, 0), "head": (10, 0, 0)}
    assert_same_outputs(model, small, digits)


def test_nothing_zero_comes_back_equal():
    model = ResidualCNN()
    result = thinning(model)
    assert result.removed_units == 0 and result.params_after == result.params_before
    assert result.model is not model and result.max_abs_diff == 0.0
    want, got = model.state_dict(), result.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_unit_with_zero_weights_but_a_live_bias_is_kept(digits):
    model = MLP(widths=[16])
    zero_((model.body[0].weight, [3]))  # ReLU(bias) reaches the head as a constant
    result = thinning(model, digits.flatten(1)[:8])
    assert result.removed_units == 0 and result.groups[0].zero == 0


def test_a_unit_nothing_reads_goes_too(digits):
    model = MLP(widths=[16])
    zero_((model.head.weight, (slice(None), [4, 8])))  # columns 4 and 8 of the head
    small = thin(model, digits.flatten(1)[:8])
    assert small.body[0].out_features == 14
    assert_same_outputs(model, small, digits.flatten(1))


def test_the_model_outputs_are_never_removed():
    model = MLP(widths=[16])
    zero_((model.head.weight, [2]), (model.head.bias, [2]))
    result = thinning(model)
    head = result.groups[-1]
    assert (head.name, head.zero, head.removed, head.kept) == ("head", 1, 0, "outputs of the model")


def test_ignore_keeps_a_group():
    model = MLP(widths=[16])
    zero_((model.body[0].weight, [3]), (model.body[0].bias, [3]))
    assert thinning(model, ignore=["body.0"]).groups[0].kept == "ignored"


def test_an_unsupported_layer_on_zero_units_is_named():
    class Mixer(nn.Module):  # a bare parameter Torch-Pruning cannot map to channels
        def __init__(self):
            super().__init__()
            self.mix = nn.Parameter(torch.randn(5, 3))

        def forward(self, x):
            return x @ self.mix

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), Mixer())
    assert thin(model, torch.randn(3, 6))[0].out_features == 5  # nothing zero: no error
    zero_((model[0].weight, [1]), (model[0].bias, [1]))
    with pytest.raises(ThinError, match=r"1 unit of 0 is exactly zero, but 2.mix \(Parameter\).*ignore=\['0'\]"):
        thin(model, torch.randn(3, 6))


def test_a_layernorm_over_zero_units_is_named():
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    zero_((model[0].weight, [1]), (model[0].bias, [1]), (model[1].weight, [1]), (model[1].bias, [1]))
    with pytest.raises(ThinError, match=r"1 \(LayerNorm\) .*mean and variance"):
        thin(model, torch.randn(3, 6))


def test_an_operation_that_maps_zero_to_nonzero_is_named():
    model = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3))  # sigmoid(0) = ½
    zero_((model[0].weight, [1]), (model[0].bias, [1]))
    with pytest.raises(ThinError, match=r"2 reads units of 0 .* as 0.5, not 0: an operation between them"):
        thin(model, torch.randn(3, 6))


def test_a_mix_over_channels_the_graph_does_not_see_is_caught_by_the_output_check():
    class Softmaxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x):  # a zero channel of a still counts in the softmax's sum
            return self.c(torch.softmax(self.a(x), dim=-1) * self.b(x))

    model = Softmaxed()
    zero_((model.a.weight, [1]), (model.a.bias, [1]), (model.b.weight, [1]), (model.b.bias, [1]))
    with pytest.raises(ThinError, match=r"outputs differ by up to .*ignore=\['a'\]"):
        thin(model, torch.randn(3, 6))


def test_a_layer_whose_units_are_all_zero_keeps_one(digits):
    model = MLP(widths=[16])
    zero_((model.body[0].weight, slice(None)), (model.body[0].bias, slice(None)))
    result = thinning(model, digits.flatten(1)[:8])
    assert result.model.body[0].out_features == 1 and result.groups[0].removed == 15
    assert result.groups[0].kept == "one unit stays: a layer needs one"
    assert_same_outputs(model, result.model, digits.flatten(1))
