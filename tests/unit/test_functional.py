"""The pure functions behind the penalties: thresholding operators and their fast forms."""

from __future__ import annotations

import pytest
import torch

from regfit import functional as F
from regfit.functional import half_threshold, lp_prox, soft_threshold
from regfit.penalties import LHalf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_threshold_in_low_precision_matches_float64(dtype):
    """The prox of L1/2 in the weights' own dtype agrees with the float64 closed form of the
    same (rounded) weights, small weights at a small t included: (|w|/3)^(-3/2) alone
    overflows float16 below |w| ≈ 2e-3, which shrank such weights 3× instead of barely."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4000, generator=g) * torch.logspace(-4, 0, 4000)).to(dtype)
    for t in (1e-9, 1e-7, 1e-4, 1e-2):
        exact = half_threshold(w.double(), t)
        got = LHalf().prox(w, t)
        assert got.dtype == dtype and torch.isfinite(got).all()
        # the threshold itself is rounded to the dtype: leave out the weights next to it
        away = (w.double().abs() - 1.5 * t ** (2 / 3)).abs() > 0.01 * 1.5 * t ** (2 / 3)
        info = torch.finfo(dtype)
        torch.testing.assert_close(got.double()[away], exact[away], rtol=4 * info.eps,
                                   atol=2 * info.eps * info.smallest_normal)  # subnormal steps
        ws = [w.clone()]
        LHalf().prox_(ws, t)
        assert torch.equal(ws[0], got)


def test_half_threshold_closed_form_matches_newton_and_threshold():
    w = torch.linspace(-5, 5, 1001)
    for t in (0.1, 1.0, 2.5):
        assert torch.allclose(half_threshold(w, t), lp_prox(w, t, 0.5), atol=1e-9)
        thr = 1.5 * t ** (2 / 3)
        assert (half_threshold(w, t)[w.abs() <= thr] == 0).all()
        assert (half_threshold(w, t)[w.abs() > thr + 1e-9] != 0).all()


def test_soft_threshold_fast_form_equals_textbook_bits():
    w = torch.randn(10_000, dtype=torch.float32)
    textbook = torch.sign(w) * torch.clamp(w.abs() - 0.3, min=0)
    assert torch.equal(soft_threshold(w, 0.3), textbook)


def test_soft_threshold_in_place_refuses_a_negative_threshold():
    with pytest.raises(ValueError, match="t=-0.1"):
        F.soft_threshold_(torch.randn(3), -0.1)
