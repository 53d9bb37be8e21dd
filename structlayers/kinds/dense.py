"""``dense``: the exact reference, one full (out, in) matrix per fold."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._checks import as_folded_factors, as_folded_weight, make_generator
from ..base import Order, StructuredSumLayer, owned_parameter, random_normal
from ..linalg.kron import kron_dense


class Dense(StructuredSumLayer, kind="dense"):
    """W[f] stored as is: ``weight`` of shape (F, out_features, in_features).

    Initialised like ``nn.Linear`` in variance (std 1/sqrt(3 in_features)).
    ``from_kronecker`` materialises A ⊗ B: this kind *is* the materialised baseline.
    """

    exact_from_kronecker = True
    exact_from_dense = True
    rank_meaning = "none: W is stored as is (no rank option)"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_folds: int = 1,
        *,
        dtype: Optional[torch.dtype] = None,
        device=None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(in_features, out_features, num_folds)
        gen = make_generator(seed, generator)
        std = 1.0 / math.sqrt(3 * self.in_features)
        shape = (self.num_folds, self.out_features, self.in_features)
        self.weight = nn.Parameter(random_normal(shape, std, dtype=dtype, device=device, generator=gen))

    def _structured_orders(self, batch_size: int):
        # W is stored: the GEMM is the only order (there is nothing to rebuild).
        out = batch_size * self.num_folds * self.out_features
        return (Order("GEMM", batch_size * self.dense_params, out, out),)

    def _forward_structured(self, order: Order, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.transpose(1, 2))

    def to_dense(self) -> torch.Tensor:
        return self.weight

    def _scaling(self):
        return [(self.weight, 1.0)]

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "Dense":
        w = as_folded_weight(weight).detach()
        f, out, inp = w.shape
        layer = cls._bare(inp, out, f)
        layer.weight = owned_parameter(w)
        return layer

    @classmethod
    def from_kronecker(cls, a: torch.Tensor, b: torch.Tensor) -> "Dense":
        a, b = as_folded_factors(a, b)
        return cls.from_dense(kron_dense(a.detach(), b.detach()))
