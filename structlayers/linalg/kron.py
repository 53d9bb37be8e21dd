"""Kronecker products applied, inspected and compared without materialising them.

Convention (the same as ``torch.kron``): for A of shape (a1, a2) and B of shape
(b1, b2), ``(A ⊗ B)[i*b1 + k, j*b2 + l] = A[i, j] * B[k, l]``. A vector x of
length a2*b2 is viewed row-major as X of shape (a2, b2); then
``(A ⊗ B) x`` is ``A @ X @ B^T`` flattened row-major. Every function takes
folded operands: a leading fold axis F on each factor.
"""

from __future__ import annotations

import functools
import math
from itertools import permutations
from typing import List, Optional, Sequence, Tuple

import torch

from .._checks import check_positive_int
from ..gradients import wanted_gradients

Chain = Sequence[torch.Tensor]


def kron_dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Materialise A ⊗ B per fold: (F, a1, a2), (F, b1, b2) -> (F, a1*b1, a2*b2).

    For references, tests and the rebuild order of layers whose W is small; every other
    path avoids it. Computed as a batched outer product (a matmul with inner dimension 1),
    so FLOP counters see its F*a1*a2*b1*b2 multiplications.
    """
    f, a1, a2 = a.shape
    _, b1, b2 = b.shape
    outer = torch.matmul(a.reshape(f, a1 * a2, 1), b.reshape(f, 1, b1 * b2))
    return outer.reshape(f, a1, a2, b1, b2).permute(0, 1, 3, 2, 4).reshape(f, a1 * b1, a2 * b2)


def _plan(a_chain: Chain, b_chain: Chain) -> Tuple[int, Tuple[str, ...]]:
    """Cheapest interleaving of the two chains' matrices; (multiply-adds per sample, order).

    Each chain is applied right to left; the A side acts on the first axis of the
    (p, q) block and the B side on the second. Shrinking both axes before
    expanding either matters for factored factors (e.g. low-rank A~ and B~).
    """
    return _plan_for_shapes(tuple(tuple(m.shape[-2:]) for m in a_chain),
                            tuple(tuple(m.shape[-2:]) for m in b_chain))


@functools.lru_cache(maxsize=256)
def _plan_for_shapes(a_shapes: Tuple[Tuple[int, int], ...],
                     b_shapes: Tuple[Tuple[int, int], ...]) -> Tuple[int, Tuple[str, ...]]:
    # Chains are short (1 or 2 matrices): every interleaving is tried, once per shape.
    # Among equally cheap orders, the one with fewest steps on the non-last axis wins:
    # those run as one small matmul per sample, the others as one GEMM over the batch.
    a_dims, b_dims = a_shapes[::-1], b_shapes[::-1]
    best: Tuple[Tuple[int, int], Tuple[str, ...]] = ((-1, 0), ())
    for order in sorted(set(permutations("a" * len(a_dims) + "b" * len(b_dims)))):
        p, q = a_dims[0][1], b_dims[0][1]
        ia = ib = cost = strided = 0
        swapped = False
        for side in order:
            if (side == "b") == swapped:
                strided, swapped = strided + 1, not swapped
            if side == "a":
                rows, cols = a_dims[ia]
                cost, p, ia = cost + rows * cols * q, rows, ia + 1
            else:
                rows, cols = b_dims[ib]
                cost, q, ib = cost + rows * cols * p, rows, ib + 1
        if best[0][0] < 0 or (cost, strided) < best[0]:
            best = ((cost, strided), order)
    return best[0][0], best[1]


def kron_steps(a_chain: Chain, b_chain: Chain) -> Tuple[Tuple[str, ...], List[torch.Tensor]]:
    """:func:`_plan`'s order (the side of each step) and the chains' matrices in the order
    they are applied (each chain right to left)."""
    order = _plan(a_chain, b_chain)[1]
    remaining = {"a": list(a_chain), "b": list(b_chain)}
    return order, [remaining[side].pop() for side in order]


def same_matrices(chain_a: Chain, chain_b: Chain) -> bool:
    """The two chains are the same tensors, matrix by matrix: one map on both sides (a tied
    real Kronecker term, whose consumers may then compute once)."""
    return len(chain_a) == len(chain_b) and all(a is b for a, b in zip(chain_a, chain_b))


def with_terms_axis(chain_a: Chain, chain_b: Chain) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """One-term chains of (F, ·, ·) matrices as (F, 1, ·, ·), the layout of
    ``kronecker_chains``; one list for both sides where they are the same matrices
    (:func:`same_matrices`), so that consumers see it is one."""
    with_axis = [m.unsqueeze(1) for m in chain_a]
    return with_axis, (with_axis if same_matrices(chain_a, chain_b) else [m.unsqueeze(1) for m in chain_b])


def kron_chain_flops(a_chain: Chain, b_chain: Chain) -> int:
    """Multiply-adds per sample of :func:`kron_apply` (its cheapest ordering)."""
    return _plan(a_chain, b_chain)[0]


def kron_apply(a_chain: Chain, b_chain: Chain, x: torch.Tensor, *, symmetric: bool = False) -> torch.Tensor:
    """Apply (A ⊗ B) to a folded batch without forming the product.

    ``a_chain`` and ``b_chain`` are sequences of folded matrices whose products
    are the factors: A = a_chain[0] @ a_chain[1] @ ... (each (F, m, n)); a plain
    factor is a chain of length one. x: (F, N, a2*b2) -> (F, N, a1*b1).
    The matrices are applied in the cheapest interleaving (see :func:`_plan`).

    Each sample is a (p, q) block. A matrix acting on the last axis is one large GEMM
    over the whole batch. One acting on the other axis multiplies each fold's samples by
    that fold's matrix, read in place (:func:`_first_axis`), where broadcasting it to every
    sample would copy ``N`` matrices per fold; a small matrix (below
    ``PER_FOLD_MIN_ELEMENTS`` entries) multiplies the transposed view instead, broadcast,
    that axis then last, and a single transpose at the end restores order.

    ``symmetric``: the caller knows every block of x is symmetric; where the map is
    ``A X Aᵀ`` with one real square matrix and one sample per fold, the backward then gets
    A's gradient from one product instead of two (:func:`block_chain_backward`). Values are
    unchanged; a wrong claim gives wrong gradients.
    """
    f, n, _ = x.shape
    a_out, b_out = a_chain[0].shape[-2], b_chain[0].shape[-2]
    if n == 1:
        return _kron_apply_one(a_chain, b_chain, x, symmetric)
    # a strided view (e.g. the real part of a complex tensor) would send matmul down a
    # per-sample loop: one copy is far cheaper
    x = x.contiguous()
    blocks = x.reshape(f, n, a_chain[-1].shape[-1], b_chain[-1].shape[-1])
    swapped = False  # False: axes are (A side, B side); True: (B side, A side)
    for side, m in zip(*kron_steps(a_chain, b_chain)):
        if (side == "b") != swapped:  # acting on the last axis
            rows = blocks.shape[2]
            blocks = torch.matmul(blocks.reshape(f, n * rows, blocks.shape[3]), m.transpose(-1, -2))
            blocks = blocks.reshape(f, n, rows, m.shape[-2])
        elif m.shape[-2] * m.shape[-1] >= PER_FOLD_MIN_ELEMENTS:
            blocks = _first_axis(m, blocks)
        else:
            blocks = torch.matmul(blocks.transpose(-1, -2), m.transpose(-1, -2).unsqueeze(1))
            swapped = not swapped
    if swapped:
        blocks = blocks.transpose(-1, -2)
    return blocks.reshape(f, n, a_out * b_out)


#: kron_apply: a matrix on the blocks' first axis with at least this many entries goes fold
#: by fold (one batched product per fold, the matrix read in place, no copies); smaller ones
#: are broadcast, the transposed blocks taking one large GEMM. Measured at 128 x 128 (64
#: folds, 32 samples): fold by fold 1.6x faster forward, 1.4x forward+backward; at 64 x 64
#: the two ways are within the noise of each other, one fold with many samples favouring
#: the broadcast's single GEMM and many folds with two samples the absence of a loop.
PER_FOLD_MIN_ELEMENTS = 16384


def _first_axis(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``m[f] @ blocks[f, s]`` for every fold and sample: m (F, r, p), blocks (F, N, p, q) ->
    (F, N, r, q), in the blocks' own layout. One batched product per fold over its samples,
    the fold's matrix expanded (a stride-0 view, never copied), each writing its place of one
    output; under autograd one node (:class:`_FirstAxis`) whose backward does the same."""
    if torch.is_grad_enabled() and (m.requires_grad or blocks.requires_grad):
        return _FirstAxis.apply(m, blocks)
    return _per_fold_products(m, blocks)


def _per_fold_products(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``m[f] @ blocks[f, s]``: m (F, r, p), blocks (F, N, p, q) -> (F, N, r, q), fold by fold
    into one output (of the promoted dtype: a real operand beside a complex one is converted)."""
    f, n = blocks.shape[:2]
    shape = (n, m.shape[-2], m.shape[-1])
    dtype = torch.promote_types(m.dtype, blocks.dtype)
    m, blocks = m.to(dtype), blocks.to(dtype)
    out = blocks.new_empty((f, n, m.shape[-2], blocks.shape[-1]))
    for i in range(f):
        torch.bmm(m[i].expand(shape), blocks[i], out=out[i])
    return out


def _as_dtype_of(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gradient for ``like``: its real part where ``like`` is real (torch's convention)."""
    return grad.real if grad.is_complex() and not like.is_complex() else grad


class _FirstAxis(torch.autograd.Function):
    """:func:`_first_axis` as one autograd node. Stacking the per-fold products copied the
    whole output once forward and once backward (unbind's gradient is a stack): at K=128, 64
    folds and 64 samples, two passes over 256 MiB in each call of a conditionals query. The
    backward writes ``m[f]ᴴ g[f, s]`` fold by fold into one tensor, and ``Σ_s g[f, s]
    blocks[f, s]ᴴ`` per fold (what autograd's expand gives)."""

    # ctx-first forward, no setup_context (see _KronChainOne)
    @staticmethod
    def forward(ctx, m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(m, blocks)
        return _per_fold_products(m, blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        m, blocks = ctx.saved_tensors
        grad_m = grad_blocks = None
        need_m, need_blocks = wanted_gradients(ctx, (0, 1))
        if need_blocks:
            grad_blocks = _as_dtype_of(_per_fold_products(m.conj().transpose(-1, -2), grad), blocks)
        if need_m:  # not in a query's derivative with respect to the values
            grad_m = torch.stack([torch.bmm(gi, bi.to(grad.dtype).conj().transpose(-1, -2)).sum(0)
                                  for gi, bi in zip(grad.unbind(0), blocks.unbind(0))])
            grad_m = _as_dtype_of(grad_m, m)
        return grad_m, grad_blocks


def _kron_apply_one(a_chain: Chain, b_chain: Chain, x: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """(A ⊗ B) x for one sample per fold, x (F, 1, a2·b2): ``A X Bᵀ`` with X the (a2, b2)
    block, the chains' matrices applied in :func:`_plan`'s order as batched products that
    need no copy (bmm reads transposed operands in place). One autograd node
    (:class:`_KronChainOne`); ``symmetric``: see :func:`kron_apply`."""
    order, mats = kron_steps(a_chain, b_chain)
    shape = (a_chain[-1].shape[-1], b_chain[-1].shape[-1])
    return _KronChainOne.apply(x, order, shape, symmetric, *mats)


def block_chain_forward(block: torch.Tensor, sides: Sequence[str],
                        mats: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``A X Bᵀ`` on blocks X (F, p, q) for A and B given as chains of matrices, applied as
    the steps ``T <- M T`` (side ``'a'``) or ``T <- T Mᵀ`` (side ``'b'``) of :func:`kron_steps`,
    each a batched product that needs no copy (bmm reads transposed operands in place).
    Returns the result (F, a1, b1) and the block each step was applied to, which
    :func:`block_chain_backward` needs."""
    inputs = []
    for side, m in zip(sides, mats):
        inputs.append(block)
        block = torch.bmm(m, block) if side == "a" else torch.bmm(block, m.transpose(-1, -2))
    return block, inputs


def symmetric_square(sides: Sequence[str], mats: Sequence[torch.Tensor]) -> bool:
    """The steps apply one real square matrix on both sides, ``A X Aᵀ`` (the same tensor twice):
    where X is symmetric, :func:`block_chain_backward` may take ``symmetric``."""
    return (len(mats) == 2 and set(sides) == {"a", "b"} and mats[0] is mats[1] and not mats[0].is_complex()
            and mats[0].shape[-1] == mats[0].shape[-2])


def symmetric_chain(sides: Sequence[str], mats: Sequence[torch.Tensor]) -> bool:
    """The steps apply one real thin chain ``A = L R`` on both sides, ``L R X Rᵀ Lᵀ``: R on both
    sides first (the same tensor twice), then L (likewise), L's inner units R's outputs. Where
    X is symmetric, :func:`block_chain_backward` may take ``symmetric``."""
    return (len(mats) == 4 and sides[0] != sides[1] and sides[2] != sides[3] and mats[0] is mats[1]
            and mats[2] is mats[3] and not mats[0].is_complex() and not mats[2].is_complex()
            and mats[2].shape[-1] == mats[0].shape[-2])


def block_chain_backward(grad: torch.Tensor, sides: Sequence[str], mats: Sequence[torch.Tensor],
                         inputs: Sequence[torch.Tensor], need_x: bool, need_m: Sequence[bool],
                         symmetric: bool = False) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
    """The backward of :func:`block_chain_forward`: the steps replayed in reverse on the saved
    blocks, two products per step. ``grad`` (F, a1, b1) -> the gradient w.r.t. the block
    (None unless ``need_x``) and w.r.t. each matrix (None where ``need_m`` is False).
    Gradients follow torch's convention for complex tensors (conjugate transposes).

    ``symmetric``: the map is ``A X Aᵀ`` with one real matrix (:func:`symmetric_square`) and
    every block X is symmetric. A's two gradients ``Gᵀ (A X) + (G A) Xᵀ`` are then one product,
    ``(G + Gᵀ)(A X)``, returned at the first matrix's place (the second gets None): three
    products instead of four. With one real chain ``L R`` on both sides (:func:`symmetric_chain`)
    the same holds for L and R, and the block's gradient is given as its symmetric part
    ``Aᵀ (G + Gᵀ) A / 2`` (X is symmetric, so nothing upstream can tell): the two
    ``K x K x r`` products of four (see :func:`_symmetric_chain_backward`)."""
    if symmetric and len(mats) == 4:
        return _symmetric_chain_backward(grad, sides, mats, inputs, need_x, need_m)
    if symmetric:
        return _symmetric_square_backward(grad, sides, mats, inputs, need_x, any(need_m))
    n = len(sides)
    g = grad
    grads: List[Optional[torch.Tensor]] = [None] * n
    for k in reversed(range(n)):
        block, m = inputs[k], mats[k]
        if sides[k] == "a":  # out = M T
            if need_m[k]:
                grads[k] = torch.bmm(g, block.mH)
            if need_x or any(need_m[:k]):
                g = torch.bmm(m.mH, g)
        else:  # out = T Mᵀ
            if need_m[k]:
                grads[k] = torch.bmm(g.transpose(-1, -2), block.conj())
            if need_x or any(need_m[:k]):
                g = torch.bmm(g, m.conj())
    return (g if need_x else None), grads


def _symmetric_square_backward(g: torch.Tensor, sides: Sequence[str], mats: Sequence[torch.Tensor],
                               inputs: Sequence[torch.Tensor], need_x: bool, need_a: bool
                               ) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
    """:func:`block_chain_backward` of ``Y = A X Aᵀ`` for symmetric X: with T the saved middle
    block (``A X`` or ``X Aᵀ``), A's gradient is ``(G + Gᵀ) A X``."""
    a, middle = mats[0], inputs[1]
    grad_a = g_x = None
    if need_a:
        both = g + g.transpose(-1, -2)
        grad_a = torch.bmm(both, middle if sides[0] == "a" else middle.transpose(-1, -2))
    if need_x:  # Aᵀ G A, in the forward's order reversed
        g_x = torch.bmm(a.transpose(-1, -2), torch.bmm(g, a)) if sides[0] == "a" else \
            torch.bmm(torch.bmm(a.transpose(-1, -2), g), a)
    return g_x, [grad_a, None]


#: :func:`_symmetric_chain_backward` multiplies G and Gᵀ by L apart where L (K x r) has
#: r <= K / THIN_CHAIN_RATIO. Measured (log Z forward+backward, low-rank squares, one process,
#: interleaved against G + Gᵀ formed first): r = K/8 gained 3-10 % (K=128, 256, 512); r = K/4
#: read -7 % to +4 %.
THIN_CHAIN_RATIO = 8


def _symmetric_chain_backward(g: torch.Tensor, sides: Sequence[str], mats: Sequence[torch.Tensor],
                              inputs: Sequence[torch.Tensor], need_x: bool, need_m: Sequence[bool]
                              ) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
    """:func:`block_chain_backward` of ``Y = L M Lᵀ``, ``M = R X Rᵀ`` for symmetric X (so M is
    symmetric too): with ``U = (G + Gᵀ) L = G L + Gᵀ L`` and ``S = Lᵀ U``, L's gradient is ``U M``, R's is
    ``S (R X)`` and the block's symmetric part ``Rᵀ S R / 2``; the gradients sit at each
    matrix's first place (the second gets None)."""
    r, lower = mats[0], mats[2]
    rx = inputs[1] if sides[0] == "a" else inputs[1].transpose(-1, -2)  # R X (X symmetric)
    if lower.shape[-1] * THIN_CHAIN_RATIO <= lower.shape[-2]:
        # two thin products accumulated: forming G + Gᵀ, a pass over three K x K blocks, cost
        # more than the second K x K x r product (continuous circuit, K=512, r=64: 48 ms a call)
        u = torch.bmm(g, lower).baddbmm_(g.transpose(-1, -2), lower)
    else:
        u = torch.bmm(g + g.transpose(-1, -2), lower)
    grads: List[Optional[torch.Tensor]] = [None] * 4
    if need_m[2] or need_m[3]:
        grads[2] = torch.bmm(u, inputs[2])
    s = torch.bmm(lower.transpose(-1, -2), u) if need_x or need_m[0] or need_m[1] else None
    if need_m[0] or need_m[1]:
        grads[0] = torch.bmm(s, rx)
    g_x = torch.bmm(r.transpose(-1, -2), torch.bmm(s, r).mul_(0.5)) if need_x else None  # halved on r x K, not K x K
    return g_x, grads


class _KronChainOne(torch.autograd.Function):
    """``A X Bᵀ`` on blocks of one sample per fold (:func:`block_chain_forward`) as one
    autograd node: the backward replays the steps on the saved blocks
    (:func:`block_chain_backward`) instead of differentiating the reshapes and transposes
    around each product one autograd node at a time (at K = 128 those nodes cost as much as
    the products)."""

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, x: torch.Tensor, sides: Tuple[str, ...], shape: Tuple[int, int],  # type: ignore[override]
                symmetric: bool, *mats: torch.Tensor) -> torch.Tensor:
        block, inputs = block_chain_forward(x.reshape(x.shape[0], *shape), sides, mats)
        ctx.save_for_backward(*inputs, *mats)
        ctx.sides, ctx.x_shape, ctx.out_shape = sides, x.shape, block.shape
        ctx.symmetric = symmetric and (symmetric_square(sides, mats) or symmetric_chain(sides, mats))
        return block.reshape(x.shape[0], 1, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        n = len(ctx.sides)
        saved = ctx.saved_tensors
        # the tensors are x (argument 0) and the matrices (4 on); a query's pass wants x's only
        wanted = wanted_gradients(ctx, (0, *range(4, 4 + n)))
        g, grads = block_chain_backward(grad.reshape(ctx.out_shape), ctx.sides, saved[n:], saved[:n],
                                        wanted[0], wanted[4:], ctx.symmetric)
        return (g.reshape(ctx.x_shape) if g is not None else None, None, None, None, *grads)


def kron_sum_apply(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_t (A_t ⊗ B_t) x in two GEMMs, the sum over t inside the second one.

    a: (F, r, a1, a2), b: (F, r, b1, b2), x: (F, N, a2*b2) -> (F, N, a1*b1). Each sample
    is an (a2, b2) block X and the result sum_t A_t X B_t^T. The first GEMM applies all
    r factors of one side at once (stacked as r*rows x cols, x is never copied per term);
    the second contracts the term and inner axes together. The side applied first is the
    cheaper one: r*N*a2*b1*(b2 + a1) multiply-adds (B first) or r*N*a1*b2*(a2 + b1)
    (A first), the same count as r separate Kronecker applies.
    """
    f, r, a1, a2 = a.shape
    _, _, b1, b2 = b.shape
    n = x.shape[1]
    x = x.contiguous()
    if a2 * b1 * (b2 + a1) <= a1 * b2 * (a2 + b1):  # B first, on the last axis of X
        z = torch.matmul(x.reshape(f, n * a2, b2), b.reshape(f, r * b1, b2).transpose(-1, -2))
        z = z.reshape(f, n, a2, r, b1).permute(0, 1, 4, 3, 2).reshape(f, n * b1, r * a2)  # [n, j, (t, k)]
        y = torch.matmul(z, a.permute(0, 2, 1, 3).reshape(f, a1, r * a2).transpose(-1, -2))  # [n, j, i]
        return y.reshape(f, n, b1, a1).transpose(-1, -2).reshape(f, n, a1 * b1)
    xt = x.reshape(f, n, a2, b2).transpose(-1, -2).reshape(f, n * b2, a2)  # A acts on X's first axis
    z = torch.matmul(xt, a.reshape(f, r * a1, a2).transpose(-1, -2))
    z = z.reshape(f, n, b2, r, a1).permute(0, 1, 4, 3, 2).reshape(f, n * a1, r * b2)  # [n, i, (t, l)]
    y = torch.matmul(z, b.permute(0, 2, 1, 3).reshape(f, b1, r * b2).transpose(-1, -2))  # [n, i, j]
    return y.reshape(f, n, a1 * b1)


class _RowwiseKron(torch.autograd.Function):
    """Row-wise Kronecker product of two factors, (..., V) and (..., W) -> (..., V·W).

    Autograd's backward of the broadcast product writes a product of the incoming gradient
    with the other factor at full size (..., V, W) and then reduces it, once per side. Here
    each side's gradient is one batched matrix-vector product on the gradient read in
    place: measured (32 folds, 256 rows, V = W = 17, 2 threads) forward+backward 4.3 -> 1.9 ms.
    """

    # ctx-first forward, no setup_context: Function.apply binds a setup_context-style
    # forward's arguments through inspect.signature on every call (~20 µs)
    @staticmethod
    def forward(ctx, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(u, w)
        return (u.unsqueeze(-1) * w.unsqueeze(-2)).flatten(start_dim=-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        u, w = ctx.saved_tensors
        if u.is_complex() or w.is_complex():  # the gradient of a holomorphic product: conj of the other factor
            u, w = u.conj(), w.conj()
        g = grad.unflatten(-1, (u.shape[-1], w.shape[-1]))  # (..., V, W)
        dtype = torch.promote_types(grad.dtype, torch.promote_types(u.dtype, w.dtype))
        g = g.to(dtype)
        grad_u = torch.matmul(g, w.to(dtype).unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[0] else None
        grad_w = torch.matmul(u.to(dtype).unsqueeze(-2), g).squeeze(-2) if ctx.needs_input_grad[1] else None
        # a real factor's gradient is the real part (as autograd's own product gives it)
        return tuple(None if d is None else _as_dtype_of(d, t) for d, t in ((grad_u, u), (grad_w, w)))


def khatri_rao(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row-wise Kronecker (Khatri-Rao) products of factors of equal leading shape,
    (..., K, V_i) -> (..., K, Π V_i), the last part's index running fastest: the factor of
    a Hadamard product of the blocks ``left_i @ right_iᵀ``. Differentiable, with a backward
    that never forms the product of the gradient with the other factor (:class:`_RowwiseKron`).
    """
    if not parts:
        raise ValueError("khatri_rao: parts must hold at least one factor")
    shapes = [tuple(p.shape[:-1]) for p in parts]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(f"khatri_rao: the parts' leading shapes must be equal; got {shapes}")
    return functools.reduce(_RowwiseKron.apply, parts)


def kron_columns(a: torch.Tensor, b: torch.Tensor, cols_a: torch.Tensor, cols_b: torch.Tensor) -> torch.Tensor:
    """Columns (j, l) of A ⊗ B, i.e. A[:, j] ⊗ B[:, l], for index tensors of shape (F, c).

    Returns (F, a1*b1, c).
    """
    f, a1, _ = a.shape
    b1 = b.shape[1]
    ca = torch.gather(a, 2, cols_a[:, None, :].expand(f, a1, -1))  # (F, a1, c)
    cb = torch.gather(b, 2, cols_b[:, None, :].expand(f, b1, -1))  # (F, b1, c)
    # column j of A ⊗ B is the Kronecker product of two columns: a row-wise product of the transposes
    return khatri_rao([ca.transpose(1, 2), cb.transpose(1, 2)]).transpose(1, 2)


def kron_rows(a: torch.Tensor, b: torch.Tensor, rows_a: torch.Tensor, rows_b: torch.Tensor) -> torch.Tensor:
    """Rows (i, k) of A ⊗ B for index tensors of shape (F, r); returns (F, r, a2*b2)."""
    return kron_columns(a.transpose(1, 2), b.transpose(1, 2), rows_a, rows_b).transpose(1, 2)


def kron_frobenius_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||A ⊗ B||_F^2 per fold = ||A||^2 ||B||^2, shape (F,)."""
    return frobenius_sq(a) * frobenius_sq(b)


def frobenius_sq(m: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm over the last two axes, real, shape (F,)."""
    return (m.abs() ** 2).sum(dim=(-2, -1)) if m.is_complex() else (m * m).sum(dim=(-2, -1))


def inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product <X, Y> = sum(conj(X) * Y) over the last two axes, shape (F,)."""
    return (x.conj() * y).sum(dim=(-2, -1))


def kron_inner_lowrank(a: torch.Tensor, b: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """<A ⊗ B, left @ right> per fold without forming either matrix.

    left: (F, a1*b1, r), right: (F, r, a2*b2). Cost O(r) Kronecker applies.
    """
    # <W, L R> = trace(W^H L R) = sum_{i,k} (W^H L)[i, k] R[k, i]
    wh_left = kron_apply([a.conj().transpose(1, 2)], [b.conj().transpose(1, 2)], left.transpose(1, 2))
    # wh_left: (F, r, in) holds (W^H L)^T
    return (wh_left * right).sum(dim=(-2, -1))


def lowrank_frobenius_sq(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """||left @ right||_F^2 per fold from the two small Gram matrices, shape (F,)."""
    gram_left = left.conj().transpose(1, 2) @ left  # (F, r, r)
    gram_right = right @ right.conj().transpose(1, 2)  # (F, r, r)
    return (gram_left * gram_right.transpose(1, 2)).sum(dim=(-2, -1)).real


# ------------------------------------------------------------ factor shapes
FactorShapes = Tuple[Tuple[int, int], Tuple[int, int]]


def sqrt_divisor(n: int) -> int:
    """The largest divisor of n that is at most sqrt(n) (1 for a prime)."""
    return max(k for k in range(1, math.isqrt(n) + 1) if n % k == 0)


def balanced_factor_shapes(out_features: int, in_features: int) -> FactorShapes:
    """((a1, a2), (b1, b2)) with a1*b1 = out, a2*b2 = in and each a the largest divisor <= sqrt."""
    a1, a2 = sqrt_divisor(out_features), sqrt_divisor(in_features)
    return (a1, a2), (out_features // a1, in_features // a2)


def check_factor_shapes(shapes: object, out_features: int, in_features: int) -> FactorShapes:
    """Validate ``((a1, a2), (b1, b2))`` against the layer shape (a1*b1 = out, a2*b2 = in)."""
    try:
        (a1, a2), (b1, b2) = shapes  # type: ignore[misc]
        dims = [check_positive_int(d, "factor_shapes entry") for d in (a1, a2, b1, b2)]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"factor_shapes must be ((a1, a2), (b1, b2)) of positive ints, got {shapes!r}") from exc
    a1, a2, b1, b2 = dims
    if a1 * b1 != out_features or a2 * b2 != in_features:
        raise ValueError(
            f"factor_shapes {shapes!r} give a {a1 * b1} x {a2 * b2} product, but the layer "
            f"is {out_features} x {in_features} (need a1*b1 = out and a2*b2 = in)"
        )
    return (a1, a2), (b1, b2)
