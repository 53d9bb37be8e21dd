"""Scale-free norms and errors (linalg.scale): any finite weight, zero targets defined."""

from __future__ import annotations

import math

import pytest
import torch

from structlayers.linalg.scale import conditioning_scale, fold_scales, ratio_of_squares, relative_error


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float32, 1e-25),
                                         (torch.float64, 1e200), (torch.float64, 1e-200)])
def test_relative_error_is_scale_free(dtype, scale):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    d = torch.randn(2, 5, 4, generator=g, dtype=torch.float64) * 1e-3
    reference = float((d.norm() / w.norm()))
    per_fold = d.flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1)
    ws, ds = (w * scale).to(dtype), (d * scale).to(dtype)
    assert relative_error(ds, ws) == pytest.approx(reference, rel=1e-5)
    assert torch.allclose(relative_error(ds, ws, per_fold=True), per_fold, rtol=1e-5)


def test_relative_error_of_a_zero_target_is_zero_when_matched_and_inf_otherwise():
    zero = torch.zeros(2, 3, 3, dtype=torch.float64)
    assert relative_error(zero, zero) == 0.0
    tiny = zero.clone()
    tiny[1, 0, 0] = 1e-300  # not flushed: a non-zero difference is an infinite relative error
    assert relative_error(tiny, zero) == math.inf
    assert relative_error(tiny, zero, per_fold=True).tolist() == [0.0, math.inf]
    assert ratio_of_squares(torch.zeros(2), torch.zeros(2)) == 0.0
    assert ratio_of_squares(torch.tensor([0.0, 1.0]), torch.zeros(2), per_fold=True).tolist() == [0.0, math.inf]


def test_conditioning_scale_is_one_in_range_and_a_power_of_two_outside():
    assert conditioning_scale(torch.randn(4, 4)) == 1.0
    assert conditioning_scale(torch.zeros(4, 4)) == 1.0
    for value, dtype in ((1e20, torch.float32), (1e-20, torch.float32), (1e200, torch.float64)):
        s = conditioning_scale(torch.full((2, 2), value, dtype=dtype))
        assert math.log2(s) == int(math.log2(s)) and 0.5 <= value / s < 1
    assert conditioning_scale(torch.full((2, 2), 1e6), degree=2) != 1.0  # products of two squared sums
    assert fold_scales(torch.tensor([[[3.0]], [[0.0]]])).tolist() == [4.0, 1.0]
