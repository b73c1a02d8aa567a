"""Terms: validation, assignments and their coefficients, per-selector strength overrides
(coefficients, training effect, YAML)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from regfit import Regularization
from regfit.constrain import Constrain
from regfit.modes import Coupled, Proximal, resolve_mode
from regfit.penalties import L2, Penalty
from regfit.scaling import DepthDecay, fan_scale
from regfit.schedules import Cosine
from regfit.selection import SelectionError, Selector
from regfit.term import Override, Term, validate_strength
from tests.helpers import TinyNet, batches, fit, max_param_diff, reference_loop

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mnist_schedule_constraints.yaml"


def coeffs(reg, model):
    return {a.name: a.coeff for a in reg.term.assign(model)}


def test_overrides_multiply_the_coefficient_of_matched_parameters():
    reg = Regularization(L2(), exclude=["bias"], overrides=[
        Override(include=["head.*"], strength_mult=0.1),
        Override(include=["*.weight"], exclude=["body.0.*"], strength_mult=3.0),
    ])
    c = coeffs(reg, TinyNet())
    assert c == pytest.approx({"body.0.weight": 1.0, "body.2.weight": 3.0, "body.3.weight": 3.0, "head.weight": 0.3})


def test_overrides_from_yaml_dicts_and_bad_values():
    reg = Regularization(L2(), overrides=[{"include": ["head.*"], "strength_mult": 0.0}])
    assert coeffs(reg, TinyNet())["head.bias"] == 0.0
    with pytest.raises(ValueError, match="strength_mult"):
        Override(include=["head.*"], strength_mult=-1)
    with pytest.raises(SelectionError, match="Did you mean 'bias'"):
        Override(include=["biases"])
    with pytest.raises(SelectionError, match="hed.weight|head.weight"):
        Regularization(L2(), overrides=[Override(include=["hed.*"])]).term.assign(TinyNet())


def test_override_equals_its_weighted_penalty_in_the_loss():
    data = batches(12)
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    ref = copy.deepcopy(model)
    fit(model, data, [Regularization(L2(), strength=0.05, overrides=[Override(include=["head.*"], strength_mult=0.1)])])

    def extra(m):
        return 0.05 * sum((0.1 if n.startswith("head.") else 1.0) * 0.5 * p.pow(2).sum() for n, p in m.named_parameters())

    reference_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), data, extra_loss=extra)
    assert max_param_diff(model, ref) <= 1e-12


def test_config_builds_schedule_override_depth_decay_and_constraint():
    """The regularization section and the callbacks of configs/mnist_schedule_constraints.yaml
    build, through jsonargparse, the objects they name."""
    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    parser = ArgumentParser()
    parser.add_class_arguments(Regularization, "regularization")
    parser.add_argument("--callbacks", type=list[Regularization | Constrain])
    ns = parser.parse_object({"regularization": cfg["regularization"], "callbacks": cfg["trainer"]["callbacks"]})
    built = parser.instantiate_classes(ns)
    reg = built.regularization
    assert isinstance(reg.term.schedule, Cosine) and isinstance(reg.term.scale, DepthDecay)
    assert reg.term.overrides and reg.term.overrides[0].strength_mult == pytest.approx(0.1)
    kinds = {type(cb).__name__ for cb in built.callbacks}
    assert kinds == {"Regularization", "Constrain"}
    # and they train together: a few steps of a small model with every piece of the config
    model = TinyNet(optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    before = copy.deepcopy(model)
    fit(model, batches(4), [reg, *built.callbacks])
    assert max_param_diff(model, before) > 0
    for w in (model.body[0].weight, model.body[3].weight):
        assert (w.norm(dim=1) <= 3.0 * (1 + 1e-12)).all()


# ---- a unit-wise penalty: one bucket per unit group ------------------------------------------


def test_unit_group_lasso_term_acts_on_whole_units_in_one_prox():
    from regfit import attach
    from regfit.penalties import GroupLasso
    from tests.helpers import ResidualCNN

    model = ResidualCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = Regularization(GroupLasso(units=True), strength=0.05, mode="proximal", exclude=["last_layer"],
                         scale="fan")
    hooks = attach(model, opt, reg)
    term = reg.term
    assert [b.name for b in term.bundles] == ["stem.0", "conv1", "fc"]
    assert [len(b.params) for b in term.buckets] == [7, 4, 2]
    # every tensor of a unit group takes the coefficient of the group's first weight
    c = {a.name: a.coeff for a in term.assignments}
    assert c["conv1.bias"] == c["bn1.weight"] == c["conv1.weight"] == pytest.approx(fan_scale("w", model.conv1.weight))
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    value_before = float(term.value())
    with torch.no_grad():
        expected = sum(float(GroupLasso(units=True).total(b.tensors(), [b.coeff])) for b in term.bundles)
    assert value_before == pytest.approx(0.05 * expected)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # a unit is zero in all its tensors or in none
    for b in term.bundles:
        zero = [t.reshape(t.shape[0], -1).eq(0).all(1) for t in b.tensors()]
        assert all(torch.equal(z, zero[0]) for z in zero)
    hooks.remove()


def test_unit_group_lasso_refuses_cautious_and_split_param_groups():
    from regfit import attach
    from regfit.penalties import GroupLasso
    from tests.helpers import ResidualCNN

    with pytest.raises(ValueError, match=r"mode='cautious' masks entry by entry; use mode='proximal'"):
        Regularization(GroupLasso(units=True), mode="cautious")
    model = ResidualCNN()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    others = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
    opt = torch.optim.SGD([{"params": weights}, {"params": others, "lr": 0.01}], lr=0.1)
    with pytest.raises(ValueError, match=r"unit group of stem.0 spans 2 optimizer param groups.*one param group"):
        attach(model, opt, Regularization(GroupLasso(units=True), mode="proximal", exclude=["last_layer"]))


def test_a_term_or_constraint_that_selects_nothing_is_an_error(caplog):
    # Each keyword may legitimately match nothing (one config, several models) — but together
    # they leave the term without a parameter, so λ would silently do nothing.
    term = Term(L2(), 0.1, Selector(include=["norm"], exclude=["bias"]), "none", Coupled(), "l2")
    bare = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(SelectionError, match=r"Term 'l2': include=\['norm'\], exclude=\['bias'\] select no trainable"):
        term.assign(bare)
    from regfit.constrain import Constrain
    from regfit.constraints import MaxNorm

    with pytest.raises(SelectionError, match=r"Constraint 'maxnorm'.*select no trainable parameter"):
        Constrain(MaxNorm(), include=["norm"]).select(bare)


def test_term_validation():
    for bad in (-1.0, float("nan"), float("inf"), "abc"):
        with pytest.raises(ValueError, match="strength"):
            validate_strength(bad)

    class ValueOnly(Penalty):
        def value(self, w):
            return w.pow(4).sum()

    with pytest.raises(ValueError, match="defines no prox"):
        Term(ValueOnly(), 0.1, Selector(), "none", Proximal(), "v4")
    Term(ValueOnly(), 0.1, Selector(), "none", Coupled(), "v4")
    with pytest.raises(ValueError, match="Unknown mode 'coupeld'"):
        resolve_mode("coupeld")


def test_term_assignments_carry_coefficients():
    term = Term(L2(), 1e-3, Selector(include=["body.*"], exclude=["norm"]), "numel", Coupled(), "l2")
    model = nn.Module()
    model.body = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    got = {a.name: a.coeff for a in term.assign(model)}
    assert got == {"body.0.weight": 1 / 32, "body.0.bias": 1 / 8, "body.2.weight": 1 / 64, "body.2.bias": 1 / 8}
