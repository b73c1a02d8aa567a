"""Per-tensor scale rules c(w): none, numel, fan, callables and depth-wise λ."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from regfit import Regularization
from regfit.modes import Coupled
from regfit.penalties import L2
from regfit.scaling import DepthDecay, fan_scale, numel_scale, scale_fn
from regfit.selection import Selector
from regfit.term import Term
from tests.helpers import TinyNet


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8))
        self.temperature = nn.Parameter(torch.ones(()))
        self.head = nn.Linear(8, 2)


def coeffs(reg, model):
    return {a.name: a.coeff for a in reg.term.assign(model)}


def test_scale_values_on_known_shapes():
    assert numel_scale("w", torch.empty(10, 20)) == 1 / 200
    assert fan_scale("w", torch.empty(10, 20)) == pytest.approx((20 + 10) / (20 * 10))  # Linear(20→10)
    # Conv2d(3→8, 5×5): fan_in = 3·25, fan_out = 8·25, as torch.nn.init computes them
    assert fan_scale("w", torch.empty(8, 3, 5, 5)) == pytest.approx((75 + 200) / (75 * 200))
    assert fan_scale("b", torch.empty(10)) == pytest.approx(2 / 10)
    assert scale_fn(lambda n, p: 3.0)("x", torch.empty(1)) == 3.0
    with pytest.raises(ValueError, match="Unknown scale 'fann'"):
        scale_fn("fann")


@pytest.mark.parametrize("scale, match", [
    (math.sqrt, r"scale='sqrt' must take two arguments, f\(name, param\)"),
    (lambda p: 1.0, r"must take two arguments"),
    (["fan"], r"Unknown scale \['fan'\]"),
    (lambda n, p: None, r"scale gave c=None for temperature; it must return a finite number ≥ 0"),
    (lambda n, p: "0.5", r"scale gave c='0.5'"),
    (lambda n, p: True, r"scale gave c=True"),
    (lambda n, p: float("nan"), r"scale gave c=nan"),
    (lambda n, p: torch.ones(2), r"scale gave c=tensor"),
])
def test_a_wrong_scale_names_itself_and_the_parameter(scale, match):
    with pytest.raises(ValueError, match=match):
        Term(L2(), 0.1, Selector(), scale, Coupled(), "l2").assign(Model())


def test_a_scale_may_return_a_numpy_number_or_a_one_element_tensor():
    import numpy as np

    for scale in (lambda n, p: np.float64(0.5), lambda n, p: torch.tensor(0.5)):
        coeffs = {a.coeff for a in Term(L2(), 0.1, Selector(), scale, Coupled(), "l2").assign(Model())}
        assert coeffs == {0.5} and all(type(a.coeff) is float for a in Term(L2(), 0.1, Selector(), scale, Coupled(), "l2").assign(Model()))


def test_depth_decay_counts_parametrized_modules_or_name_prefixes():
    model = TinyNet()  # body.0 Linear, body.2 LayerNorm, body.3 Linear, head: 4 blocks
    by_layer = coeffs(Regularization(L2(), scale=DepthDecay(0.5)), model)
    assert by_layer == pytest.approx({
        "body.0.weight": 0.125, "body.0.bias": 0.125, "body.2.weight": 0.25, "body.2.bias": 0.25,
        "body.3.weight": 0.5, "body.3.bias": 0.5, "head.weight": 1.0, "head.bias": 1.0})
    by_top = coeffs(Regularization(L2(), scale=DepthDecay(0.5, level=1)), model)
    assert {n: by_top[n] for n in ("body.0.weight", "body.3.bias", "head.weight")} == {
        "body.0.weight": 0.5, "body.3.bias": 0.5, "head.weight": 1.0}
    # excluded parameters still count as blocks; a base rule is multiplied in
    fan = coeffs(Regularization(L2(), scale=DepthDecay(0.5, base="fan"), exclude=["last_layer", "norm"]), model)
    assert fan["body.3.weight"] == pytest.approx(0.5 * fan_scale("", model.body[3].weight))
    assert "head.weight" not in fan


def test_depth_decay_is_overridable_by_subclassing():
    class ByStage(DepthDecay):
        def block_of(self, name):
            return "head" if name.startswith("head") else "body"

    c = coeffs(Regularization(L2(), scale=ByStage(0.1)), TinyNet())
    assert c["body.2.weight"] == pytest.approx(0.1) and c["head.bias"] == 1.0


@pytest.mark.parametrize("kw, match", [({"decay": 0.0}, "decay"), ({"level": 0}, "level"), ({"base": "fans"}, "Unknown scale")])
def test_bad_depth_decay_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        DepthDecay(**kw)
