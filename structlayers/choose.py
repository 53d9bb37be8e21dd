"""Choose a layer by error bound and parameter budget instead of by trial-and-error training."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._checks import as_folded_factors, as_folded_weight, check_budget, check_positive_int
from .base import StructuredSumLayer
from .registry import available, get

Target = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Candidate:
    kind: str
    options: dict
    rank: Optional[int] = None
    error: float = math.nan
    params: int = 0
    flops: int = 0
    meets: bool = False
    note: str = ""


@dataclass
class Choice:
    """The selected layer and every candidate considered."""

    layer: StructuredSumLayer
    chosen: Candidate
    candidates: List[Candidate] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'':3s}{'kind':10s} {'options':34s} {'rank':>5s} {'rel.err':>9s} {'params':>10s} {'MACs':>11s}  note"]
        for c in self.candidates:
            mark = "->" if c is self.chosen else ("ok" if c.meets else "  ")
            lines.append(f"{mark:2s} {c.kind:10s} {str(c.options):34.34s} {str(c.rank or '-'):>5s} "
                         f"{c.error:9.3e} {c.params:10d} {c.flops:11.3e}  {c.note}")
        return "\n".join(lines)


def error_resolution(dtype: torch.dtype, kronecker: bool) -> float:
    """The smallest relative error :func:`choose` tells apart from 0 for a layer of ``dtype``:
    32 units of rounding of the dtype (its factorisations round), at most 1e-4 (so half
    precisions do not widen a tolerance noticeably), and for Kronecker targets at least
    8 sqrt(eps) of float64 (the error is a difference of squared norms)."""
    eps = torch.finfo(dtype).eps
    return max(min(32 * eps, 1e-4), 8 * math.sqrt(torch.finfo(torch.float64).eps) if kronecker else 0.0)


def choose(
    target: Target,
    *,
    tolerance: Optional[float] = None,
    params_share: Optional[float] = None,
    kinds: Optional[Sequence[str]] = None,
    batch_size: int = 256,
) -> Choice:
    """The cheapest layer meeting an error tolerance and/or a parameter budget.

    target: a dense weight W (F, out, in) / (out, in), or a pair (A, B) for W = A ⊗ B
    (never materialised).

    With ``tolerance``: each kind builds its smallest configuration meeting it;
    among those within the budget (if ``params_share`` is given too) the one with
    the fewest multiply-adds for ``batch_size`` wins, ties broken by parameters.
    With only ``params_share``: each kind builds its best configuration within the
    budget and the most accurate wins (the cheapest layer with no error bound
    would be a trivial one). A kind that cannot honour the request is listed with
    the reason and skipped.

    Each kind is tried in the configurations it declares (``kronecker_choose_options``
    on Kronecker input); a kind that is exact from the input with no options
    (``exact_from_kronecker`` / ``exact_from_dense``) is built without the request and
    its error is 0 by construction. Computed errors are only resolved to about
    :func:`error_resolution` (rounding of the layer's dtype; for Kronecker targets also
    the cancellation in ||W||^2 - 2 Re<W, L> + ||L||^2): an error below it meets any
    tolerance, including ``tolerance=0`` (exact up to rounding).

    kinds: kind names, or one kind name as a string.
    """
    check_budget(tolerance=tolerance)  # both may be given: each is checked on its own
    check_budget(params_share=params_share)
    check_positive_int(batch_size, "batch_size")
    if tolerance is None and params_share is None:
        raise ValueError("choose needs a tolerance, a params_share, or both")
    kronecker = isinstance(target, tuple)
    if kronecker:
        if len(target) != 2:
            raise ValueError(f"target must be a weight W or a pair (A, B) for W = A ⊗ B, got a tuple of "
                             f"{len(target)} entries")
        a, b = as_folded_factors(*target)
        dense_params = a.shape[0] * a.shape[1] * b.shape[1] * a.shape[2] * b.shape[2]
    else:
        w = as_folded_weight(target, "target")
        dense_params = w.numel()
    names = [kinds] if isinstance(kinds, str) else list(kinds) if kinds is not None else available()
    if not names:
        raise ValueError("kinds is empty: give kind names (see structlayers.available()) or None for all")
    for name in names:
        get(name)  # unknown names fail here, before any work
    resolution = error_resolution(a.dtype if kronecker else w.dtype, kronecker)
    budget = params_share * dense_params if params_share is not None else math.inf

    candidates: List[Tuple[Candidate, Optional[StructuredSumLayer]]] = []
    for name in names:
        cls = get(name)
        variants = cls.kronecker_choose_options if kronecker else ({},)
        exact = cls.exact_from_kronecker if kronecker else cls.exact_from_dense
        for variant in variants:
            request = {"tolerance": tolerance} if tolerance is not None else {"params_share": params_share}
            options = {} if exact else {**variant, **request}  # exact kinds take no budget options
            cand = Candidate(kind=name, options=options)
            try:
                # a kind's warnings (e.g. tt costing more than dense) go into the candidate's note
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    layer = cls.from_kronecker(a, b, **options) if kronecker else cls.from_dense(w, **options)
            except (ValueError, TypeError, NotImplementedError) as exc:
                cand.note = f"skipped: {exc}"
                candidates.append((cand, None))
                continue
            for c in caught:  # only a kind's own remarks (UserWarning) become notes
                if not issubclass(c.category, UserWarning):
                    warnings.warn_explicit(c.message, c.category, c.filename, c.lineno)
            warned = "; ".join(str(c.message) for c in caught if issubclass(c.category, UserWarning))
            cand.rank = getattr(layer, "rank", None) if isinstance(getattr(layer, "rank", None), int) else None
            if exact:
                cand.error = 0.0
            else:
                cand.error = layer.relative_error_kronecker(a, b) if kronecker else layer.relative_error(w)
            cand.params, cand.flops = layer.num_params, layer.flops(batch_size)
            within_tol = tolerance is None or cand.error <= max(tolerance * (1 + 1e-9), resolution)
            cand.meets = within_tol and cand.params <= budget
            if not cand.meets:
                cand.note = "over tolerance" if not within_tol else "over parameter budget"
            if warned:
                cand.note = f"{cand.note}; {warned}" if cand.note else warned
            candidates.append((cand, layer))
    ok = [(c, layer) for c, layer in candidates if c.meets]
    if not ok:
        raise ValueError("no candidate meets the request:\n" + str(Choice(None, None, [c for c, _ in candidates])))  # type: ignore[arg-type]
    if tolerance is not None:
        best = min(ok, key=lambda cl: (cl[0].flops, cl[0].params, cl[0].error))
    else:
        best = min(ok, key=lambda cl: (cl[0].error, cl[0].flops))
    return Choice(layer=best[1], chosen=best[0], candidates=[c for c, _ in candidates])
