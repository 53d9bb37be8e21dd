"""Every access to cirkit's private internals, in one module.

cirkit (PyPI ``libcirkit``) 0.3.1 has no public API for a few things the adapter
needs: walking a compiled circuit's (or parameter graph's) fold bookkeeping, reading
the unit layout of its optimised layers, the semiring of a pipeline context, and
replacing layers inside a compiled circuit. Those reads and writes live here and
nowhere else, so an upgrade of cirkit means auditing this file only. Each function
names the private attribute it touches.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from torch import Tensor

from cirkit.backend.torch.circuits import TorchCircuit
from cirkit.backend.torch.layers import TorchLayer
from cirkit.backend.torch.layers.optimized import TorchTensorDotLayer, TorchTuckerLayer
from cirkit.backend.torch.parameters.nodes import TorchPointerParameter
from cirkit.backend.torch.parameters.parameter import TorchParameter
from cirkit.pipeline import PipelineContext

TESTED_CIRKIT = "0.3.1"


class BookEntry(NamedTuple):
    """One step of cirkit's evaluation order: ``module`` (None for the output entry)
    reads the outputs of ``in_module_ids`` gathered by ``in_fold_idx`` (one fold-index
    tensor, or cirkit's tuple of slices, per input group)."""

    module: Optional[object]
    in_module_ids: Sequence[Sequence[int]]
    in_fold_idx: Sequence[object]


def address_book(graph) -> Iterator[BookEntry]:
    """The evaluation order of a compiled circuit or parameter graph (``_address_book``)."""
    for entry in graph._address_book:  # noqa: SLF001
        yield BookEntry(entry.module, entry.in_module_ids, entry.in_fold_idx)


def module_ids(graph) -> Tuple[int, ...]:
    """``id`` of the module of every address-book entry, in order (``_entry_modules``): a
    graph's identity for plan caches, read without building the entries."""
    return tuple(map(id, graph._address_book._entry_modules))  # noqa: SLF001


def pointer_fold_index(node: TorchPointerParameter) -> Optional[Tensor]:
    """The folds a pointer parameter reads from its target (``_fold_idx``), None for all."""
    return node._fold_idx  # noqa: SLF001


def tensordot_units(layer: TorchTensorDotLayer) -> Tuple[int, int]:
    """(contracted units Kj, batch units Kq) of a tensor-dot layer
    (``_num_contract_units``, ``_num_batch_units``)."""
    return layer._num_contract_units, layer._num_batch_units  # noqa: SLF001


def tucker_subscripts(layer: TorchTuckerLayer) -> Tuple[List, List, List]:
    """The Tucker layer's einsum in interleaved form (``_einsum``): input subscripts
    (one list per input), the weight's, the output's."""
    *in_subs, w_sub, out_sub = layer._einsum  # noqa: SLF001
    return [list(s) for s in in_subs], list(w_sub), list(out_sub)


def context_semiring(ctx: PipelineContext):
    """The semiring class a pipeline context compiles with (``_compiler.semiring``)."""
    return ctx._compiler.semiring  # noqa: SLF001


def replace_layers(circuit: TorchCircuit, mapping: Dict[TorchLayer, TorchLayer]) -> None:
    """Install ``new`` for ``old`` everywhere a compiled circuit refers to a layer.

    A compiled circuit refers to a layer from its module list (``_nodes``, which
    registers the parameters), its adjacency maps (``_in_nodes``, ``_out_nodes``), its
    outputs (``_outputs``) and its address book (``_address_book._entry_modules``, which
    drives evaluation). Fold indices are untouched: each new layer must have the old
    one's folds, units and unit order.
    """
    if not mapping:
        return
    for old, new in mapping.items():
        if (new.num_folds, new.num_output_units) != (old.num_folds, old.num_output_units):
            raise ValueError(f"replacement for {type(old).__name__} has a different fold/unit layout")

    def sub(m):
        return mapping.get(m, m)

    nodes = circuit._nodes  # noqa: SLF001
    for i, module in enumerate(list(nodes)):
        if module in mapping:
            nodes[i] = mapping[module]
    circuit._in_nodes = {sub(k): [sub(m) for m in v] for k, v in circuit._in_nodes.items()}  # noqa: SLF001
    circuit._out_nodes = {sub(k): [sub(m) for m in v] for k, v in circuit._out_nodes.items()}  # noqa: SLF001
    circuit._outputs = [sub(m) for m in circuit._outputs]  # noqa: SLF001
    book = circuit._address_book  # noqa: SLF001
    book._entry_modules = [sub(m) if m is not None else None for m in book._entry_modules]  # noqa: SLF001



def node_tensor(node) -> Tensor:
    """The tensor a parameter-graph leaf holds (``_ptensor``): its trainable values."""
    return node._ptensor  # noqa: SLF001


def leaf_tensors(parameter: TorchParameter) -> List[Tensor]:
    """The tensors held by the leaves of a parameter graph, in node order."""
    return [node_tensor(n) for n in parameter.nodes if hasattr(n, "_ptensor")]


def entry_modules(circuit: TorchCircuit) -> List[Optional[TorchLayer]]:
    """The layer of every address-book entry, in evaluation order (``_entry_modules``)."""
    return list(circuit._address_book._entry_modules)  # noqa: SLF001


def integrate_query_mask(module_fn) -> Optional[Tensor]:
    """The (B, D) mask of a cirkit ``IntegrateQuery`` evaluation, if ``module_fn`` is the
    query's layer function (``IntegrateQuery._layer_fn`` bound to ``integrate_vars_mask``);
    else None."""
    import functools

    from cirkit.backend.torch.queries import IntegrateQuery

    if isinstance(module_fn, functools.partial) and module_fn.func is IntegrateQuery._layer_fn:  # noqa: SLF001
        return module_fn.keywords.get("integrate_vars_mask")
    return None
