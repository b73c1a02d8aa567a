"""The ready-made classifiers check the first batch against the sizes they were built for."""

from __future__ import annotations

import pytest
import torch

from regfit.models import CNN, MLP

DIGITS = torch.randn(8, 1, 28, 28), torch.arange(8)


@pytest.mark.parametrize("model, match", [
    (lambda: MLP(in_features=100), r"MLP\(in_features=100\) got a batch of shape \(8, 1, 28, 28\), 784 values per "
                                   r"sample: give in_features=784"),
    (lambda: MLP(num_classes=5), r"MLP\(num_classes=5\) got class labels 0…7: give num_classes=8 or more"),
    (lambda: CNN(image_size=32), r"CNN\(in_channels=1, image_size=32\) takes batches of shape \(N, 1, 32, 32\), "
                                 r"got \(8, 1, 28, 28\)"),
    (lambda: CNN(in_channels=3), r"takes batches of shape \(N, 3, 28, 28\)"),
])
@pytest.mark.parametrize("step", ["data_loss", "validation_step"])
def test_a_model_that_does_not_fit_the_data_names_its_argument(model, match, step):
    m = model()
    call = m.data_loss if step == "data_loss" else (lambda b: m.validation_step(b, 0))
    with pytest.raises(ValueError, match=match):
        call(DIGITS)


def test_a_model_that_fits_checks_once_and_trains():
    for m in (MLP(widths=[8]), CNN(channels=[4], hidden=0)):
        assert torch.isfinite(m.data_loss(DIGITS))
        assert m._batch_checked
        m.num_classes = 2  # a later batch is not checked again (no host sync per step)
        assert torch.isfinite(m.data_loss(DIGITS))


def test_probability_targets_are_not_taken_for_labels():
    soft = torch.softmax(torch.randn(8, 10), dim=1)
    assert torch.isfinite(MLP(widths=[8]).data_loss((DIGITS[0], soft)))


@pytest.mark.parametrize("make, match", [
    (lambda: CNN(hidden=-5), r"^CNN\(hidden=-5\): hidden must be an integer ≥ 0"),
    (lambda: MLP(in_features=0), r"^MLP\(in_features=0\): in_features must be an integer ≥ 1"),
    (lambda: MLP(num_classes=1), r"^MLP\(num_classes=1\): num_classes must be an integer ≥ 2"),
    (lambda: CNN(in_channels=0), r"^CNN\(in_channels=0\): in_channels must be an integer ≥ 1"),
    (lambda: CNN(image_size=2.5), r"^CNN\(image_size=2.5\): image_size must be an integer ≥ 1"),
])
def test_bad_model_sizes_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()
