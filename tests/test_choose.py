"""choose(): the cheapest layer meeting an error bound and/or a parameter budget."""

import warnings

import pytest
import torch

import structlayers as sl
from structlayers.choose import error_resolution
from structlayers.linalg import kron_dense

from .helpers import decaying_factors, decaying_matrix

W8 = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
A4 = W8[:4, :4]


def test_tolerance_on_kronecker_input_picks_the_cheapest_qualifying_layer():
    a, b = decaying_factors(2, 16, decay=0.6, seed=1)
    choice = sl.choose((a, b), tolerance=0.05, kinds=["dense", "kronecker", "lowrank", "nystrom"])
    ok = [c for c in choice.candidates if c.meets]
    assert choice.chosen in ok and all(choice.chosen.flops <= c.flops for c in ok)
    assert choice.layer.relative_error(kron_dense(a, b)) <= 0.05
    assert choice.chosen.kind != "dense"  # the materialised layer is never the cheapest
    assert "->" in str(choice)


def test_budget_and_tolerance_together():
    w = decaying_matrix(1, 64, 64, decay=0.9, seed=2)
    choice = sl.choose(w, tolerance=0.2, params_share=0.5, kinds=["dense", "lowrank", "nystrom"])
    assert choice.layer.num_params <= 0.5 * w.numel()
    assert choice.layer.relative_error(w) <= 0.2
    dense = next(c for c in choice.candidates if c.kind == "dense")
    assert not dense.meets and dense.note == "over parameter budget"


def test_budget_only_picks_the_most_accurate_within_budget():
    w = decaying_matrix(1, 64, 48, decay=0.9, seed=3)
    choice = sl.choose(w, params_share=0.25, kinds=["lowrank", "nystrom"])
    assert choice.chosen.kind == "lowrank"  # the SVD optimum is never beaten at equal params
    assert choice.layer.num_params <= 0.25 * w.numel()


def test_kind_warnings_become_candidate_notes():
    """A tt at 60 % of the numbers costs more multiply-adds than dense: choose() says so in
    that candidate's note and lets no warning escape."""
    w = decaying_matrix(1, 32, 48, decay=0.9, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = sl.choose(w, params_share=0.6, kinds=["lowrank", "tt"])
    tt = next(c for c in choice.candidates if c.kind == "tt")
    assert "multiply-adds" in tt.note and tt.flops > 32 * 48 * 256
    assert "multiply-adds" in str(choice)


def test_bad_requests():
    w = decaying_matrix(1, 8, 8, seed=4)
    with pytest.raises(ValueError, match="choose needs a tolerance, a params_share, or both"):
        sl.choose(w)
    with pytest.raises(ValueError, match="unknown structured layer kind 'fft'"):
        sl.choose(w, tolerance=0.1, kinds=["fft"])
    with pytest.raises(ValueError, match="no candidate meets the request"):
        sl.choose(w, tolerance=0.01, params_share=0.05, kinds=["lowrank"])


def test_tolerance_zero_accepts_exact_candidates_despite_rounding():
    """The Kronecker error ||W||^2 - 2<W, L> + ||L||^2 leaves ~1e-8 of rounding: exact
    candidates used to be rejected at tolerance=0."""
    a, b = decaying_factors(1, 4, decay=0.7, seed=3)
    choice = sl.choose((a, b), tolerance=0.0, kinds=["dense", "lowrank", "nystrom"])
    assert {c.kind for c in choice.candidates if c.meets} == {"dense", "lowrank", "nystrom"}
    dense = next(c for c in choice.candidates if c.kind == "dense")
    assert dense.error == 0.0  # exact by construction
    w = decaying_matrix(1, 12, 12, decay=0.9, seed=4)
    assert all(c.meets for c in sl.choose(w, tolerance=0.0, kinds=["dense", "lowrank", "kronecker"]).candidates)


def test_zero_target_finds_a_candidate():
    zero = torch.zeros(8, 8, dtype=torch.float64)
    choice = sl.choose(zero, tolerance=0.1, kinds=["dense", "lowrank", "nystrom"])
    assert choice.chosen.error == 0.0 and choice.chosen.kind in ("lowrank", "nystrom")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: sl.choose((A4, A4, A4), tolerance=0.1), ValueError, "target must be a weight W or a pair"),
        (lambda: sl.choose(W8, tolerance=0.1, kinds=[]), ValueError, "kinds is empty"),
        (lambda: sl.choose(W8, tolerance=0.1, kinds=["lowrank", 3]), TypeError, "kind name must be a str"),
        (lambda: sl.choose(W8, tolerance=0.1, batch_size=0), ValueError, "batch_size must be a positive int"),
        (lambda: sl.choose(W8.numpy(), tolerance=0.1), TypeError, "target must be a torch.Tensor"),
    ],
)
def test_bad_choose_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_one_kind_as_a_string_is_one_kind():
    choice = sl.choose(W8, tolerance=0.5, kinds="lowrank")
    assert [c.kind for c in choice.candidates] == ["lowrank"]


def test_the_error_resolution_never_widens_a_tolerance_noticeably():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64):
        assert error_resolution(dtype, False) <= 1e-4
        assert error_resolution(dtype, True) <= 1e-4
    assert error_resolution(torch.float64, True) > 1e-8  # the Kronecker cancellation
