"""Scaled values (adapters.cirkit.scaling): the rescaling keeps the value represented,
``v · e^s``, and moves the range into s only when some (fold, sample) leaves [2^-16, 2^16]."""

from __future__ import annotations

import pytest
import torch

from adapters.cirkit.scaling import _Unmeasured, from_logs, normalise, rescale, shifted_exp, shifted_exp_values, undivided

pytestmark = pytest.mark.usefixtures("float64")


def represented(v, s):
    return v * torch.exp(s).unsqueeze(-1)


def test_values_in_range_are_left_alone():
    v = torch.tensor([[[0.5, -2.0, 3.0]], [[1.0, 0.25, -1.0]]])  # (F=2, B=1, K=3)
    s = torch.tensor([[0.5], [-1.0]])
    out_v, out_s, divisor = rescale(v, s)
    assert out_v is v and out_s is s and divisor is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_out_of_range_values_are_divided_by_their_peaks(dtype):
    """One (fold, sample) above 2^16: every one is divided by its own largest |entry| (for
    complex values the largest real or imaginary part), its log added to s."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(3, 2, 5, dtype=dtype, generator=gen)
    v[1, 0] *= 1e6
    s = torch.randn(3, 2, dtype=torch.float64, generator=gen)
    out_v, out_s, divisor = rescale(v, s)
    parts = torch.view_as_real(v).flatten(-2) if dtype.is_complex else v
    torch.testing.assert_close(divisor, parts.abs().amax(-1), rtol=0, atol=0)
    torch.testing.assert_close(represented(out_v, out_s), represented(v, s), rtol=1e-14, atol=0)
    assert float((torch.view_as_real(out_v) if dtype.is_complex else out_v).abs().max()) == 1.0


def test_a_single_vector_is_divided_by_a_number():
    v = torch.full((1, 1, 4), 1e-7)
    out_v, out_s, divisor = rescale(v, torch.zeros(1, 1))
    assert isinstance(divisor, float) and divisor == 1e-7
    torch.testing.assert_close(out_v, torch.ones(1, 1, 4))
    torch.testing.assert_close(out_s, torch.full((1, 1), torch.log(torch.tensor(1e-7)).item()))


def test_an_all_zero_vector_stays_zero():
    v = torch.zeros(2, 1, 3)
    v[1] = 1e9  # another fold leaves the range, so every fold is divided
    out_v, out_s, divisor = rescale(v, torch.zeros(2, 1))
    assert torch.equal(divisor[0], torch.ones(1)) and bool((out_v[0] == 0).all())
    assert float(out_s[0]) == 0.0


def test_a_tiny_sum_after_an_unmeasured_product_raises():
    v = torch.full((1, 1, 3), 1e-160)  # below sqrt(tiny) of float64
    with pytest.raises(_Unmeasured):
        normalise(v, torch.zeros(1, 1), after_unmeasured=True)
    out_v, _ = normalise(v, torch.zeros(1, 1))  # a measured value is just rescaled
    torch.testing.assert_close(out_v, torch.ones(1, 1, 3))


@pytest.mark.parametrize("single", [True, False])
def test_undivided_is_the_gradient_through_the_division(single):
    gen = torch.Generator().manual_seed(1)
    v = (torch.randn(1 if single else 3, 1, 4, generator=gen) * 1e7).requires_grad_()
    out_v, _, divisor = rescale(v, torch.zeros(v.shape[:2]))
    assert isinstance(divisor, float) == single
    grad = torch.randn(out_v.shape, generator=gen)
    (ref,) = torch.autograd.grad(out_v, v, grad)
    torch.testing.assert_close(undivided(grad, divisor), ref, rtol=0, atol=0)
    assert undivided(grad, None) is grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("single", [True, False])
def test_gram_blocks_are_measured_on_their_diagonals(dtype, single):
    """K x K Gram blocks (A Aᴴ, flattened) out of range: measured on their diagonals only,
    they are divided by the same peaks as measured whole (for complex blocks the diagonal
    is real, within √2 of the largest real or imaginary part), and end with largest entry 1.
    A block that is no Gram matrix would be measured wrongly: the flag is a promise."""
    gen = torch.Generator().manual_seed(2)
    folds, k = (1, 5) if single else (3, 5)
    a = torch.randn(folds, 2, k, 3, dtype=dtype, generator=gen) * 1e4  # (F, B, K, r)
    v = (a @ a.mH).flatten(start_dim=-2)  # (F, B, K²): above 2^16
    s = torch.randn(folds, 2, dtype=torch.float64, generator=gen)
    for gram in (False, True):
        out_v, out_s, divisor = rescale(v, s, gram=gram)
        torch.testing.assert_close(represented(out_v, out_s), represented(v, s), rtol=1e-13, atol=0)
        if not dtype.is_complex:
            assert float(out_v.abs().max()) == pytest.approx(1.0, rel=1e-13)
    modulus = v.abs().amax(-1)
    _, _, divisor = rescale(v, s, gram=True)
    torch.testing.assert_close(divisor, modulus, rtol=1e-13, atol=0)  # the diagonal holds |X|'s peak
    skew = v.clone()
    skew.view(folds, 2, k, k)[..., 0, 1] = 1e30  # not a Gram block: its peak is off the diagonal
    _, _, divisor = rescale(skew, s, gram=True)
    assert float(divisor.max() if isinstance(divisor, torch.Tensor) else divisor) < 1e30


def test_shifted_exp_in_float32_is_exp_to_a_few_ulps_down_to_subnormals_and_zero():
    # arguments across the normal range, the subnormal band (-103.97, -87.34) and below it
    gen = torch.Generator().manual_seed(3)
    f32, eps = torch.float32, torch.finfo(torch.float32).eps
    d = torch.cat([torch.linspace(-300.0, 0.0, 30000, dtype=f32), -300.0 * torch.rand(5000, generator=gen, dtype=f32)])
    d = d.view(7, 5000)
    got = shifted_exp(d, torch.zeros(7, dtype=f32))  # s = 0: the argument is exact
    want = torch.exp(d.double())
    assert got.dtype == f32
    normal = want >= torch.finfo(f32).tiny
    assert ((got.double() - want).abs() / want)[normal].max() <= 4 * eps  # within a few ulps, like torch.exp
    subnormal = ~normal & (want > 0)
    assert subnormal.any() and (got[subnormal] > 0).any()  # subnormal results are kept
    assert ((got.double() - want).abs()[~normal] <= 2 * 2.0 ** -149).all()  # 2.0 ** -149: the subnormal step
    assert (got[want < 2.0 ** -151] == 0).all()
    # with a shift, as torch.exp of the float32 difference: up to the rounding of the argument
    s = torch.randn(7, generator=gen, dtype=f32) * 3
    y = d + s.unsqueeze(-1)
    shifted, plain = shifted_exp(y, s).double(), torch.exp(y - s.unsqueeze(-1)).double()
    bound = (d.double().abs() + 4) * eps
    assert ((shifted - plain).abs() <= bound * plain + 2 * 2.0 ** -149).all()
    # written over y (for a caller done with it): the same bound, in y's storage
    target = y.clone()
    over = shifted_exp_values(target, s, overwrite=True)
    assert over.data_ptr() == target.data_ptr()
    assert ((over.double() - plain).abs() <= bound * plain + 2 * 2.0 ** -149).all()


def test_shifted_exp_differentiates_as_exp_and_leaves_other_dtypes_to_torch():
    y = (torch.randn(3, 5, dtype=torch.float32) * 40).requires_grad_()
    s = y.detach().amax(dim=-1)
    weights = torch.randn(3, 5, dtype=torch.float32)
    (g,) = torch.autograd.grad((shifted_exp(y, s) * weights).sum(), [y])
    v = shifted_exp(y.detach(), s)
    torch.testing.assert_close(g, weights * v, rtol=0, atol=0)
    y64 = torch.randn(3, 5, dtype=torch.float64) * 300
    s64 = y64.amax(dim=-1)
    assert torch.equal(shifted_exp(y64, s64), torch.exp(y64 - s64.unsqueeze(-1)))
    assert torch.equal(shifted_exp_values(y64.clone(), s64, overwrite=True), torch.exp(y64 - s64.unsqueeze(-1)))


def test_from_logs_of_far_tails_in_float32_matches_float64():
    logs = torch.tensor([[0.0, -50.0, -95.0, -120.0, float("-inf")]], dtype=torch.float32) - 7.0
    v, s = from_logs(logs)
    v64, s64 = from_logs(logs.double())
    assert s.item() == -7.0 and s64.item() == -7.0
    torch.testing.assert_close(v.double(), v64, rtol=4 * torch.finfo(torch.float32).eps, atol=2.0 ** -148)
    assert v[0, -1] == 0 and v[0, -2] == 0 and v[0, -3] > 0
