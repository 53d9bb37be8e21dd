"""Fold gathering without advanced indexing, for circuits and for parameter graphs.

cirkit gathers the inputs of every folded layer (and of every folded parameter node)
with ``cat(outputs)[fold_idx]``. Its backward is a sort-based ``index_put`` with
accumulation, about five times slower on the CPU than the scatter-add behind
``index_select`` (measured here on a (64, 32, 32) → (128, 32, 32) gather: 612 µs
against 117 µs forward+backward); at batch size 1 (a partition function) these
gathers are a visible share of a whole evaluation. :func:`gather_folds` returns the
same tensor through a reshape when the fold index is the identity, else through
``index_select``; :func:`evaluate_parameter` evaluates a cirkit parameter graph with
it (and reads ``TorchPointerParameter`` slices with ``index_select`` too).
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

from cirkit.backend.torch.parameters.nodes import TorchParameterNode, TorchPointerParameter
from cirkit.backend.torch.parameters.parameter import TorchParameter

# fold-index tensor -> (weak reference, whether a reshape gathers the same inputs); an
# entry is dropped when its index tensor is freed
_VIEW_PLANS: Dict[Tuple[int, int, bool], Tuple[weakref.ref, bool]] = {}


def _gathers_by_view(idx: Tensor, num_rows: int, commutative: bool) -> bool:
    """Whether ``t[idx]`` is ``t.view(idx.shape + ...)`` for ``t`` with ``num_rows`` rows,
    up to the order of the inputs of a fold when the consumer is ``commutative`` in them."""
    key = (id(idx), num_rows, commutative)
    hit = _VIEW_PLANS.get(key)
    if hit is not None and hit[0]() is idx:
        return hit[1]
    rows = torch.sort(idx, dim=-1).values if commutative and idx.dim() > 1 else idx
    plan = idx.numel() == num_rows and torch.equal(rows.flatten().cpu(), torch.arange(num_rows))
    _VIEW_PLANS[key] = (weakref.ref(idx), plan)
    weakref.finalize(idx, _VIEW_PLANS.pop, key, None)  # the entry goes with its index tensor
    return plan


def gather_folds(outputs: List[Tensor], ids: List[int], idx, commutative: bool = False) -> Tensor:
    """cirkit's input gathering ``cat(outputs[ids])[idx]``.

    ``idx`` is a fold-index tensor (F, [H]) into the concatenated outputs, or cirkit's
    tuple of slices. A reshape where the index is the identity (in any order of the H
    inputs of each fold if ``commutative``: e.g. a Hadamard product), else
    ``index_select``. Returns (F, [H,] ...).
    """
    t = outputs[ids[0]] if len(ids) == 1 else torch.cat([outputs[i] for i in ids], dim=0)
    if not isinstance(idx, Tensor):  # cirkit's slice/None fast path
        return t[idx]
    if _gathers_by_view(idx, t.shape[0], commutative):
        return t.view(*idx.shape, *t.shape[1:])
    return t.index_select(0, idx.flatten()).view(*idx.shape, *t.shape[1:])


NodeFunction = Callable[..., Tensor]


def evaluate_node(node: TorchParameterNode, *inputs: Tensor) -> Tensor:
    """``node(*inputs)``, except that a pointer to some folds of a tensor is read with
    ``index_select``."""
    if type(node) is TorchPointerParameter and node._fold_idx is not None:  # noqa: SLF001
        return node.deref()().index_select(0, node._fold_idx)  # noqa: SLF001
    return node(*inputs)


def evaluate_parameter(parameter: TorchParameter, module_fn: NodeFunction = evaluate_node) -> Tensor:
    """``parameter()`` -- or ``parameter.evaluate(module_fn=module_fn)`` -- with the
    gathers of :func:`gather_folds`. ``module_fn(node, *inputs)`` evaluates each node, as
    in cirkit; overrides should fall back to :func:`evaluate_node`."""
    outputs: List[Tensor] = []
    for entry in parameter._address_book:  # noqa: SLF001 -- cirkit's fold bookkeeping, reused as is
        inputs = tuple(gather_folds(outputs, ids, idx) for ids, idx in zip(entry.in_module_ids, entry.in_fold_idx))
        if entry.module is None:  # the output entry
            (out,) = inputs
            return out
        outputs.append(module_fn(entry.module, *inputs))
    raise RuntimeError("the parameter graph's address book has no output entry")
