"""Shared body of the tensor-network kinds (``tt``, ``cp``, ``tucker``).

Such a kind stores W as a network of small tensors over the modes of a tensorized weight
(out = m_1..m_d, in = n_1..n_d). It names the network once, as einsum subscripts
(:meth:`NetworkLayer._network_spec`) with its tensors in that order
(:meth:`NetworkLayer._network_tensors`); from that this class derives the forward's
searched contraction order (x and the tensors), W itself (the tensors alone, in a searched
order: ``to_dense`` and the rebuild + GEMM order) and their costs
(:mod:`structlayers.linalg.contract`), and the warning a kind gives when its layer costs
more multiply-adds per sample than the layer it stands in for.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch

from ..base import Order, StructuredSumLayer
from ..linalg.contract import Plan, contract, dependent_peak, plan
from ..linalg.decompose import split_layout
from ..linalg.tt import Modes, resolve_modes

#: the forward processes the batch in chunks whose largest intermediate has at most about this
#: many elements (64 MiB in float32), so memory stays bounded at any batch size; chunks much
#: smaller than this cost more in per-call overhead (and in repeated permuted copies of
#: contracted tensors) than they gain in cache locality.
CHUNK_ELEMENTS = 1 << 24
#: searched orders of cp and tucker keep their intermediates within min(largest rank, this)
#: times the input or output, or W's size.
MEMORY_RANKS = 16
#: what the cost warning advises when a layer costs more than dense
LOWER_RANKS = "a lower rank, a looser tolerance or a smaller params_share makes it cheaper"


def network_layout(out: int, inp: int, out_modes, in_modes, num_cores, split_modes: bool) -> Tuple[Modes, Modes]:
    """tt's mode layout, or with ``split_modes`` its separate out and in modes (order 2d)."""
    om, im = resolve_modes(out, inp, out_modes, in_modes, num_cores)
    if not isinstance(split_modes, bool):
        raise TypeError(f"split_modes must be a bool, got {type(split_modes).__name__}")
    return split_layout(om, im) if split_modes else (om, im)


class NetworkLayer(StructuredSumLayer):
    """A layer whose W is a tensor network; see the module docstring.

    ``_MODE_AXES``: the axes of m_k and n_k in the k-th tensor of :meth:`_mode_tensors`.
    """

    _MODE_AXES: Tuple[int, int] = (1, 2)

    def _mode_tensors(self):
        """One tensor per mode k, holding m_k and n_k at ``_MODE_AXES``."""
        return self.factors

    @property
    def num_cores(self) -> int:
        """d, the number of modes."""
        return len(self._mode_tensors())

    @property
    def out_modes(self) -> Tuple[int, ...]:
        return tuple(int(g.shape[self._MODE_AXES[0]]) for g in self._mode_tensors())

    @property
    def in_modes(self) -> Tuple[int, ...]:
        return tuple(int(g.shape[self._MODE_AXES[1]]) for g in self._mode_tensors())

    def _network_spec(self) -> Tuple[Tuple[str, ...], str, str, Dict[str, int]]:
        """(subscripts of the tensors, in letters n_1..n_d, out letters m_1..m_d, sizes)."""
        raise NotImplementedError

    def _network_tensors(self) -> List[torch.Tensor]:
        """The tensors, folded, in the order of :meth:`_network_spec`."""
        raise NotImplementedError

    def _describe(self) -> str:
        """How the cost warning names the layer (kind, modes, ranks)."""
        raise NotImplementedError

    def _network(self, batch_size: Optional[int] = None):
        """(operand subscripts, output subscripts, sizes) of the forward (x first) for a batch
        size, or of W (the tensors only) for None."""
        operands, ins, outs, sizes = self._network_spec()
        sizes = {**sizes, "f": self.num_folds}
        if batch_size is None:
            return operands, "f" + outs + ins, tuple(sorted(sizes.items()))
        sizes["b"] = batch_size
        return ("fb" + ins,) + operands, "fb" + outs, tuple(sorted(sizes.items()))

    def _searched_order(self, batch_size: int, memory_limit: Optional[int] = None) -> Order:
        """The order opt_einsum finds for x and the tensors (intermediates within the limit
        when some order fits it)."""
        found = plan(*self._network(batch_size), memory_limit)
        return Order("searched order", found.macs, found.peak, found.traffic, found.calls + 2, found, found.work)

    def _rank_bounded_order(self, batch_size: int, rank: int) -> Order:
        """:meth:`_searched_order` with intermediates within min(rank, MEMORY_RANKS) times the
        input or output, or W's size."""
        io = batch_size * self.num_folds * max(self.in_features, self.out_features)
        dense = self.num_folds * self.out_features * self.in_features
        return self._searched_order(batch_size, max(io * min(rank, MEMORY_RANKS), dense))

    def _run_searched(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        """Evaluate a searched order, in batch chunks of bounded memory (same arithmetic)."""
        f, b, _ = x.shape
        p: Plan = order.plan  # type: ignore[assignment]
        sizes = dict(self._network(b)[2])
        per_sample = max(1, dependent_peak(p, sizes, 0) // b)
        chunk = max(1, CHUNK_ELEMENTS // per_sample)
        y = contract(p, [x.reshape(f, b, *self.in_modes)] + self._network_tensors(), chunk=(0, "b", chunk))
        return y.reshape(f, b, self.out_features)

    def _dense_plan(self) -> Plan:
        return plan(*self._network())

    def _rebuild_macs(self) -> int:
        return self._dense_plan().macs

    def _rebuild_traffic(self) -> int:
        return self._dense_plan().traffic

    def _rebuild_work(self) -> float:
        return self._dense_plan().work

    def _rebuild_calls(self) -> int:
        return self._dense_plan().calls + 1

    def to_dense(self) -> torch.Tensor:
        """The tensors contracted in the cheapest order found (``_rebuild_macs`` multiply-adds)."""
        w = contract(self._dense_plan(), self._network_tensors())
        return w.reshape(self.num_folds, self.out_features, self.in_features)

    def _per_sample_cost(self) -> int:
        """Multiply-adds per sample and fold of the cheapest of the kind's own orders (no rebuild)."""
        return min(o.macs for o in self._structured_orders(1)) // self.num_folds

    def _warn_if_costlier(self, reference: int, what: str, advice: str = LOWER_RANKS, stacklevel: int = 4):
        """A UserWarning when one sample costs more multiply-adds than ``reference`` (per
        fold): the layout is valid, but slower than the layer it stands in for."""
        cost = self._per_sample_cost()
        if cost > reference:
            warnings.warn(
                f"{self._describe()} costs {cost} multiply-adds per sample and fold, {cost / reference:.1f}x "
                f"the {reference} of {what}; {advice}", UserWarning, stacklevel=stacklevel)
        return self


__all__ = ["CHUNK_ELEMENTS", "MEMORY_RANKS", "NetworkLayer"]
