"""Time of one forward and of one forward + backward, every kind x rank x size.

Two inputs: folded Kronecker weights W[f] = A[f] ⊗ B[f] (A, B with decaying
spectra; ``dense`` materialises W, ``kronecker`` stores A and B: the two exact
baselines) and plain dense weights W (``dense`` is the baseline, ``kronecker``
there is the nearest sum of ``rank`` Kronecker products). Input x is
(F=2, B=256, in_features), float32. The meaning of ``rank`` per kind is in
``_common.kronecker_options`` / ``_common.dense_options``; combinations a kind
cannot build, and ranks for exact kinds, are skipped (n/a).
"""

from . import _common as common


class _Timings:
    # asv times one call per sample here (a benchmark with a setup gets number=1).
    # Per process (2 rounds = 2 processes): at least 1 sample, up to 20, stopping
    # after 5 s; fast calls get 40 samples in all, a 1-second call about 10.
    repeat = (1, 20, 5.0)

    def time_forward(self, cache, kind, rank, size):
        common.forward(self.layer, self.x)

    def time_forward_backward(self, cache, kind, rank, size):
        common.forward_backward(self.layer, self.x_grad, self.grad_inputs)


class KroneckerInput(_Timings, common.KroneckerCase):
    """Layers from ``structlayers.from_kronecker``; size is K (W is K^2 x K^2)."""


class DenseInput(_Timings, common.DenseCase):
    """Layers from ``structlayers.from_dense``; size is n (W is n x n)."""
