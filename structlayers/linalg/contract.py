"""Tensor networks contracted pair by pair: orders searched with opt_einsum, their cost, their execution.

A network is a list of operands, each named by einsum subscripts (one letter per index),
and the subscripts of the result. It is contracted by a sequence of pairwise steps (a
contraction tree); the order matters enormously (a tensor-train forward can cost 10x more
multiply-adds in one order than in another), and finding a good one is a well-studied
search that ``opt_einsum`` performs (``optimal`` for a few operands, ``dp`` beyond).

Cost. A pairwise step with index sets A and B costs prod(size of every index in A ∪ B)
multiply-adds: one per combination of its indices, whether an index is contracted, shared
(a batch index, such as the fold) or free. :func:`plan` returns the searched order with
that count (and the size of its largest intermediate), so a layer can report exactly
what its forward does.

Execution. Each step runs as one ``torch.einsum`` of two operands, which torch turns
into a single batched GEMM. A step that contracts no index (an outer or Hadamard
product, e.g. CP factors sharing their rank index, or one contracting only indices of
size 1) runs as a matmul with an inner dimension of 1 instead: ``torch.einsum`` would use
an elementwise product there, which torch's FLOP counter does not see, and the count
above would no longer be checkable.
:func:`contract` evaluates a plan, optionally in batch chunks: steps that do not depend
on the chunked operand (products of weight factors) run once, the others once per chunk.
Everything is differentiable.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import opt_einsum
import torch

#: the exhaustive ``optimal`` search is used up to this many operands, ``dp`` beyond.
OPTIMAL_MAX_OPERANDS = 6
#: a batched GEMM whose smallest dimension (rows, columns or inner) is below this runs at
#: about that dimension / GEMM_FULL_SPEED of full speed (many small products, or too few
#: multiply-adds per element read): :func:`gemm_work` weighs its multiply-adds accordingly.
GEMM_FULL_SPEED = 64


def gemm_work(macs: int, rows: int, inner: int, cols: int) -> int:
    """The cost model's weight of a (batched) GEMM: its multiply-adds, scaled up by
    GEMM_FULL_SPEED / min(rows, inner, cols) when that is below 1."""
    return macs * max(1.0, GEMM_FULL_SPEED / max(1, min(rows, inner, cols)))


@dataclass(frozen=True)
class Step:
    """One pairwise contraction: nodes ``left`` and ``right`` (ids: inputs 0..n-1, then one
    new id per step) into a new node with subscripts ``result``."""

    left: int
    right: int
    equation: str
    result: str
    macs: int
    outer: bool
    copied: int = 0  # elements of the operands permuted into the GEMM's layout first
    work: float = 0.0  # the cost model's weight of its multiply-adds (see gemm_work)


@dataclass(frozen=True)
class Plan:
    """A contraction order with its multiply-adds, largest intermediate, traffic (elements
    written: every step's result, the operands it must permute into the batched GEMM's
    layout, and the output once more for its final layout) and operator calls (two per step:
    the copy and the product)."""

    inputs: Tuple[str, ...]
    output: str
    steps: Tuple[Step, ...]
    macs: int
    peak: int
    traffic: int

    @property
    def calls(self) -> int:
        return 2 * len(self.steps)

    @property
    def work(self) -> float:
        return sum(s.work for s in self.steps)


def _sizes_dict(sizes: Tuple[Tuple[str, int], ...]) -> Dict[str, int]:
    return dict(sizes)


def _copied(ls: str, rs: str, needed, sizes: Dict[str, int]) -> int:
    """Elements of the operands that a batched GEMM with ``ls`` on the left must copy: the left
    wants its indices as (shared, free, contracted), the right as (shared, contracted, free)."""
    def groups(s: str, other: str, contracted_last: bool):
        shared = [c for c in s if c in other and c in needed]
        contracted = [c for c in s if c in other and c not in needed]
        free = [c for c in s if c not in other]
        return shared + (free + contracted if contracted_last else contracted + free)

    total = 0
    for s, other, last in ((ls, rs, True), (rs, ls, False)):
        if list(s) != groups(s, other, last):
            total += math.prod(sizes[c] for c in s)
    return total


def steps_from_pairs(inputs: Sequence[str], output: str, sizes: Dict[str, int],
                     pairs: Sequence[Tuple[int, int]]) -> Tuple[Tuple[Step, ...], int, int]:
    """Steps, total multiply-adds and peak size of contracting ``inputs`` in the order
    ``pairs`` (opt_einsum's linear format: positions in the shrinking operand list, the
    result appended at the end)."""
    live: List[Tuple[int, str]] = list(enumerate(inputs))  # (node id, subscripts)
    next_id = len(inputs)
    steps: List[Step] = []
    total, peak = 0, 0
    for i, j in pairs:
        (li, ls), (ri, rs) = live[i], live[j]
        for pos in sorted((i, j), reverse=True):
            live.pop(pos)
        needed = set(output).union(*(s for _, s in live))
        if _copied(rs, ls, needed, sizes) < _copied(ls, rs, needed, sizes):
            (li, ls), (ri, rs) = (ri, rs), (li, ls)
        copied = _copied(ls, rs, needed, sizes)
        union = ls + "".join(c for c in rs if c not in ls)
        if not live:
            result = output
        else:  # the batched GEMM's own layout: shared, then the left's free, then the right's free
            shared = [c for c in ls if c in rs and c in needed]
            result = "".join(shared + [c for c in ls if c not in rs and c in needed]
                             + [c for c in rs if c not in ls and c in needed])
        macs = math.prod(sizes[c] for c in union)
        contracted = [c for c in union if c not in result]
        if any(sizes[c] > 1 for c in contracted if not (c in ls and c in rs)):
            raise ValueError(f"index summed within one operand in step {ls},{rs}->{result}")
        outer = all(sizes[c] == 1 for c in contracted)
        rows = math.prod(sizes[c] for c in ls if c not in rs)
        cols = math.prod(sizes[c] for c in rs if c not in ls)
        inner = math.prod(sizes[c] for c in contracted)
        work = macs if outer else gemm_work(macs, rows, inner, cols)  # outer steps: memory-bound, in traffic
        steps.append(Step(li, ri, f"{ls},{rs}->{result}", result, macs, outer, copied, work))
        total += macs
        peak = max(peak, math.prod(sizes[c] for c in result))
        live.append((next_id, result))
        next_id += 1
    if len(live) != 1:
        raise ValueError(f"the pairs {tuple(pairs)} leave {len(live)} operands uncontracted")
    return tuple(steps), total, peak


@functools.lru_cache(maxsize=1024)
def plan(inputs: Tuple[str, ...], output: str, sizes: Tuple[Tuple[str, int], ...],
         memory_limit: Optional[int] = None) -> Plan:
    """The cheapest pairwise order found by opt_einsum for ``inputs -> output``.

    sizes: (index, size) pairs. memory_limit: largest intermediate allowed (elements);
    when no pairwise order fits it, the search is repeated without it (the returned
    ``peak`` says what the order needs). Cached per argument tuple.
    """
    size_of = _sizes_dict(sizes)
    if len(inputs) == 1:
        size = math.prod(size_of[c] for c in output)
        return Plan(inputs, output, (), 0, size, size)
    equation = ",".join(inputs) + "->" + output
    shapes = [tuple(size_of[c] for c in s) for s in inputs]
    method = "optimal" if len(inputs) <= OPTIMAL_MAX_OPERANDS else "dp"
    pairs, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=method,
                                        memory_limit=memory_limit)
    if any(len(p) != 2 for p in pairs):  # no pairwise order within the limit
        pairs, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=method)
    steps, macs, peak = steps_from_pairs(inputs, output, size_of, [tuple(p) for p in pairs])
    # every result is written once, the operands a step must permute are copied once more,
    # and the final result usually once more into the caller's layout
    traffic = sum(math.prod(size_of[c] for c in s.result) + s.copied for s in steps)
    traffic += math.prod(size_of[c] for c in output)
    return Plan(tuple(inputs), output, steps, macs, peak, traffic)


def _outer(equation: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A step without a contracted index, as a matmul with inner dimension 1."""
    operands, result = equation.split("->")
    ls, rs = operands.split(",")
    shared = [c for c in ls if c in rs]
    left_only = [c for c in ls if c not in rs]
    right_only = [c for c in rs if c not in ls]
    sizes = dict(zip(ls, a.shape))
    sizes.update(zip(rs, b.shape))
    batch = [sizes[c] for c in shared]
    n_left = math.prod(sizes[c] for c in left_only)
    n_right = math.prod(sizes[c] for c in right_only)
    a2 = a.permute([ls.index(c) for c in shared + left_only]).reshape(*batch, n_left, 1)
    b2 = b.permute([rs.index(c) for c in shared + right_only]).reshape(*batch, 1, n_right)
    # indices of size 1 that the step contracts are dropped by the reshape
    order = [c for c in shared + left_only + right_only if c in result]
    out = torch.matmul(a2, b2).reshape([sizes[c] for c in order])
    return out.permute([order.index(c) for c in result])


def _run(step: Step, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if step.outer:
        return _outer(step.equation, a, b)
    return torch.einsum(step.equation, a, b)


def contract_dense(inputs: Sequence[str], output: str, operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.einsum`` of ``operands`` in the cheapest pairwise order, counted as :func:`plan` counts."""
    sizes = {}
    for subs, op in zip(inputs, operands):
        sizes.update(zip(subs, op.shape))
    return contract(plan(tuple(inputs), output, tuple(sorted(sizes.items()))), operands)


def contract(p: Plan, operands: Sequence[torch.Tensor], *, chunk: Optional[Tuple[int, str, int]] = None
             ) -> torch.Tensor:
    """Evaluate plan ``p`` on ``operands`` (in the order of ``p.inputs``).

    chunk: (operand position, index letter, chunk length): split that operand along that
    index into chunks of at most that length; the steps that do not depend on it run once,
    the others per chunk, and the results are concatenated along the index in the output.
    The multiply-adds are the same either way.
    """
    if not p.steps:
        return torch.einsum(f"{p.inputs[0]}->{p.output}", operands[0])
    if chunk is None:
        values: Dict[int, torch.Tensor] = dict(enumerate(operands))
        next_id = len(operands)
        for step in p.steps:
            values[next_id] = _run(step, values.pop(step.left), values.pop(step.right))
            next_id += 1
        return values[next_id - 1]

    position, letter, length = chunk
    n = len(operands)
    dependent = {position}
    for t, step in enumerate(p.steps):
        if step.left in dependent or step.right in dependent:
            dependent.add(n + t)
    fixed: Dict[int, torch.Tensor] = {i: op for i, op in enumerate(operands) if i != position}
    for t, step in enumerate(p.steps):
        if n + t not in dependent:
            fixed[n + t] = _run(step, fixed[step.left], fixed[step.right])
    axis_in = p.inputs[position].index(letter)
    axis_out = p.output.index(letter)
    parts = []
    for part in torch.split(operands[position], length, dim=axis_in):
        values = {position: part}
        for t, step in enumerate(p.steps):
            if n + t in dependent:
                a = values[step.left] if step.left in dependent else fixed[step.left]
                b = values[step.right] if step.right in dependent else fixed[step.right]
                values[n + t] = _run(step, a, b)
        parts.append(values[n + len(p.steps) - 1])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis_out)


def dependent_peak(p: Plan, sizes: Dict[str, int], position: int) -> int:
    """Largest intermediate (elements) among the steps that depend on operand ``position``."""
    n = len(p.inputs)
    dependent = {position}
    peak = 0
    for t, step in enumerate(p.steps):
        if step.left in dependent or step.right in dependent:
            dependent.add(n + t)
            peak = max(peak, math.prod(sizes[c] for c in step.result))
    return peak


__all__ = ["GEMM_FULL_SPEED", "gemm_work", "OPTIMAL_MAX_OPERANDS", "Plan", "Step", "contract", "contract_dense", "dependent_peak", "plan", "steps_from_pairs"]
