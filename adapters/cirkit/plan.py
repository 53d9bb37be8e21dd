"""Evaluation plans: how every folded input of a circuit or parameter graph is fetched.

cirkit evaluates a compiled graph (a circuit's layers, or the nodes of one parameter)
entry by entry and gathers the inputs of each entry with ``cat(outputs)[fold_idx]``. Most
of those gathers move nothing: the fold index is the identity, a contiguous range, one
row repeated for every fold (a tied parameter), or -- for a commutative consumer such as
a Hadamard product -- the identity up to the order of the inputs of each fold. And a
pointer into a parameter tensor (``TorchPointerParameter``) is itself only a gather.

A plan is built once per graph (and rebuilt when its modules change, e.g. after a
swap). It composes the gathers through pointers at build time, on small integer arrays,
and gives each input a :class:`Fetch` that is a reshape, a ``narrow``, an ``expand``
(never a per-fold copy of a tied parameter), a ``cat``, or -- only where rows really move
-- one ``index_select``. Evaluating then costs the graph's own operations and nothing
for the bookkeeping; the backward of a view is free, that of ``expand`` a sum, where
cirkit's advanced indexing costs a zero fill and a sort-based scatter.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from cirkit.backend.torch.parameters.nodes import (
    TorchConjugateParameter,
    TorchEntrywiseParameterOp,
    TorchKroneckerParameter,
    TorchPointerParameter,
    TorchReduceParameterOp,
    TorchTensorParameter,
)
from cirkit.backend.torch.parameters.parameter import TorchParameter

from .internals import address_book, module_ids, node_tensor, pointer_fold_index

__all__ = ["Fetch", "operand_row", "plan_fetch", "ParameterPlan", "parameter_plan", "evaluate_parameter", "evaluate_node",
           "capture_inputs", "cached_plan", "fetched_rows", "is_kronecker_weight", "KroneckerReads",
           "kronecker_reads", "kronecker_inputs", "kronecker_permuted_inputs", "kronecker_leaf_factors"]


@dataclass(frozen=True)
class Fetch:
    """How one folded input (F, [H,] ...) is read from earlier outputs.

    ``kind``: ``'slices'`` (cirkit's tuple of slices, applied as is), ``'view'`` (the single
    source, reshaped), ``'narrow'`` (a contiguous range of the single source's folds),
    ``'expand'`` (one fold per input position, the same for every fold: broadcast, no
    copy), ``'cat'`` (the sources concatenated, in order), ``'index'`` (concatenated, then
    one ``index_select``). ``shape`` is the fold shape (F,) or (F, H).
    """

    kind: str
    sources: Tuple[int, ...]
    shape: Tuple[int, ...]
    start: int = 0
    length: int = 0
    index: Optional[Tensor] = None  # flat rows for 'index' and 'permute'; the H rows for 'expand'
    slices: Optional[tuple] = None
    inverse: Optional[Tensor] = None  # 'permute': the inverse permutation, for the backward
    pieces: Optional[Tuple[Tuple[int, int], ...]] = None  # 'pieces': (source, row) of every requested row

    def __call__(self, outputs: Union[Sequence[Tensor], Mapping[int, Tensor]],
                 unbound: Optional[Dict[int, tuple]] = None) -> Tensor:
        """The input, from ``outputs`` (indexed by source: a list of every earlier output, or
        a mapping holding at least the sources)."""
        if self.kind == "pieces":
            # a few rows from large sources: never concatenate the sources; their rows, split
            # once per run (one stack in the backward), are stacked into just the rows asked for
            cache = {} if unbound is None else unbound
            t = torch.stack([_row(outputs, cache, source, row) for source, row in self.pieces])
            return t.view(*self.shape, *t.shape[1:])
        if len(self.sources) == 1:
            t = outputs[self.sources[0]]
        else:
            t = torch.cat([outputs[i] for i in self.sources], dim=0)
        if self.kind == "slices":
            return t[self.slices]
        rest = t.shape[1:]
        if self.kind in ("view", "cat"):
            if len(self.shape) == 1:  # (F,): the tensor as it is
                return t
            return t.view(*self.shape, *rest)
        if self.kind == "narrow":
            return t.narrow(0, self.start, self.length).view(*self.shape, *rest)
        idx = self.index if self.index.device == t.device else self.index.to(t.device)
        if self.kind == "expand":  # the rows of one fold, (H, ...) or (1, ...), shared by every fold
            first, count = int(idx[0]), idx.numel()
            if count == 1 or bool((idx == torch.arange(first, first + count)).all()):
                rows = t.narrow(0, first, count)  # a view
            else:
                rows = t.index_select(0, idx)
            if len(self.shape) == 2:
                return rows.unsqueeze(0).expand(self.shape[0], *rows.shape)
            return rows.expand(self.shape[0], *rest)
        if self.kind == "permute":
            inverse = self.inverse if self.inverse.device == t.device else self.inverse.to(t.device)
            return _Permute.apply(t, idx, inverse).view(*self.shape, *rest)
        return t.index_select(0, idx).view(*self.shape, *rest)

    def operands(self, outputs: Union[Sequence[Tensor], Mapping[int, Tensor]],
                 unbound: Optional[Dict[int, tuple]] = None) -> List[Tensor]:
        """A ``'pieces'`` or ``'narrow'`` input of one fold (shape (1, H)) as its H inputs apart,
        each (1, ...): for a consumer that combines them one by one (a product), no stack;
        rows of a larger source come from its split (:meth:`takes_operands`)."""
        if not self.takes_operands:
            raise ValueError(f"operands() reads a 'pieces' or 'narrow' input of one fold, not {self.kind!r} "
                             f"of shape {self.shape}")
        cache = {} if unbound is None else unbound
        return [operand_row(outputs, cache, source, row) for source, row in self.operand_pieces]

    @property
    def operand_pieces(self) -> Tuple[Tuple[int, int], ...]:
        """(source, row) of each of the H inputs :meth:`operands` reads."""
        if self.kind == "pieces":
            return self.pieces
        return tuple((self.sources[0], self.start + h) for h in range(self.shape[1]))

    @property
    def takes_operands(self) -> bool:
        """One fold of H inputs, each a row of some source: :meth:`operands` applies. Rows
        read this way share their source's split (one stack in the backward for all of
        them, where a ``narrow`` of the source would add a zero-filled copy of it)."""
        return self.kind in ("pieces", "narrow") and len(self.shape) == 2 and self.shape[0] == 1


def operand_row(outputs, cache: Dict[int, tuple], source: int, row: int) -> Tensor:
    """Row ``row`` of ``outputs[source]`` as a value of one fold (1, ...): a source of one fold
    is its own row (no split, and no stack in the backward), a larger one is split once per
    run (``cache``)."""
    t = outputs[source]
    return t if t.shape[0] == 1 else _row(outputs, cache, source, row).unsqueeze(0)


def _row(outputs, cache: Dict[int, tuple], source: int, row: int) -> Tensor:
    """Row ``row`` of ``outputs[source]``, the source split once per run (``cache``)."""
    if source not in cache:
        cache[source] = outputs[source].unbind(0)
    return cache[source][row]


class _Permute(torch.autograd.Function):
    """Rows of ``t`` in the order ``idx``, a permutation of all of them. The backward is the
    inverse permutation, a gather too: no zero fill and no scatter-add, as ``index_select``'s
    backward would need for an arbitrary index."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, t: Tensor, idx: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.inverse = inverse
        return t.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad.index_select(0, ctx.inverse), None, None


def plan_fetch(sources: Sequence[int], idx, source_rows: Sequence[int], commutative: bool = False) -> Fetch:
    """The cheapest :class:`Fetch` equal to ``cat(outputs[sources])[idx]``.

    ``source_rows``: the number of folds of each source. ``commutative``: the consumer
    does not depend on the order of the H inputs of a fold (rows of ``idx`` may be sorted).
    """
    sources = tuple(int(s) for s in sources)
    if not isinstance(idx, Tensor):
        return Fetch("slices", sources, (), slices=idx)
    shape = tuple(idx.shape)
    original = idx.detach().cpu().numpy().reshape(shape)
    total = int(sum(source_rows))
    candidates = [original]
    if commutative and original.ndim == 2:
        candidates.insert(0, np.sort(original, axis=1))  # any order of a fold's inputs will do
    for rows in candidates:
        flat = rows.reshape(-1)
        if flat.size == total and bool(np.array_equal(flat, np.arange(total))):
            return Fetch("view" if len(sources) == 1 else "cat", sources, shape)
        if len(sources) == 1 and flat.size and bool(np.array_equal(flat, np.arange(flat[0], flat[0] + flat.size))):
            return Fetch("narrow", sources, shape, start=int(flat[0]), length=int(flat.size))
    flat = original.reshape(-1)
    rows = flat.reshape(shape)
    if len(sources) == 1 and shape[0] > 1 and bool((rows == rows[:1]).all()):
        first = torch.as_tensor(rows[0].reshape(-1).copy(), dtype=torch.long)
        return Fetch("expand", sources, shape, index=first)
    index = torch.as_tensor(flat.copy(), dtype=torch.long)
    if len(sources) > 1 and total > 2 * flat.size:  # a few rows out of large sources
        offsets = np.cumsum([0] + [int(r) for r in source_rows])
        which = np.searchsorted(offsets, flat, side="right") - 1
        pieces = tuple((int(sources[w]), int(r - offsets[w])) for w, r in zip(which, flat))
        return Fetch("pieces", sources, shape, pieces=pieces)
    if len(sources) == 1 and flat.size == total and bool(np.array_equal(np.sort(flat), np.arange(total))):
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(total)
        return Fetch("permute", sources, shape, index=index, inverse=inverse)
    return Fetch("index", sources, shape, index=index)


# ------------------------------------------------------------------ parameter graphs
NodeFunction = Callable[..., Tensor]


def evaluate_node(node, *inputs: Tensor) -> Tensor:
    """``node(*inputs)``: the default evaluation of one parameter node."""
    return node(*inputs)


class ParameterPlan:
    """The fetches of one parameter graph, with pointers composed into them.

    A pointer node does not compute: it stands for some folds of its target's tensor.
    Its consumers fetch from the target directly, through the composed index (a view
    of the parameter tensor whenever the composition is a range or the identity).

    A node that works row by row (an entrywise or reduce op) and reads some rows more than
    once (``conj(c)·c`` reads each input parameter of c on both sides) computes each distinct
    row once; its readers fetch through the map from its rows to those it computed, so the
    two sides then read one fetch, one tensor.
    """

    def __init__(self, parameter: TorchParameter) -> None:
        entries = list(address_book(parameter))
        self.signature = module_ids(parameter)
        # where each entry's rows live: ('own', entry) or ('leaf', leaf module, rows)
        self.modules: List[object] = []
        self.leaves: List[object] = []  # leaf modules read by pointers, by slot
        # per entry: (space, slot, rows): a leaf's rows, or an entry's map from its rows to those it
        # computes (None: all of them)
        origin: List[Tuple[str, int, Optional[np.ndarray]]] = []
        rows_of: List[int] = []  # rows per entry, as its readers index them
        computed: List[int] = []  # rows per entry, as computed
        self.steps: List[Tuple[object, Tuple[Fetch, ...]]] = []
        leaf_slot: Dict[int, int] = {}
        for entry in entries:
            module = entry.module
            fetches = []
            for ids, idx in zip(entry.in_module_ids, entry.in_fold_idx):
                fetches.append(self._fetch(ids, idx, origin, rows_of, computed))
            if module is None:
                self.steps.append((None, tuple(fetches)))
                break
            if type(module) is TorchPointerParameter and not fetches:
                target = module.deref()
                slot = leaf_slot.setdefault(id(target), len(self.leaves))
                if slot == len(self.leaves):
                    self.leaves.append(target)
                idx = pointer_fold_index(module)
                n = target.num_folds
                rows = np.arange(n) if idx is None else idx.detach().cpu().numpy().reshape(-1)
                origin.append(("leaf", slot, rows))
                rows_of.append(len(rows))
                computed.append(len(rows))
                self.steps.append((module, ()))  # nothing to compute
                continue
            row_map = None
            if isinstance(module, (TorchEntrywiseParameterOp, TorchReduceParameterOp)) and len(fetches) == 1:
                found = self._distinct_rows(fetches[0], computed)
                if found is not None:
                    fetches[0], row_map = found
            origin.append(("own", len(origin), row_map))
            rows_of.append(module.num_folds)
            computed.append(module.num_folds if row_map is None else int(row_map.max()) + 1)
            self.steps.append((module, tuple(fetches)))
        self.origin = origin
        self._computed_rows = computed  # output rows per entry, as computed
        self._decisions: Dict[tuple, object] = {}  # see decided
        self.kronecker_reads: object = _UNREAD  # built by kronecker_reads
        # equal fetches (e.g. A and conj(A) read through one pointer) become one, run once
        canonical: Dict[tuple, Fetch] = {}
        self.steps = [(m, tuple(canonical.setdefault(_fetch_key(f), f) for f in fs)) for m, fs in self.steps]

    def same_inputs(self, module, pairs: Tuple[Tuple[int, int], ...] = ((0, 1),), *, real: bool = False) -> bool:
        """Whether the inputs the step of ``module`` reads are pairwise the same function of the
        same leaf rows (``pairs``: which inputs; the default, a node of two inputs): each traced
        back through its fetches to the leaf tensors' rows, every node on the way of one type
        and configuration and without tensors of its own. Every cirkit parameter node maps
        fold f of its inputs to its own fold f, so equal traces give equal values and equal
        gradients (``conj(c)·c`` of a real circuit reads the two sides of its inputs and
        their integrals through two pointers to the same rows). ``real``: the caller's values
        are real, so conjugations on the way change nothing (cirkit squares a real c as
        ``conj(c)·c`` too). Decided once."""
        return self.decided(("same inputs", id(module), pairs, real),
                            lambda: self._decide_same_inputs(module, pairs, real))

    def decided(self, key: tuple, decide: Callable[[], object]) -> object:
        """``decide()``, called once per plan and ``key``: a decision about the graph's structure
        (valid until the graph changes, when its plan is rebuilt)."""
        if key not in self._decisions:
            self._decisions[key] = decide()
        return self._decisions[key]

    def _decide_same_inputs(self, module, pairs: Tuple[Tuple[int, int], ...], real: bool) -> bool:
        step = next((i for i, (m, _) in enumerate(self.steps) if m is module), None)
        if step is None:
            return False
        keys = [self._trace(f, np.arange(module.num_folds), module.num_folds) for f in self.steps[step][1]]
        if real:
            keys = [_without_conjugations(k) for k in keys]
        if pairs == ((0, 1),) and len(keys) != 2:
            return False
        return all(max(i, j) < len(keys) and keys[i] is not None and keys[i] == keys[j] for i, j in pairs)

    def _trace(self, fetch: Fetch, rows: np.ndarray, folds: int, depth: int = 0) -> Optional[tuple]:
        """A key of what ``fetch`` (read by a node of ``folds`` folds: one row per fold) gives
        at its rows ``rows``: the leaf rows read and the operations applied to them (None
        where it cannot be traced)."""
        if len(fetch.sources) != 1 or depth > 64:
            return None
        source = fetch.sources[0]
        total = self.leaves[-1 - source].num_folds if source < 0 else self._computed_rows[source]
        read = fetched_rows(fetch, total)
        if read is None or read.size != folds:
            return None
        read = read[rows]
        if source < 0:
            return ("leaf", source, read.tobytes())
        module, fetches = self.steps[source]
        config = getattr(module, "config", None)
        if module is None or config is None or next(module.parameters(recurse=False), None) is not None \
                or next(module.buffers(recurse=False), None) is not None:
            return None  # a node holding tensors of its own is not traced
        parts = tuple(self._trace(f, read, self._computed_rows[source], depth + 1) for f in fetches)
        if not parts or any(part is None for part in parts):
            return None
        return (type(module), repr(config), parts)

    def _distinct_rows(self, fetch: Fetch, computed: List[int]) -> Optional[Tuple[Fetch, np.ndarray]]:
        """For a row-wise node's input ``fetch`` that reads some rows of its one source more than
        once: the fetch of each distinct row once (in order of first reading) and the map from
        the node's rows to them; None where every row is read once (or the rows are unknown)."""
        if len(fetch.sources) != 1:
            return None
        source = fetch.sources[0]
        total = self.leaves[-1 - source].num_folds if source < 0 else computed[source]
        read = fetched_rows(fetch, total)
        if read is None or read.ndim != 1:
            return None
        distinct, first, row_map = np.unique(read, return_index=True, return_inverse=True)
        if distinct.size == read.size:
            return None
        order = np.argsort(first)  # distinct rows in order of first reading
        position = np.empty_like(order)
        position[order] = np.arange(order.size)
        return plan_fetch([source], torch.as_tensor(distinct[order].copy()), [total]), position[row_map.reshape(-1)]

    def _fetch(self, ids, idx, origin, rows_of, computed) -> Fetch:
        """A fetch over the space of materialised outputs: entries computed here occupy
        slots ``0..E-1``; leaf tensors read through pointers occupy slots ``E + leaf``."""
        ids = [int(i) for i in ids]
        if not isinstance(idx, Tensor):
            if any(origin[i][0] == "leaf" or origin[i][2] is not None for i in ids):
                # a slice of a pointer: materialise the pointer's rows as an index
                idx = torch.arange(sum(rows_of[i] for i in ids))[idx]
            else:
                return Fetch("slices", tuple(ids), (), slices=idx)
        shape = tuple(idx.shape)
        flat = idx.detach().cpu().numpy().reshape(-1)
        offsets = np.cumsum([0] + [rows_of[i] for i in ids])
        which = np.searchsorted(offsets, flat, side="right") - 1
        spaces: List[Tuple[str, int]] = []
        rows = np.empty_like(flat)
        for k, (w, r) in enumerate(zip(which, flat - offsets[which])):
            space, slot, leaf_rows = origin[ids[w]]
            if space == "leaf":
                spaces.append(("leaf", slot))
                rows[k] = leaf_rows[r]
            else:
                spaces.append(("own", ids[w]))
                rows[k] = r if leaf_rows is None else leaf_rows[r]  # through the entry's row map
        distinct = list(dict.fromkeys(spaces))
        if len(distinct) == 1:
            space, slot = distinct[0]
            source = slot if space == "own" else -1 - slot  # negative: a leaf tensor
            total = computed[slot] if space == "own" else self.leaves[slot].num_folds
            return plan_fetch([source], torch.as_tensor(rows.reshape(shape)), [total])
        # rows from several tensors: concatenate them (in order of first use) and index
        order = distinct
        sizes = [computed[s] if sp == "own" else self.leaves[s].num_folds for sp, s in order]
        base = dict(zip(order, np.cumsum([0] + sizes[:-1])))
        flat_rows = np.array([base[sp] + r for sp, r in zip(spaces, rows)])
        sources = [s if sp == "own" else -1 - s for sp, s in order]
        return plan_fetch(sources, torch.as_tensor(flat_rows.reshape(shape)), sizes)

    def run(self, module_fn: NodeFunction = evaluate_node) -> Tensor:
        """The graph's output; ``module_fn(node, *inputs)`` evaluates each computing node."""
        outputs: List[Optional[Tensor]] = []
        leaf_values = [_leaf_value(leaf) for leaf in self.leaves]
        view = _Outputs(outputs, leaf_values)
        fetched: Dict[int, Tensor] = {}
        for module, fetches in self.steps:
            inputs = tuple(_once(f, view, fetched) for f in fetches)
            if module is None:
                (out,) = inputs
                return out
            if type(module) is TorchPointerParameter and not fetches:
                outputs.append(None)  # read through the composed fetches, never materialised
                continue
            outputs.append(module_fn(module, *inputs))
        raise RuntimeError("the parameter graph's address book has no output entry")


_UNREAD = object()  # a ParameterPlan's kronecker_reads before they are decided


def _leaf_value(leaf) -> Tensor:
    """``leaf()``; a tensor parameter's tensor read directly (its ``forward`` only returns it,
    and the module call costs more than the rest of a small graph's bookkeeping)."""
    if type(leaf) is TorchTensorParameter:
        value = node_tensor(leaf)
        if value is not None:
            return value
    return leaf()


def _fetch_key(f: Fetch) -> tuple:
    index = None if f.index is None else tuple(f.index.tolist())  # inverse follows from index
    return (f.kind, f.sources, f.shape, f.start, f.length, index, repr(f.slices), f.pieces)


def _once(fetch: Fetch, outputs, fetched: Dict[int, Tensor]) -> Tensor:
    """``fetch(outputs)``, computed once per run: a fetch read twice (equal fetches are one,
    e.g. both sides of ``conj(c)·c``'s integrals read through one pointer) gives one tensor,
    which its readers can recognise as the same value by identity."""
    key = id(fetch)
    if key not in fetched:
        fetched[key] = fetch(outputs)
    return fetched[key]


class _Outputs:
    """Indexable as the fetches expect: ``i >= 0`` an entry's output, ``-1 - j`` leaf ``j``."""

    __slots__ = ("outputs", "leaves")

    def __init__(self, outputs: List[Optional[Tensor]], leaves: List[Tensor]) -> None:
        self.outputs, self.leaves = outputs, leaves

    def __getitem__(self, i: int) -> Tensor:
        return self.leaves[-1 - i] if i < 0 else self.outputs[i]


def cached_plan(cache: "weakref.WeakKeyDictionary", graph, build: Callable):
    """``cache[graph]``, built by ``build(graph)`` the first time and again whenever the
    graph's address book lists other modules than when the plan was built."""
    plan = cache.get(graph)
    if plan is None or plan.signature != module_ids(graph):
        plan = build(graph)
        cache[graph] = plan
    return plan


_PARAMETER_PLANS: "weakref.WeakKeyDictionary[TorchParameter, ParameterPlan]" = weakref.WeakKeyDictionary()


def parameter_plan(parameter: TorchParameter) -> ParameterPlan:
    """The cached plan of a parameter graph (rebuilt if its nodes changed)."""
    return cached_plan(_PARAMETER_PLANS, parameter, ParameterPlan)


def evaluate_parameter(parameter: TorchParameter, module_fn: NodeFunction = evaluate_node) -> Tensor:
    """``parameter()`` through its plan -- or ``parameter.evaluate(module_fn=module_fn)``:
    ``module_fn(node, *inputs)`` evaluates each computing node (overrides should fall back
    to :func:`evaluate_node`). Pointers are never materialised."""
    return parameter_plan(parameter).run(module_fn)


def capture_inputs(parameter: TorchParameter, node_type,
                   module_fn: NodeFunction = evaluate_node) -> Optional[Tuple[Tensor, ...]]:
    """The inputs of the graph's output node when it is a ``node_type`` (e.g. the factors
    of a Kronecker product), evaluated through the plan (the other nodes by ``module_fn``,
    as in :func:`evaluate_parameter`); the node itself is never computed. None for a graph
    whose output is another node."""
    if not parameter.outputs or not isinstance(parameter.outputs[0], node_type):
        return None
    out = parameter.outputs[0]
    captured: dict = {}

    def fn(node, *inputs):
        if node is out:
            captured["inputs"] = inputs
            return inputs[0]  # placeholder: the graph's output is not used
        return module_fn(node, *inputs)

    evaluate_parameter(parameter, fn)
    return captured["inputs"]


def fetched_rows(fetch: Fetch, source_rows: int) -> Optional[np.ndarray]:
    """The source rows a single-source fetch reads, flattened (None for several sources)."""
    if len(fetch.sources) != 1:
        return None
    if fetch.kind == "view":
        return np.arange(source_rows)
    if fetch.kind == "narrow":
        return np.arange(fetch.start, fetch.start + fetch.length)
    if fetch.kind in ("permute", "index"):
        return fetch.index.numpy()
    if fetch.kind == "expand":
        return np.tile(fetch.index.numpy(), fetch.shape[0])
    if fetch.kind == "slices":
        return np.arange(source_rows)[fetch.slices].reshape(-1)
    return None


def is_kronecker_weight(weight: TorchParameter) -> bool:
    """Whether a cirkit weight graph ends in a Kronecker node (W = A ⊗ B)."""
    return bool(weight.outputs) and isinstance(weight.outputs[0], TorchKroneckerParameter)


class KroneckerReads(NamedTuple):
    """How the two factors of a weight graph ``A ⊗ B`` are read from parameter tensors
    (:func:`kronecker_leaf_factors`), decided once per plan: each factor's tensor (a leaf),
    the fetch of its rows and whether it is conjugated; whether both read the same rows of one
    tensor; and the permutation ``(index, inverse)`` both read all rows through, if they do."""

    leaves: Tuple[object, object]
    fetches: Tuple[Fetch, Fetch]
    conjugated: Tuple[bool, bool]
    same_rows: bool
    permutation: Optional[Tuple[Tensor, Tensor]]


def _without_conjugations(key: Optional[tuple]) -> Optional[tuple]:
    """A trace key of :meth:`ParameterPlan._trace` with its conjugation nodes left out."""
    if key is None or key[0] == "leaf":
        return key
    node_type, config, parts = key
    parts = tuple(_without_conjugations(part) for part in parts)
    return parts[0] if node_type is TorchConjugateParameter else (node_type, config, parts)


def kronecker_reads(parameter: TorchParameter) -> Optional[KroneckerReads]:
    """The :class:`KroneckerReads` of a weight graph, built with its plan; None where a factor
    is not rows of a parameter tensor (or the graph is not a Kronecker product)."""
    plan = parameter_plan(parameter)
    if plan.kronecker_reads is _UNREAD:
        found = kronecker_leaf_factors(parameter)
        reads = None
        if found is not None:
            (leaf_a, rows_a, conj_a), (leaf_b, rows_b, conj_b) = found
            fetches = tuple(plan_fetch([0], torch.as_tensor(np.asarray(rows).reshape(-1)), [leaf.num_folds])
                            for leaf, rows, _ in found)
            same = leaf_a is leaf_b and np.array_equal(rows_a, rows_b)
            permuted = all(f.kind == "permute" for f in fetches) and torch.equal(fetches[0].index, fetches[1].index)
            reads = KroneckerReads((leaf_a, leaf_b), fetches, (conj_a, conj_b), same,
                                   (fetches[0].index, fetches[0].inverse) if permuted else None)
        plan.kronecker_reads = reads
    return plan.kronecker_reads


def kronecker_inputs(parameter: TorchParameter) -> Optional[Tuple[Tensor, Tensor]]:
    """``(A, B)`` of a weight graph ``A ⊗ B`` (as :func:`capture_inputs` gives them), read
    straight from the parameter tensors where each factor is (conjugated) rows of one
    (:func:`kronecker_reads`): a view, or a gather where rows move, one gather and one tensor
    for both where they read the same rows (the conjugate of a real tensor is itself) --
    without running the graph (about 20 µs per layer, which a deep chain of small layers pays
    per layer). None for a graph whose output is not a Kronecker node."""
    reads = kronecker_reads(parameter)
    if reads is None:
        found = capture_inputs(parameter, TorchKroneckerParameter)
        if found is not None and found[0] is not found[1] and parameter_plan(parameter).same_inputs(
                parameter.outputs[0], real=not any(t.is_complex() for t in found)):
            return found[0], found[0]  # one function of the same rows (e.g. a softmax of them): one tensor
        return found  # type: ignore[return-value]
    a = reads.fetches[0]([_leaf_value(reads.leaves[0])])
    b = a if reads.same_rows else reads.fetches[1]([_leaf_value(reads.leaves[1])])
    return _conjugated(reads, a, b)


def kronecker_permuted_inputs(parameter: TorchParameter) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Where both factors of a weight graph ``A ⊗ B`` read all rows of their parameter
    tensors through one permutation (a squared circuit's layer reading ``c``'s folds in its
    own order): ``(A', B', index, inverse)`` with ``A = A'[index]`` and ``B = B'[index]``,
    ``A'`` and ``B'`` the tensors in their own order (the same tensor where they read the same
    rows), so that a caller can permute its small operands instead of the weights. None
    otherwise (see :func:`kronecker_reads`)."""
    reads = kronecker_reads(parameter)
    if reads is None or reads.permutation is None:
        return None
    a = _leaf_value(reads.leaves[0])
    b = a if reads.leaves[1] is reads.leaves[0] else _leaf_value(reads.leaves[1])
    return (*_conjugated(reads, a, b), *reads.permutation)


def _conjugated(reads: KroneckerReads, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """The factors with their conjugations; one tensor for both where they are one tensor
    conjugated alike (a real tensor is its own conjugate)."""
    a_out = a.conj() if reads.conjugated[0] else a
    if b is a and (reads.conjugated[0] == reads.conjugated[1] or not a.is_complex()):
        return a_out, a_out
    return a_out, (b.conj() if reads.conjugated[1] else b)


def kronecker_leaf_factors(parameter: TorchParameter):
    """For a weight graph ``A ⊗ B`` whose factors are (conjugated) folds of parameter
    tensors: ``[(leaf, rows, conjugated), (leaf, rows, conjugated)]`` for A and B, where
    fold f of the factor is row ``rows[f]`` of ``leaf`` (a ``TorchTensorParameter``),
    conjugated or not. None for any other graph."""
    if not is_kronecker_weight(parameter):
        return None
    plan = parameter_plan(parameter)
    modules = [m for m, _ in plan.steps]
    out = parameter.outputs[0]
    kron_step = next(((m, fs) for m, fs in plan.steps if m is out), None)
    if kron_step is None or len(kron_step[1]) != 2:
        return None

    def trace(fetch: Fetch, conjugated: bool):
        (source,) = fetch.sources if len(fetch.sources) == 1 else (None,)
        if source is None:
            return None
        if source < 0:
            leaf = plan.leaves[-1 - source]
            rows = fetched_rows(fetch, leaf.num_folds)
            return None if rows is None else (leaf, rows, conjugated)
        node, fetches = modules[source], plan.steps[source][1]
        if isinstance(node, TorchConjugateParameter) and len(fetches) == 1:
            inner = trace(fetches[0], not conjugated)
            rows = fetched_rows(fetch, node.num_folds)
            if inner is None or rows is None:
                return None
            return inner[0], inner[1][rows], inner[2]
        return None

    found = [trace(f, False) for f in kron_step[1]]
    return None if any(f is None for f in found) else found
