"""Fetch plans and parameter graphs evaluated through them equal cirkit's gathers and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cirkit.backend.torch.parameters.nodes import TorchPointerParameter
from cirkit.backend.torch.parameters.parameter import TorchParameter

from adapters.cirkit.plan import evaluate_parameter, parameter_plan, plan_fetch
from adapters.cirkit.internals import pointer_fold_index

from .builders import compile_pair

pytestmark = pytest.mark.usefixtures("float64")

INDICES = {
    "identity": torch.arange(6).view(3, 2),
    "pairs swapped": torch.tensor([[1, 0], [3, 2], [5, 4]]),
    "repeated": torch.tensor([[0, 0], [5, 1], [2, 2]]),
    "one input": torch.tensor([4, 0, 2]),
    "fewer rows": torch.tensor([[0, 1], [2, 3]]),
    "a range": torch.tensor([[2, 3], [4, 5]]),
    "tied": torch.tensor([[4, 1], [4, 1], [4, 1]]),
    "one tied input": torch.tensor([3, 3, 3, 3]),
}
# two sources: only the identity over their concatenation moves nothing
EXPECTED_KIND = {name: ("cat" if name == "identity" else "index") for name in INDICES}


def gather(parts, idx, commutative=False, single=False):
    """The planned fetch of ``cat(parts)[idx]`` (or of ``parts[0][idx]`` with ``single``)."""
    sources = [0] if single else list(range(len(parts)))
    fetch = plan_fetch(sources, idx, [p.shape[0] for p in parts[: len(sources)]], commutative)
    return fetch, fetch(parts)


@pytest.mark.parametrize("commutative", [False, True])
@pytest.mark.parametrize("name", list(INDICES))
def test_gather_equals_cirkits_indexing_with_gradients(name, commutative):
    idx = INDICES[name]
    parts = [torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(2)]
    weights = torch.randn(*idx.shape, 2, 3, generator=torch.Generator().manual_seed(9))
    fetch, got = gather(parts, idx, commutative)
    ref = torch.cat(parts, dim=0)[idx]
    expected = EXPECTED_KIND[name]
    if commutative and name == "pairs swapped":
        expected = "cat"
    assert fetch.kind == expected, (name, fetch.kind)
    if commutative and name == "pairs swapped":  # same inputs per fold, in either order: no move
        assert torch.equal(got.sort(dim=1).values, ref.sort(dim=1).values)
        return
    assert torch.equal(got, ref)
    grads = torch.autograd.grad((got * weights).sum(), parts)
    ref_grads = torch.autograd.grad((ref * weights).sum(), parts)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name,kind", [("identity", "view"), ("fewer rows", "narrow"), ("a range", "narrow"),
                                       ("tied", "expand"), ("one tied input", "expand"), ("pairs swapped", "permute"),
                                       ("repeated", "index")])
def test_one_source_moves_rows_only_when_it_must(name, kind):
    """Views, ranges and tied rows (one parameter for every fold) never copy per fold."""
    t = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(4), requires_grad=True)
    idx = INDICES[name]
    fetch, got = gather([t], idx, single=True)
    ref = t[idx]
    assert fetch.kind == kind and torch.equal(got, ref)
    if kind in ("view", "narrow"):
        assert got.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # no copy
    if kind == "expand":
        assert got.stride(0) == 0  # one copy of the fold's rows, broadcast to every fold
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(torch.autograd.grad((got * probe).sum(), t)[0],
                               torch.autograd.grad((ref * probe).sum(), t)[0], rtol=1e-14, atol=0)


def test_gather_keeps_the_order_for_non_commutative_consumers():
    """A Kronecker product or a sum layer needs its inputs in cirkit's order."""
    t = torch.arange(6.0).view(6, 1)
    _, got = gather([t], INDICES["pairs swapped"], commutative=False)
    assert got[:, :, 0].tolist() == [[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]


def test_slices_pass_through():
    t = torch.randn(3, 2)
    fetch, got = gather([t], (slice(None), None))
    assert fetch.kind == "slices" and torch.equal(got, t[:, None])


@pytest.mark.parametrize("fold", [False, True])
def test_parameter_graphs_equal_cirkits_evaluation(fold):
    """Every parameter graph of a squared circuit and of its partition function: the same
    values as cirkit's evaluation, and the same gradients on the leaf tensors."""
    circuit, partition = compile_pair("quad-tree", "cp", "complex-lse-sum", fold, optimize=False)
    params = [m for c in (circuit, partition) for m in c.modules() if isinstance(m, TorchParameter)]
    pointers = [n for p in params for n in p.nodes if isinstance(n, TorchPointerParameter)]
    # folded: pointers into some folds of a tensor (the index_select path); unfolded: none
    assert any(pointer_fold_index(n) is not None for n in pointers) == fold
    leaves = list(circuit.parameters()) + list(partition.parameters())
    for p in params:
        got, ref = evaluate_parameter(p), p()
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=ref.real.dtype)
        used = [leaf for leaf in leaves if leaf.requires_grad]
        g = torch.autograd.grad((got.real * probe).sum(), used, allow_unused=True)
        r = torch.autograd.grad((ref.real * probe).sum(), used, allow_unused=True)
        for a, b in zip(g, r):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_plans_are_built_once_and_rebuilt_when_the_graph_changes():
    circuit, _ = compile_pair("quad-tree", "cp", "complex-lse-sum", True, optimize=False)
    weight = next(p for m in circuit.modules() if isinstance(m, TorchParameter) for p in [m]
                  if any(isinstance(n, TorchPointerParameter) for n in m.nodes))
    plan = parameter_plan(weight)
    evaluate_parameter(weight)
    assert parameter_plan(weight) is plan  # cached
    plan.signature = ("stale",)  # as if a node had been replaced
    assert parameter_plan(weight) is not plan


def test_a_few_rows_out_of_large_sources_are_never_concatenated(monkeypatch):
    """A deep, narrow circuit's Hadamard layer reads one row of a 40-fold layer and one of
    the previous layer: the fetch stacks just those rows (no cat of the sources)."""
    parts = [torch.randn(10, 3, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(2)]
    idx = torch.tensor([[12, 3]])
    fetch = plan_fetch([0, 1], idx, [10, 10])
    assert fetch.kind == "pieces"
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("sources concatenated"))
    got = fetch(parts)
    monkeypatch.undo()
    ref = torch.cat(parts)[idx]
    assert torch.equal(got, ref)
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    for g, r in zip(torch.autograd.grad((got * probe).sum(), parts), torch.autograd.grad((ref * probe).sum(), parts)):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("idx,kind", [(torch.tensor([[12, 3]]), "pieces"), (torch.tensor([[4, 5]]), "narrow")])
def test_one_fold_inputs_read_apart_are_the_rows_of_the_fetch(idx, kind):
    """``operands``: the H inputs of one fold, each (1, ...), equal to the fetch's rows with
    the same gradients; a one-fold source is passed as it is; other fetches refuse."""
    parts = [torch.randn(10, 3, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(2)]
    parts.append(torch.randn(1, 3, generator=torch.Generator().manual_seed(9), requires_grad=True))
    sources = [0, 1] if kind == "pieces" else [1]
    fetch = plan_fetch(sources, idx, [10] * len(sources))
    assert fetch.kind == kind and fetch.takes_operands
    got = fetch.operands(parts, {})
    ref = fetch(parts)
    assert len(got) == 2 and all(g.shape == (1, 3) for g in got)
    for h in range(2):
        assert torch.equal(got[h], ref[:, h])
    probe = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    for g, r in zip(torch.autograd.grad((got[0] * probe[0] + got[1] * probe[1]).sum(), parts[:2], allow_unused=True),
                    torch.autograd.grad((ref[0] * probe).sum(), parts[:2], allow_unused=True)):
        assert (g is None) == (r is None) and (g is None or torch.equal(g, r))
    one = plan_fetch([2, 0], torch.tensor([[0, 5]]), [1, 10])
    assert one.kind == "pieces" and one.operands(parts, {})[0] is parts[2]
    whole = plan_fetch([0], torch.arange(10).view(5, 2), [10])
    assert not whole.takes_operands
    with pytest.raises(ValueError, match="operands\\(\\) reads a 'pieces' or 'narrow' input of one fold"):
        whole.operands(parts)


@pytest.mark.parametrize("weights_of", ["real", "complex", "real, conjugated"])
@pytest.mark.parametrize("fold", [False, True])
def test_kronecker_factors_read_from_the_parameter_tensors(fold, weights_of):
    """kronecker_inputs reads A and B of every Kronecker weight straight from the leaf tensors
    (views, a permutation, conjugates): the same values and leaf gradients as evaluating the
    graph up to its Kronecker node, one tensor for both where they read the same rows."""
    from cirkit.backend.torch.parameters.nodes import TorchKroneckerParameter

    import cirkit.symbolic.functional as SF

    from adapters.cirkit.plan import capture_inputs, kronecker_inputs, kronecker_leaf_factors, kronecker_reads

    from adapters.cirkit.bench.circuits import digits_squared_circuit

    from .builders import CATEGORIES, complex_circuit, compile_partition

    complex_weights = weights_of == "complex"
    if weights_of != "real":  # |c|² = conj(c)·c: A read conjugated (a no-op on a real tensor), B not
        c = complex_circuit("quad-tree") if complex_weights else \
            digits_squared_circuit(2, image_shape=(4, 4), num_categories=CATEGORIES).circuit
        partition = compile_partition(SF.multiply(SF.conjugate(c), c), "complex-lse-sum", fold)
        circuit = partition
    else:
        circuit, partition = compile_pair("quad-tree", "cp", "complex-lse-sum", fold, optimize=False)
    weights = [m for c in (circuit, partition) for m in c.modules()
               if isinstance(m, TorchParameter) and kronecker_leaf_factors(m) is not None]
    assert weights
    moved, conjugated, shared = set(), set(), 0
    for w in weights:
        got, ref = kronecker_inputs(w), capture_inputs(w, TorchKroneckerParameter)
        moved.update(f.kind for f in kronecker_reads(w).fetches)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        (leaf_a, rows_a, conj_a), (leaf_b, rows_b, conj_b) = kronecker_leaf_factors(w)
        # one tensor for both where they read the same rows and conjugate alike (a real tensor
        # is its own conjugate: a squared real circuit's A = conj(A) = B is one gather)
        same = leaf_a is leaf_b and np.array_equal(rows_a, rows_b) and (conj_a == conj_b or not ref[0].is_complex())
        assert (got[0] is got[1]) == same
        shared += same and conj_a != conj_b
        conjugated.update((conj_a, conj_b))
        leaves = [p for p in w.parameters() if p.requires_grad]
        probe = [torch.randn(t.shape, generator=torch.Generator().manual_seed(5), dtype=t.real.dtype) for t in ref]
        g = torch.autograd.grad(sum((t.real * p).sum() for t, p in zip(got, probe)), leaves)
        r = torch.autograd.grad(sum((t.real * p).sum() for t, p in zip(ref, probe)), leaves)
        for a, b in zip(g, r):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert "permute" in moved if fold else moved <= {"view", "narrow"}
    assert (True in conjugated) == (weights_of != "real")
    assert (shared > 0) == (weights_of == "real, conjugated")  # conj(A) and A of a real tensor: one gather
    plain = next(m for m in circuit.modules() if isinstance(m, TorchParameter) and kronecker_leaf_factors(m) is None
                 and not any(isinstance(n, TorchKroneckerParameter) for n in m.nodes))
    assert kronecker_inputs(plain) is None  # not a Kronecker weight


def test_same_inputs_sees_through_conjugations_only_of_real_values():
    """cirkit squares a real c as conj(c)·c: a Kronecker weight computed from the rows (here a
    softmax of them) reads ``conj(f(w))`` and ``f(w)``. The plan calls them one function only
    when told the values are real (a real tensor is its own conjugate), and kronecker_inputs
    then gives one tensor for both, with cirkit's values and gradients. Two circuits' weights
    are never one function."""
    import cirkit.symbolic.functional as SF
    from cirkit.backend.torch.parameters.nodes import TorchConjugateParameter, TorchKroneckerParameter

    from adapters.cirkit.model import compile_density
    from adapters.cirkit.plan import capture_inputs, kronecker_inputs, kronecker_reads

    from .builders import compile_partition, two_circuits

    c1, c2 = two_circuits("quad-tree", units=(2, 2))
    density = compile_density(c1, seed=0, dtype=torch.float64).density
    weights = [m for m in density.modules() if isinstance(m, TorchParameter) and m.outputs
               and isinstance(m.outputs[0], TorchKroneckerParameter)]
    assert weights
    for w in weights:
        assert kronecker_reads(w) is None and any(isinstance(n, TorchConjugateParameter) for n in w.nodes)
        plan, node = parameter_plan(w), w.outputs[0]
        assert not plan.same_inputs(node) and plan.same_inputs(node, real=True)
        got, ref = kronecker_inputs(w), capture_inputs(w, TorchKroneckerParameter)
        assert got[0] is got[1] and ref[0] is not ref[1]
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
        leaves = [p for p in w.parameters() if p.requires_grad]
        probe = [torch.randn(t.shape, generator=torch.Generator().manual_seed(5), dtype=t.dtype) for t in ref]
        g = torch.autograd.grad(sum((t * p).sum() for t, p in zip(got, probe)), leaves)
        r = torch.autograd.grad(sum((t * p).sum() for t, p in zip(ref, probe)), leaves)
        for a, b in zip(g, r):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    apart = compile_partition(SF.multiply(c1, c2), "lse-sum", True)
    two = [m for m in apart.modules() if isinstance(m, TorchParameter) and m.outputs
           and isinstance(m.outputs[0], TorchKroneckerParameter)]
    assert two and not any(parameter_plan(w).same_inputs(w.outputs[0], real=True) for w in two)


@pytest.mark.parametrize("inputs", ["categorical", "Gaussian"])
def test_row_wise_nodes_compute_each_row_they_read_once(inputs):
    """conj(c)·c reads each input parameter of c on both sides: the row-wise nodes on the way
    (softmax, log, scaled sigmoid) fetch every row twice. The plan computes each distinct row
    once and its readers fetch through the map of rows, so the two sides of the outer sum (the
    Gaussian product) read one fetch. The values and leaf gradients equal cirkit's evaluation,
    in Z and at data."""
    from cirkit.backend.torch.layers import TorchInputLayer
    from cirkit.backend.torch.parameters.nodes import TorchEntrywiseParameterOp, TorchReduceParameterOp

    from adapters.cirkit.model import compile_density
    from adapters.cirkit.plan import fetched_rows

    from .builders import gaussian_base, two_circuits

    c = two_circuits("quad-tree", units=(3, 3))[0] if inputs == "categorical" else gaussian_base()
    model = compile_density(c, seed=0, dtype=torch.float64, semiring="complex-lse-sum")
    graphs = [g for circuit in (model.density, model.partition) for layer in circuit.layers
              if isinstance(layer, TorchInputLayer) for g in layer.params.values()]
    deduplicated = 0
    for graph in graphs:
        plan = parameter_plan(graph)
        for module, fetches in plan.steps:
            if isinstance(module, (TorchEntrywiseParameterOp, TorchReduceParameterOp)):
                (fetch,) = fetches
                source = fetch.sources[0]
                total = plan.leaves[-1 - source].num_folds if source < 0 else plan._computed_rows[source]
                read = fetched_rows(fetch, total)
                assert np.unique(read).size == read.size  # every row computed once
                deduplicated += read.size < module.num_folds
        binary = [fetches for module, fetches in plan.steps if module is not None and len(fetches) >= 2]
        assert all(fetches[0] is fetches[-2 if len(fetches) == 4 else 1] for fetches in binary)  # one fetch per pair
        got, ref = evaluate_parameter(graph), graph()
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        leaves = [p for p in graph.parameters() if p.requires_grad]
        probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=ref.real.dtype)
        g = torch.autograd.grad((got.real * probe).sum(), leaves)
        r = torch.autograd.grad((ref.real * probe).sum(), leaves)
        for a, b in zip(g, r):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert deduplicated > 0
