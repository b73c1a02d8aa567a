"""Every number a penalty, schedule or constraint takes, and every argument of
`Regularization`, is checked where it is given: a wrong type or value names the argument and
what it must be."""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest

import regfit.constraints
import regfit.penalties
import regfit.schedules
from regfit import Regularization
from regfit.hyperparams import check_number
from regfit.modes import Proximal
from regfit.term import Override

REQUIRED = {"total_steps": 100, "warmup_steps": 10, "step_size": 10}  # the integer arguments some need


def float_arguments():
    """(class, argument) for each public constructor argument whose default is a float."""
    for module in (regfit.penalties, regfit.schedules, regfit.constraints):
        for name, cls in vars(module).items():
            if not (inspect.isclass(cls) and cls.__module__ == module.__name__ and name in module.__all__):
                continue
            for arg, par in inspect.signature(cls).parameters.items():
                if isinstance(par.default, float):
                    yield cls, arg


CASES = list(float_arguments())


def make(cls, **kw):
    params = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in REQUIRED.items() if k in params and params[k].default is inspect.Parameter.empty}, **kw)


def test_the_sweep_reaches_every_kind_of_hyperparameter():
    found = {f"{cls.__name__}.{arg}" for cls, arg in CASES}
    assert {"Lp.p", "LHalf.eps", "ElasticNet.l1_ratio", "Cosine.final", "Step.gamma", "MaxNorm.max_value",
            "MinMaxNorm.rate"} <= found, found


@pytest.mark.parametrize("cls, arg", CASES, ids=[f"{c.__name__}.{a}" for c, a in CASES])
@pytest.mark.parametrize("bad", ["0.5", None, True, float("nan"), [0.5]], ids=repr)
def test_a_non_number_names_the_class_and_argument(cls, arg, bad):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\({arg}={re.escape(repr(bad))}\): {arg} must be "):
        make(cls, **{arg: bad})


@pytest.mark.parametrize("cls, arg", CASES, ids=[f"{c.__name__}.{a}" for c, a in CASES])
def test_the_default_and_numpy_numbers_are_accepted(cls, arg):
    default = inspect.signature(cls).parameters[arg].default
    obj = make(cls, **{arg: np.float64(default)})
    assert getattr(obj, arg) == pytest.approx(default) and type(getattr(obj, arg)) is float
    assert obj == make(cls)


def test_check_number_message():
    with pytest.raises(ValueError, match=r"^LHalf\(eps=inf\): eps must be a finite number > 0"):
        regfit.penalties.LHalf(eps=math.inf)
    assert check_number("X", "a", 3, lambda v: v > 0, "> 0") == 3.0


@pytest.mark.parametrize("kwargs, match", [
    ({"strength": True}, r"^strength=True is not a number"),
    ({"strength": "1e-4"}, r"^strength='1e-4' is not a number"),
    ({"penalty": regfit.penalties.L2}, r"^penalty=L2 is a class; pass an instance, L2\(\)"),
    ({"mode": Proximal}, r"^mode=Proximal is a class; pass an instance, Proximal\(\)"),
    ({"name": 3}, r"^name=3: give a non-empty string"),
    ({"name": ""}, r"^name='': give a non-empty string"),
    ({"overrides": Override(include=["bias"], strength_mult=0.1)}, r"overrides=Override\(.*must be a list of overrides"),
    ({"overrides": {"include": ["bias"], "strength_mult": 0.1}}, r"must be a list of overrides"),
    ({"overrides": [{"include": ["bias"], "strength_mult": False}]}, r"^strength_mult=False is not a number"),
])
def test_regularization_names_a_wrong_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Regularization(**kwargs)


def test_regularization_takes_overrides_as_dicts_or_objects_alike():
    as_dict = Regularization(overrides=[{"include": ["bias"], "strength_mult": 0.1}])
    as_obj = Regularization(overrides=[Override(include=["bias"], strength_mult=0.1)])
    assert repr(as_dict) == repr(as_obj) and as_dict.term.overrides == (Override(include=["bias"], strength_mult=0.1),)
