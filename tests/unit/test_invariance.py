"""regfit.invariance: the scale-invariance probe finds the tensors a norm layer makes
scale-invariant, and leaves the model exactly as it found it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regfit import RegModule
from regfit.invariance import PROBE_SAMPLES, head_of_batch, probe_run, probe_scale_invariance


class Net(RegModule):
    """conv (no bias) → BatchNorm → ReLU → linear (bias) → LayerNorm → linear (no bias) → RMSNorm → dropout → head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 16)  # with a bias: LN(2Wx + b) ≠ LN(Wx + b)
        self.ln = nn.LayerNorm(16, elementwise_affine=False)
        self.fc2 = nn.Linear(16, 16, bias=False)
        self.rms = nn.RMSNorm(16)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, 3)
        self.unused = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(self.drop(self.rms(self.fc2(self.ln(self.fc(h))))))

    def data_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)


def batch(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_the_probe_finds_what_norm_layers_make_scale_invariant():
    net = Net().train()
    found = probe_scale_invariance(net, list(net.named_parameters()), probe_run(net, batch()))
    assert found["conv.weight"] is True  # before BatchNorm (train mode: batch statistics)
    assert found["fc2.weight"] is True  # before RMSNorm, with dropout after it
    assert found["fc.weight"] is False  # its bias breaks the invariance
    assert found["fc.bias"] is False and found["head.weight"] is False and found["bn.weight"] is False
    assert found["unused"] is None  # all zeros: nothing to scale


def test_the_probe_leaves_the_model_as_it_was():
    net = Net().train()
    params = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    probe_scale_invariance(net, list(net.named_parameters()), probe_run(net, batch()))
    for key, value in net.state_dict().items():  # weights bit for bit, BatchNorm's running stats too
        assert torch.equal(value, params[key]), key
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream is untouched


def test_probe_inputs():
    net = Net()
    assert probe_run(net) is None  # no batch and no example_input_array: nothing to run
    net.example_input_array = torch.randn(2, 1, 8, 8)
    assert probe_run(net)().shape == (2, 3)
    x, y = batch(100)
    hx, hy = head_of_batch((x, y))
    assert hx.shape[0] == hy.shape[0] == PROBE_SAMPLES
    d = head_of_batch({"x": x, "mask": torch.ones(3)})
    assert d["x"].shape[0] == PROBE_SAMPLES and d["mask"].shape == (3,)  # not the batch dim: kept
    assert head_of_batch("text") == "text"


def test_a_sharded_model_is_not_probed(monkeypatch):
    import regfit.invariance as invariance

    net = Net()
    monkeypatch.setattr(invariance, "is_sharded", lambda t: True)
    assert set(probe_scale_invariance(net, [("conv.weight", net.conv.weight)], lambda: net(batch()[0])).values()) == {None}


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.GroupNorm])
def test_linear_or_conv_before_other_norms(norm):
    layer = nn.Linear(8, 16, bias=False)
    model = nn.Sequential(layer, nn.LayerNorm(16)) if norm is nn.LayerNorm else nn.Sequential(
        nn.Conv2d(1, 8, 3, bias=False), nn.GroupNorm(2, 8))
    x = torch.randn(4, 8) if norm is nn.LayerNorm else torch.randn(4, 1, 6, 6)
    assert probe_scale_invariance(model, [("w", model[0].weight)], lambda: model(x)) == {"w": True}


def test_a_group_of_invariant_tensors_costs_one_pass_and_a_mixed_one_is_split():
    torch.manual_seed(0)
    layers = [m for _ in range(8) for m in (nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False))]
    model = nn.Sequential(*layers).train()
    x = torch.randn(4, 8, 5, 5)
    calls = []
    found = probe_scale_invariance(model, list(model.named_parameters()), lambda: calls.append(1) or model(x))
    assert set(found.values()) == {True} and len(found) == 8
    assert len(calls) == 2  # the unscaled output, then all eight scaled at once
    # a Linear with its bias before a LayerNorm: invariant only together; each gets its own factor
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    calls.clear()
    found = probe_scale_invariance(model, list(model.named_parameters()), lambda: calls.append(1) or model(torch.randn(4, 4)))
    assert found == {"0.weight": False, "0.bias": False, "1.weight": False, "1.bias": None}  # (zeros at init)
    assert len(calls) == 1 + 1 + 3  # base, the group, then one by one
