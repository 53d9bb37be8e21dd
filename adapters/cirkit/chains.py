"""Deep chains of one-fold layers evaluated as one autograd node.

A deep, narrow circuit (a linear tree: one fold per layer, tens of layers) spends most of
its time in ``Z`` around its products, not in them: per layer a Hadamard product, a sum
layer's two (or, through a low-rank factor, four) matrix products on one ``K x K`` block,
one measurement of its largest entry -- each a separate autograd node and several Python
calls, while the products themselves take microseconds at K = 128. Where such layers
follow each other -- a product of one fold whose only consumer is a sum layer of one
fold, whose only consumer is the next such product -- the evaluator
(:meth:`~adapters.cirkit.linear_space.CircuitPlan.run`) applies the whole run of them
here: one forward that computes exactly what the layer rules compute, in the same order
(so the values are the same to the last bit), and one hand-written backward that replays
the links in reverse on the saved blocks without the autograd engine between them.

A link is ``X_{k+1} = normalise(A_k (O_k1 ∘ … ∘ X_k ∘ …) B_kᵀ)``: the product of the
chain's value ``X_k`` with operands ``O_kj`` read from outside the chain (the first link
has outside operands only), then the sum layer's map as one Kronecker product of chains
of matrices (``kronecker_chain()`` of the layer), then the rescaling of
:func:`~adapters.cirkit.scaling.normalise` (the product is measured at the sum's output).

Through the inner units (:func:`_inner_chain`). Where every sum layer's map is ``L R``
per side through ``r < K`` inner units (a low-rank square) and every later link's outside
operand comes as thin factors ``Φ Ψᵀ`` of rank V (the integrals of a categorical input
over V categories), the chain never needs its ``K x K`` blocks: with ``X = L M L'ᵀ`` the
previous link's output, the next one's inner block is

    R (X ∘ Φ Ψᵀ) R'ᵀ = Σ_v (R diag(φ_v) L) M (R' diag(ψ_v) L')ᵀ = Σ_v P_v M Q_vᵀ,

an ``r x r`` recurrence whose operators ``P_v``, ``Q_v`` are computed for all links at
once (one batched product each). Per link that is ``V·(2·K·r² + 2·r³)`` multiply-adds
where the blocks take ``K² + 2·K²·r + 2·K·r²`` and several passes over ``K²`` entries:
the transfer-matrix contraction of a tensor train, here of a low-rank squared circuit.
Only the first link's input and the last link's output are ``K x K`` blocks.
"""

from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from structlayers.linalg.kron import (block_chain_backward, block_chain_forward, khatri_rao, kron_chain_flops, kron_steps,
                                     same_matrices, symmetric_square)

from .scaling import Scaled, _flush_limit, _Unmeasured, normalise, rescale, undivided

__all__ = ["ChainLink", "OperandFactors", "run_chain", "may_run_inner", "inner_map", "CHAIN_MIN_LINKS"]

#: Runs shorter than this are left to the layer rules (a chain saves per-layer overhead).
CHAIN_MIN_LINKS = 2


class ChainLink(NamedTuple):
    """One product -> sum pair of a chain, as the plan finds it: the step numbers, where the
    previous link's output enters the product (its position among the product's operands;
    None for the first link), and the (source step, row) of each other operand."""

    product: int
    total: int
    carried: Optional[int]
    outside: Tuple[Tuple[int, int], ...]


class _Link(NamedTuple):
    """A link's tensors at run time: the outside operands (1, 1, Ki) and their scales (1, 1),
    the sum layer's matrices in the order applied and the side of each (:func:`kron_steps`),
    the shapes of its input and output blocks (Ki = p·q, Ko = a1·b1), where the chain's
    value enters the product, and whether the backward may take the map as symmetric."""

    operands: List[Tensor]
    scales: List[Tensor]
    sides: Tuple[str, ...]
    mats: List[Tensor]
    shape: Tuple[int, int]
    out_shape: Tuple[int, int, int]
    carried: Optional[int]
    symmetric: bool  # the product is a symmetric block and the map A P Aᵀ (one real square A)


class OperandFactors(NamedTuple):
    """An outside operand given as thin factors: row ``row`` of ``left @ rightᵀ · e^s`` with
    left (F, Ki, V), right (F, Kj, V), s (F, 1) (a constant input's integrals, one block per
    fold). Rows of one source share one read (:func:`_inner_chain`)."""

    left: Tensor
    right: Tensor
    s: Tensor
    row: int


def run_chain(links: Sequence[Tuple[ChainLink, List[Scaled], object, bool]],
              factors: Optional[Sequence[Sequence[Optional[OperandFactors]]]] = None) -> Optional[Scaled]:
    """The last sum's output ``(v (1, 1, Ko), s (1, 1))`` of a chain, from each link's plan
    entry, its outside operands ``(v, s)`` (in the product's order, the carried one left
    out), its sum layer, and whether those operands are symmetric blocks (then, where the
    chain's value is too and the layer applies one real square matrix on both sides, the
    link's backward spares a product: :func:`~structlayers.linalg.kron.block_chain_backward`).
    ``factors``: per link, per outside operand, its thin factors where it has them (then the
    chain may run through the layers' inner units, :func:`_inner_chain`; an operand given
    only as factors has ``v`` None). None where the chain does not apply to these tensors
    (a layer with no single Kronecker term, mixed dtypes, more than one fold or sample,
    scales that carry gradients, an operand missing its values): the caller then evaluates
    the layers one by one."""
    if factors is not None:
        plan = _inner_links(links, factors)
        if plan is not None:
            taken = plan.taken
            out = _inner_chain(links[:taken], factors[:taken], plan)
            if taken == len(links):
                return out
            # the rest as blocks, the first of them reading this output as an outside operand
            link, operands, layer, _ = links[taken]
            links = [(link._replace(carried=None), _with_carried(operands, link.carried, out), layer, False),
                     *links[taken + 1:]]
    if any(v is None for _, operands, _, _ in links for v, _ in operands):
        return None
    prepared: List[_Link] = []
    dtype = None
    carried_symmetric = True  # the first link has no carried value
    for link, operands, layer, operands_symmetric in links:
        chain = layer.kronecker_chain()
        if chain is None:
            return None
        sides, mats = kron_steps(*chain)
        values = [v for v, _ in operands]
        scales = [s for _, s in operands]
        for t in (*values, *mats):
            dtype = t.dtype if dtype is None else dtype
            if t.dtype != dtype:
                return None
        if any(v.shape[:2] != (1, 1) for v in values) or any(m.shape[0] != 1 for m in mats) \
                or any(s.requires_grad for s in scales):
            return None
        shape = (chain[0][-1].shape[-1], chain[1][-1].shape[-1])
        if any(v.shape[-1] != shape[0] * shape[1] for v in values):
            return None
        out_shape = (1, chain[0][0].shape[-2], chain[1][0].shape[-2])
        symmetric = operands_symmetric and carried_symmetric and symmetric_square(sides, mats)
        carried_symmetric = symmetric  # A P Aᵀ of a symmetric P
        prepared.append(_Link(values, scales, sides, mats, shape, out_shape, link.carried, symmetric))
    tensors = [t for link in prepared for t in (*link.operands, *link.mats)]
    v, s = _DeepChain.apply(prepared, *tensors)
    return v, s


def _with_carried(operands: List[Tensor], carried: Optional[int], value: Optional[Tensor]) -> List[Tensor]:
    """The product's operands in its own order: the chain's value at position ``carried``."""
    if carried is None:
        return list(operands)
    return [*operands[:carried], value, *operands[carried:]]


class _DeepChain(torch.autograd.Function):
    """The links of a chain (:func:`run_chain`) in one node. Forward: per link the same
    operations as the layer rules (``_hadamard`` unmeasured, then ``_structured`` with
    :func:`~adapters.cirkit.scaling.normalise` after an unmeasured product), raising
    :class:`~adapters.cirkit.scaling._Unmeasured` where they would. Backward: per link in
    reverse, the rescaling's factor, the matrix chain's backward
    (:func:`~structlayers.linalg.kron.block_chain_backward`) and the product's (each
    operand's gradient the others' product, conjugated for complex values)."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, links: List[_Link], *tensors: Tensor) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        value: Optional[Tensor] = None
        scale: Optional[Tensor] = None
        saved: List[Tensor] = []
        divisors: List[object] = []
        for link in links:
            operands = _with_carried(link.operands, link.carried, value)
            scales = _with_carried(link.scales, link.carried, scale)
            product = functools.reduce(torch.mul, operands)
            scale = functools.reduce(torch.add, scales)
            block, inputs = block_chain_forward(product.reshape(1, *link.shape), link.sides, link.mats)
            # normalise after an unmeasured product, keeping the divisor for the backward
            value, scale, divisor = rescale(block.reshape(1, 1, -1), scale, after_unmeasured=True)
            divisors.append(divisor)
            saved.extend(operands)  # with the chain's value: the product's backward reads it
            saved.extend(inputs)
        ctx.links, ctx.divisors = links, divisors
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(scale)
        return value, scale

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_scale: Optional[Tensor]):  # type: ignore[override]
        links: List[_Link] = ctx.links
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]  # per tensor given to apply, after the links
        grads: List[Optional[Tensor]] = [None] * len(needs)
        # each link's saved tensors (its product's operands, then its blocks) and inputs
        saved_at, input_at = [0], [0]
        for link in links:
            saved_at.append(saved_at[-1] + len(link.operands) + (link.carried is not None) + len(link.mats))
            input_at.append(input_at[-1] + len(link.operands) + len(link.mats))
        g: Optional[Tensor] = grad
        for k in reversed(range(len(links))):
            link, divisor = links[k], ctx.divisors[k]
            if g is None:  # nothing earlier needs a gradient
                break
            g = undivided(g, divisor)
            arity = len(link.operands) + (link.carried is not None)
            operands = saved[saved_at[k]:saved_at[k] + arity]
            inputs = saved[saved_at[k] + arity:saved_at[k + 1]]
            first, mats_first = input_at[k], input_at[k] + len(link.operands)
            # the chain's value leads back to earlier links (their operands and matrices)
            operand_needs = _with_carried(list(needs[first:mats_first]), link.carried, k > 0)
            g_block, g_mats = block_chain_backward(g.reshape(link.out_shape), link.sides, link.mats, inputs,
                                                   any(operand_needs), needs[mats_first:input_at[k + 1]],
                                                   link.symmetric)
            grads[mats_first:input_at[k + 1]] = g_mats
            g = None
            if g_block is None:
                continue
            g_product = g_block.reshape(1, 1, -1)
            outside = first
            for h, operand in enumerate(operands):
                if operand_needs[h]:
                    other = functools.reduce(torch.mul, [o for i, o in enumerate(operands) if i != h])
                    g_h = g_product * (other.conj() if other.is_complex() else other)
                    if h == link.carried:
                        g = g_h
                    else:
                        grads[outside] = g_h
                if h != link.carried:
                    outside += 1
        return (None, *grads)


# ------------------------------------------------------------------ through the inner units
def _rows(tensors: Sequence[Tensor], rows: Sequence[int]) -> Tensor:
    """Row ``rows[k]`` of ``tensors[k]`` for every k, stacked: one ``index_select`` where they
    are rows of one tensor (one gradient for it in the backward instead of one per row)."""
    if all(t is tensors[0] for t in tensors):
        return tensors[0].index_select(0, torch.tensor(list(rows), device=tensors[0].device))
    return torch.cat([t[r:r + 1] for t, r in zip(tensors, rows)])


def _transfer_operators(outer: Tensor, phi: Tensor, inner: Tensor) -> Tensor:
    """``P_v = R diag(φ_v) L`` per link and category, side by side: outer R (N, r, K), phi
    (N, K, V), inner L (N, K, r') -> (N, r, V·r'), ``[i, v·r' + j] = P_v[i, j]``. One batched
    product of R with the V scaled copies of L (the thin side scaled: a broadcast product over
    R's rows was measured 1-4 ms against 0.2 at 37 links, K=256, r=64)."""
    n, k, r = inner.shape
    scaled = (phi.unsqueeze(-1) * inner.unsqueeze(2)).reshape(n, k, -1)  # (N, K, V·r'): [φ_1 L, …, φ_V L]
    return torch.bmm(outer, scaled)


def _stacked(side_a: Sequence[Tensor], side_b: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Both sides' matrices of the links, each concatenated over the links; once where the
    sides are the same tensors (a real square's ``S`` on both sides)."""
    a = torch.cat(side_a)
    return a, a if same_matrices(side_a, side_b) else torch.cat(side_b)


def _per_category(t: Tensor, rank: int) -> Tensor:
    """(N, r, V·r') of :func:`_transfer_operators` -> (N, V, r, r'), a view."""
    n, r, _ = t.shape
    return t.view(n, r, rank, -1).transpose(1, 2)


def inner_map(layer) -> Optional[Tuple[List[Tensor], List[Tensor]]]:
    """A layer's map as ``(L_a, R_a), (L_b, R_b)`` through fewer inner units than it maps on
    each side (``kronecker_chain`` of two matrices per side), else None (also for a layer
    without ``kronecker_chain``)."""
    chain = layer.kronecker_chain() if hasattr(layer, "kronecker_chain") else None
    if chain is None or any(len(side) != 2 or side[0].shape[-1] >= side[0].shape[-2] for side in chain):
        return None
    return chain


def may_run_inner(layers: Sequence[object]) -> bool:
    """Whether a chain of these sum layers (in order) may run through their inner units
    (:func:`_inner_links`): its first two layers have inner maps. A property of the layers'
    structure, decided when the plan is built: only such a chain reads its operands as
    factors, so only its operands stay factored (the others are multiplied out once, as
    the layer rules read them)."""
    with torch.no_grad():
        return len(layers) >= 2 and all(inner_map(layer) is not None for layer in layers[:2])


def _row(t: Tensor, row: int) -> Tensor:
    return t[row:row + 1]


class _InnerPlan(NamedTuple):
    """What :func:`_inner_chain` takes of a chain: the inner maps of its first links, a
    one-matrix map ``(A, B)`` per side ending the run (or None), and whether the first
    link's operands are read as factors (their block never multiplied out)."""

    maps: List[Tuple[List[Tensor], List[Tensor]]]
    last: Optional[Tuple[Tensor, Tensor]]
    first_factored: bool

    @property
    def taken(self) -> int:
        return len(self.maps) + (self.last is not None)


def _inner_links(links: Sequence[Tuple[ChainLink, List[Scaled], object, bool]],
                 factors: Sequence[Sequence[Optional[OperandFactors]]]) -> Optional[_InnerPlan]:
    """Which leading links :func:`_inner_chain` takes: at least two whose layers have inner
    maps (:func:`inner_map`) of the first's shapes (one fold, ``K x K`` blocks in and out),
    then possibly one whose map is one matrix per side on those blocks; each link after the
    first with one outside operand given as factors of one rank V; all of one dtype, no
    scale with gradients, fewer multiply-adds than the blocks'. None where that is not so."""
    maps: List[Tuple[List[Tensor], List[Tensor]]] = []
    last = None
    for k, (_, _, layer, _) in enumerate(links):
        if k and (len(factors[k]) != 1 or factors[k][0] is None):
            break
        chain = inner_map(layer)
        if chain is not None and (not maps or [m.shape for side in chain for m in side]
                                  == [m.shape for side in maps[0] for m in side]):
            maps.append(chain)
            continue
        chain = layer.kronecker_chain() if len(maps) >= 2 else None
        if chain is not None and all(len(side) == 1 for side in chain) \
                and (chain[0][0].shape[-1], chain[1][0].shape[-1]) == (maps[0][0][0].shape[-2], maps[0][1][0].shape[-2]):
            last = (chain[0][0], chain[1][0])
        break
    if len(maps) < 2:
        return None
    n = len(maps) + (last is not None)
    (la, ra), (lb, rb) = maps[0]
    ka, kb, r_a, r_b = la.shape[-2], lb.shape[-2], la.shape[-1], lb.shape[-1]
    later = [f[0] for f in factors[1:n]]
    rank = later[0].left.shape[-1]
    first_values = links[0][1]
    first_factors = factors[0]
    first_factored = all(f is not None for f in first_factors) and all(
        f.left.shape[1] == ka and f.right.shape[1] == kb for f in first_factors) and \
        math.prod(f.left.shape[-1] for f in first_factors) < min(ka, kb)
    if la.shape[0] != 1 or ra.shape[-1] != ka or rb.shape[-1] != kb \
            or any(f.left.shape[1:] != (ka, rank) or f.right.shape[1:] != (kb, rank) for f in later) \
            or (not first_factored and any(v is None or v.shape != (1, 1, ka * kb) for v, _ in first_values)):
        return None
    tensors = [*(m for chain in maps for side in chain for m in side), *(last or ()),
               *(t for f in [*later, *(first_factors if first_factored else ())] for t in (f.left, f.right)),
               *(() if first_factored else (v for v, _ in first_values))]
    scales = [*(f.s for f in later), *(f.s for f in first_factors if first_factored),
              *(() if first_factored else (s for _, s in first_values))]
    if any(t.dtype != tensors[0].dtype for t in tensors) or any(s.requires_grad for s in scales):
        return None
    blocks_macs = ka * kb + kron_chain_flops(*maps[0])
    inner_macs = rank * (r_a * ka * r_a + r_b * kb * r_b + r_a * r_a * r_b + r_a * r_b * r_b)
    return _InnerPlan(maps, last, first_factored) if inner_macs < blocks_macs else None


def _inner_chain(links: Sequence[Tuple[ChainLink, List[Scaled], object, bool]],
                 factors: Sequence[Sequence[Optional[OperandFactors]]], plan: _InnerPlan) -> Scaled:
    """The last output of the links :func:`_inner_links` took, through the inner units (see
    the module's docstring). The first link applies ``R`` on both sides of its product (on
    its factors where ``plan.first_factored``: ``(R Φ̃)(R' Ψ̃)ᵀ``, Φ̃ the row-wise products
    of its operands' factors); the last applies ``L`` on both sides, or, a one-matrix map
    ending the run, ``Σ_v (A diag(φ_v) L) M (B diag(ψ_v) L')ᵀ``; the output is normalised
    as a sum layer's is."""
    maps, n = plan.maps, len(plan.maps)
    (_, ra), (_, rb) = maps[0]
    if plan.first_factored:
        fs = factors[0]
        left = torch.bmm(ra, khatri_rao([_row(f.left, f.row) for f in fs]))  # (1, r_a, Π V)
        right = left if rb is ra and all(f.right is f.left for f in fs) else \
            torch.bmm(rb, khatri_rao([_row(f.right, f.row) for f in fs]))
        m = torch.bmm(left, right.transpose(-1, -2))[0]
        s = functools.reduce(torch.add, [_row(f.s, f.row) for f in fs])
    else:
        first = links[0][1]
        x = functools.reduce(torch.mul, [v for v, _ in first]).reshape(1, ra.shape[-1], rb.shape[-1])
        m = torch.bmm(torch.bmm(ra, x), rb.transpose(-1, -2))[0]  # the first link's inner block (r_a, r_b)
        s = functools.reduce(torch.add, [s for _, s in first])
    later = [f[0] for f in factors[1:n]]
    rows = [f.row for f in later]
    s = s + _rows([f.s for f in later], rows).sum(0, keepdim=True)
    rank = later[0].left.shape[-1]
    outer_a, outer_b = _stacked([c[0][1] for c in maps[1:]], [c[1][1] for c in maps[1:]])
    inner_a, inner_b = _stacked([c[0][0] for c in maps[:-1]], [c[1][0] for c in maps[:-1]])
    # P side by side (N, r, V·r): each link's sum over v is one product; Q per category. A
    # real square over one tensor of factors on both sides (conj(c)·c of a real c): Q is P
    p = _transfer_operators(outer_a, _rows([f.left for f in later], rows), inner_a)
    same = outer_b is outer_a and inner_b is inner_a and all(f.right is f.left for f in later)
    q = p if same else _transfer_operators(outer_b, _rows([f.right for f in later], rows), inner_b)
    m, log_divisor = _Transfer.apply(m, p, _per_category(q, rank))
    s = s + log_divisor
    (la, _), (lb, _) = maps[-1]
    if plan.last is None:
        y = torch.bmm(torch.bmm(la, m.unsqueeze(0)), lb.transpose(-1, -2))  # (1, Ka, Kb)
    else:
        f = factors[n][0]
        a, b = plan.last
        p_last = _per_category(_transfer_operators(a, _row(f.left, f.row), la), rank)[0]  # (V, a1, r_a)
        q_last = p_last if b is a and lb is la and f.right is f.left else \
            _per_category(_transfer_operators(b, _row(f.right, f.row), lb), rank)[0]
        y = torch.matmul(p_last, torch.matmul(m, q_last.transpose(-1, -2))).sum(0, keepdim=True)  # (1, a1, b1)
        s = s + _row(f.s, f.row)
    return normalise(y.reshape(1, 1, -1), s)


class _Transfer(torch.autograd.Function):
    """The recurrence ``M <- Σ_v P_v M Q_vᵀ / d`` of :func:`_inner_chain`, ``d`` the largest
    |entry| of the result (kept as a constant, as the rescaling does). m (r, r'), p (N, r,
    V·r) laid out by :func:`_transfer_operators`, q (N, V, r', r') -> the last M and the sum
    of the logs of the divisors (the first of them M's own peak). Two products per link each
    way; the operators' gradients as two batched products over all links after the loop. A
    peak below ``sqrt(tiny)`` (or not finite) raises :class:`~adapters.cirkit.scaling._Unmeasured`:
    the evaluation then runs the layers one by one, measuring every product."""

    # ctx-first forward, no setup_context (see _DeepChain)
    @staticmethod
    def forward(ctx, m: Tensor, p: Tensor, q: Tensor) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        # each M divided by its largest modulus, kept as a tensor: one read on the host (the
        # flush check) for the whole recurrence instead of one per link
        tops = [torch.linalg.vector_norm(m, math.inf)]
        m = m / tops[0]
        inputs, middles = [], []
        q_t = q.transpose(-1, -2)
        rank = q.shape[1]
        for k in range(p.shape[0]):
            inputs.append(m)
            t = torch.bmm(m.expand(rank, -1, -1), q_t[k]).view(-1, q.shape[-2])  # (V·r, r'): the M Q_vᵀ stacked
            middles.append(t)
            n = p[k] @ t
            tops.append(torch.linalg.vector_norm(n, math.inf))
            m = n / tops[-1]
        tops_t = torch.stack(tops)
        low, high = (float(v) for v in torch.aminmax(tops_t))
        if not (low >= _flush_limit(m.dtype) and math.isfinite(high)):
            raise _Unmeasured
        ctx.save_for_backward(p, q, torch.stack(inputs), torch.stack(middles), tops_t)
        log_divisor = tops_t.log().sum().to(m.real.dtype)
        ctx.mark_non_differentiable(log_divisor)
        return m, log_divisor

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_log: Optional[Tensor]):  # type: ignore[override]
        p, q, inputs, middles, tops = ctx.saved_tensors
        n, rank = p.shape[0], q.shape[1]
        q_conj = q.conj()
        inverse = tops.reciprocal()
        g = grad
        grads_out, grads_middle = [], []
        for k in reversed(range(n)):
            g = g * inverse[k + 1]  # the gradient of link k's sum P (M Qᵀ)
            grads_out.append(g)
            g_t = (p[k].mH @ g).view(rank, -1, g.shape[-1])  # per v, w.r.t. M Q_vᵀ
            grads_middle.append(g_t)
            g = torch.bmm(g_t, q_conj[k]).sum(0)  # w.r.t. the link's M
        g = g * inverse[0]
        grads_out.reverse()
        grads_middle.reverse()
        g_p = torch.stack(grads_out) @ middles.mH if ctx.needs_input_grad[1] else None
        g_q = torch.stack(grads_middle).transpose(-1, -2) @ inputs.conj().unsqueeze(1) if ctx.needs_input_grad[2] \
            else None
        return g, g_p, g_q
