"""Constraints: each projection lands in its set and is the nearest point; the Constrain
callback projects the selected weights after every real step."""

from __future__ import annotations

import copy

import pytest
import torch

from regfit import Regularization
from regfit.constrain import Constrain
from regfit.constraints import MaxNorm, MinMaxNorm, NonNeg, UnitNorm
from regfit.penalties import L2
from tests.helpers import TinyNet, batches, fit, max_param_diff

SHAPES = [(6, 5), (4, 3, 2, 2), (7,)]


def sample(shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    if len(shape) > 1:
        w[0] *= 0.01  # one unit well inside every ball
    return w


def unit_norms(w, dim=None):
    if dim is None:
        return w.abs() if w.ndim == 1 else w.reshape(w.shape[0], -1).norm(dim=1)
    return torch.linalg.vector_norm(w, dim=dim)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_maxnorm_lands_in_the_ball_and_is_the_nearest_point(shape):
    w = sample(shape)
    p = MaxNorm(1.5).project(w)
    n_before, n_after = unit_norms(w), unit_norms(p)
    assert (n_after <= 1.5 * (1 + 1e-12)).all()
    inside = n_before <= 1.5
    assert inside.any() and (~inside).any()
    assert torch.equal(p[inside], w[inside])  # units already in the set are untouched
    assert torch.allclose(n_after[~inside], torch.full_like(n_after[~inside], 1.5))
    assert torch.allclose(MaxNorm(1.5).project(p), p, rtol=1e-14, atol=0)  # idempotent
    # nearest point of a convex set: <w − P(w), z − P(w)> ≤ 0 for every z in the set
    for seed in range(20):
        z = MaxNorm(1.5).project(sample(shape, seed=100 + seed, scale=1.0))
        assert ((w - p) * (z - p)).sum() <= 1e-12


def test_maxnorm_dim_follows_the_keras_mapping():
    """Keras Dense kernel K = Wᵀ (in, out); MaxNorm(axis=0) on K ≡ regfit MaxNorm(dim=1) on W."""
    w = sample((6, 5))
    k = w.T
    keras_norms = k.pow(2).sum(0, keepdim=True).sqrt()
    keras = k * keras_norms.clamp(0, 2.0) / (1e-7 + keras_norms)  # Keras's formula
    assert torch.allclose(MaxNorm(2.0, dim=1).project(w), keras.T, atol=1e-6)
    assert torch.equal(MaxNorm(2.0, dim=1).project(w), MaxNorm(2.0).project(w))  # default: per output unit
    assert (unit_norms(MaxNorm(2.0, dim=0).project(w), dim=0) <= 2.0 + 1e-12).all()  # per input unit


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_unitnorm_gives_unit_vectors_with_the_same_direction(shape):
    w = sample(shape)
    w[-1] = 0.0  # a zero unit stays zero
    p = UnitNorm().project(w)
    n = unit_norms(p)
    assert torch.allclose(n[:-1], torch.ones_like(n[:-1])) and n[-1] == 0
    assert torch.allclose(p[:-1] * unit_norms(w)[:-1].reshape(-1, *[1] * (w.ndim - 1)), w[:-1])


def test_nonneg_is_the_nearest_nonnegative_tensor():
    w = sample((6, 5))
    p = NonNeg().project(w)
    assert (p >= 0).all() and torch.equal(p[w >= 0], w[w >= 0])
    ws = [w.clone(), sample((3,), seed=1)]
    NonNeg().project_(ws)
    assert torch.equal(ws[0], p) and (ws[1] >= 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_minmaxnorm_lands_in_the_shell(shape):
    w = sample(shape)
    p = MinMaxNorm(0.5, 2.0).project(w)
    n = unit_norms(p)
    assert ((n >= 0.5 * (1 - 1e-12)) & (n <= 2.0 * (1 + 1e-12))).all()
    inside = (unit_norms(w) >= 0.5) & (unit_norms(w) <= 2.0)
    assert torch.allclose(p[inside], w[inside], rtol=1e-15, atol=0)
    # rate r moves a fraction r of the way, as Keras: n' = r·clip(n) + (1 − r)·n
    half = MinMaxNorm(0.5, 2.0, rate=0.5).project(w)
    expected = 0.5 * unit_norms(w).clamp(0.5, 2.0) + 0.5 * unit_norms(w)
    assert torch.allclose(unit_norms(half), expected)


@pytest.mark.parametrize("make, match", [
    (lambda: MaxNorm(0.0), "max_value"),
    (lambda: MaxNorm(-1.0), "max_value"),
    (lambda: MinMaxNorm(2.0, 1.0), "min_value ≤ max_value"),
    (lambda: MinMaxNorm(rate=0.0), "rate"),
    (lambda: UnitNorm(dim="rows"), "dim"),
    (lambda: Constrain("maxnorm"), "regfit.constraints.Constraint"),
    (lambda: Constrain(MaxNorm(), include="body.*"), "list of rules"),
])
def test_bad_constraint_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_constrain_projects_after_every_step_like_a_hand_written_loop():
    """SGD + L2 + MaxNorm on the hidden weights ≡ step, then project, by hand."""
    data = batches(30)
    model = TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9))
    ref = copy.deepcopy(model)
    before = copy.deepcopy(model)
    fit(model, data, [Regularization(L2(), strength=1e-3), Constrain(MaxNorm(0.8), include=["body.*"], exclude=["bias", "norm"])])
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
        with torch.no_grad():
            for w in (ref.body[0].weight, ref.body[3].weight):
                w.copy_(w * (0.8 / w.norm(dim=1, keepdim=True).clamp_min(0.8)))
    assert max_param_diff(model, ref) <= 1e-12
    for w in (model.body[0].weight, model.body[3].weight):
        assert (w.norm(dim=1) <= 0.8 * (1 + 1e-12)).all()
    assert (model.head.weight.norm(dim=1) > 0.8).any()  # not selected: not projected
    assert max_param_diff(model, before) > 0.1


def test_constraint_is_not_applied_for_a_skipped_step():
    """A step in which no weight has a gradient moves nothing and projects nothing."""
    model = TinyNet()
    model.head.weight.data.mul_(100.0)
    big = model.head.weight.detach().clone()
    model.training_step = lambda *args, **kwargs: None  # Lightning skips the optimizer step
    fit(model, batches(3), [Constrain(NonNeg(), include=["head.weight"])])
    assert torch.equal(model.head.weight, big)


def test_constrain_logs_no_penalty_but_the_weight_norm(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path)
    fit(TinyNet(dtype=torch.float32), batches(4, dtype=torch.float32), [Constrain(UnitNorm(), include=["head.weight"])],
        logger=logger, log_every_n_steps=2)
    import csv
    from pathlib import Path

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = set().union(*rows)
    assert "weights/norm/unitnorm" in keys
    assert not any(k.startswith("train/penalty/") or k.startswith("train/strength/") for k in keys)
    norms = [float(r["weights/norm/unitnorm"]) for r in rows if r.get("weights/norm/unitnorm")]
    assert norms and all(n == pytest.approx(3 ** 0.5) for n in norms)  # 3 unit rows


def test_two_constraints_or_a_constraint_and_a_term_with_one_name_are_an_error():
    """Their logs (weights/norm/<name>) would merge into one curve."""
    with pytest.raises(ValueError, match=r"Two constraints are named 'maxnorm'\. Give each a distinct `name`"):
        fit(TinyNet(), batches(2), [Constrain(MaxNorm(3.0)), Constrain(MaxNorm(1.0), include=["last_layer"])])
    with pytest.raises(ValueError, match=r"A term and a constraint are both named 'l2'"):
        fit(TinyNet(), batches(2), [Regularization(L2()), Constrain(MaxNorm(3.0), name="l2")])
    fit(TinyNet(), batches(2), [Constrain(MaxNorm(3.0)), Constrain(MaxNorm(1.0), include=["last_layer"], name="head_norm")])
    with pytest.raises(ValueError, match=r"name=5: give a non-empty string"):
        Constrain(MaxNorm(3.0), name=5)
