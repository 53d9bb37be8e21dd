"""Approximation quality: relative Frobenius error ||W - layer||_F / ||W||_F per kind and rank.

Lower is better, as asv assumes for every ``track_`` benchmark, so a rise is
reported as a regression. Errors are computed by the layers' own reports
(``relative_error_kronecker`` without forming W, ``relative_error`` against the
dense W), in double precision; exact kinds sit at float32 rounding (~1e-7).
``track_num_params`` records the size bought with that error.
"""

from . import _common as common


class _Quality:
    unit = "relative error"

    def track_relative_error(self, cache, kind, rank, size):
        return self.relative_error(cache, size)

    def track_num_params(self, cache, kind, rank, size):
        return self.layer.num_params

    track_num_params.unit = "parameters"


class KroneckerInput(_Quality, common.KroneckerCase):
    """Layers from ``structlayers.from_kronecker``; size is K (W is K^2 x K^2)."""


class DenseInput(_Quality, common.DenseCase):
    """Layers from ``structlayers.from_dense``; size is n (W is n x n)."""
